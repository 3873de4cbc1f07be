"""`python -m fracture_fastai.compare RUN_DIR...`: one leaderboard of finished runs (accuracy with 95 % CIs,
localisation, model size, CPU speed) as Markdown, CSV and a bar plot.

It only reads run folders written by `fracture_fastai.run`; nothing is retrained.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ArgumentParser, UserError, cli_errors
from .files import atomic_path, save_figure, write_json, write_text
from .runstate import resume_command, run_state

__all__ = ["COLUMNS", "collect_runs", "leaderboard", "to_markdown", "plot_leaderboard", "write_leaderboard",
           "seed_markdown", "paired_report", "main"]

# What each leaderboard column holds; the CSV has them all, the Markdown shows them merged (e.g. accuracy with its CI).
COLUMNS = {
    "run": "run folder name",
    "arch": "architecture (--arch)",
    "size": "square input size in px",
    "epochs_run": "epochs trained, head-only ones included; fewer than asked after early stopping",
    "epochs_asked": "epochs asked for: --epochs, plus --freeze-epochs when training started from pretrained weights",
    "weights": "where the starting weights came from; 'none (...)' means trained from scratch",
    "train_seconds": "wall-clock seconds of training (lr_find and evaluation excluded)",
    "valid_accuracy": "accuracy on the validation set (with TTA if the run used it)",
    "valid_acc_low": "lower end of the 95 % Wilson interval of valid_accuracy",
    "valid_acc_high": "upper end of the 95 % Wilson interval of valid_accuracy",
    "valid_n": "validation images scored",
    "test_accuracy": "accuracy on the test set; blank when the run had none",
    "test_acc_low": "lower end of the 95 % Wilson interval of test_accuracy",
    "test_acc_high": "upper end of the 95 % Wilson interval of test_accuracy",
    "test_n": "test images scored",
    "valid_macro_f1": "macro-averaged F1 on the validation set",
    "localisation_split": "split the localisation scores come from (valid if scored there, else test); blank if none",
    "pointing_game": "Grad-CAM pointing-game hit rate (the peak falls inside the fracture polygon)",
    "pointing_game_low": "lower end of the 95 % interval of pointing_game",
    "pointing_game_high": "upper end of the 95 % interval of pointing_game",
    "mass_inside": "mean share of Grad-CAM mass inside the fracture polygon",
    "mass_inside_low": "lower end of the 95 % interval of mass_inside",
    "mass_inside_high": "upper end of the 95 % interval of mass_inside",
    "valid_auroc": "binary runs: area under the ROC curve on the validation set",
    "valid_auroc_low": "lower end of the 95 % bootstrap interval of valid_auroc",
    "valid_auroc_high": "upper end of the 95 % bootstrap interval of valid_auroc",
    "test_auroc": "binary runs: area under the ROC curve on the test set",
    "test_auroc_low": "lower end of the 95 % bootstrap interval of test_auroc",
    "test_auroc_high": "upper end of the 95 % bootstrap interval of test_auroc",
    "threshold": "binary runs: the decision threshold, chosen on the validation set by the operating point",
    "operating_point": "binary runs: the rule that chose the threshold (youden, sens=0.90, spec=0.90)",
    "test_sensitivity": "binary runs: sensitivity on the test set at the threshold (valid's is biased: chosen there)",
    "test_sensitivity_low": "lower end of the 95 % Wilson interval of test_sensitivity",
    "test_sensitivity_high": "upper end of the 95 % Wilson interval of test_sensitivity",
    "test_specificity": "binary runs: specificity on the test set at the threshold",
    "pointing_game_tp": "binary runs: pointing game of the positive class's Grad-CAM on the true positives "
                        "(same split as pointing_game, which then covers all positives)",
    "pointing_game_tp_low": "lower end of the 95 % Wilson interval of pointing_game_tp",
    "pointing_game_tp_high": "upper end of the 95 % Wilson interval of pointing_game_tp",
    "params": "parameters of the saved model (count_params on model.json + model.safetensors, or export.pkl)",
    "cpu_ms_per_image": "CPU milliseconds per image: the saved model loaded on the CPU, one warm-up pass, then one timed "
                        "learn.get_preds over a single batch (image reading and preprocessing included), with torch's "
                        "thread count as it is in this process",
    "cpu_timing_images": "how many images were timed and where they came from: the run's validation set, or "
                         "synthetic noise images of the run's size when that data is not at hand",
}

# Markdown header -> how to show a row; `_fmt_*` return '' for a missing value so absent splits stay blank.
_MD_COLUMNS = ("run", "arch", "size", "epochs", "weights", "train time", "valid acc [95% CI]", "test acc [95% CI]",
               "macro-F1", "pointing game [95% CI]", "mass inside", "params", "CPU ms/img")


def _read_json(path: Path) -> dict:
    "The JSON object in `path`; {} when the file is absent."
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _is_run(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _skip_reason(run: Path) -> str | None:
    "Why `run` cannot be on the leaderboard, or None when it can."
    if not _is_run(run):
        return "no config.json: not a run folder"
    try:
        config = _read_json(run / "config.json")
    except (OSError, ValueError) as e:
        return f"config.json cannot be read ({e})"
    status = run_state(run, config)
    if status == "interrupted":  # stopped by Ctrl-C, or dead (killed, power cut) while config.json still says running
        return f"interrupted before the end; continue it with: {resume_command(run)}"
    if status == "failed":
        return f"the run failed ({config.get('error', 'no reason recorded')}); continue it with: {resume_command(run)}"
    if status == "running":
        return "still running"
    if status != "done":
        return f"status is {status!r}, not 'done'"
    if not (run / "metrics.json").is_file():
        return "no metrics.json"
    try:
        _read_json(run / "metrics.json")
    except (OSError, ValueError) as e:
        return f"metrics.json cannot be read ({e})"
    return None


def _candidates(path: Path) -> list:
    "`path` itself when it is a run folder, else the run folders one level down."
    if _is_run(path):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))


def collect_runs(
    paths,  # run folders, or folders that hold run folders (looked for one level down)
) -> list:
    "The finished run folders in `paths`, without repeats; unfinished ones are reported on stderr and left out."
    runs, unfinished, empty = [], 0, []
    for path in map(Path, paths):
        found = _candidates(path) if path.is_dir() else []
        if not found:
            empty.append(f"skipped {path}: " + ("no run folder (one with config.json) in it or one level down"
                                                if path.is_dir() else "no such folder"))
        for run in found:
            reason = _skip_reason(run)
            if reason:
                print(f"skipped {run}: {reason}", file=sys.stderr)
                unfinished += 1
            else:
                runs.append(run)
    if not runs:
        # One line says it all when nothing was found; unfinished runs were listed above with their reasons.
        found = f"{unfinished} unfinished run(s) skipped" if unfinished else "no run folders (with config.json)"
        raise UserError(f"no finished runs in {' '.join(map(str, paths))}: {found}; pass folders made by "
                        "python -m fracture_fastai.run, or folders that hold them")
    for note in empty:
        print(note, file=sys.stderr)
    return list(dict.fromkeys(runs))


def _ci(split: dict, key: str) -> tuple:
    "`(low, high)` of `split[key]`, NaNs when it is absent."
    ci = split.get(key)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return float(ci[0]), float(ci[1])
    return math.nan, math.nan


def _num(d: dict, key: str) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _localisation(metrics: dict) -> tuple:
    "`(split, scores)` of the first split (valid, then test) that has localisation scores; `('', {})` if none."
    for split in ("valid", "test"):
        loc = (metrics.get(split) or {}).get("localisation")
        if isinstance(loc, dict) and loc:
            return split, loc
    return "", {}


def _epochs_asked(config: dict) -> float:
    "Epochs the run asked for; head-only epochs only count when it started from pretrained weights (as train does)."
    opts = config.get("options", {})
    epochs = opts.get("epochs")
    if epochs is None:
        return math.nan
    pretrained = not str(config.get("weights", "none")).startswith("none")
    return epochs + (opts.get("freeze_epochs", 0) or 0) * pretrained


def _metrics_row(run: Path) -> dict:
    "Everything the leaderboard says about `run` that its JSON files hold."
    config, metrics = _read_json(run / "config.json"), _read_json(run / "metrics.json")
    opts, training = config.get("options", {}), config.get("training", {})
    valid, test = metrics.get("valid") or {}, metrics.get("test") or {}
    loc_split, loc = _localisation(metrics)
    seconds = _num(training, "train_seconds")
    row = {"run": run.name, "arch": opts.get("arch", ""), "size": opts.get("size", math.nan),
           "epochs_run": training.get("epochs_run", math.nan), "epochs_asked": _epochs_asked(config),
           "weights": str(config.get("weights", "")),
           "train_seconds": seconds if not math.isnan(seconds) else _num(config, "seconds")}
    for name, split in (("valid", valid), ("test", test)):
        row[f"{name}_accuracy"] = _num(split, "accuracy")
        row[f"{name}_acc_low"], row[f"{name}_acc_high"] = _ci(split, "accuracy_ci95")
        row[f"{name}_n"] = split.get("n", math.nan)
    row["valid_macro_f1"] = _num(valid, "macro_f1")
    row["localisation_split"] = loc_split
    for key in ("pointing_game", "mass_inside"):
        row[key] = _num(loc, key)
        row[f"{key}_low"], row[f"{key}_high"] = _ci(loc, f"{key}_ci95")
    row.update(_binary_row(metrics, loc_split))
    return row


def _binary_row(metrics: dict, loc_split: str) -> dict:
    "The leaderboard's binary-test columns of a run (AUROC, sensitivity at the threshold, true-positive pointing game)."
    valid, test = ((metrics.get(s) or {}).get("binary") or {} for s in ("valid", "test"))
    tp_loc = (metrics.get(loc_split) or {}).get("localisation_tp") or {} if loc_split else {}
    row = {"threshold": _num(valid, "threshold"), "operating_point": valid.get("operating_point") or "",
           "test_sensitivity": _num(test, "sensitivity"), "test_specificity": _num(test, "specificity"),
           "pointing_game_tp": _num(tp_loc, "pointing_game")}
    row["test_sensitivity_low"], row["test_sensitivity_high"] = _ci(test, "sensitivity_ci95")
    row["pointing_game_tp_low"], row["pointing_game_tp_high"] = _ci(tp_loc, "pointing_game_ci95")
    for name, split in (("valid", valid), ("test", test)):
        row[f"{name}_auroc"] = _num(split, "auroc")
        row[f"{name}_auroc_low"], row[f"{name}_auroc_high"] = _ci(split, "auroc_ci95")
    return row


def _valid_images(config: dict, n: int) -> list:
    "Up to `n` images of the run's validation set, when its data is still where the run found it; else []."
    from .data import load_table
    data, opts = config.get("data", {}), config.get("options", {})
    if data.get("synthetic_demo"):
        from .demo import demo_dir
        root = demo_dir()  # the cached demo; never regenerated just to time a model
    else:
        root = Path(str(data.get("path", "")))
    if not str(root) or not root.exists():
        return []
    try:
        table = load_table(root, valid_pct=opts.get("valid_pct", 0.2), seed=opts.get("seed", 42))
    except (UserError, OSError):  # the data moved or changed since the run: time on synthetic images instead
        return []
    return [Path(f) for f in table.df.loc[table.df.split == "valid", "file"].tolist()[:n] if Path(f).is_file()]


def _synthetic_images(folder: Path, n: int, size: int, seed: int = 0) -> list:
    "`n` grayscale noise PNGs of `size` px in `folder`: stand-ins whose decoding and preprocessing cost like real ones."
    from PIL import Image
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        f = folder / f"synthetic_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(f)
        files.append(f)
    return files


def _cpu_ms_per_image(learn, files) -> float:
    "Milliseconds per image of one `get_preds` pass over `files` as a single batch, after one warm-up pass."
    dl = learn.dls.test_dl([str(f) for f in files], bs=len(files))
    with learn.no_bar():
        learn.get_preds(dl=dl)  # warm-up: lazy initialisation and first-call allocations are not inference
        start = time.perf_counter()
        learn.get_preds(dl=dl)
        elapsed = time.perf_counter() - start
    return 1000 * elapsed / len(files)


def _export_row(run: Path, timing: bool, n_images: int) -> dict:
    "Parameter count and (if `timing`) CPU ms per image of `run`'s saved model; blanks, said on stderr, without one."
    row = {"params": math.nan, "cpu_ms_per_image": math.nan, "cpu_timing_images": ""}
    if not ((run / "model.json").is_file() or (run / "export.pkl").is_file()):
        print(f"note: {run} has no model.json or export.pkl; its params and CPU time are left blank", file=sys.stderr)
        return row
    from .models import count_params  # fastai and torch load only when there is a model to look at
    from .model_io import load_any
    try:
        learn = load_any(run)  # model.json (no code runs) where the run has one, else its export.pkl
    except UserError as e:
        print(f"note: {e}; params and CPU time left blank", file=sys.stderr)
        return row
    row["params"] = count_params(learn.model)
    if not timing:
        return row
    config = _read_json(run / "config.json")
    files = _valid_images(config, n_images)
    with tempfile.TemporaryDirectory(prefix="fracture-timing-") as tmp:
        source = "valid"
        if not files:
            files, source = _synthetic_images(Path(tmp), n_images, int(config.get("options", {}).get("size") or 224)), "synthetic"
        row["cpu_ms_per_image"] = _cpu_ms_per_image(learn, files)
    row["cpu_timing_images"] = f"{len(files)} {source}"
    return row


def leaderboard(
    runs,  # run folders (e.g. from `collect_runs`); unfinished ones are reported on stderr and left out
    timing: bool = True,  # time CPU inference of each saved model (seconds per run); False leaves that column blank
    n_images: int = 16,  # images in the timed batch
) -> pd.DataFrame:
    "One row per finished run, best validation accuracy first; the columns are documented in `COLUMNS`."
    if n_images < 1:
        raise UserError(f"the timed batch needs at least 1 image; got {n_images}")
    rows = []
    for run in map(Path, runs):
        reason = _skip_reason(run)
        if reason:
            print(f"skipped {run}: {reason}", file=sys.stderr)
            continue
        rows.append({**_metrics_row(run), **_export_row(run, timing, n_images)})
    if not rows:
        raise UserError("no finished runs to compare; pass run folders whose config.json says status 'done'")
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.sort_values(["valid_accuracy", "run"], ascending=[False, True], na_position="last").reset_index(drop=True)
    if df.valid_auroc.notna().all():  # binary tests only: accuracy rewards calling everything negative, AUROC does not
        df = df.sort_values(["valid_auroc", "run"], ascending=[False, True]).reset_index(drop=True)
    if timing:
        import torch
        df.attrs["torch_threads"] = torch.get_num_threads()
    return df


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == ""


def _fmt_ci(value, low, high) -> str:
    "'0.871 [0.813-0.913]', the value alone without an interval, '' without a value."
    if _missing(value):
        return ""
    if _missing(low) or _missing(high):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}-{high:.3f}]"


def _fmt_seconds(s) -> str:
    if _missing(s):
        return ""
    if s < 10:
        return f"{s:.1f} s"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _fmt_int(v) -> str:
    return "" if _missing(v) else str(int(v))


def _fmt_params(p) -> str:
    return "" if _missing(p) else f"{p / 1e6:.2f} M"


def _fmt_float(v, digits: int = 3) -> str:
    return "" if _missing(v) else f"{v:.{digits}f}"


def _fmt_epochs(run, asked) -> str:
    if _missing(run) and _missing(asked):
        return ""
    return f"{_fmt_int(run) or '?'}/{_fmt_int(asked) or '?'}"


def _display_row(r) -> list:
    "One leaderboard row as the Markdown table shows it."
    return [r.run, r.arch, _fmt_int(r.size), _fmt_epochs(r.epochs_run, r.epochs_asked), r.weights,
            _fmt_seconds(r.train_seconds), _fmt_ci(r.valid_accuracy, r.valid_acc_low, r.valid_acc_high),
            _fmt_ci(r.test_accuracy, r.test_acc_low, r.test_acc_high), _fmt_float(r.valid_macro_f1),
            _fmt_ci(r.pointing_game, r.pointing_game_low, r.pointing_game_high),
            _fmt_ci(r.mass_inside, r.mass_inside_low, r.mass_inside_high), _fmt_params(r.params),
            _fmt_float(r.cpu_ms_per_image, 1)]


_BINARY_MD_COLUMNS = ["valid AUROC [95% CI]", "test AUROC [95% CI]", "test sensitivity @ threshold [95% CI]",
                      "pointing game TP [95% CI]"]


def _binary_display(r) -> list:
    "A row's binary-test cells as the Markdown table shows them."
    rule = f" ({r.threshold:.3f}, {r.operating_point})" if not _missing(r.threshold) and r.operating_point else ""
    sens = _fmt_ci(r.test_sensitivity, r.test_sensitivity_low, r.test_sensitivity_high)
    return [_fmt_ci(r.valid_auroc, r.valid_auroc_low, r.valid_auroc_high),
            _fmt_ci(r.test_auroc, r.test_auroc_low, r.test_auroc_high), sens + rule if sens else "",
            _fmt_ci(r.pointing_game_tp, r.pointing_game_tp_low, r.pointing_game_tp_high)]


def _md_cell(v) -> str:
    # A '|' inside a cell would end it early; a newline would end the row.
    return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown_table(header, rows, right=()) -> str:
    "A GitHub-flavoured Markdown table; columns whose index is in `right` are right-aligned."
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |",
             "|" + "|".join("---:" if i in right else ":---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(
    df: pd.DataFrame,  # a table from `leaderboard`
) -> str:
    "`df` as a Markdown table: accuracy and localisation with their 95 % CIs, blank cells where a run has no value."
    header, rows = list(_MD_COLUMNS), [_display_row(r) for r in df.itertuples(index=False)]
    binary = df.valid_auroc.notna().any()
    if binary:  # binary runs: the numbers of a diagnostic test beside accuracy
        header += _BINARY_MD_COLUMNS
        rows = [row + _binary_display(r) for row, r in zip(rows, df.itertuples(index=False))]
    right = {i for i, h in enumerate(header) if h not in ("run", "arch", "weights")}
    table = _markdown_table(header, rows, right)
    notes = [f"Sorted by validation {'AUROC' if df.valid_auroc.notna().all() else 'accuracy'}; intervals are 95 % "
             f"(Wilson for accuracy{', sensitivity and pointing game; bootstrap for AUROC' if binary else ''})."]
    if binary:
        notes.append("Binary runs: sensitivity on the test set at the threshold chosen on the validation set (its rule "
                     "in brackets); pointing game: the positive class's Grad-CAM on all positives, and on the true "
                     "positives (TP).")
    if "torch_threads" in df.attrs:
        notes.append(f"CPU ms/img: the saved model on the CPU, one warm-up pass, then one timed get_preds over a batch "
                     f"(see cpu_timing_images in the CSV), {df.attrs['torch_threads']} torch thread(s).")
    return table + "\n\n" + "\n".join(notes) + "\n"


def plot_leaderboard(
    df: pd.DataFrame,  # a table from `leaderboard`
    path,  # PNG to write
) -> Path:
    "Validation accuracy per run as horizontal bars with 95 % CI error bars, best on top, each annotated with its arch."
    # The object-oriented Figure needs no pyplot backend, so nothing here can try to open a display.
    from matplotlib.figure import Figure
    d = df.dropna(subset=["valid_accuracy"])
    acc = d.valid_accuracy.to_numpy(dtype=float)
    low = np.nan_to_num(acc - d.valid_acc_low.to_numpy(dtype=float))
    high = np.nan_to_num(d.valid_acc_high.to_numpy(dtype=float) - acc)
    y = np.arange(len(d))[::-1]
    fig = Figure(figsize=(8, 1.2 + 0.5 * max(len(d), 1)))
    ax = fig.subplots()
    ax.barh(y, acc, xerr=np.vstack([low, high]), capsize=4, color="tab:blue", alpha=0.8, ecolor="black")
    for yi, a, h, arch in zip(y, acc, high, d.arch):
        ax.text(a + h + 0.01, yi, str(arch), va="center", fontsize=9)
    ax.set_yticks(y, [str(r) for r in d.run])
    ax.set(xlim=(0, 1.25), xlabel="validation accuracy (95 % CI)", title="Leaderboard")
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.grid(axis="x", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi=100)


def write_leaderboard(
    df: pd.DataFrame,  # a table from `leaderboard`
    out,  # folder for leaderboard.md, leaderboard.csv and leaderboard.png
) -> list:
    "Write the Markdown, CSV and plot of `df` into `out`; their paths."
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "leaderboard.md"
    write_text("# Leaderboard\n\n" + to_markdown(df), md)
    csv = out / "leaderboard.csv"
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False)
    return [md, csv, plot_leaderboard(df, out / "leaderboard.png")]


def _default_out(paths) -> Path:
    "The first argument when it is a folder of runs (not a run itself), else the current directory."
    first = Path(paths[0])
    return first if first.is_dir() and not _is_run(first) else Path(".")


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fracture_fastai.compare",
        description="Compare finished runs of python -m fracture_fastai.run: a leaderboard sorted by validation "
                    "accuracy (95 % CIs, localisation, params, CPU ms per image), written as leaderboard.md, "
                    "leaderboard.csv and leaderboard.png.",
        epilog="Runs that are still running or failed are listed on stderr and left out. Exit code 2: no runs found.")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding run folders (e.g. runs/)")
    p.add_argument("--out", default=None,
                   help="folder for the leaderboard files; default: the first RUN_DIR when it holds runs, else the current folder")
    p.add_argument("--n-images", type=int, default=16, help="images in the timed CPU batch (default: %(default)s)")
    p.add_argument("--no-timing", action="store_true", help="skip the CPU inference timing (params are still counted)")
    p.add_argument("--paired", nargs="+", metavar="A [B]", default=None,
                   help="paired comparison on the same images: two run folders (or folders holding one configuration's "
                        "seeds), or one option name (e.g. no_clahe) to compare the configurations that differ only in it")
    p.add_argument("--split", choices=["valid", "test"], default="valid", help="images of the paired comparison")
    p.add_argument("--ensemble", action="store_true",
                   help="two-class runs on the same images (e.g. seeds under one --split-seed): score their mean "
                        "probabilities as one model, the threshold chosen on valid, and their averaged Grad-CAMs "
                        "against the fracture boxes (ensemble.json)")
    return p


def seed_markdown(df: pd.DataFrame) -> str:
    "The table of `stats.group_table` as Markdown: one row per configuration, mean accuracy and t 95 % CI over seeds."
    acc = next(c for c in df.columns if c.endswith("_accuracy_mean"))
    keys = [c for c in df.columns if c not in (acc, "ci_low", "ci_high", "seeds", "runs", "per_seed")]
    rows = [[*(r[k] for k in keys), r.seeds, _fmt_ci(r[acc], r.ci_low, r.ci_high), r.per_seed] for _, r in df.iterrows()]
    header = [*keys, "seeds", f"mean {acc.split('_')[0]} acc [95% CI over seeds]", "per seed"]
    return _markdown_table(header, rows, right={len(keys)})


def paired_report(
    runs,  # finished run folders
    paired=None,  # None: every two configurations differing in one option; [option]; or [A, B] (run folders)
    split: str = "valid",  # images of the comparison
) -> str:
    "Seed groups (when some configuration has several seeds) and the paired comparisons of `runs`, as text."
    from .stats import format_paired, group_table, paired_by_option, paired_comparison
    parts = []
    groups = group_table(runs, split)
    if (groups.seeds > 1).any():
        parts.append("Configurations over seeds:\n\n" + seed_markdown(groups))
    if paired and len(paired) == 2:
        names = [Path(x).resolve().name for x in paired]  # a run folder's name, or that of a folder of one setup's seeds
        comparisons = [paired_comparison(collect_runs([paired[0]]), collect_runs([paired[1]]), split=split,
                                         names=names if names[0] != names[1] else None)]
    elif paired and len(paired) == 1:
        comparisons = paired_by_option(runs, option=paired[0], split=split)
    elif paired:
        raise UserError(f"--paired takes two run folders or one option name; got {len(paired)} values")
    else:  # unasked: compare what can be compared, and say why not where runs lack what it needs
        try:
            comparisons = paired_by_option(runs, split=split)
        except UserError as e:
            comparisons = []
            parts.append(f"(no paired comparison: {e})")
    if comparisons:
        parts.append("Paired comparisons (B vs A on the same images):\n\n" + "\n\n".join(map(format_paired, comparisons)))
    return "\n\n".join(parts)


@cli_errors
def main(argv=None):
    "Command line: collect the runs, print the Markdown leaderboard, write the files and print their paths."
    from .runtime import tune_malloc
    tune_malloc()  # the timing, the paired scores and the ensemble's Grad-CAMs run models
    args = _parser().parse_args(argv)
    if args.n_images < 1:
        raise UserError(f"--n-images must be at least 1; got {args.n_images}")
    runs = collect_runs(args.paths)
    report = paired_report(runs, args.paired, args.split)  # first: a wrong --paired fails before any timing
    if args.ensemble:  # before the timing too: runs of other images or classes fail here
        from .stats import ensemble_binary, format_ensemble
        ensemble = ensemble_binary(runs, localisation=True)
        report = "\n\n".join(filter(None, [report, format_ensemble(ensemble)]))
    df = leaderboard(runs, timing=not args.no_timing, n_images=args.n_images)
    out = Path(args.out if args.out is not None else _default_out(args.paths))
    paths = write_leaderboard(df, out)
    if args.ensemble:
        paths.append(write_json(ensemble, out / "ensemble.json"))
    print(to_markdown(df))
    if report:
        print(report + "\n")
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
