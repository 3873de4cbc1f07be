"""The metrics of a binary test (fracture or not): AUROC with its CI, average precision, sensitivity, specificity,
PPV and NPV at an operating threshold, calibration, subgroups, and the ROC / PR / reliability plots.

`evaluate.evaluate_learner` calls it whenever a model has two classes; curves and scores come from scikit-learn.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import UserError
from .evaluate import _save, accuracy_ci, plt

__all__ = ["POSITIVE_NAMES", "SUBGROUP_COLUMNS", "OPERATING_POINT_HELP", "positive_class", "parse_operating_point",
           "choose_threshold", "auroc_ci", "expected_calibration_error", "binary_metrics", "evaluate_binary",
           "binary_plots"]

# Class names that are the finding a binary test looks for, in order of preference: found without --positive.
POSITIVE_NAMES = ("fractured", "fracture", "positive", "abnormal")
# Table columns (where a source has them) that the subgroup table splits the scores by.
SUBGROUP_COLUMNS = ("body_part", "hardware")
OPERATING_POINT_HELP = "youden (max sensitivity + specificity - 1), sens=0.90 or spec=0.90"
N_BOOT = 2000  # bootstrap resamples of the AUROC's interval: its ends then vary by ~0.005 between seeds
ECE_BINS = 10


def positive_class(
    classes,  # the model's two class names (e.g. `dls.vocab`)
    positive: str | None = None,  # the class that is the finding; None: one of POSITIVE_NAMES, else the last class
) -> str:
    "The positive class of a binary model; a `UserError` when `positive` is not one of `classes`."
    classes = [str(c) for c in classes]
    if len(classes) != 2:
        raise UserError(f"a positive class needs a binary model (two classes); this one has {len(classes)}: "
                        f"{', '.join(classes)}")
    if positive is not None:
        if positive not in classes:
            raise UserError(f"--positive {positive!r} is not a class of the data; pass one of: {', '.join(classes)}")
        return positive
    for name in POSITIVE_NAMES:
        if name in (c.lower() for c in classes):
            return next(c for c in classes if c.lower() == name)
    return classes[-1]


def parse_operating_point(text: str) -> tuple:
    "`('youden', None)`, `('sens', 0.9)` or `('spec', 0.9)` from 'youden', 'sens=0.90', 'spec=0.90'; `UserError` else."
    text = str(text).strip().lower()
    if text == "youden": return ("youden", None)
    m = re.fullmatch(r"(sens|spec)=([0-9.]+)", text)
    try:
        value = float(m.group(2)) if m else None
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise UserError(f"operating point must be {OPERATING_POINT_HELP} (a share in (0, 1]); got {text!r}")
    return (m.group(1), value)


def _binary_arrays(y_true, score) -> tuple:
    y = np.asarray(y_true.detach().cpu() if hasattr(y_true, "detach") else y_true).reshape(-1).astype(int)
    s = np.asarray(score.detach().cpu() if hasattr(score, "detach") else score, dtype=float).reshape(-1)
    if len(y) != len(s): raise ValueError(f"y_true and score differ in length: {len(y)} != {len(s)}")
    if len(y) == 0: raise ValueError("no samples to score")
    if not set(np.unique(y)) <= {0, 1}: raise ValueError("y_true must hold 0 (negative) and 1 (positive)")
    return y, s


def _both_classes(y) -> bool: return 0 < int(y.sum()) < len(y)


def choose_threshold(
    y_true,  # 1 for the positive class, 0 for the negative (e.g. of the validation split)
    score,  # probability of the positive class
    operating_point: str = "youden",  # 'youden', 'sens=0.90' (the highest threshold reaching it) or 'spec=0.90'
) -> float:
    "The threshold (positive where score >= it) that meets `operating_point` on these data, from sklearn's ROC curve."
    from sklearn.metrics import roc_curve
    kind, target = parse_operating_point(operating_point)
    y, s = _binary_arrays(y_true, score)
    if not _both_classes(y):
        raise UserError("choosing an operating threshold needs both classes among the images it is chosen on")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)  # thresholds decreasing; the first is +inf
    if kind == "youden":
        i = int(np.argmax(np.round(tpr - fpr, 12)))  # ties (to rounding): the highest threshold, the fewest false positives
    elif kind == "sens":
        i = int(np.flatnonzero(tpr >= target - 1e-12)[0])  # the best specificity that keeps the sensitivity
    else:
        i = int(np.flatnonzero(fpr <= 1 - target + 1e-12)[-1])  # the best sensitivity that keeps the specificity
    # +inf (call nothing positive) as the highest probability there is: JSON has no infinity.
    return float(min(thresholds[i], np.nextafter(1.0, 2.0)))


def auroc_ci(
    y_true,  # 1 positive, 0 negative
    score,  # probability of the positive class
    n_boot: int = N_BOOT,  # bootstrap resamples
    level: float = 0.95,  # confidence level
    seed: int = 0,  # the same data always get the same interval
) -> tuple:
    "Percentile interval of the AUROC over bootstrap resamples drawn within each class (so each has both classes)."
    y, s = _binary_arrays(y_true, score)
    if not _both_classes(y): return (None, None)
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    # The AUROC is the share of (positive, negative) pairs ranked right, ties half (Mann-Whitney; sklearn's value):
    # with `right` scoring every pair once, a resample's AUROC is its pairs' multiplicities times `right`, so all
    # resamples are a few matrix products instead of thousands of roc_auc_score calls (9 s for 2000 on 2 cores).
    right = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    aucs = np.empty(n_boot)
    for start in range(0, n_boot, 250):  # in blocks: (250, n_neg) floats at a time
        k = min(250, n_boot - start)
        count_pos = np.stack([np.bincount(rng.integers(0, len(pos), len(pos)), minlength=len(pos)) for _ in range(k)])
        count_neg = np.stack([np.bincount(rng.integers(0, len(neg), len(neg)), minlength=len(neg)) for _ in range(k)])
        aucs[start:start + k] = ((count_pos @ right) * count_neg).sum(1) / (len(pos) * len(neg))
    low, high = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def expected_calibration_error(
    y_true,  # 1 positive, 0 negative
    score,  # predicted probability of the positive class
    n_bins: int = ECE_BINS,  # equal-width probability bins, as sklearn's calibration_curve makes them
) -> float:
    "ECE: the image-weighted mean gap between the observed positive rate and the mean predicted probability per bin."
    y, s = _binary_arrays(y_true, score)
    # The bins of sklearn.calibration.calibration_curve(strategy='uniform'), so the ECE matches the reliability plot.
    bins = np.linspace(0.0, 1.0 + 1e-8, n_bins + 1)
    ids = np.searchsorted(bins[1:-1], s)
    gaps = [abs(y[ids == b].mean() - s[ids == b].mean()) * (ids == b).sum() for b in range(n_bins) if (ids == b).any()]
    return float(sum(gaps) / len(y))


def _rate(k: int, n: int) -> tuple:
    "`(k / n, Wilson 95 % interval)`; `(None, None)` when n is 0 (e.g. PPV with no positive call)."
    return (k / n, list(accuracy_ci(k, n))) if n else (None, None)


def binary_metrics(
    y_true,  # 1 positive, 0 negative
    score,  # probability of the positive class
    threshold: float,  # positive call where score >= threshold
    subgroups: dict | None = None,  # {column: one value per image}, e.g. {'body_part': [...]}: a table per column
    n_boot: int = N_BOOT,  # bootstrap resamples for the AUROC's interval (0: no interval)
) -> dict:
    "AUROC [CI], AP, sensitivity/specificity/PPV/NPV [Wilson CIs] at `threshold`, accuracy vs all-negative, Brier, ECE."
    from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score
    y, s = _binary_arrays(y_true, score)
    call = (s >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, call, labels=[0, 1]).ravel())
    both = _both_classes(y)
    out = {"n": int(len(y)), "n_positive": int(y.sum()), "prevalence": float(y.mean()), "threshold": float(threshold),
           "auroc": float(roc_auc_score(y, s)) if both else None,
           "auroc_ci95": list(auroc_ci(y, s, n_boot)) if both and n_boot else None,
           "auroc_ci95_method": f"bootstrap within each class, {n_boot} resamples, percentile",
           "average_precision": float(average_precision_score(y, s)) if y.any() else None,
           "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        out[name], out[f"{name}_ci95"] = _rate(k, n)
    out["accuracy"], out["accuracy_ci95"] = _rate(tp + tn, len(y))
    out["baseline_accuracy"] = float(1 - y.mean())  # calling every image negative: what accuracy alone has to beat
    out["brier"] = float(brier_score_loss(y, s, pos_label=1))
    out["ece"], out["ece_bins"] = expected_calibration_error(y, s), ECE_BINS
    if subgroups:
        out["subgroups"] = {col: _subgroup_table(y, s, call, np.asarray(values).astype(str))
                            for col, values in subgroups.items()}
    return out


def _subgroup_table(y, s, call, values) -> dict:
    "{value: n, positives, AUROC, sensitivity and specificity [Wilson CIs]} for each value of one column."
    from sklearn.metrics import roc_auc_score
    table = {}
    for value in sorted(set(values)):
        m = values == value
        yv, cv = y[m], call[m]
        row = {"n": int(m.sum()), "n_positive": int(yv.sum()),
               "auroc": float(roc_auc_score(yv, s[m])) if _both_classes(yv) else None}
        row["sensitivity"], row["sensitivity_ci95"] = _rate(int((cv & yv).sum()), int(yv.sum()))
        row["specificity"], row["specificity_ci95"] = _rate(int(((1 - cv) & (1 - yv)).sum()), int((1 - yv).sum()))
        table[value] = row
    return table


def evaluate_binary(
    targets,  # class indices of the images
    probs,  # (n, 2) class probabilities
    classes,  # the two class names in index order
    positive: str | None = None,  # the positive class; None: `positive_class(classes)`
    threshold: float | None = None,  # decision threshold on the positive probability; None: chosen here
    operating_point: str = "youden",  # how to choose it where `threshold` is None
    subgroups: dict | None = None,  # {column: one value per image} for the subgroup table
) -> dict:
    "`binary_metrics` of a two-class model's output, with the positive class and where its threshold came from."
    classes = [str(c) for c in classes]
    positive = positive_class(classes, positive)
    i = classes.index(positive)
    probs = np.asarray(probs.detach().cpu() if hasattr(probs, "detach") else probs, dtype=float)
    y = (np.asarray(targets.detach().cpu() if hasattr(targets, "detach") else targets).reshape(-1) == i).astype(int)
    score = probs[:, i]
    chosen = threshold is None
    if chosen:
        threshold = choose_threshold(y, score, operating_point) if _both_classes(y) else 0.5
    out = binary_metrics(y, score, threshold, subgroups)
    return {"positive": positive, "negative": classes[1 - i],
            "operating_point": operating_point if chosen and _both_classes(y) else None,
            "threshold_source": ("chosen on these images" if _both_classes(y) else "0.5: these images lack a class")
            if chosen else "given", **out}


def _operating_marker(ax, x, y, threshold, label: bool):
    "Circle the operating point on the curve just drawn; the threshold written once (it is the same for every split)."
    ax.plot([x], [y], "o", ms=8, mfc="none", mew=2, color=ax.lines[-1].get_color())
    if label: ax.annotate(f"threshold {threshold:.2f}", (x, y), textcoords="offset points", xytext=(8, -14), fontsize=8)


def binary_plots(
    curves: dict,  # {split name: (y_true 0/1, positive probability)}, e.g. {'valid': ..., 'test': ...}
    threshold: float,  # the operating threshold, marked on the ROC and PR curves
    out_dir,  # folder for roc.png, pr.png and calibration.png
    positive: str = "positive",  # the positive class's name, for the titles
) -> list:
    "ROC, precision-recall and reliability diagram (with a histogram of the probabilities), one curve per split."
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay, confusion_matrix
    out_dir = Path(out_dir)
    curves = {k: _binary_arrays(*v) for k, v in curves.items() if _both_classes(_binary_arrays(*v)[0])}
    paths = []
    if not curves: return paths
    fig, ax = plt.subplots(figsize=(5, 5))
    for k, (split, (y, s)) in enumerate(curves.items()):
        RocCurveDisplay.from_predictions(y, s, ax=ax, name=split)
        tn, fp, fn, tp = confusion_matrix(y, (s >= threshold).astype(int), labels=[0, 1]).ravel()
        _operating_marker(ax, fp / (fp + tn), tp / (tp + fn), threshold, label=k == 0)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.set(title=f"ROC: {positive} (circle: operating point)", xlabel="1 - specificity", ylabel="sensitivity")
    ax.legend(loc="lower right")
    paths.append(_save(out_dir / "roc.png"))
    fig, ax = plt.subplots(figsize=(5, 5))
    for k, (split, (y, s)) in enumerate(curves.items()):
        PrecisionRecallDisplay.from_predictions(y, s, ax=ax, name=split)
        tn, fp, fn, tp = confusion_matrix(y, (s >= threshold).astype(int), labels=[0, 1]).ravel()
        if tp + fp: _operating_marker(ax, tp / (tp + fn), tp / (tp + fp), threshold, label=k == 0)
        ax.axhline(y.mean(), ls=":", color=ax.lines[-1].get_color(), lw=1)  # a test that calls at random: prevalence
    ax.set(title=f"Precision-recall: {positive} (dotted: prevalence)", xlabel="sensitivity (recall)", ylabel="PPV (precision)",
           ylim=(0, 1.02))
    ax.legend(loc="lower left")
    paths.append(_save(out_dir / "pr.png"))
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for split, (y, s) in curves.items():
        CalibrationDisplay.from_predictions(y, s, n_bins=ECE_BINS, ax=ax, name=f"{split} (ECE {expected_calibration_error(y, s):.3f})")
        hist.hist(s, bins=np.linspace(0, 1, ECE_BINS + 1), histtype="step", lw=1.5, label=split)
    ax.set(title=f"Reliability: predicted vs observed {positive} rate", xlabel="", ylabel="observed share positive")
    hist.set(xlabel=f"predicted probability of {positive}", ylabel="images")
    hist.legend(fontsize=8)
    paths.append(_save(out_dir / "calibration.png"))
    return paths
