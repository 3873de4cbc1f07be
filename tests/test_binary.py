"Binary-test metrics on synthetic scores whose right answers are known analytically."
import math

import numpy as np
import pytest

from fracture_fastai.binary import (auroc_ci, binary_metrics, binary_plots, choose_threshold, evaluate_binary,
                                    expected_calibration_error, parse_operating_point, positive_class)
from fracture_fastai.errors import UserError
from fracture_fastai.evaluate import accuracy_ci


def test_positive_class_found_given_and_checked():
    assert positive_class(["fractured", "normal"]) == "fractured"
    assert positive_class(["Negative", "Positive"]) == "Positive"
    assert positive_class(["cat", "dog"]) == "dog"  # no finding word: the last class
    assert positive_class(["fractured", "normal"], "normal") == "normal"
    with pytest.raises(UserError, match="not a class"):
        positive_class(["fractured", "normal"], "broken")
    with pytest.raises(UserError, match="binary"):
        positive_class(["a", "b", "c"])


@pytest.mark.parametrize("text,parsed", [("youden", ("youden", None)), ("sens=0.90", ("sens", 0.9)), ("SPEC=0.8", ("spec", 0.8))])
def test_parse_operating_point(text, parsed):
    assert parse_operating_point(text) == parsed


@pytest.mark.parametrize("bad", ["sens", "spec=1.5", "sens=0", "youdenx", "ppv=0.9"])
def test_parse_operating_point_rejects(bad):
    with pytest.raises(UserError, match="operating point"):
        parse_operating_point(bad)


def test_perfect_separation():
    y, s = [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]
    t = choose_threshold(y, s)
    assert t == pytest.approx(0.8)  # the highest threshold with sensitivity + specificity - 1 = 1
    m = binary_metrics(y, s, t, n_boot=200)
    assert m["auroc"] == 1 and m["average_precision"] == 1 and m["auroc_ci95"] == [1.0, 1.0]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 0, 2, 0)
    assert m["sensitivity"] == m["specificity"] == m["ppv"] == m["npv"] == 1


def test_auroc_counts_ordered_pairs_and_ap():
    # pairs (positive, negative) ranked right: 0.4 > 0.1, 0.9 > 0.1, 0.9 > 0.6; wrong: 0.4 < 0.6 -> 3/4
    y, s = [0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]
    m = binary_metrics(y, s, 0.5, n_boot=0)
    assert m["auroc"] == pytest.approx(0.75)
    # ranked 0.9 (P), 0.6 (N), 0.4 (P): precision 1 at recall 1/2, 2/3 at recall 1 -> AP = 0.5 * 1 + 0.5 * 2/3
    assert m["average_precision"] == pytest.approx(0.5 + 1 / 3)
    assert m["auroc_ci95"] is None


def test_rates_and_wilson_intervals_at_the_threshold():
    # 10 positives, 8 scored above 0.5; 20 negatives, 15 below -> sens 0.8, spec 0.75, PPV 8/13, NPV 15/17
    y = np.r_[np.ones(10), np.zeros(20)]
    s = np.r_[np.full(8, 0.9), np.full(2, 0.2), np.full(15, 0.1), np.full(5, 0.7)]
    m = binary_metrics(y, s, 0.5, n_boot=0)
    assert m["sensitivity"] == 0.8 and m["specificity"] == 0.75
    assert m["ppv"] == pytest.approx(8 / 13) and m["npv"] == pytest.approx(15 / 17)
    assert m["sensitivity_ci95"] == list(accuracy_ci(8, 10)) and m["npv_ci95"] == list(accuracy_ci(15, 17))
    assert m["accuracy"] == pytest.approx(23 / 30) and m["baseline_accuracy"] == pytest.approx(20 / 30)
    assert m["prevalence"] == pytest.approx(1 / 3)


def test_ppv_undefined_without_positive_calls():
    m = binary_metrics([0, 1, 0], [0.1, 0.2, 0.3], threshold=0.9, n_boot=0)
    assert m["ppv"] is None and m["ppv_ci95"] is None and m["sensitivity"] == 0


def test_brier_and_ece_analytic():
    assert binary_metrics([1, 0], [0.8, 0.3], 0.5, n_boot=0)["brier"] == pytest.approx((0.2 ** 2 + 0.3 ** 2) / 2)
    y = np.r_[np.ones(7), np.zeros(3)]
    assert expected_calibration_error(y, np.full(10, 0.7)) == pytest.approx(0)  # 70 % said, 70 % observed
    assert expected_calibration_error(np.r_[np.ones(5), np.zeros(5)], np.full(10, 0.9)) == pytest.approx(0.4)
    # two bins, each half the images: gaps |1 - 0.95| and |0 - 0.15| -> 0.5 * 0.05 + 0.5 * 0.15
    assert expected_calibration_error([1, 1, 0, 0], [0.95, 0.95, 0.15, 0.15]) == pytest.approx(0.1)


def test_operating_points_meet_their_target():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200), np.zeros(800)].astype(int)
    s = np.r_[rng.normal(1.5, 1, 200), rng.normal(0, 1, 800)]
    s = 1 / (1 + np.exp(-s))
    for rule, key, target in (("sens=0.90", "sensitivity", 0.9), ("spec=0.90", "specificity", 0.9)):
        t = choose_threshold(y, s, rule)
        m = binary_metrics(y, s, t, n_boot=0)
        assert m[key] >= target
        # the next score beyond the threshold no longer meets it: the threshold is the extreme one that does
        other = np.sort(s[s > t])[0] if key == "sensitivity" else np.sort(s[s < t])[-1]
        assert binary_metrics(y, s, other, n_boot=0)[key] < target
    t = choose_threshold(y, s, "youden")
    j = lambda thr: sum(binary_metrics(y, s, thr, n_boot=0)[k] for k in ("sensitivity", "specificity")) - 1
    assert all(j(t) >= j(u) - 1e-12 for u in np.quantile(s, np.linspace(0.01, 0.99, 50)))


def test_auroc_ci_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(1)
    def data(n):
        y = np.r_[np.ones(n), np.zeros(n)]
        return y, 1 / (1 + np.exp(-np.r_[rng.normal(1, 1, n), rng.normal(0, 1, n)]))  # probabilities, same ranks
    (y1, s1), (y2, s2) = data(40), data(1000)
    lo1, hi1 = auroc_ci(y1, s1, n_boot=500)
    lo2, hi2 = auroc_ci(y2, s2, n_boot=500)
    assert lo1 < binary_metrics(y1, s1, 0.5, n_boot=0)["auroc"] < hi1
    assert hi2 - lo2 < (hi1 - lo1) / 3  # width ~ 1/sqrt(n): 25x the images, about a fifth of the width
    # Hanley & McNeil's standard error of an AUROC A with n images per class: the interval is about 2 * 1.96 of it
    a, n = 0.5 * (1 + math.erf(0.5)), 1000  # the binormal AUROC of a unit shift, Phi(1/sqrt(2)) = 0.760
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    assert hi2 - lo2 == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert auroc_ci(y1, s1, n_boot=500) == (lo1, hi1)  # seeded


def test_evaluate_binary_subgroups_and_given_threshold():
    classes = ["fractured", "normal"]
    targets = np.array([0, 0, 1, 1, 0, 1])  # index 0 = fractured
    p_frac = np.array([0.9, 0.4, 0.2, 0.6, 0.7, 0.1])
    probs = np.c_[p_frac, 1 - p_frac]
    m = evaluate_binary(targets, probs, classes, threshold=0.5,
                        subgroups={"body_part": ["hand", "hand", "hand", "leg", "leg", "leg"]})
    assert m["positive"] == "fractured" and m["negative"] == "normal" and m["threshold"] == 0.5
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 2)
    hand, leg = m["subgroups"]["body_part"]["hand"], m["subgroups"]["body_part"]["leg"]
    assert (hand["n"], hand["n_positive"], hand["sensitivity"], hand["specificity"]) == (3, 2, 0.5, 1.0)
    assert (leg["n"], leg["n_positive"], leg["sensitivity"], leg["specificity"]) == (3, 1, 1.0, 0.5)
    chosen = evaluate_binary(targets, probs, classes, operating_point="youden")
    assert chosen["threshold"] == pytest.approx(0.7) and chosen["operating_point"] == "youden"


def test_binary_plots_written(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(40)]
    s = np.clip(np.r_[rng.normal(0.7, 0.2, 20), rng.normal(0.3, 0.2, 40)], 0, 1)
    paths = binary_plots({"valid": (y, s), "test": (y[::-1], s)}, 0.5, tmp_path, positive="fractured")
    assert [p.name for p in paths] == ["roc.png", "pr.png", "calibration.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_auroc_ci_resamples_score_as_sklearn():
    "Each resample's AUROC (pair multiplicities times the pair table) is sklearn's AUROC of that resample, ties included."
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.ones(5), np.zeros(7)]
    s = np.array([0.9, 0.5, 0.5, 0.3, 0.8, 0.5, 0.1, 0.2, 0.5, 0.4, 0.9, 0.05])
    # one resample, made by hand with the generator auroc_ci uses, then scored by sklearn
    rng = np.random.default_rng(7)
    pos, neg = s[:5][rng.integers(0, 5, 5)], s[5:][rng.integers(0, 7, 7)]
    expected = roc_auc_score(np.r_[np.ones(5), np.zeros(7)], np.r_[pos, neg])
    low, high = auroc_ci(y, s, n_boot=1, seed=7)
    assert low == pytest.approx(expected) and high == pytest.approx(expected)
