"Paired statistics: McNemar, bootstrap and seed intervals against values known in closed form, and on hand-made run folders."
import json
from pathlib import PurePath

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2

from fracture_fastai.errors import UserError
from fracture_fastai.stats import (bootstrap_ci, group_table, mcnemar_test, paired_by_option, paired_comparison,
                                   format_paired, seed_ci, seed_groups)


def test_mcnemar_exact_for_few_discordant_pairs():
    a = np.array([True] * 10 + [False] * 5)  # A right on the first 10; B right on all 15: 5 discordant, all for B
    r = mcnemar_test(a, np.ones(15, bool))
    assert (r["only_a"], r["only_b"], r["exact"]) == (0, 5, True)
    assert r["pvalue"] == pytest.approx(2 * 0.5 ** 5)  # two-sided exact binomial: P(X = 0 or 5 | n=5, p=1/2)


def test_mcnemar_chi_square_with_continuity_correction_for_many():
    a = np.r_[np.ones(30, bool), np.zeros(10, bool), np.ones(50, bool)]
    b = np.r_[np.zeros(30, bool), np.ones(10, bool), np.ones(50, bool)]
    r = mcnemar_test(a, b)
    assert (r["only_a"], r["only_b"], r["exact"], r["n"]) == (30, 10, False, 90)
    assert r["pvalue"] == pytest.approx(chi2.sf((abs(30 - 10) - 1) ** 2 / 40, 1))


def test_mcnemar_without_disagreement_is_p_one():
    assert mcnemar_test([True, False], [True, False])["pvalue"] == 1.0


def test_bootstrap_ci_brackets_the_mean_and_collapses_on_constant_data():
    rng = np.random.default_rng(0)
    d = rng.choice([-1.0, 0.0, 1.0], size=400, p=[0.1, 0.6, 0.3])  # mean 0.2, sd ~0.6: se ~0.03
    low, high = bootstrap_ci([d], np.mean)
    assert low < d.mean() < high and 0.08 < high - low < 0.16  # about ±1.96 se
    assert bootstrap_ci([np.zeros(10)], np.mean) == (0.0, 0.0)
    assert bootstrap_ci([d], np.mean) == (low, high)  # seeded: the same data, the same interval


def test_seed_ci_is_students_t_clipped_to_0_1():
    mean, low, high = seed_ci([0.80, 0.90])
    assert mean == pytest.approx(0.85)
    assert low == pytest.approx(0.85 - 12.7062 * 0.05, abs=1e-3) and high == 1.0  # t(0.975, 1 df) = 12.706
    assert np.isnan(seed_ci([0.8])[1])


def _fake_run(root, name, correct, seed, no_clahe=False, arch="cnn", files=None, labels=("a", "b")):
    "A finished run folder with config.json, metrics.json and predictions.csv: image i right where correct[i]."
    run = root / name
    run.mkdir(parents=True)
    n = len(correct)
    files = files or [f"/data/img_{i:03d}.png" for i in range(n)]
    label = [labels[i % 2] for i in range(n)]
    pred = [lab if ok else labels[1 - labels.index(lab)] for lab, ok in zip(label, correct)]
    p_b = [(0.8 if p == "b" else 0.2) for p in pred]
    pd.DataFrame({"file": files, "split": "valid", "label": label, "predicted": pred,
                  "prob_a": [1 - p for p in p_b], "prob_b": p_b}).to_csv(run / "predictions.csv", index=False)
    opts = {"arch": arch, "no_clahe": no_clahe, "seed": seed, "out": str(run), "size": 32, "data": None}
    (run / "config.json").write_text(json.dumps({"options": opts, "data": {"path": "demo"}, "status": "done"}))
    (run / "metrics.json").write_text(json.dumps({"valid": {"accuracy": float(np.mean(correct)), "n": n}}))
    return run


@pytest.fixture
def clahe_runs(tmp_path):
    "2 configurations x 2 seeds on the same 20 images: with CLAHE right on 15 and 16, without it on 12 and 12."
    root = tmp_path / "sweep"
    right = lambda k: [i < k for i in range(20)]  # noqa: E731
    _fake_run(root, "clahe_42", right(15), 42)
    _fake_run(root, "clahe_43", right(16), 43)
    _fake_run(root, "none_42", right(12), 42, no_clahe=True)
    _fake_run(root, "none_43", right(12), 43, no_clahe=True)
    return root


def test_seed_groups_and_their_table(clahe_runs):
    runs = sorted(clahe_runs.iterdir())
    groups = seed_groups(runs)
    assert [[r.name for r in members] for _, members in groups] == [["clahe_42", "clahe_43"], ["none_42", "none_43"]]
    table = group_table(runs)
    assert list(table.no_clahe) == [False, True] and list(table.seeds) == [2, 2]
    assert table.valid_accuracy_mean.tolist() == pytest.approx([0.775, 0.6])
    assert table.per_seed.tolist() == ["0.750 0.800", "0.600 0.600"]


def test_paired_comparison_pairs_by_seed(clahe_runs):
    a = [clahe_runs / "none_42", clahe_runs / "none_43"]
    b = [clahe_runs / "clahe_43", clahe_runs / "clahe_42"]  # order does not matter: paired by seed
    c = paired_comparison(a, b)
    assert c["accuracy_diff"] == pytest.approx(0.775 - 0.6)
    low, high = c["accuracy_diff_ci95"]
    assert 0 < low < 0.175 < high
    assert [(p["seed"], p["only_b"], p["only_a"]) for p in c["per_seed"]] == [(42, 3, 0), (43, 4, 0)]
    assert c["same_images_across_seeds"] and c["images"] == [20, 20]
    # binary: the AUROC difference too; the fake scores are 0.8/0.2 for the predicted class, so AUROC = balanced accuracy
    assert c["auroc_a"] == pytest.approx(0.6) and c["auroc_b"] == pytest.approx(0.775)
    assert all(np.isfinite(c["auroc_diff_ci95"])) and c["auroc_diff_ci95"][0] <= c["auroc_diff"] <= c["auroc_diff_ci95"][1]
    text = format_paired(c)
    assert "+0.175" in text and "seed 42: 3 right only with clahe_42..." in text


def test_paired_by_option_finds_the_one_option_that_differs(clahe_runs):
    [c] = paired_by_option(sorted(clahe_runs.iterdir()))
    assert (c["option"], c["a"], c["b"]) == ("no_clahe", False, True)
    assert c["accuracy_diff"] == pytest.approx(0.6 - 0.775)
    with pytest.raises(UserError, match="no two configurations differ only in 'arch'.*no_clahe"):
        paired_by_option(sorted(clahe_runs.iterdir()), option="arch")


def test_a_runs_last_epoch_is_paired_with_the_kept_one_not_grouped_as_a_seed(tmp_path):
    kept = _fake_run(tmp_path, "run", [i < 15 for i in range(20)], 42)
    last = _fake_run(kept, "last_epoch", [i < 13 for i in range(20)], 42)
    config = json.loads((last / "config.json").read_text())
    config["options"]["epoch"] = "last"  # as run --keep-last writes it
    (last / "config.json").write_text(json.dumps(config))
    assert [[r.name for r in members] for _, members in seed_groups([kept, last])] == [["run"], ["last_epoch"]]
    assert list(group_table([kept, last]).epoch) == ["kept", "last"]  # the run's own epoch named, not missing
    [c] = paired_by_option([kept, last])
    assert (c["option"], c["a"], c["b"]) == ("epoch", "kept", "last")
    assert c["accuracy_diff"] == pytest.approx(0.65 - 0.75)


def test_runs_on_different_images_are_not_paired(tmp_path):
    a = _fake_run(tmp_path, "a", [True] * 4, 42)
    b = _fake_run(tmp_path, "b", [True] * 4, 42, no_clahe=True, files=[f"/other/{i}.png" for i in range(4)])
    with pytest.raises(UserError, match="scored different valid images"):
        paired_comparison([a], [b])


def test_compare_cli_paired(clahe_runs, capsys):
    from fracture_fastai.compare import main
    main([str(clahe_runs), "--no-timing", "--paired", str(clahe_runs / "none_42"), str(clahe_runs / "clahe_42")])
    out = capsys.readouterr().out
    assert "Configurations over seeds" in out and "clahe_42 vs none_42, valid, 20 images" in out
    assert "difference +0.150" in out
    with pytest.raises(SystemExit) as e:
        main([str(clahe_runs), "--no-timing", "--paired", "arch"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: no two configurations differ only in 'arch'; options that vary here: no_clahe"]
    # Folders that each hold one configuration's seeds: named by those folders, not by their first runs.
    for name, runs in (("plain", ["none_42", "none_43"]), ("clahe", ["clahe_42", "clahe_43"])):
        (clahe_runs.parent / name).mkdir()
        for r in runs: (clahe_runs / r).rename(clahe_runs.parent / name / r)
    main([str(clahe_runs.parent / "clahe"), "--no-timing", "--paired", str(clahe_runs.parent / "plain"),
          str(clahe_runs.parent / "clahe")])
    out = capsys.readouterr().out
    assert "clahe vs plain, valid, 20 images x 2 seed(s):" in out and "seed 43: 4 right only with clahe, 0 only with plain" in out


def _prob_run(root, name, labels, probs, classes=("a", "b", "c")):
    "A run folder holding only predictions.csv: `probs` rows (one per image) for `labels`."
    run = root / name
    run.mkdir()
    probs = np.asarray(probs, float)
    df = pd.DataFrame({"file": [f"/d/{i}.png" for i in range(len(labels))], "split": "valid", "label": labels,
                       "predicted": [classes[i] for i in probs.argmax(1)]})
    for j, c in enumerate(classes): df[f"prob_{c}"] = probs[:, j]
    df.to_csv(run / "predictions.csv", index=False)
    return run


def test_the_ensemble_of_runs_scores_their_mean_probabilities(tmp_path):
    from fracture_fastai.stats import ensemble_accuracy
    labels = ["a", "b", "c", "a"]
    # Run 1 gets images 0, 1 right; run 2 gets 0, 2 right; averaged: 0, 1, 2 right (image 1: 0.55 vs 0.45 for b).
    r1 = _prob_run(tmp_path, "r1", labels, [[.9, .1, 0], [.1, .8, .1], [.6, 0, .4], [0, .9, .1]])
    r2 = _prob_run(tmp_path, "r2", labels, [[.9, .1, 0], [.6, .3, .1], [0, .1, .9], [0, .9, .1]])
    assert ensemble_accuracy([r1]) == 0.5 and ensemble_accuracy([r2]) == 0.5
    assert ensemble_accuracy([r1, r2]) == 0.75


def test_ensemble_binary_refuses_what_is_not_one_binary_ensemble(tmp_path):
    from fracture_fastai.errors import UserError
    from fracture_fastai.stats import ensemble_binary
    labels = ["a", "b", "a", "b"]
    two = [_prob_run(tmp_path, f"r{i}", labels, [[.9, .1], [.2, .8], [.6, .4], [.3, .7]], classes=("a", "b")) for i in (1, 2)]
    three = [_prob_run(tmp_path, f"c{i}", labels, [[.9, .1, 0]] * 4) for i in (1, 2)]
    with pytest.raises(UserError, match="at least two runs"): ensemble_binary(two[:1])
    with pytest.raises(UserError, match="two-class runs"): ensemble_binary(three)
    other = _prob_run(tmp_path, "other", labels[:3], [[.9, .1], [.2, .8], [.6, .4]], classes=("a", "b"))
    with pytest.raises(UserError, match="scored other valid images"): ensemble_binary([two[0], other])
    result = ensemble_binary(two, operating_point="youden")  # no test split in these runs: valid only
    assert result["valid"]["auroc"] == 1.0 and "test" not in result and result["threshold"] == result["valid"]["threshold"]


def test_suspect_labels_lists_confident_disagreement_of_every_run(tmp_path):
    from fracture_fastai.stats import suspect_labels
    labels = ["a", "b", "c", "a"]
    # Image 1 (b): both runs say c with p(b) <= 0.05: suspect. Image 2 (c): both wrong, but p(c) 0.3 on average: not
    # confident. Image 3 (a): one run right: not suspect.
    r1 = _prob_run(tmp_path, "r1", labels, [[.9, .1, 0], [0, .05, .95], [.7, 0, .3], [.1, .9, 0]])
    r2 = _prob_run(tmp_path, "r2", labels, [[.9, .1, 0], [.1, .03, .87], [.7, 0, .3], [.9, .1, 0]])
    s = suspect_labels([r1, r2])
    assert s.file.tolist() == ["/d/1.png"] and s.called.tolist() == ["c"] and s.p_label[0] == pytest.approx(0.04)
    assert len(suspect_labels([r1, r2], max_label_prob=0.5)) == 2  # image 2 joins when the bar is loosened
    r3 = _prob_run(tmp_path, "r3", labels[:3], [[1, 0, 0]] * 3)
    with pytest.raises(UserError, match="other valid images"):
        suspect_labels([r1, r3])


def test_runs_given_the_data_by_another_path_pair_up(tmp_path):
    "A run given ../shared/data/x and one given /work/shared/data/x (or x/data.yaml) scored the same images."
    from fracture_fastai.stats import ensemble_accuracy, suspect_labels
    right = [i < 15 for i in range(20)]
    names = [f"val/images/img_{i:03d}.png" for i in range(20)]
    for name, data in (("rel", "../shared/data/x"), ("abs", "/work/shared/data/x"), ("yaml", "/elsewhere/x/data.yaml")):
        root = str(PurePath(data).parent) if data.endswith(".yaml") else data
        run = _fake_run(tmp_path, name, right, 42, files=[f"{root}/{n}" for n in names])
        config = json.loads((run / "config.json").read_text())
        config["data"] = {"path": data, "synthetic_demo": False}
        (run / "config.json").write_text(json.dumps(config))
    c = paired_comparison([tmp_path / "rel"], [tmp_path / "abs"])
    assert c["images"] == [20] and c["accuracy_diff"] == 0
    assert paired_comparison([tmp_path / "rel"], [tmp_path / "yaml"])["images"] == [20]
    assert ensemble_accuracy([tmp_path / "rel", tmp_path / "abs", tmp_path / "yaml"]) == 0.75
    # The file a person reviews is the path the first run wrote.
    suspects = suspect_labels([tmp_path / "rel", tmp_path / "abs"], max_label_prob=0.5)
    assert len(suspects) == 5 and all(f.startswith("../shared/data/x/val/images/") for f in suspects.file)
