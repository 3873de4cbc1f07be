"""`python -m fracture_fastai.run --arch resnet18`: data -> DataLoaders -> Learner -> training -> evaluation -> export,
all written to one new run folder whose path is the last line printed."""
from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime
from pathlib import Path

from .errors import ArchError, UserError, cli_errors
from .evaluate import write_json

__all__ = ["main", "parse_args", "run", "new_run_dir"]

DEMO_SIZE = 128  # the demo's images are small and synthetic: no need for 224 px there


def _archs():
    from .models import list_archs
    return list_archs()


def parse_args(argv=None) -> argparse.Namespace:
    archs = _archs()
    p = argparse.ArgumentParser(
        prog="python -m fracture_fastai.run",
        description="Train, evaluate, interpret and export one model; everything goes to a new run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18", metavar="ARCH", help=f"architecture, one of: {', '.join(archs)}")
    p.add_argument("--data", default=None, help="YOLO export, folder tree of classes or CSV; default: the built-in synthetic demo")
    p.add_argument("--out", default=None, help="run folder (must not exist yet); default: runs/<timestamp>-<arch>")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10, help="epochs of the main phase")
    g.add_argument("--freeze-epochs", type=int, default=1, help="head-only epochs first (pretrained archs)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate; default: lr_find's suggestion")
    g.add_argument("--lr-mult", type=float, default=10, help="pretrained archs: head lr / first body group's lr")
    g.add_argument("--schedule", choices=["one_cycle", "sgdr"], default="one_cycle",
                   help="one-cycle, or cosine annealing with warm restarts")
    g.add_argument("--cycle-len", type=int, default=2, help="SGDR: epochs of the first cycle")
    g.add_argument("--cycle-mult", type=int, default=1, help="SGDR: growth of each later cycle")
    g.add_argument("--patience", type=int, default=10, help="early stopping patience in epochs; 0 = off")
    g.add_argument("--monitor", choices=["valid_loss", "accuracy"], default="valid_loss", help="what picks the best epoch")
    g.add_argument("--wd", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the loss (0 = off)")
    g.add_argument("--pretrained", choices=["auto", "require", "none"], default="auto",
                   help="ImageNet weights: auto = use them when found, else train from scratch")
    g.add_argument("--weights", default=None, help="a state_dict file of ImageNet weights for --arch")
    g.add_argument("--seed", type=int, default=42)
    d = p.add_argument_group("data")
    d.add_argument("--size", type=int, default=None, help=f"square input size in px; default 224, {DEMO_SIZE} on the demo")
    d.add_argument("--bs", type=int, default=32, help="batch size")
    d.add_argument("--balance", choices=["none", "oversample", "weights"], default="none", help="class-imbalance handling")
    d.add_argument("--no-clahe", action="store_true", help="skip CLAHE and the median filter")
    d.add_argument("--flip-vert", action="store_true", help="add vertical flips to the augmentation")
    d.add_argument("--sample", type=int, default=None, metavar="N", help="at most N images per class per split (quick runs)")
    d.add_argument("--valid-pct", type=float, default=0.2, help="share held out when the data has no validation split")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    e = p.add_argument_group("evaluation")
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="test-time augmentation in the metrics")
    args = p.parse_args(argv)
    if args.arch not in archs:
        raise ArchError(f"unknown architecture {args.arch!r}; choose one of: {', '.join(archs)}")
    for name in ("epochs", "bs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.size is not None and args.size < 32:
        raise UserError(f"--size must be at least 32 px, got {args.size}")
    if args.sample is not None and args.sample < 1:
        raise UserError(f"--sample must be at least 1, got {args.sample}")
    return args


def new_run_dir(out, arch: str) -> Path:
    "A fresh run folder: `out` if it does not exist yet, else runs/<timestamp>-<arch>[-n]; never an existing one."
    if out is not None:
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"run folder {str(out)!r} already holds a run; pass a new --out (earlier results are kept)")
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{arch}"
    for n in range(1, 1000):
        cand = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            cand.mkdir(parents=True)
            return cand
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder next to {base}; clean up runs/")


def _versions() -> dict:
    import fastai
    import timm
    import torch
    return {"fracture_fastai": __import__("fracture_fastai").__version__, "fastai": fastai.__version__,
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}


def _train_and_evaluate(args, dls, out: Path, config: dict):
    import pandas as pd

    from .cam import gradcam_grid, score_localisation
    from .evaluate import evaluate_learner, interpretation_plots, plot_curves
    from .report import write_report
    from .train import radiograph_learner, train

    learn = radiograph_learner(args.arch, dls, pretrained=args.pretrained, weights=args.weights, wd=args.wd,
                               label_smoothing=args.label_smoothing, path=out)
    info = learn.weights_info
    print(f"weights: {info.note}", flush=True)
    config.update(weights=info.source, fp16=learn.fp16)
    write_json(config, out / "config.json")

    start = time.time()
    summary = train(learn, epochs=args.epochs, lr=args.lr, freeze_epochs=args.freeze_epochs, lr_mult=args.lr_mult,
                    schedule=args.schedule, cycle_len=args.cycle_len, cycle_mult=args.cycle_mult,
                    patience=args.patience, monitor=args.monitor, out_dir=out)
    plot_curves(pd.read_csv(out / "history.csv"), out / "curves.png")

    metrics = {"valid": evaluate_learner(learn, tta=args.tta)[0]}
    if len(dls.loaders) > 2:
        metrics["test"] = evaluate_learner(learn, dl=dls[2], tta=args.tta)[0]  # dls[2]: the labelled test split
    metrics["tta"] = args.tta
    # Does the heat map point at the annotated fracture? Only where the data carries polygons (YOLO exports).
    for split, dl in (("valid", dls.valid), ("test", dls[2] if len(dls.loaders) > 2 else None)):
        if dl is not None and split in metrics:
            scores = score_localisation(learn, dl)
            if scores["n"]:
                metrics[split]["localisation"] = scores
    write_json(metrics, out / "metrics.json")
    interpretation_plots(learn, out)
    gradcam_grid(learn, out / "gradcam.png")

    learn.export(out.resolve() / "export.pkl")  # absolute: fastai joins a relative name onto learn.path
    config.update(status="done", training=summary, seconds=round(time.time() - start, 1),
                  finished=datetime.now().isoformat(timespec="seconds"))
    write_json(config, out / "config.json")
    write_report(out)
    return learn, metrics


def run(args: argparse.Namespace) -> Path:
    "Do one run as `args` says; return the run folder."
    from .data import load_table, radiograph_dataloaders, sample_per_class
    from .demo import make_demo
    from .models import arch_stats

    demo = args.data is None
    if demo:
        print("no --data given: using the built-in SYNTHETIC demo dataset (six regions, made by the package); "
              "results on it say nothing about real radiographs", flush=True)
    table = load_table(make_demo() if demo else args.data, valid_pct=args.valid_pct, seed=args.seed)
    if args.sample:
        table.df = sample_per_class(table.df, args.sample, seed=args.seed)
    size = args.size or (DEMO_SIZE if demo else 224)
    dls = radiograph_dataloaders(table, size=size, bs=args.bs, seed=args.seed, num_workers=args.num_workers,
                                 balance=args.balance, clahe=not args.no_clahe, flip_vert=args.flip_vert,
                                 stats=arch_stats(args.arch))
    out = new_run_dir(args.out, args.arch)
    config = {"options": {**vars(args), "size": size}, "data": {"path": str(args.data) if args.data else "demo",
              "synthetic_demo": demo, "source": table.source, **table.summary(), "notes": table.notes,
              "classes": list(dls.vocab)},
              "versions": _versions(), "device": str(dls.device), "started": datetime.now().isoformat(timespec="seconds"),
              "status": "running"}
    write_json(config, out / "config.json")
    try:
        learn, metrics = _train_and_evaluate(args, dls, out, config)
    except BaseException as e:  # the folder says the run did not finish, and why
        config.update(status="failed", error=f"{type(e).__name__}: {e}")
        write_json(config, out / "config.json")
        try:  # a report of the failure helps; it must not hide the original error
            from .report import write_report
            write_report(out)
        except Exception:
            pass
        raise
    for split, m in metrics.items():
        if isinstance(m, dict):
            lo, hi = m["accuracy_ci95"]
            print(f"{split}: accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), macro-F1 {m['macro_f1']:.3f}, n={m['n']}")
    return out


@cli_errors
def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    print(out)


if __name__ == "__main__":
    main()
