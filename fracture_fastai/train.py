"""Learner creation and the training recipes (fine_tune, one-cycle, SGDR), with the callbacks a run needs."""
from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler, SchedCos, combine_scheds
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import F1Score, accuracy
from fastai.optimizer import Adam
from fastai.learner import noop  # fastai's own noop (not fastcore's), the one no_logging installs
from fastcore.foundation import L
from fastcore.meta import delegates

from .data import class_weights
from .errors import UserError
from .models import create_learner

__all__ = ["SCHEDULES", "MONITORS", "radiograph_learner", "HistoryCallback", "PlainProgressCallback", "suggest_lr",
           "fit_warm_restarts", "train"]

SCHEDULES = ("one_cycle", "sgdr")
MONITORS = ("valid_loss", "accuracy")


@delegates(create_learner, but=["loss_func", "opt_func", "metrics"])
def radiograph_learner(
    arch: str,  # a name from `list_archs()`
    dls,  # DataLoaders from `radiograph_dataloaders`
    wd: float = 1e-2,  # decoupled weight decay (AdamW)
    label_smoothing: float = 0.0,  # spread this much target probability over the other classes; 0 = plain cross-entropy
    fp16: bool | None = None,  # mixed precision; None: on exactly when training on CUDA
    **kwargs,
):
    "A Learner for `arch` with AdamW, accuracy and macro-F1, class-weighted loss when `dls.balance == 'weights'`."
    weights = class_weights(dls).to(dls.device) if getattr(dls, "balance", "none") == "weights" else None
    if not 0 <= label_smoothing < 1:
        raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    # Label smoothing keeps a model from betting everything on a label that may be wrong (a few per cent here are).
    loss = (LabelSmoothingCrossEntropyFlat(eps=label_smoothing, weight=weights) if label_smoothing
            else CrossEntropyLossFlat(weight=weights))
    # fastai's Adam decouples weight decay by default: this is AdamW.
    learn = create_learner(arch, dls, loss_func=loss, opt_func=Adam, wd=wd,
                           metrics=[accuracy, F1Score(average="macro")], **kwargs)
    if fp16 is None:
        fp16 = torch.cuda.is_available() and getattr(dls.device, "type", str(dls.device)) == "cuda"
    if fp16:
        learn = learn.to_fp16()
    learn.fp16 = bool(fp16)
    return learn


class HistoryCallback(Callback):
    "Collect one row per epoch across every fit (frozen and unfrozen phases) and rewrite `fname` after each epoch."
    order = 60  # after the Recorder has its values

    def __init__(self, fname=None, phase: str = "train"):
        self.fname, self.phase, self.rows = Path(fname) if fname else None, phase, []

    def before_epoch(self):
        self._start = time.time()

    def after_epoch(self):
        rec = self.learn.recorder
        names = rec.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = rec.log[1:len(names) + 1]
        row = {"epoch": len(self.rows), "phase": self.phase}
        row.update({n: (float(v) if v is not None else None) for n, v in zip(names, values)})
        row["seconds"] = round(time.time() - self._start, 1)
        self.rows.append(row)
        if self.fname:
            keys = list(dict.fromkeys(k for r in self.rows for k in r))
            with open(self.fname, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.rows)


class PlainProgressCallback(Callback):
    "One plain line per epoch instead of progress bars, for logs and pipes; silent wherever fastai mutes logging."
    order = 65

    def before_fit(self):
        # lr_find and get_preds run under `no_logging`, which sets the logger to noop: leave those alone.
        self._old_logger = self.learn.logger
        if self.learn.logger is not noop:
            self.learn.logger = self._write

    def after_fit(self):
        self.learn.logger = self._old_logger

    def _write(self, log):
        names = self.learn.recorder.metric_names
        parts = [f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in zip(names[1:], log[1:])]
        print(f"epoch {log[0] + 1}/{self.n_epoch}: " + ", ".join(parts), flush=True)


def suggest_lr(learn, out_png=None, num_it: int = 50, lower: float = 1e-5, upper: float = 1e-2) -> float:
    "Run `lr_find`, save its plot to `out_png`, and return fastai's valley suggestion clipped to [lower, upper]."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with learn.no_bar():
        found = learn.lr_find(num_it=num_it, show_plot=out_png is not None)
    if out_png is not None:
        plt.gcf().savefig(out_png, bbox_inches="tight")
        plt.close("all")
    lr = float(found.valley)
    # A short lr_find on a small dataset can point at the edge of the sweep; clipping keeps a run from diverging.
    return min(max(lr, lower), upper) if math.isfinite(lr) else upper


def fit_warm_restarts(learn, epochs: int, lr_max, cycle_len: int = 2, cycle_mult: int = 1, cbs=None):
    "Cosine annealing with warm restarts (SGDR) for exactly `epochs` epochs: cycles of `cycle_len`, each `cycle_mult` times longer."
    if cycle_len < 1 or cycle_mult < 1:
        raise UserError(f"cycle_len and cycle_mult must be >= 1, got {cycle_len} and {cycle_mult}")
    lengths, n = [], cycle_len
    while sum(lengths) < epochs:
        lengths.append(min(n, epochs - sum(lengths)))
        n *= cycle_mult
    if learn.opt is None:
        learn.create_opt()
    learn.opt.set_hyper("lr", lr_max)
    lr_max = [h["lr"] for h in learn.opt.hypers]
    scheds = {"lr": combine_scheds([n / epochs for n in lengths], [SchedCos(torch.tensor(lr_max), 0) for _ in lengths])}
    learn.fit(epochs, cbs=ParamScheduler(scheds) + L(cbs))


def _callbacks(monitor: str, patience: int, history: HistoryCallback):
    # fastai picks the direction from the name: lower is better for a loss, higher for accuracy.
    cbs = [history, SaveModelCallback(monitor=monitor, fname="best", with_opt=False)]
    if patience:
        cbs.append(EarlyStoppingCallback(monitor=monitor, patience=patience))
    return cbs


def train(
    learn,
    epochs: int = 10,  # epochs of the main phase (unfrozen for pretrained archs)
    lr: float | None = None,  # peak learning rate; None: lr_find's suggestion
    freeze_epochs: int = 1,  # head-only epochs before unfreezing (pretrained archs only)
    lr_mult: float = 10,  # pretrained archs: the body's first layer group learns `lr_mult` times slower than the head
    schedule: str = "one_cycle",  # 'one_cycle' or 'sgdr' (cosine annealing with warm restarts)
    cycle_len: int = 2,  # SGDR: epochs of the first cycle
    cycle_mult: int = 1,  # SGDR: growth of each later cycle
    patience: int = 10,  # early stopping after this many epochs without improvement; 0 = off
    monitor: str = "valid_loss",  # what picks the best epoch and drives early stopping: 'valid_loss' or 'accuracy'
    out_dir=None,  # where lr_find.png, history.csv and the best weights go
    lr_find_iters: int = 50,  # iterations of the lr_find sweep
) -> dict:
    "Train `learn` with the seed's recipe, the fastai way: lr_find, then fine_tune (pretrained) or one-cycle/SGDR from scratch."
    if schedule not in SCHEDULES:
        raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if monitor not in MONITORS:
        raise UserError(f"monitor must be one of {', '.join(MONITORS)}; got {monitor!r}")
    if epochs < 1:
        raise UserError(f"epochs must be at least 1, got {epochs}")
    out_dir = Path(out_dir) if out_dir is not None else Path(learn.path)
    learn.path, learn.model_dir = out_dir, "models"
    if not sys.stdout.isatty():
        learn.remove_cb(ProgressCallback)
        learn.add_cb(PlainProgressCallback())
    pretrained = bool(getattr(getattr(learn, "weights_info", None), "pretrained", False))
    lr_found = suggest_lr(learn, out_dir / "lr_find.png", num_it=lr_find_iters)  # the plot is part of every run
    base_lr = lr = lr if lr is not None else lr_found
    history = HistoryCallback(out_dir / "history.csv")
    start = time.time()
    if pretrained and freeze_epochs > 0:
        history.phase = "frozen"
        learn.freeze()
        learn.fit_one_cycle(freeze_epochs, slice(lr), pct_start=0.99, cbs=[history])
        learn.unfreeze()
        lr = lr / 2  # fastai's fine_tune halves the rate and spreads it over the layer groups
    history.phase = "unfrozen" if pretrained else "train"
    # fastai's fine_tune uses lr_mult=100; on timm archs (two layer groups) that leaves the whole body at lr/100,
    # too slow for ImageNet features to adapt to radiographs within a few epochs.
    lrs = slice(lr / lr_mult, lr) if pretrained else lr
    cbs = _callbacks(monitor, patience, history)
    if schedule == "one_cycle":
        kwargs = dict(pct_start=0.3, div=5.0) if pretrained else {}
        learn.fit_one_cycle(epochs, lrs, cbs=cbs, **kwargs)
    else:
        fit_warm_restarts(learn, epochs, lrs, cycle_len=cycle_len, cycle_mult=cycle_mult, cbs=cbs)
    main_rows = [r for r in history.rows if r["phase"] != "frozen"]
    sign = 1 if monitor == "valid_loss" else -1
    best = min(main_rows, key=lambda r: sign * r[monitor])  # the epoch SaveModelCallback reloaded at the end
    return {"lr": base_lr, "lr_find_suggestion": lr_found, "epochs_run": len(history.rows), "best_epoch": best["epoch"],
            "best": {monitor: best[monitor]}, "early_stopped": len(main_rows) < epochs,
            "train_seconds": round(time.time() - start, 1)}
