"""Learner creation and the training recipes (fine_tune, one-cycle, SGDR), with the callbacks a run needs."""
from __future__ import annotations

import csv
import itertools
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
from fastai.metrics import AccumMetric, ActivationType, F1Score, accuracy
from fastai.optimizer import Adam
from fastai.learner import noop  # fastai's own noop (not fastcore's), the one no_logging installs
from fastcore.foundation import L
from fastcore.meta import delegates

from .data import class_weights
from .errors import UserError
from .files import atomic_path, save_figure
from .models import create_learner, early_layers

__all__ = ["SCHEDULES", "MONITORS", "PRECISIONS", "FINE_TUNE_LR", "resolve_precision", "precision_of", "CPUBFloat16",
           "progressive_sizes", "ProgressiveResize", "PlainInputs",
           "radiograph_learner", "auroc_metric", "HistoryCallback", "PlainProgressCallback", "suggest_lr", "sgdr_cycles", "fit_warm_restarts",
           "Snapshots", "FreezeEarly", "train",
           "Checkpoint", "load_checkpoint",
           "export_learner"]

SCHEDULES = ("one_cycle", "sgdr")
MONITORS = ("valid_loss", "accuracy", "auroc", "none")  # auroc: two classes only; none: the last epoch is kept
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# fastai's `fine_tune` default. Measured on the YOLO export (lite0, 10 short epochs): lr_find's valley at the small
# first size (6.9e-4) reached 0.740 validation accuracy, 2e-3 reached 0.780; and skipping lr_find saves ~30 s.
FINE_TUNE_LR = 2e-3


def resolve_precision(precision: str, device) -> str:
    "'auto' -> fp16 on CUDA, fp32 on the CPU; other values are checked against the device."
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    cuda = getattr(device, "type", str(device)) == "cuda"
    # Not bf16 on the CPU by default: measured on a 2-core AVX512-BF16 EPYC (lite0, channels-last, batch 32), bf16
    # autocast trained no faster than fp32 at 224 px (12.2 vs 12.1 img/s) and slower at 128 px (35.6 vs 46.9).
    if precision == "auto": return "fp16" if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise UserError("precision fp16 needs a CUDA GPU; on the CPU use bf16 (or auto)")
    return precision


def precision_of(learn) -> str:
    "'fp16', 'bf16' or 'fp32': what `learn`'s callbacks compute in (the callbacks are the truth, not a recorded flag)."
    from fastai.callback.fp16 import AMPMode, MixedPrecision
    for cb in learn.cbs:
        if isinstance(cb, CPUBFloat16): return "bf16"
        if isinstance(cb, MixedPrecision): return "bf16" if cb.amp_mode == AMPMode.BF16 else "fp16"
    return "fp32"


class PlainInputs(Callback):
    "Feed the model plain tensors: a fastai `TensorImage` sends every op of the network through `__torch_function__`."
    # Measured: the same forward + backward 25 % slower on a TensorImage than on a plain tensor (lite0, 192 px, CPU).
    # Only the inputs change type; their values, the targets and everything fastai decodes stay as they were.
    order = 1

    def before_batch(self):
        self.learn.xb = tuple(x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x for x in self.xb)


class CPUBFloat16(Callback):
    "bfloat16 autocast for CPU training and inference; fastai's `MixedPrecision` is CUDA-only. No loss scaling: bf16 has fp32's range."
    order = 10  # where MixedPrecision sits: after the batch is on its device, before the model runs

    def before_batch(self):
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self.autocast.__enter__()

    def after_pred(self):
        self.learn.pred = self.pred.float()  # the loss and metrics in fp32

    def _exit(self):
        if getattr(self, "autocast", None) is not None:
            self.autocast.__exit__(None, None, None)
            self.autocast = None

    def after_loss(self): self._exit()
    def after_cancel_batch(self): self._exit()  # a batch cancelled before its loss must not leave autocast on
    def after_fit(self): self._exit()


def _roc_auc(targets, scores) -> float:
    "sklearn's AUROC, or NaN where the targets hold one class only (a tiny validation split) instead of an error."
    import numpy as np
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(targets, scores)) if len(np.unique(targets)) == 2 else float("nan")


def auroc_metric() -> AccumMetric:
    """The validation AUROC of a two-class model, as a fastai metric named `auroc`. It scores the second class's softmax
    probability; for two classes that is the AUROC of either class as the positive one (it is symmetric)."""
    return AccumMetric(_roc_auc, dim_argmax=-1, activation=ActivationType.BinarySoftmax, to_np=True, invert_arg=True,
                       flatten=False, name="auroc")  # dim_argmax: the softmax's dimension (fastai's RocAucBinary's)


@delegates(create_learner, but=["loss_func", "opt_func", "metrics"])
def radiograph_learner(
    arch: str,  # a name from `list_archs()`
    dls,  # DataLoaders from `radiograph_dataloaders`
    wd: float = 1e-2,  # decoupled weight decay (AdamW)
    label_smoothing: float = 0.0,  # spread this much target probability over the other classes; 0 = plain cross-entropy
    balance: str = "none",  # class imbalance: 'weights' weighs the loss by inverse class frequency; others leave it plain
    precision: str = "auto",  # 'auto', 'fp32', 'bf16' or 'fp16' (see `resolve_precision`)
    channels_last: bool = True,  # channels-last memory format: faster convolutions on CPUs and tensor-core GPUs
    **kwargs,
):
    """A Learner for `arch` with AdamW, accuracy and macro-F1 (and AUROC for two classes), mixed precision, a class-weighted
    loss when `balance='weights'`."""
    from .data import BALANCE
    if balance not in BALANCE:
        raise UserError(f"balance must be one of {', '.join(BALANCE)}; got {balance!r}")
    weights = class_weights(dls).to(dls.device) if balance == "weights" else None
    if not 0 <= label_smoothing < 1:
        raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    # Label smoothing keeps a model from betting everything on a label that may be wrong (a few per cent here are).
    loss = (LabelSmoothingCrossEntropyFlat(eps=label_smoothing, weight=weights) if label_smoothing
            else CrossEntropyLossFlat(weight=weights))
    # fastai's Adam decouples weight decay by default: this is AdamW.
    learn = create_learner(arch, dls, loss_func=loss, opt_func=Adam, wd=wd,
                           metrics=[accuracy, F1Score(average="macro")] + ([auroc_metric()] if dls.c == 2 else []),
                           **kwargs)
    learn.add_cb(PlainInputs())
    precision = resolve_precision(precision, dls.device)
    if precision == "fp16": learn.to_fp16()
    elif precision == "bf16":
        if getattr(dls.device, "type", str(dls.device)) == "cuda": learn.to_bf16()
        else: learn.add_cb(CPUBFloat16())
    if channels_last:
        from fastai.callback.channelslast import ChannelsLast
        learn.add_cb(ChannelsLast())
    return learn


class HistoryCallback(Callback):
    "Collect one row per epoch across every fit (frozen and unfrozen phases) and rewrite `fname` after each epoch."
    order = 60  # after the Recorder has its values

    def __init__(self, fname=None, phase: str = "train"):
        self.fname, self.phase, self.rows = Path(fname) if fname else None, phase, []

    def before_epoch(self):
        self._start = time.time()

    def after_epoch(self):
        if _skipped(self.learn): return
        rec = self.learn.recorder
        names = rec.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = rec.log[1:len(names) + 1]
        row = {"epoch": len(self.rows), "phase": self.phase}
        row.update({n: (float(v) if v is not None else None) for n, v in zip(names, values)})
        row["seconds"] = round(time.time() - self._start, 1)
        self.rows.append(row)
        if self.fname:
            keys = list(dict.fromkeys(k for r in self.rows for k in r))
            with atomic_path(self.fname) as tmp, open(tmp, "w", newline="") as f:
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
        if _skipped(self.learn): return
        names = self.learn.recorder.metric_names
        parts = [f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in zip(names[1:], log[1:])]
        print(f"epoch {log[0] + 1}/{self.n_epoch}: " + ", ".join(parts), flush=True)


def suggest_lr(learn, out_png=None, num_it: int = 50, lower: float = 1e-5, upper: float = 1e-2) -> float:
    "Run `lr_find`, save its plot to `out_png`, and return fastai's valley suggestion clipped to [lower, upper]."
    from .evaluate import plt  # pyplot on the file backend, or a notebook's own
    with learn.no_bar():
        found = learn.lr_find(num_it=num_it, show_plot=out_png is not None)
    if out_png is not None:
        save_figure(plt.gcf(), out_png)
        plt.close("all")
    lr = float(found.valley)
    # A short lr_find on a small dataset can point at the edge of the sweep; clipping keeps a run from diverging.
    return min(max(lr, lower), upper) if math.isfinite(lr) else upper


def progressive_sizes(
    epochs: int,  # epochs of the schedule
    start: int,  # input side of the first epoch
    end: int,  # input side of the last epoch (the model's size)
    step: int = 32,  # sides are multiples of this (what the strides of the archs divide)
) -> list:
    "Input side of each epoch for progressive resizing: a linear ramp from `start` to `end`, rounded down to `step`."
    if start >= end or epochs < 2: return [end] * epochs
    ramp = [start + (end - start) * e / (epochs - 1) for e in range(epochs)]
    return [max(start, int(s) // step * step) if e < epochs - 1 else end for e, s in enumerate(ramp)]


class ProgressiveResize(Callback):
    "Progressive resizing: epoch `e` trains and validates at `sizes[e]` px (fastai's affine augmentation resizes both)."
    order = 5  # before anything reads the batch

    def __init__(self, sizes: list):
        self.sizes = list(sizes)

    def _affine(self):
        from fastai.vision.augment import AffineCoordTfm
        found = [t for t in self.dls.train.after_batch.fs if isinstance(t, AffineCoordTfm)]
        if not found:
            raise UserError("progressive resizing needs fastai's affine augmentation in the batch transforms "
                            "(aug_transforms); use the default augmentation or --min-size 0")
        return found[0]

    def before_fit(self):
        self.tfm = self._affine()
        self.old_size = self.tfm.size

    def before_epoch(self):
        # Epochs past the schedule (a later fit, lr_find) keep the last size.
        size = self.sizes[min(self.epoch, len(self.sizes) - 1)]
        self.tfm.size = (size, size)

    def after_fit(self):
        self.tfm.size = self.old_size  # the shared transform also serves validation-time TTA at full size


def sgdr_cycles(epochs: int, cycle_len: int = 2, cycle_mult: int = 1) -> list[int]:
    "The lengths in epochs of SGDR's cycles over exactly `epochs` epochs (the last one cut short where needed)."
    if cycle_len < 1 or cycle_mult < 1:
        raise UserError(f"cycle_len and cycle_mult must be >= 1, got {cycle_len} and {cycle_mult}")
    lengths, n = [], cycle_len
    while sum(lengths) < epochs:
        lengths.append(min(n, epochs - sum(lengths)))
        n *= cycle_mult
    return lengths


def fit_warm_restarts(learn, epochs: int, lr_max, cycle_len: int = 2, cycle_mult: int = 1, cbs=None, start_epoch: int = 0):
    "Cosine annealing with warm restarts (SGDR) for exactly `epochs` epochs: cycles of `cycle_len`, each `cycle_mult` times longer."
    lengths = sgdr_cycles(epochs, cycle_len, cycle_mult)
    if learn.opt is None:
        learn.create_opt()
    learn.opt.set_hyper("lr", lr_max)
    lr_max = [h["lr"] for h in learn.opt.hypers]
    scheds = {"lr": combine_scheds([n / epochs for n in lengths], [SchedCos(torch.tensor(lr_max), 0) for _ in lengths])}
    learn.fit(epochs, cbs=ParamScheduler(scheds) + L(cbs), start_epoch=start_epoch)


class Snapshots(Callback):
    """Snapshot ensembles (Huang et al. 2017): the weights at the end of each SGDR cycle, where its rate reaches its low,
    saved as `snapshot<epoch>` with `learn.save` (in the model folder)."""
    def __init__(self, cycle_ends):  # the 0-based epochs that end a cycle
        self.cycle_ends = sorted(cycle_ends)

    def after_epoch(self):
        if self.epoch in self.cycle_ends and not _skipped(self.learn):
            self.learn.save(f"snapshot{self.epoch}", with_opt=False)

    def saved(self, folder) -> list[str]:
        "The names saved in `folder` (a resumed run's earlier snapshots too), in order."
        return [f"snapshot{e}" for e in self.cycle_ends if (Path(folder) / f"snapshot{e}.pth").is_file()]


class FreezeEarly(Callback):
    """Keep the layers that compute at 1/`stride` of the input's side or finer (`models.early_layers`: the stem and first
    stages) at their pretrained weights for every fit, batch norms' scales and shifts included, whatever `freeze` and
    `unfreeze` do. Their backward pass is skipped: on a CPU, at 320 px, the costliest part of a training step."""
    order = 1  # before anything computes; fastai's freeze_to has already set requires_grad when a fit starts

    def __init__(self, stride: int):
        if stride < 2: raise UserError(f"the frozen stride must be at least 2 (the stem's), got {stride}")
        self.stride, self.layers = stride, None

    def before_fit(self):
        if self.layers is None:
            if not getattr(self.learn, "pretrained", False):
                info = getattr(self.learn, "weights_info", None)
                raise UserError("--freeze-stride keeps pretrained weights, and this model has none"
                                + (f" ({info.note})" if info is not None else "") + ": it trains from scratch; drop "
                                "--freeze-stride, or install its weights and add --pretrained require")
            self.layers = early_layers(self.learn.model, self.stride)
        for m in self.layers:
            for p in m.parameters(recurse=False): p.requires_grad_(False)

    def summary(self) -> dict:
        "What was kept: the stride, and the number of modules and parameters."
        return {"stride": self.stride, "modules": len(self.layers or []),
                "params": sum(p.numel() for m in self.layers or [] for p in m.parameters(recurse=False))}


def _skipped(learn) -> bool:
    "Is this epoch one that fastai's `SkipToEpoch` (`fit(start_epoch=...)`, a resumed run) passes over?"
    from fastai.learner import SkipToEpoch
    return any(isinstance(cb, SkipToEpoch) and learn.epoch < cb._skip_to for cb in learn.cbs)


class _Resumable:
    "Mixin for fastai's trackers: ignore epochs before `from_epoch` (smaller progressive sizes, or epochs a resume skips); start from `state`."
    def __init__(self, *args, from_epoch: int = 0, state: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.from_epoch, self.state = from_epoch, state

    def before_fit(self):
        super().before_fit()
        if self.state:  # a resumed run: the best so far and the epochs waited, as its checkpoint recorded them
            self.best = self.state["best"]
            if hasattr(self, "wait"): self.wait = self.state["wait"]

    def after_epoch(self):
        if self.epoch >= self.from_epoch and not _skipped(self.learn): super().after_epoch()

    def snapshot(self) -> dict:
        return {"best": float(self.best), "wait": getattr(self, "wait", None)}


class _SaveBest(_Resumable, SaveModelCallback): pass
class _EarlyStopping(_Resumable, EarlyStoppingCallback): pass


CHECKPOINT = "checkpoint.pth"
CHECKPOINT_FORMAT = "fracture_fastai-checkpoint/1"


class Checkpoint(Callback):
    "After every epoch: model, optimiser, RNG states and the run's progress to `path`, atomically, for `train(resume=...)`."
    order = 64  # after the history and the trackers (early stopping included) have counted the epoch

    def __init__(self, path, phase: str, history: HistoryCallback, info: dict, resume: dict | None = None):
        self.path, self.phase, self.history, self.info = Path(path), phase, history, info
        self.resume = resume if resume and resume["phase"] == phase else None

    def before_fit(self):
        if self.resume:  # the recorder's smoothed training loss goes on as it was, not from zero (after it resets it)
            smooth = self.learn.recorder.smooth_loss
            smooth.count, smooth.val = self.resume["smooth_loss"]["count"], self.resume["smooth_loss"]["val"]

    def after_epoch(self):
        if not _skipped(self.learn): self.save(self.epoch + 1)

    def after_cancel_fit(self):
        # Early stopping ends the fit by raising in its after_epoch, before this callback's turn: that epoch is
        # saved here, as the end of its phase, so that a resume goes straight on to what follows.
        if any(isinstance(cb, _EarlyStopping) and cb.wait >= cb.patience for cb in self.learn.cbs):
            self.save(self.n_epoch)

    def save(self, epochs_done: int):
        import random
        from fastai.torch_core import get_model, rank_distrib
        if rank_distrib(): return  # several processes (torchrun): rank 0 alone writes, as fastai's Learner.save
        train_dl = getattr(self.dls.train, "dl", self.dls.train)  # under DDP: the DataLoader inside DistributedDL
        state = {"format": CHECKPOINT_FORMAT, "phase": self.phase, "epochs_done": epochs_done, "n_epoch": self.n_epoch,
                 "history": self.history.rows, **self.info,
                 "smooth_loss": {"count": self.learn.recorder.smooth_loss.count, 
                                "val": torch.as_tensor(self.learn.recorder.smooth_loss.val).as_subclass(torch.Tensor)},
                 "trackers": {type(cb).__name__: cb.snapshot() for cb in self.learn.cbs if isinstance(cb, _Resumable)},
                 "model": get_model(self.learn.model).state_dict(), "opt": _plain(self.learn.opt.state_dict()),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "train_dl": train_dl.rng.getstate()}}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def _plain(obj):
    "Numpy scalars to Python numbers, recursively: a checkpoint then loads with `weights_only=True` (no pickle code)."
    import numpy as np
    if isinstance(obj, dict): return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple): return tuple(_plain(v) for v in obj)
    if isinstance(obj, (list, L)): return [_plain(v) for v in obj]  # fastcore's L too: a list to the loader
    if isinstance(obj, np.generic): return obj.item()
    return obj


def load_checkpoint(folder) -> dict | None:
    "The last checkpoint of the run in `folder` (`models/checkpoint.pth`), or None where the run saved none."
    path = Path(folder) / "models" / CHECKPOINT
    if not path.is_file(): return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to restart the run's training "
                        "from its first epoch") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a fracture_fastai checkpoint; delete it to restart the run's training")
    return state


def _restore(learn, state: dict, with_opt: bool = True):
    "Put a checkpoint's model (and optimiser, RNG states) back into `learn`."
    import random
    from fastai.torch_core import get_model
    get_model(learn.model).load_state_dict(state["model"])
    if with_opt:
        if learn.opt is None: learn.create_opt()
        learn.opt.load_state_dict({**state["opt"], "hypers": L(state["opt"]["hypers"])})  # fastai keeps them in an L
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        learn.dls.train.rng.setstate(state["rng"]["train_dl"])


def _callbacks(monitor: str, patience: int, history: HistoryCallback, from_epoch: int = 0, trackers: dict | None = None):
    # fastai picks the direction from the name: lower is better for a loss, higher for accuracy.
    # With progressive resizing an epoch validates at its own size, so only full-size epochs compete: the kept
    # model must score what the export (full size) will score.
    if monitor == "none": return [history]  # the last epoch is kept (and saved as "best" after the fit), no early stopping
    trackers = trackers or {}
    cbs = [history, _SaveBest(monitor=monitor, fname="best", with_opt=False, from_epoch=from_epoch,
                              state=trackers.get("_SaveBest"))]
    if patience:
        cbs.append(_EarlyStopping(monitor=monitor, patience=patience, from_epoch=from_epoch,
                                  state=trackers.get("_EarlyStopping")))
    return cbs


def train(
    learn,
    epochs: int = 8,  # epochs of the main phase (unfrozen for pretrained archs)
    lr: float | str | None = None,  # peak learning rate; 'find': lr_find's suggestion; None: FINE_TUNE_LR when pretrained, else 'find'
    freeze_epochs: int = 1,  # head-only epochs before unfreezing (pretrained archs only)
    lr_mult: float = 3,  # pretrained archs: the body's first layer group learns `lr_mult` times slower than the head
    schedule: str = "one_cycle",  # 'one_cycle' or 'sgdr' (cosine annealing with warm restarts)
    cycle_len: int = 2,  # SGDR: epochs of the first cycle
    cycle_mult: int = 1,  # SGDR: growth of each later cycle
    patience: int = 10,  # early stopping after this many epochs without improvement; 0 = off
    monitor: str = "valid_loss",  # picks the best epoch, drives early stopping: 'valid_loss', 'accuracy', 'auroc'; 'none': the last
    out_dir=None,  # where lr_find.png, history.csv and the best weights go
    lr_find_iters: int = 50,  # iterations of the lr_find sweep
    min_size: int | None = None,  # progressive resizing: first epochs at this side, ramping up to the DataLoaders' size
    resume: dict | None = None,  # a checkpoint from `load_checkpoint`: go on from its last epoch with the same settings
    snapshots: bool = False,  # SGDR: save the weights at each cycle's end for a snapshot ensemble (summary's `snapshots`)
) -> dict:
    "Train `learn` with the seed's recipe, the fastai way: lr_find, then fine_tune (pretrained) or one-cycle/SGDR from scratch."
    if schedule not in SCHEDULES:
        raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if monitor not in MONITORS:
        raise UserError(f"monitor must be one of {', '.join(MONITORS)}; got {monitor!r}")
    if monitor not in ("valid_loss", "none", *(m.name for m in learn.metrics)):
        raise UserError(f"monitor {monitor!r} is not among this learner's metrics "
                        f"({', '.join(m.name for m in learn.metrics)}); auroc is for two classes")
    if epochs < 1:
        raise UserError(f"epochs must be at least 1, got {epochs}")
    if snapshots and schedule != "sgdr":
        raise UserError("snapshot ensembles take the weights at the end of each SGDR cycle: add --schedule sgdr")
    out_dir = Path(out_dir) if out_dir is not None else Path(learn.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    learn.path, learn.model_dir = out_dir, "models"
    if not sys.stdout.isatty():
        learn.remove_cb(ProgressCallback)
        learn.add_cb(PlainProgressCallback())
    pretrained = bool(getattr(learn, "pretrained", False))  # fastai's own record (vision_learner's, and create_learner's)
    full = _input_size(learn.dls)
    sizes = progressive_sizes(epochs, min_size, full) if min_size and full else [full] * epochs
    # lr_find and the frozen epochs run at the first size, the one the main phase starts from.
    first = [ProgressiveResize(sizes[:1])] if sizes[0] != full else []
    start = time.time()
    state = resume or {}
    done = _epochs_done(state, freeze_epochs if pretrained else 0)
    if lr is None: lr = FINE_TUNE_LR if pretrained else "find"
    lr_found = None
    if state:  # the rate the run chose when it started, lr_find's included: no second sweep
        lr, lr_found = state["lr"], state["lr_find_suggestion"]
    elif lr == "find":
        with learn.added_cbs(first):
            lr = lr_found = suggest_lr(learn, out_dir / "lr_find.png", num_it=lr_find_iters)
    elif isinstance(lr, str) or not (math.isfinite(lr) and lr > 0):
        raise UserError(f"lr must be a positive number or 'find', got {lr!r}")
    lr_find_seconds = time.time() - start
    base_lr = lr
    history = HistoryCallback(out_dir / "history.csv")
    history.rows = list(state.get("history", []))
    checkpoint = out_dir / learn.model_dir / CHECKPOINT
    info = {"lr": base_lr, "lr_find_suggestion": lr_found}
    if pretrained and freeze_epochs > 0:
        history.phase = "frozen"
        learn.freeze()
        if state.get("phase") == "frozen": _restore(learn, state, with_opt=done["frozen"] < freeze_epochs)
        if done["frozen"] < freeze_epochs:
            learn.fit_one_cycle(freeze_epochs, slice(lr), pct_start=0.99, start_epoch=done["frozen"],
                                cbs=[history, Checkpoint(checkpoint, "frozen", history, info, state)] + first)
        learn.unfreeze()
        lr = lr / 2  # fastai's fine_tune halves the rate and spreads it over the layer groups
    history.phase = "unfrozen" if pretrained else "train"
    # fastai's fine_tune uses lr_mult=100; on timm archs (two layer groups) that leaves the whole body at lr/100,
    # too slow for ImageNet features to adapt to radiographs within a few epochs. Measured (lite0, 160 px, 14
    # epochs): lr_mult 3 reached 0.867 validation accuracy at its best epoch, lr_mult 10 0.832.
    lrs = slice(lr / lr_mult, lr) if pretrained else lr
    from_epoch = sizes.index(full)
    # Only full-size cycle ends: a snapshot must score what it would score at the export's size.
    cycle_ends = [end - 1 for end in itertools.accumulate(sgdr_cycles(epochs, cycle_len, cycle_mult))]
    snapshot_cb = Snapshots([e for e in cycle_ends if e >= from_epoch]) if snapshots else None
    if state.get("phase") == "main": _restore(learn, state, with_opt=done["main"] < epochs)
    if done["main"] < epochs:
        cbs = (_callbacks(monitor, patience, history, max(from_epoch, done["main"]), trackers=state.get("trackers"))
               + [Checkpoint(checkpoint, "main", history, info, state)]
               + ([ProgressiveResize(sizes)] if sizes[0] != full else []) + ([snapshot_cb] if snapshot_cb else []))
        if schedule == "one_cycle":
            kwargs = dict(pct_start=0.3, div=5.0) if pretrained else {}
            learn.fit_one_cycle(epochs, lrs, cbs=cbs, start_epoch=done["main"], **kwargs)
        else:
            fit_warm_restarts(learn, epochs, lrs, cycle_len=cycle_len, cycle_mult=cycle_mult, cbs=cbs,
                              start_epoch=done["main"])
        if monitor == "none": learn.save("best", with_opt=False)  # what a best epoch's users (snapshots, a resume) load
    elif monitor != "none":  # stopped after its last epoch: what SaveModelCallback loads at the end of a fit
        learn.load("best", with_opt=False)  # (with no monitor the checkpoint's last epoch, restored above, is kept)
    main_rows = [r for r in history.rows if r["phase"] != "frozen"]
    if monitor == "none":
        best, kept = main_rows[-1], {"kept": "last", "valid_loss": main_rows[-1]["valid_loss"]}  # whatever it scored
    else:
        sign = 1 if monitor == "valid_loss" else -1
        best = min(main_rows[from_epoch:], key=lambda r: sign * r[monitor])  # the epoch SaveModelCallback reloaded
        kept = {monitor: best[monitor]}
    return {"lr": base_lr, "lr_find_suggestion": lr_found, "epochs_run": len(history.rows), "best_epoch": best["epoch"],
            "best": kept, "early_stopped": len(main_rows) < epochs,
            "train_seconds": round(time.time() - start, 1), "lr_find_seconds": round(lr_find_seconds, 1),
            "sizes": sizes, "snapshots": snapshot_cb.saved(out_dir / learn.model_dir) if snapshot_cb else [],
            "resumed_from": ({"phase": state["phase"], "epochs_done": state["epochs_done"]} if state else None)}


def _epochs_done(state: dict, freeze_epochs: int) -> dict:
    "Epochs finished in each phase ('frozen', 'main') according to a checkpoint's `state` ({} = none yet)."
    if not state: return {"frozen": 0, "main": 0}
    if state["phase"] == "frozen": return {"frozen": state["epochs_done"], "main": 0}
    return {"frozen": freeze_epochs, "main": state["epochs_done"]}


def _input_size(dls) -> int | None:
    "The side of the DataLoaders' model input (their `RadiographLoader`'s), or None when it cannot be told."
    from .transforms import find_loader
    loader = find_loader(dls.train)
    return None if loader is None else int(max(loader.resize.size))


def export_learner(learn, path) -> Path:
    "`learn.export` to `path`, loadable anywhere: fp32, no training-only callbacks, written atomically."
    from fastai.callback.channelslast import ChannelsLast
    from fastai.callback.fp16 import MixedPrecision
    path = Path(path).resolve()  # absolute: fastai joins a relative name onto learn.path
    removed = [cb for cb in learn.cbs if isinstance(cb, (CPUBFloat16, MixedPrecision, ChannelsLast, PlainProgressCallback))]
    learn.remove_cbs(removed)
    model_format = torch.channels_last if any(isinstance(cb, ChannelsLast) for cb in removed) else None
    learn.model.to(memory_format=torch.contiguous_format)
    try:
        with atomic_path(path) as tmp:  # a reader never finds half an export, even if the run is killed while writing
            learn.export(tmp)
    finally:
        learn.add_cbs(removed)
        if model_format is not None: learn.model.to(memory_format=model_format)
    return path
