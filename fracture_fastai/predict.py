"""`python -m fracture_fastai.predict MODEL PATH...`: class and probability of each image from an exported Learner,
or with `--backend onnx` from the run's model.onnx on onnxruntime (no torch or fastai import on that path).

Unreadable images are reported and skipped; the others are still predicted, in batches.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from .data import IMAGE_EXTS, image_files
from .errors import ArgumentParser, UserError, check_writable, cli_errors
from .files import atomic_path
from .model_io import TTA

__all__ = ["load_export", "find_images", "predict_files", "predict_files_onnx", "main"]

_MAKE_EXPORT = "make one with python -m fracture_fastai.run"


_warned_pickle = False


def _warn_pickle(path):
    "Say once per process that an export is a pickle, and what loads without running code."
    global _warned_pickle
    if not _warned_pickle:
        _warned_pickle = True
        print(f"warning: {path} is a pickle: loading it runs whatever code it holds, so load only your own. A run "
              "folder or its model.json loads without running code.", file=sys.stderr)


def load_export(
    path,  # an export.pkl written by `Learner.export`
):
    "The exported Learner at `path`, on the CPU; a `UserError` when it is missing or not an export."
    path = Path(path)
    if not path.is_file():  # checked before importing fastai, which takes seconds
        raise UserError(f"cannot load {path}: no such file ({_MAKE_EXPORT})")
    # pickle imports the package modules that export.pkl names (RadiographImage, RadiographPreprocess, ...) itself
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar: the export carries no progress callback to import it)
    from fastai.learner import Learner, load_learner
    try:
        with warnings.catch_warnings():
            # fastai warns on every load that pickle runs code; exports come from the user's own runs.
            warnings.filterwarnings("ignore", message=".*load_learner.*insecure pickle")
            learn = load_learner(path, cpu=True)
    except AttributeError as e:
        if "Can't get attribute" not in str(e): raise UserError(_not_an_export(path)) from None
        # pickle names a class or function that the installed package no longer (or not yet) has
        raise UserError(f"cannot load {path}: it needs {str(e).splitlines()[-1].strip()} "
                        "that this fracture_fastai lacks; predict with the version that made it") from None
    except Exception:
        raise UserError(_not_an_export(path)) from None
    if not isinstance(learn, Learner):
        raise UserError(_not_an_export(path))
    _warn_pickle(path)
    import torch
    # Channels-last convolutions: measured 1.45x the images/s of the contiguous layout on a 2-core CPU (lite0, 192 px).
    learn.model.to(memory_format=torch.channels_last)
    return learn


def _not_an_export(path) -> str:
    "What `path` is, if it is not an export, and what to pass instead."
    import torch
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        content = None
    if isinstance(content, dict) and any(isinstance(v, torch.Tensor) for v in content.values()):
        return (f"cannot load {path}: it is a state_dict (model weights alone, such as a run's models/best.pth), not an "
                f"export; pass the run folder, its model.json or its export.pkl ({_MAKE_EXPORT})")
    return f"cannot load {path}: not a fastai export.pkl ({_MAKE_EXPORT})"


def find_images(
    paths,  # image files and folders (searched recursively)
) -> tuple:
    "`(files, missing)`: the images named or found under `paths`, in order and without repeats, and the paths that don't exist."
    files, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files += image_files(p)  # hidden files (macOS's ._* twins) and broken links left out
        elif p.is_file():
            files.append(p)  # named explicitly: tried whatever its extension
        else:
            missing.append(p)
    return list(dict.fromkeys(files)), missing


def _probs(learn, files, bs: int, tta: str = "none"):
    "Class probabilities of `files` (str paths), one batched pass."
    from .evaluate import predict_probs
    return predict_probs(learn, learn.dls.test_dl(files, bs=bs), tta)[0]


def unreadable_reason(error: Exception) -> str:
    "What to say of a file that would not load: the error itself where it says what to install (a DICOM decoder), else 'cannot read image'."
    return str(error) if isinstance(error, UserError) and "pip install" in str(error) else "cannot read image"


def _readable(learn, files) -> tuple:
    "`(good, bad)`: the files that the export's item pipeline (reading + item transforms) loads, and `(file, reason)` of those it doesn't."
    dl = learn.dls.test_dl(files)
    good, bad = [], []
    for i, f in enumerate(files):
        try:
            dl.do_item(i)
            good.append(f)
        except Exception as e:
            bad.append((f, unreadable_reason(e)))
    return good, bad


def predict_files(
    learn,  # a Learner (e.g. from `load_export`) for single-label classification
    files,  # image paths
    bs: int = 16,  # batch size
    tta: str = "none",  # test-time augmentation: 'none', 'flip' (image and mirror) or 'aug' (fastai's tta)
    chunk: int = 1024,  # images per batched pass (each folds the model anew, 0.05 s); a pass that hits a bad image is redone without it
    decision: dict | None = None,  # a binary model's rule {'positive': class, 'threshold': t}: class is then the call
) -> tuple:
    """`(table, failures)`: file, class, probability and one probability column per class; `[(file, reason)]` skipped.

    With a `decision`, class is the positive class where its probability reaches the threshold, and probability is
    the positive class's probability; without, the most probable class and its probability."""
    import torch
    classes = [str(c) for c in learn.dls.vocab]
    files = [str(f) for f in files]  # str matches both folder- and table-built pipelines
    done, probs, failures = [], [], []
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        try:
            p = _probs(learn, part, bs, tta)
        except Exception:
            # Reading each image once more only when a pass fails keeps the usual case to one read per image.
            part, bad = _readable(learn, part)
            if not bad:
                raise  # every image reads: the failure is not the data's
            failures += bad
            if not part:
                continue
            p = _probs(learn, part, bs, tta)
        done += part
        probs.append(p)
    probs = torch.cat(probs).float() if probs else torch.zeros(0, len(classes))
    return _table(done, probs.numpy(), classes, decision), failures


def _table(files, probs, classes, decision: dict | None = None) -> pd.DataFrame:
    "file, class, probability and one probability column per class, from an N x classes array (see `predict_files`)."
    if decision is not None:
        pos = classes.index(decision["positive"])
        table = pd.DataFrame({"file": list(files), "probability": probs[:, pos]})
        table.insert(1, "class", [classes[pos] if p >= decision["threshold"] else classes[1 - pos] for p in probs[:, pos]])
    else:
        best = probs.argmax(axis=1)
        table = pd.DataFrame({"file": list(files), "class": [classes[i] for i in best.tolist()],
                              "probability": probs.max(axis=1) if len(probs) else probs[:, 0]})
    for i, c in enumerate(classes):
        table[c] = probs[:, i]
    return table


def predict_files_onnx(
    model,  # a `model_io.OnnxModel` (from `model_io.load_onnx`)
    files,  # image paths
    bs: int = 16,  # images per onnxruntime call
    decision: dict | None = None,  # a binary model's rule, as for `predict_files`
    tta: str = "none",  # 'none', or 'flip': each image and its mirror, averaged, as `evaluate.predict_probs` does
) -> tuple:
    "`(table, failures)` as `predict_files` gives them, from the ONNX model: numpy/OpenCV preprocessing, no torch."
    import numpy as np
    if tta not in ("none", "flip"):
        raise UserError(f"--tta {tta} runs through fastai; with --backend onnx use --tta flip or none")
    from .preprocess import model_preprocess, normalise, radiograph_pixels
    meta = model.meta
    pre, size = model_preprocess(meta), tuple(meta["size"])
    done, grays, failures = [], [], []
    for f in map(str, files):
        try:
            grays.append(radiograph_pixels(f, size, **pre))
            done.append(f)
        except Exception as e:
            failures.append((f, unreadable_reason(e)))
    def run(x): return model.run(x) if tta == "none" else (model.run(x) + model.run(np.ascontiguousarray(x[..., ::-1]))) / 2
    probs = [run(normalise(np.stack(grays[i:i + bs]), meta["stats"]["mean"], meta["stats"]["std"]))
             for i in range(0, len(grays), bs)]
    probs = np.concatenate(probs).astype(np.float32) if probs else np.zeros((0, len(model.classes)), np.float32)
    return _table(done, probs, model.classes, decision), failures


def add_export_and_images(p: argparse.ArgumentParser):
    "The arguments every export-using command takes: the export, then images or folders."
    p.add_argument("export", metavar="MODEL", help="a run folder of fracture_fastai.run or its model.json (both load "
                   "without running code from the files), or an export.pkl (a pickle: only your own)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help=f"image files, or folders searched recursively for {' '.join(sorted(IMAGE_EXTS))}")


def _threshold(text: str):
    "--threshold: a probability, or the path of an ensemble.json (`compare --ensemble`)."
    try:
        return float(text)
    except ValueError:
        return Path(text).expanduser()


def _run_folder(model) -> Path:
    "The run folder of a model path (the folder itself, or the folder of its model.json / export.pkl)."
    model = Path(model).expanduser().resolve()
    return model if model.is_dir() else model.parent


def _ensemble_decision(path: Path, models) -> dict:
    "The decision rule an ensemble.json records for exactly these `models`: its threshold, chosen on validation."
    import json
    try:
        saved = json.loads(path.read_text())
        runs, threshold, positive = saved["runs"], float(saved["threshold"]), saved["valid"]["positive"]
    except FileNotFoundError:
        raise UserError(f"--threshold {path}: no such file; give a probability or compare --ensemble's ensemble.json") from None
    except Exception:
        raise UserError(f"--threshold {path}: not an ensemble.json of compare --ensemble (it needs runs, threshold "
                        "and valid.positive)") from None
    if sorted(map(_run_folder, runs)) != sorted(map(_run_folder, models)):
        raise UserError(f"--threshold {path} was chosen for the ensemble of {' '.join(runs)}; predict those runs "
                        f"(MODEL --ensemble OTHER ...), not {' '.join(map(str, models))}")
    return {"positive": positive, "threshold": threshold,
            "source": f"the ensemble's, chosen on validation for {saved.get('operating_point')}: {path}"}


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fracture_fastai.predict",
        description="Predict the class of radiographs with an exported fastai Learner (export.pkl from "
                    "python -m fracture_fastai.run). Prints file<TAB>class<TAB>probability per image, or writes a CSV.",
        epilog="Exit code: 0 all images predicted, 1 some could not be read or found, 2 usage error. "
               "export.pkl is a pickle: load only exports you trust.")
    add_export_and_images(p)
    p.add_argument("--csv", metavar="FILE", help="write file,class,probability,<one column per class> to FILE instead of printing")
    p.add_argument("--tta", nargs="?", choices=TTA, default=None, const="flip",
                   help="test-time augmentation: flip (image and mirror, 2 passes; what a bare --tta means), aug "
                        "(fastai's tta, 5 passes) or none; default: what the model's metrics and threshold were "
                        "measured with (its run's --tta, saved in model.json), none where it says nothing")
    p.add_argument("--bs", type=int, default=16, help="batch size (default: %(default)s)")
    p.add_argument("--threshold", type=_threshold, default=None, metavar="T",
                   help="binary models: call the positive class from this probability on, instead of the threshold "
                        "saved with the model (chosen on its validation split); probability is then the positive "
                        "class's. An ensemble.json (compare RUNS --ensemble) gives that ensemble's threshold, chosen "
                        "on validation for its mean probability: predict its runs (MODEL --ensemble OTHER ...)")
    p.add_argument("--backend", choices=["fastai", "onnx"], default="fastai",
                   help="fastai (default), or onnx: the run's model.onnx (python -m fracture_fastai.export RUN --onnx) "
                        "on onnxruntime, without torch")
    p.add_argument("--ensemble", action="append", default=[], metavar="MODEL",
                   help="another model (run folder, model.json or export.pkl) of the same classes, its class "
                        "probabilities averaged with MODEL's; repeat for more. Each reads the images at its own size")
    return p


@cli_errors
def main(argv=None) -> int:
    "Command line: predict, print or write the table, report failures; returns the exit code."
    from .runtime import tune_malloc
    tune_malloc()
    args = _parser().parse_args(argv)
    return _predict_command(args)


def _decision(args, classes, models, ensemble_rule: dict | None = None) -> dict | None:
    """The binary decision rule to apply: the one saved with the model (for an ensemble, the mean of the models'
    thresholds), its threshold replaced by --threshold if given (`ensemble_rule`: what its ensemble.json said); None for
    more than two classes or no saved rule."""
    from .model_io import read_decision
    if len(classes) != 2:
        if args.threshold is not None:
            raise UserError(f"--threshold is for binary models; this one has {len(classes)} classes ({', '.join(classes)})")
        return None
    saved = [read_decision(m) for m in models]
    positives = sorted({d["positive"] for d in saved if d})
    if len(positives) > 1:
        raise UserError(f"the models disagree on the positive class ({', '.join(positives)}); ensemble models of one task")
    if ensemble_rule is not None:
        decision = ensemble_rule
    elif args.threshold is not None:
        from .binary import positive_class  # without a saved rule: the positive class by name, as the run found it
        decision = {"positive": positives[0] if positives else positive_class(classes), "threshold": args.threshold,
                    "source": "--threshold"}
    elif all(saved):
        decision = saved[0] if len(saved) == 1 else {
            "positive": positives[0], "threshold": sum(d["threshold"] for d in saved) / len(saved),
            "source": f"the mean of the {len(saved)} models' saved thresholds"}
    elif any(saved):
        missing = ", ".join(str(m) for m, d in zip(models, saved) if d is None)
        raise UserError(f"{missing}: no saved threshold (no model.json beside it); pass --threshold T for the ensemble")
    else:
        return None  # an export without its model.json: the most probable class
    print(f"binary model: probability of {decision['positive']!r}, called {decision['positive']!r} from "
          f"{decision['threshold']:.4f} on ({decision.get('source', 'the threshold saved with the model')})",
          file=sys.stderr)
    return decision


def _ttas(args, models) -> list:
    """The test-time augmentation of each model: --tta where given, else the one its metrics and threshold were
    measured with (model.json); said on stderr where it is not none."""
    from .model_io import read_tta
    if args.tta is not None:
        if args.tta == "aug" and args.backend == "onnx":
            raise UserError("--tta aug runs through fastai; with --backend onnx use --tta flip or none")
        return [args.tta] * len(models)
    ttas = [read_tta(m) for m in models]
    for m, tta in zip(models, ttas):
        if tta == "aug" and args.backend == "onnx":
            raise UserError(f"{m} was measured with --tta aug, which runs through fastai; with --backend onnx pass "
                            "--tta flip or --tta none")
        if tta != "none":
            print(f"{m}: test-time augmentation {tta}, as its metrics and threshold were measured (--tta none to skip)",
                  file=sys.stderr)
    return ttas


def average_tables(tables, classes) -> tuple:
    """`(files, probs)`: the mean of the per-class probability columns of prediction `tables` (as `predict_files`
    gives them), over the files that every table holds, in the first table's order."""
    import numpy as np
    common = set.intersection(*(set(t.file) for t in tables))
    files = [f for f in tables[0].file if f in common]
    probs = np.mean([t.set_index("file").loc[files, classes].to_numpy(dtype=np.float64) for t in tables], axis=0)
    return files, probs.astype(np.float32).reshape(len(files), len(classes))


def _same_classes(models, vocabs) -> list:
    "The classes that every model of an ensemble shares, in order; a `UserError` where they differ."
    for m, v in zip(models[1:], vocabs[1:]):
        if v != vocabs[0]:
            raise UserError(f"{m} predicts {', '.join(v)} but {models[0]} predicts {', '.join(vocabs[0])}; "
                            "an ensemble needs models of the same classes")
    return vocabs[0]


def _predict_command(args) -> int:
    "Predict the images of parsed `args`, print or write the table, report failures; the exit code."
    if args.bs < 1:
        raise UserError(f"--bs must be at least 1; got {args.bs}")
    if isinstance(args.threshold, float) and not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold is a probability in [0, 1]; got {args.threshold}")
    # read before any model loads: a wrong file fails at once
    ensemble_rule = (_ensemble_decision(args.threshold, [args.export, *args.ensemble])
                     if isinstance(args.threshold, Path) else None)
    files, missing = find_images(args.paths)
    for p in missing:
        print(f"skipped {p}: no such file or folder", file=sys.stderr)
    if not files:
        raise UserError(f"no images found in {' '.join(args.paths)}; looked for {' '.join(sorted(IMAGE_EXTS))}")
    csv = check_writable(args.csv, "--csv", folder=False) if args.csv else None  # before the work, not after it
    models = [args.export, *args.ensemble]
    ttas = _ttas(args, models)
    if args.backend == "onnx":
        from .model_io import load_onnx
        loaded = [load_onnx(m) for m in models]
        classes = _same_classes(models, [list(m.classes) for m in loaded])
        def one(m, tta): return predict_files_onnx(m, files, bs=args.bs, tta=tta)
    else:
        from .model_io import load_any
        loaded = [load_any(m) for m in models]
        classes = _same_classes(models, [[str(c) for c in learn.dls.vocab] for learn in loaded])
        def one(learn, tta): return predict_files(learn, files, bs=args.bs, tta=tta)
    decision = _decision(args, classes, models, ensemble_rule)
    from .runtime import frozen_gc
    with frozen_gc():  # the libraries and models loaded are not walked by every full collection while predicting
        results = [one(m, tta) for m, tta in zip(loaded, ttas)]
    failures = list({f: reason for _, fails in results for f, reason in fails}.items())  # failed by any model
    done, probs = average_tables([t for t, _ in results], classes)
    table = _table(done, probs, classes, decision)
    for f, reason in failures:
        print(f"skipped {f}: {reason}", file=sys.stderr)
    if csv is not None:
        with atomic_path(csv) as tmp:  # an earlier file of the same name stays whole until the new one is
            table.to_csv(tmp, index=False, float_format="%.6f")
        print(csv)
    else:
        for row in table.itertuples(index=False):
            print(f"{row[0]}\t{row[1]}\t{row[2]:.4f}")
    n_failed = len(failures) + len(missing)
    if n_failed:
        print(f"{n_failed} of {len(files) + len(missing)} path(s) failed; {len(table)} image(s) predicted",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
