"""Metrics with confidence intervals, interpretation plots and test-set evaluation of a trained Learner.

Everything returned is plain JSON-serialisable Python, so a run folder can store it as is.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from statistics import NormalDist

import matplotlib
import numpy as np

from .errors import UserError
from .files import save_figure, write_json  # noqa: F401  (write_json: re-exported, its old home)
from .model_io import TTA  # model.json saves it: its home is the light module the ONNX path imports

# Plots go to files, never to a screen; a Jupyter kernel keeps its own (inline) backend.
if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["TTA", "predict_probs", "accuracy_ci", "classification_metrics", "evaluate_learner", "interpretation", "plot_confusion_matrix",
           "plot_top_losses", "interpretation_plots", "plot_curves", "write_json", "prediction_table", "write_predictions"]


def accuracy_ci(
    n_correct: int,  # correctly classified images
    n: int,  # images scored
    level: float = 0.95,  # confidence level of the interval
) -> tuple:
    "Wilson score interval `(low, high)` of the accuracy `n_correct / n`; `(0.0, 1.0)` when `n == 0`."
    # Wilson rather than the normal approximation p ± z·sqrt(p(1-p)/n): on small test sets (the seed's 83 images)
    # and accuracies near 1 the normal interval spills past [0, 1] and collapses to a point at p = 0 or 1;
    # Wilson stays inside [0, 1], keeps a sensible width there, and has closed-form values to test against.
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1; got {level}")
    if n < 0 or not 0 <= n_correct <= max(n, 0):
        raise ValueError(f"need 0 <= n_correct <= n; got n_correct={n_correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, z2 = n_correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Analytically 0/n has low exactly 0 and n/n high exactly 1; set them so rounding leaves no 3e-18.
    low = 0.0 if n_correct == 0 else max(0.0, centre - half)
    high = 1.0 if n_correct == n else min(1.0, centre + half)
    return float(low), float(high)


def _as_int_array(x, name: str) -> np.ndarray:
    "`x` (list, numpy array or torch tensor) as a flat int64 numpy array."
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x).reshape(-1)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold class indices (ints); got dtype {a.dtype}")
    return a.astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    "num / den with 0 where den == 0 (a class never predicted has precision 0, never present has recall 0)."
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def classification_metrics(
    targets,  # actual class indices (list, numpy array or torch tensor)
    preds,  # predicted class indices, same length
    classes,  # class names in index order (e.g. `learn.dls.vocab`)
) -> dict:
    "Accuracy with its Wilson 95% interval, macro F1, per-class precision/recall/F1 and the confusion matrix."
    classes = [str(c) for c in classes]
    t, p = _as_int_array(targets, "targets"), _as_int_array(preds, "preds")
    if len(t) != len(p):
        raise ValueError(f"targets and preds differ in length: {len(t)} != {len(p)}")
    if len(t) == 0:
        raise ValueError("no samples to score: targets and preds are empty")
    k = len(classes)
    for name, a in (("targets", t), ("preds", p)):
        if a.min() < 0 or a.max() >= k:
            raise ValueError(f"{name} hold class indices outside 0..{k - 1} for {k} classes")
    cm = np.zeros((k, k), dtype=np.int64)  # rows = actual, cols = predicted
    np.add.at(cm, (t, p), 1)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    # Macro F1 over the classes that occur in targets or preds (sklearn's default): a class absent from both
    # has no defined F1 and would only drag the mean to 0.
    seen = (support + predicted) > 0
    n_correct = int(tp.sum())
    return {
        "n": int(len(t)),
        "accuracy": n_correct / len(t),
        "accuracy_ci95": list(accuracy_ci(n_correct, len(t))),
        "macro_f1": float(f1[seen].mean()),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "classes": classes,
    }


def _labelled_dl(learn, dl=None):
    "`dl`, or the validation DataLoader of `learn`, checked to hold labelled items."
    dl = learn.dls.valid if dl is None else dl
    if len(dl.dataset) == 0:
        raise UserError("no images to evaluate: the DataLoader is empty (is there a validation or test split?)")
    tls = getattr(dl.dataset, "tls", None)  # a fastai Datasets: inputs first, then targets
    if tls is not None and len(tls) <= dl.dataset.n_inp:
        raise UserError("the DataLoader has no labels; make it with learn.dls.test_dl(items, with_labels=True)")
    return dl


TTA_SEED = 0  # fastai's tta draws random augmentations: seeded, the same model always gets the same score


@contextmanager
def _seeded(seed: int):
    "Seed Python's, NumPy's and torch's generators inside the block; their states outside it are left as they were."
    import random
    import torch
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
        try: yield
        finally: random.setstate(py); np.random.set_state(np_state)


def _without_identity_warps(dl):
    "`dl` without the affine augmentations, which outside training warp by the identity: 0.2 ms an image for nothing."
    from fastai.vision.augment import AffineCoordTfm
    tfms = getattr(dl, "after_batch", None)
    if tfms is None or getattr(dl.dataset, "split_idx", None) == 0: return dl
    # One with an output size of its own resizes too: that one stays.
    keep = [t for t in tfms.fs if not (isinstance(t, AffineCoordTfm) and t.size is None)]
    return dl if len(keep) == len(tfms.fs) else dl.new(after_batch=keep)


def _input_batches(dl):
    "The batches of `dl`; made without fastai's per-item dispatch (~1 ms an image) where a `RadiographLoader` is all the items need."
    import torch
    from fastai.torch_core import TensorImage, to_device
    from .transforms import RadiographLoader
    tls = getattr(dl.dataset, "tls", None)
    type_tfms = tls[0].tfms.fs if tls is not None and len(tls) == 1 else []  # unlabelled file items only
    item_tfms = [t for t in dl.after_item.fs if type(t).__name__ != "ToTensor"]  # ToTensor passes tensors through
    if len(type_tfms) != 1 or not isinstance(type_tfms[0], RadiographLoader) or item_tfms:
        yield from dl
        return
    loader, files = type_tfms[0], tls[0].items
    dl.after_batch.split_idx = dl.dataset.split_idx  # what iterating `dl` would set
    for start in range(0, len(files), dl.bs):
        xb = TensorImage(torch.stack([loader.encodes(f) for f in files[start:start + dl.bs]]))
        yield dl.after_batch((to_device(xb, dl.device),))


def predict_probs(
    learn,  # a Learner for single-label classification
    dl,  # a DataLoader of its inputs, labelled or not
    tta: str = "none",  # 'none', 'flip' (each image and its mirror) or 'aug' (fastai's `learn.tta`)
) -> tuple:
    """`(probs, targets)`: class probabilities of every item of `dl` (targets None when it has no labels), in order;
    computed by `learn.model` with its batch norms folded into its convolutions (`models.fold_batchnorm`)."""
    import torch
    if tta not in TTA: raise UserError(f"tta must be one of {', '.join(TTA)}; got {tta!r}")
    if tta == "aug":
        import fastai.callback.progress  # noqa: F401  (Learner.no_bar, for a Learner that did not come through load_export)
        with learn.no_logging(), learn.no_bar(), _seeded(TTA_SEED):
            return learn.tta(dl=dl)
    from .models import fold_batchnorm
    activation = getattr(learn.loss_func, "activation", None) or (lambda o: o.softmax(dim=-1))
    dl = _without_identity_warps(dl)
    model, fold = learn.model.eval(), True
    probs, targets = [], []
    # A plain loop, not get_preds: no callbacks, recorder or loss to run. Making the next batch in a second thread
    # while the model runs was measured slower on 2 cores (60 vs 67 img/s at 192 px): the model needs both.
    with torch.no_grad():
        for xb, *yb in _input_batches(dl):
            # As a plain tensor: a fastai TensorImage sends every op of the network through its __torch_function__,
            # measured 25 % slower.
            xb = xb.as_subclass(torch.Tensor)
            if fold:  # the same function with a memory pass less per batch norm: 1.3x the images/s of lite0 on 2 cores
                model, fold = fold_batchnorm(model, xb[:1])[0], False
            p = activation(model(xb)).float()
            if tta == "flip": p = (p + activation(model(xb.flip(-1))).float()) / 2
            probs.append(p)
            targets += yb[:1]
    if not probs: return torch.zeros(0, learn.dls.c), None
    return torch.cat(probs), (torch.cat(targets) if targets else None)


def evaluate_learner(
    learn,  # a trained fastai Learner for single-label classification
    dl=None,  # a labelled DataLoader (e.g. `learn.dls.test_dl(items, with_labels=True)`); None: the validation set
    tta="none",  # test-time augmentation: 'flip' (image and mirror, 2 passes), 'aug' (fastai's `learn.tta`, 5), 'none'
    positive: str | None = None,  # two classes: the positive one; None: found from its name (`binary.positive_class`)
    threshold: float | None = None,  # two classes: the decision threshold; None: chosen on `dl` by `operating_point`
    operating_point: str = "youden",  # two classes: 'youden', 'sens=0.90' or 'spec=0.90'
) -> tuple:
    """`(metrics, probs, targets)`: `classification_metrics` plus `loss` and `tta` (and, for two classes, `binary`: the
    metrics of a binary test from `binary.evaluate_binary`), and the class probabilities."""
    tta = {True: "aug", False: "none", None: "none"}.get(tta, tta)
    if tta not in TTA: raise UserError(f"tta must be one of {', '.join(TTA)}; got {tta!r}")
    dl = _labelled_dl(learn, dl)
    loss = None
    if tta == "none":
        probs, targets, losses = learn.get_preds(dl=dl, with_loss=True)
        loss = float(losses.mean())
    else:  # averaged probabilities: the loss function's value on them is not defined
        probs, targets = predict_probs(learn, dl, tta)
    metrics = classification_metrics(targets, probs.argmax(dim=1), learn.dls.vocab)
    metrics.update(loss=loss, tta=tta)
    if len(learn.dls.vocab) == 2:  # a binary test: the numbers a reader of a diagnostic test looks for
        from .binary import SUBGROUP_COLUMNS, evaluate_binary
        items = getattr(dl, "items", None)
        columns = [c for c in SUBGROUP_COLUMNS if hasattr(items, "columns") and c in items.columns]
        metrics["binary"] = evaluate_binary(targets, probs, learn.dls.vocab, positive, threshold, operating_point,
                                            subgroups={c: items[c].to_numpy() for c in columns})
    return metrics, probs, targets


def interpretation(
    learn,  # a trained fastai Learner for classification
    dl=None,  # a labelled DataLoader; None: the validation set
    probs=None,  # the class probabilities of `dl`'s images in its order, already evaluated (`evaluate_learner`): no pass
    targets=None,  # their labels, with `probs`
):
    """fastai's `ClassificationInterpretation` of `learn` on `dl`: the losses are computed once, here, or, given the
    evaluated `probs` and `targets`, taken from them (the negative log of each label's probability, as its metrics
    scored it) with no pass over the data at all."""
    from fastai.interpret import ClassificationInterpretation
    dl = _labelled_dl(learn, dl)
    if (probs is None) != (targets is None): raise ValueError("give both probs and targets, or neither")
    if probs is not None:
        return _evaluated_interpretation()(learn, dl.new(shuffle=False, drop_last=False), probs, targets)
    if dl is learn.dls.valid:
        dl = None  # fastai then makes an unshuffled copy of the validation set itself
    return ClassificationInterpretation.from_learner(learn, dl=dl)


@cache  # one class, made on first use: fastai is imported then, not with this module
def _evaluated_interpretation():
    from fastai.interpret import ClassificationInterpretation
    import torch

    class Evaluated(ClassificationInterpretation):
        "A `ClassificationInterpretation` of probabilities already evaluated: its losses and confusion matrix need no pass."
        def __init__(self, learn, dl, probs, targets):
            if len(probs) != len(dl.dataset) or len(targets) != len(probs):
                raise ValueError(f"{len(probs)} probabilities and {len(targets)} labels for {len(dl.dataset)} images")
            self.probs, self.targs = probs.float(), targets.long()
            losses = -torch.log(self.probs.gather(1, self.targs[:, None])[:, 0].clamp_min(1e-12))
            super().__init__(learn, dl, losses)

        def confusion_matrix(self):
            x = torch.arange(len(self.vocab))
            d, t = self.probs.argmax(1), self.targs
            return ((d == x[:, None]) & (t == x[:, None, None])).long().sum(2).numpy()
    return Evaluated


def _save(path) -> Path:
    "Save pyplot's current figure to `path` (a PNG), tightly cropped, and close it."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.gcf()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _save_confusion(interp, path) -> Path:
    "Confusion matrix (rows actual, columns predicted) of `interp` as a PNG."
    n = len(interp.vocab)
    # fastai's plot functions draw on pyplot's current figure and return nothing.
    interp.plot_confusion_matrix(figsize=(max(4, n), max(4, n)), dpi=100)
    return _save(path)


def _save_top_losses(interp, path, k: int = 9) -> Path:
    "The `k` images with the largest loss (titled prediction/actual/loss/probability) as a PNG."
    k = min(k, len(interp.losses))
    rows = max(1, int(math.sqrt(k)))  # the grid fastai's get_grid makes; wider cells keep long titles apart
    cols = math.ceil(k / rows)
    interp.plot_top_losses(k, figsize=(3.6 * cols, 3.4 * rows))
    return _save(path)


def plot_confusion_matrix(
    learn,  # a trained fastai Learner for classification
    path,  # PNG to write
    dl=None,  # a labelled DataLoader; None: the validation set
) -> Path:
    "Save fastai's confusion matrix of `learn` on `dl` to `path`."
    return _save_confusion(interpretation(learn, dl), path)


def plot_top_losses(
    learn,  # a trained fastai Learner for classification
    path,  # PNG to write
    k: int = 9,  # images to show
    dl=None,  # a labelled DataLoader; None: the validation set
) -> Path:
    "Save fastai's top-losses grid of `learn` on `dl` to `path`."
    return _save_top_losses(interpretation(learn, dl), path, k)


def interpretation_plots(
    learn,  # a trained fastai Learner for classification
    out_dir,  # folder for confusion_matrix.png and top_losses.png
    dl=None,  # a labelled DataLoader; None: the validation set
    k: int = 9,  # images in the top-losses grid
    prefix: str = "",  # put before each file name, e.g. 'test_'
    probs=None,  # `dl`'s class probabilities and labels as evaluated (`evaluate_learner`): no pass over the data
    targets=None,
) -> list:
    "Write the confusion matrix and the top losses of `learn` on `dl` from one interpretation; their paths."
    interp = interpretation(learn, dl, probs, targets)
    out_dir = Path(out_dir)
    return [_save_confusion(interp, out_dir / f"{prefix}confusion_matrix.png"),
            _save_top_losses(interp, out_dir / f"{prefix}top_losses.png", k)]


def plot_curves(
    history,  # pandas DataFrame with columns epoch, train_loss, valid_loss[, accuracy]
    path,  # PNG to write
) -> Path:
    "Loss (train and valid) per epoch and, when `history` has it, accuracy per epoch, side by side."
    import pandas as pd
    missing = {"epoch", "train_loss", "valid_loss"} - set(history.columns)
    if missing:
        raise ValueError(f"history lacks column(s) {sorted(missing)}; expected epoch, train_loss, valid_loss[, accuracy]")
    # Recorder values may come back as strings or None (no validation set); plot what is a number.
    h = history.apply(pd.to_numeric, errors="coerce")
    with_acc = "accuracy" in h.columns and h.accuracy.notna().any()
    fig, axs = plt.subplots(1, 2 if with_acc else 1, figsize=(10 if with_acc else 5, 4), squeeze=False)
    ax = axs[0, 0]
    for col, label in (("train_loss", "train"), ("valid_loss", "valid")):
        ax.plot(h.epoch, h[col], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax.legend()
    if with_acc:
        ax = axs[0, 1]
        ax.plot(h.epoch, h.accuracy, marker="o", color="tab:green")
        ax.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy", ylim=(0, 1.02))
    for ax in axs.flat:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    return _save(path)
def prediction_table(
    files,  # the images, in the order of `probs`
    probs,  # class probabilities, one row per image (e.g. from `evaluate_learner`)
    targets,  # actual class indices
    classes,  # class names in index order (`learn.dls.vocab`)
    split: str = "valid",  # what the `split` column says
):
    """One row per image: file, split, label, predicted (the most probable class, as `accuracy` counts it) and one
    `prob_<class>` column per class."""
    import pandas as pd
    vocab = [str(c) for c in classes]
    table = pd.DataFrame({"file": [str(f) for f in files], "split": split,
                          "label": [vocab[int(t)] for t in targets],
                          "predicted": [vocab[int(i)] for i in probs.argmax(dim=1)]})
    for i, c in enumerate(vocab):
        table[f"prob_{c}"] = probs[:, i].float().numpy()
    return table


def write_predictions(
    learn,  # the trained Learner: its validation DataLoader and, as `dls[2]`, its labelled test one
    path,  # CSV to write (e.g. run_dir / 'predictions.csv')
    outputs: dict,  # {'valid': (probs, targets)[, 'test': (...)]} as `evaluate_learner` returned them for those splits
) -> Path:
    "Per-image predictions of the evaluated splits as one CSV, written atomically: what paired comparisons of runs read."
    import pandas as pd
    from .files import atomic_path
    dls = {"valid": learn.dls.valid, "test": learn.dls[2] if len(learn.dls.loaders) > 2 else None}
    parts = []
    for split, (probs, targets) in outputs.items():
        items = dls[split].items
        files = items["file"].tolist() if isinstance(items, pd.DataFrame) else list(items)
        parts.append(prediction_table(files, probs, targets, learn.dls.vocab, split))
    with atomic_path(path) as tmp:  # a reader never sees half a file
        pd.concat(parts, ignore_index=True).to_csv(tmp, index=False)
    return Path(path)
