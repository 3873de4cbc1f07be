"""`python -m fracture_fastai.report RUN_DIR`: one self-contained `report.html` per run folder (config, metrics,
history and every plot embedded), readable in any browser without Python, a server or the run folder itself."""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from .errors import ArgumentParser, UserError, cli_errors
from .files import write_text
from .runstate import resume_command, run_state

__all__ = ["render_report", "write_report", "main"]

# Captions of the plots the runner writes; any other PNG in the folder is shown under its file name.
_CAPTIONS = {"lr_find.png": "Learning-rate finder", "curves.png": "Loss and accuracy per epoch",
             "confusion_matrix.png": "Confusion matrix (validation)", "roc.png": "ROC curve, operating point circled",
             "pr.png": "Precision-recall curve", "calibration.png": "Reliability diagram (calibration)",
             "top_losses.png": "Top losses (validation)", "gradcam.png": "Grad-CAM"}

# Inline so the file stays one piece; no JavaScript, no fonts or images fetched from anywhere.
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
     padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666}.warn{background:#fff4d6;border:1px solid #e6c200;padding:.5em .8em}
.error{background:#fde2e2;border:1px solid #d33;padding:.5em .8em}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}img{max-width:100%;height:auto;border:1px solid #eee}
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v) -> str:
    "A value as a table shows it: short floats, JSON for lists and dicts, '' for nothing."
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _round(v, digits: int = 3):
    "`v` rounded when it is a number, so a table shows 0.167 rather than 0.1667."
    return round(v, digits) if _is_num(v) else v


def _cell(v, tag: str = "td", style: str = "") -> str:
    cls = ' class="num"' if _is_num(v) and tag == "td" else ""
    style = f' style="{_e(style)}"' if style else ""
    return f"<{tag}{cls}{style}>{_e(_fmt(v))}</{tag}>"


def _table(header, rows) -> str:
    "An HTML table of `rows` (lists of values) under `header`; every value escaped."
    head = "<tr>" + "".join(_cell(h, "th") for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _kv_table(d: dict) -> str:
    "A two-column table of the keys and values of `d`."
    return _table(None, [[k, v] for k, v in d.items()])


def _with_ci(value, ci) -> str:
    "'0.871 (95 % CI 0.813-0.913)', or the value alone when there is no interval."
    if not _is_num(value):
        return _fmt(value)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_is_num, ci)):
        return f"{value:.3f} (95 % CI {ci[0]:.3f}-{ci[1]:.3f})"
    return f"{value:.3f}"


def _read_json(path: Path, required: bool = False) -> dict:
    "The JSON object in `path`; {} when it is absent and not `required`."
    if not path.is_file():
        if required:
            raise UserError(f"{path.parent} is not a run folder: it has no config.json (make one with "
                            "python -m fracture_fastai.run)")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"cannot read {path}: not valid JSON ({e}); was the run interrupted while writing it?") from None


def _header(run: Path, config: dict) -> str:
    "Title, status and the synthetic-data warning."
    arch = config.get("options", {}).get("arch", "unknown arch")
    status = run_state(run, config)  # a run killed hard still says 'running' in its config.json
    parts = [f"<h1>{_e(arch)} &mdash; {_e(run.name)}</h1>",
             (f'<p class="muted">run folder {_e(run.resolve())}; status {_e(status)}; '
              f'started {_e(config.get("started", "?"))}, finished {_e(config.get("finished", "-"))}</p>')]
    if status == "interrupted":
        parts.append(f'<p class="error">The run was interrupted before the end{": " + _e(config["error"]) if config.get("error") else ""}. '
                     f"Continue it with <code>{_e(resume_command(run))}</code></p>")
    elif config.get("error"):
        parts.append(f'<p class="error">The run failed: {_e(config["error"])}. '
                     f"Continue it after fixing the cause with <code>{_e(resume_command(run))}</code></p>")
    if config.get("data", {}).get("synthetic_demo"):
        parts.append('<p class="warn">Trained on the built-in SYNTHETIC demo dataset: these results say nothing '
                     "about real radiographs.</p>")
    return "\n".join(parts)


def _splits_table(splits: dict) -> str:
    "Images per split (rows) and class (columns), with totals."
    classes = sorted({c for counts in splits.values() for c in counts})
    rows = [[split, *(counts.get(c, 0) for c in classes), sum(counts.values())] for split, counts in splits.items()]
    return _table(["split", *classes, "total"], rows)


def _config_section(config: dict) -> str:
    "Weights, options, data summary, training summary and versions."
    parts = ["<h2>Configuration</h2>"]
    run_facts = {k: config[k] for k in ("weights", "precision", "device", "seconds") if k in config}
    if run_facts:
        parts.append(_kv_table(run_facts))
    if config.get("options"):
        parts += ["<h3>Options</h3>", _kv_table(config["options"])]
    data = config.get("data") or {}
    if data:
        parts.append("<h3>Data</h3>")
        parts.append(_kv_table({k: v for k, v in data.items() if k not in ("splits", "notes")}))
        if isinstance(data.get("splits"), dict) and data["splits"]:
            parts.append(_splits_table(data["splits"]))
        if data.get("notes"):
            parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in data["notes"]) + "</ul>")
    if config.get("training"):
        parts += ["<h3>Training</h3>", _kv_table(config["training"])]
    if config.get("versions"):
        parts += ["<h3>Versions</h3>", _kv_table(config["versions"])]
    return "\n".join(parts)


def _confusion_table(cm, classes) -> str:
    "Confusion matrix as an HTML table, rows actual and columns predicted, each cell shaded by its share of the row."
    head = "<tr><th>actual \\ predicted</th>" + "".join(_cell(c, "th") for c in classes) + "</tr>"
    rows = []
    for name, counts in zip(classes, cm):
        total = sum(counts) or 1
        cells = []
        for j, v in enumerate(counts):
            share = v / total
            style = f"background:rgba(31,119,180,{0.85 * share:.2f})" + (";color:#fff" if share > 0.5 else "")
            cells.append(_cell(v, style=style + (";font-weight:bold" if name == classes[j] else "")))
        rows.append("<tr>" + _cell(name, "th") + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _localisation_table(loc: dict) -> str:
    "Localisation scores, each with its 95 % CI when the metrics hold one."
    rows = []
    for key, value in loc.items():
        if key.endswith("_ci95") and key[:-len("_ci95")] in loc:
            continue  # shown beside its value
        ci = loc.get(f"{key}_ci95")
        rows.append([key, _with_ci(value, ci) if isinstance(value, float) else value])
    return _table(["score", "value"], rows)


def _split_section(name: str, m: dict) -> str:
    "Accuracy, macro-F1, per-class scores, confusion matrix and localisation of one split."
    parts = [f"<h3>{_e(name)}</h3>"]
    summary = {"images": m.get("n"), "accuracy": _with_ci(m.get("accuracy"), m.get("accuracy_ci95")),
               "macro-F1": _with_ci(m.get("macro_f1"), None), "loss": _with_ci(m.get("loss"), None)}
    snap = m.get("snapshot_ensemble")
    if isinstance(snap, dict):  # --snapshots: SGDR's cycle ends as one ensemble
        summary["snapshot ensemble accuracy"] = (f"{_with_ci(snap.get('accuracy'), snap.get('accuracy_ci95'))} "
                                                 f"({len(snap.get('models', []))} snapshots, alone: "
                                                 f"{', '.join(_fmt(_round(a)) for a in snap.get('member_accuracy', []))})")
    last = m.get("last_epoch")
    if isinstance(last, dict) and "folder" in last:  # --keep-last: the last epoch as a second model
        auroc = (f"; AUROC {_fmt(_round(last['auroc']))}, as one ensemble {_fmt(_round(last.get('ensemble_auroc')))}"
                 if last.get("auroc") is not None else "")
        summary[f"last epoch ({last['epoch']}, {last['folder']}/)"] = (
            f"accuracy {_fmt(_round(last['accuracy']))}, with the kept epoch as one ensemble "
            f"{_fmt(_round(last['ensemble_accuracy']))}{auroc}")
    parts.append(_kv_table({k: v for k, v in summary.items() if v not in (None, "")}))
    per_class = m.get("per_class") or {}
    if per_class:
        rows = [[c, *(_round(s.get(k)) for k in ("precision", "recall", "f1")), s.get("support")]
                for c, s in per_class.items()]
        parts.append(_table(["class", "precision", "recall", "F1", "support"], rows))
    cm, classes = m.get("confusion_matrix"), m.get("classes") or list(per_class)
    if cm and classes and len(cm) == len(classes):
        parts += ["<h4>Confusion matrix</h4>", _confusion_table(cm, [str(c) for c in classes])]
    if isinstance(m.get("binary"), dict):
        parts.append(_binary_section(m["binary"]))
    if isinstance(m.get("localisation"), dict) and m["localisation"]:
        parts += ["<h4>Localisation (Grad-CAM)</h4>", _localisation_table(m["localisation"])]
    if isinstance(m.get("localisation_tp"), dict) and m["localisation_tp"]:
        parts += ["<h4>Localisation on the true positives (Grad-CAM)</h4>", _localisation_table(m["localisation_tp"])]
    return "\n".join(parts)


def _binary_section(b: dict) -> str:
    "A binary test's numbers: AUROC, the rates at the operating threshold with their CIs, calibration, subgroups."
    pos, neg = b.get("positive"), b.get("negative")
    rows = [["AUROC", _with_ci(b.get("auroc"), b.get("auroc_ci95"))],
            ["average precision", _with_ci(b.get("average_precision"), None)],
            ["threshold", f"{_fmt(b.get('threshold'))} ({b.get('operating_point') or b.get('threshold_source') or ''})"]]
    rows += [[name, _with_ci(b.get(key), b.get(f"{key}_ci95"))] for key, name in
             (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"))]
    rows += [["accuracy", f"{_with_ci(b.get('accuracy'), b.get('accuracy_ci95'))} (calling every image {neg}: "
                          f"{_fmt(_round(b.get('baseline_accuracy')))})"],
             ["Brier score", _fmt(_round(b.get("brier"), 4))], [f"ECE ({b.get('ece_bins')} bins)", _fmt(_round(b.get("ece"), 4))],
             ["TP / FP / TN / FN", f"{b.get('tp')} / {b.get('fp')} / {b.get('tn')} / {b.get('fn')}"]]
    parts = [f"<h4>Binary test: {_e(pos)} (positive) vs {_e(neg)}</h4>", _table(["score", "value"], rows)]
    for column, groups in (b.get("subgroups") or {}).items():
        sub = [[value, g.get("n"), g.get("n_positive"), _with_ci(g.get("auroc"), None),
                _with_ci(g.get("sensitivity"), g.get("sensitivity_ci95")), _with_ci(g.get("specificity"), g.get("specificity_ci95"))]
               for value, g in groups.items()]
        parts += [f"<h4>By {_e(column.replace('_', ' '))}</h4>",
                  _table([column.replace("_", " "), "images", pos, "AUROC", "sensitivity", "specificity"], sub)]
    return "\n".join(parts)


def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return "<h2>Metrics</h2>\n<p class=\"muted\">No metrics.json: the run did not get as far as evaluation.</p>"
    parts = ["<h2>Metrics</h2>"]
    if "tta" in metrics:
        parts.append(f'<p class="muted">test-time augmentation: {_e(_fmt(metrics["tta"]))}</p>')
    for split in ("valid", "test"):
        if isinstance(metrics.get(split), dict):
            parts.append(_split_section({"valid": "Validation", "test": "Test"}[split], metrics[split]))
    return "\n".join(parts)


def _history_section(run: Path) -> str:
    path = run / "history.csv"
    if not path.is_file():
        return ""
    import pandas as pd
    try:
        h = pd.read_csv(path)
    except (ValueError, OSError):  # an empty or half-written history: the rest of the report still stands
        return ""
    rows = [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in h.itertuples(index=False)]
    return "<h2>Training history</h2>\n" + _table(list(h.columns), rows)


def _figure(png: Path) -> str:
    "One PNG embedded as base64, with its caption, so the report can travel without the folder."
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    caption = _CAPTIONS.get(png.name, png.name)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)} ({_e(png.name)})</figcaption></figure>")


def _figures_section(run: Path, shown=()) -> str:
    "Every PNG of the run folder not `shown` already (in the verdict), embedded."
    known = list(_CAPTIONS)  # the runner's plots in the order a run makes them, then any others by name
    pngs = sorted((p for p in run.glob("*.png") if p.name not in shown),
                  key=lambda p: (known.index(p.name) if p.name in known else len(known), p.name))
    if not pngs:
        return ""
    return "\n".join(["<h2>Figures</h2>"] + [_figure(png) for png in pngs])


def _verdict_section(run: Path, metrics: dict) -> tuple:
    """`(html, names of the PNGs it shows)`: the headline numbers of the held-out split (test, else validation) with
    their CIs, its ROC curve (binary) or confusion matrix, and the heat maps; what a reader wants before the options."""
    split = next((s for s in ("test", "valid") if isinstance(metrics.get(s), dict)), None)
    if split is None:
        return "", ()
    m, b = metrics[split], metrics[split].get("binary")
    if isinstance(b, dict):
        rows = {"AUROC": _with_ci(b.get("auroc"), b.get("auroc_ci95")),
                f"sensitivity at threshold {_fmt(b.get('threshold'))}": _with_ci(b.get("sensitivity"), b.get("sensitivity_ci95")),
                "specificity": _with_ci(b.get("specificity"), b.get("specificity_ci95")),
                "accuracy": f"{_with_ci(b.get('accuracy'), b.get('accuracy_ci95'))} (calling every image "
                            f"{b.get('negative')}: {_fmt(_round(b.get('baseline_accuracy')))})"}
    else:
        rows = {"accuracy": _with_ci(m.get("accuracy"), m.get("accuracy_ci95")), "macro-F1": _with_ci(m.get("macro_f1"), None)}
    for key in ("localisation_tp", "localisation"):
        loc = m.get(key)
        if isinstance(loc, dict) and loc.get("pointing_game") is not None:
            rows[f"pointing game ({loc.get('images', 'annotated images')})"] = _with_ci(loc["pointing_game"], loc.get("pointing_game_ci95"))
    shown = [name for name in ("roc.png" if isinstance(b, dict) else "confusion_matrix.png", "gradcam.png")
             if (run / name).is_file()]
    name = {"test": "test", "valid": "validation"}[split]
    parts = ["<h2>Verdict</h2>", f'<p class="muted">{name} split, {_e(m.get("n"))} images; details, configuration '
             "and history below</p>", _kv_table(rows)] + [_figure(run / png) for png in shown]
    return "\n".join(parts), tuple(shown)


def render_report(
    run_dir,  # a run folder written by `python -m fracture_fastai.run`
) -> str:
    "The HTML of `run_dir`'s report: one document, inline CSS, images embedded, no scripts or external resources."
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder {str(run)!r} does not exist; pass a folder made by python -m fracture_fastai.run")
    config = _read_json(run / "config.json", required=True)
    metrics = _read_json(run / "metrics.json")
    arch = config.get("options", {}).get("arch", "unknown arch")
    verdict, shown = _verdict_section(run, metrics)  # the headline first; options and history last
    body = [_header(run, config), verdict, _metrics_section(metrics), _figures_section(run, shown),
            _config_section(config), _history_section(run)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(arch)} - {_e(run.name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(p for p in body if p) + "\n</body>\n</html>\n")


def write_report(
    run_dir,  # a run folder written by `python -m fracture_fastai.run`
) -> Path:
    "Write `report.html` into `run_dir` (replacing an older one) and return its path."
    run = Path(run_dir)
    text = render_report(run)
    path = run / "report.html"
    return write_text(text, path)  # atomic: a browser never opens half a report


@cli_errors
def main(argv=None):
    "Command line: (re)write RUN_DIR/report.html and print its path."
    p = ArgumentParser(prog="python -m fracture_fastai.report",
                                description="Write report.html into a run folder: config, metrics, history and every "
                                            "plot in one self-contained file that any browser opens.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder made by python -m fracture_fastai.run")
    args = p.parse_args(argv)
    print(write_report(args.run_dir))


if __name__ == "__main__":
    main()
