"""`python -m fracture_fastai.app RUN_DIR [--port P]`: a Gradio page to try a trained model on one radiograph.

Upload a JPEG, PNG or DICOM: the class probabilities (and a binary model's call at its saved threshold), the Grad-CAM
overlay (cam.py) and where the model comes from (arch, data, validation metrics with their 95 % CIs).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .errors import ArgumentParser, UserError, cli_errors

__all__ = ["provenance", "analyse", "build_app", "main"]

_NOT_AN_IMAGE = "Upload a radiograph as JPEG, PNG or DICOM (.dcm)."


def _read_json(path: Path) -> dict:
    try: return json.loads(path.read_text())
    except (OSError, ValueError): return {}


def provenance(run_dir) -> str:
    "Markdown: the model's arch, the data it was trained on, and its validation (and test) metrics with 95 % CIs."
    run_dir = Path(run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    config, metrics, meta = (_read_json(run_dir / n) for n in ("config.json", "metrics.json", "model.json"))
    data = config.get("data", {})
    lines = [f"**Model**: {meta.get('arch') or config.get('options', {}).get('arch', '?')}, input "
             f"{'x'.join(map(str, meta.get('size', []))) or '?'} px, classes: {', '.join(meta.get('classes', [])) or '?'}",
             f"**Trained on**: {data.get('path', '?')}" + (" (the SYNTHETIC demo: says nothing about real "
                                                           "radiographs)" if data.get("synthetic_demo") else "")]
    for split in ("valid", "test"):
        m = metrics.get(split)
        if isinstance(m, dict) and "accuracy" in m:
            lo, hi = m.get("accuracy_ci95", (float("nan"), float("nan")))
            line = f"**{split}**: accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), n={m.get('n', '?')}"
            if "macro_f1" in m: line += f", macro-F1 {m['macro_f1']:.3f}"
            lines.append(line)
    if not metrics: lines.append("**Metrics**: none found beside the model (no metrics.json)")
    return "  \n".join(lines)


def analyse(
    learn,  # a Learner from `model_io.load_any`
    path,  # the uploaded file, or None
    decision: dict | None = None,  # a binary model's {'positive', 'threshold'}
    out_dir=None,  # where the overlay PNG goes; default: a temporary folder
    tta: str = "none",  # the probabilities' test-time augmentation: the model's own (`model_io.read_tta`), as predict's
    heat_map: dict | None = None,  # how the map is made, `{'levels', 'flip'}`: the model's own (`model_io.read_heat_map`)
) -> tuple:
    "`(message, {class: probability}, overlay PNG path)` of one upload; a bad upload gives only the message, never a traceback."
    from .cam import explain_file, overlay
    from .data import image_problem
    if not path: return "", None, None
    try:
        problem = image_problem(path)  # a full decode, DICOM included, before the model sees it
        if problem: return f"**Cannot use this file** ({problem}). {_NOT_AN_IMAGE}", None, None
        # The probabilities its threshold was chosen with and the heat map its run scored; fastai's tta, its own
        # passes through predict_probs.
        probs, cam, image = explain_file(learn, path, tta="flip" if tta == "flip" else "none", **(heat_map or {}))
        if tta not in ("none", "flip"):
            from .evaluate import predict_probs
            probs = predict_probs(learn, learn.dls.test_dl([str(path)]), tta)[0][0].numpy()
    except UserError as e:
        return f"**Cannot use this file**: {e}. {_NOT_AN_IMAGE}", None, None
    except Exception as e:  # a page shows no stack trace: the kind of failure, and what to do
        return f"**Cannot use this file** ({type(e).__name__}). {_NOT_AN_IMAGE}", None, None
    classes = [str(c) for c in learn.dls.vocab]
    best = int(probs.argmax())
    message = f"**{classes[best]}** (probability {probs[best]:.3f})"
    if decision is not None and decision["positive"] in classes:
        p = float(probs[classes.index(decision["positive"])])
        call = decision["positive"] if p >= decision["threshold"] else next(c for c in classes if c != decision["positive"])
        message = (f"**{call}** at the saved threshold {decision['threshold']:.3f} "
                   f"(probability of {decision['positive']}: {p:.3f})")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="fracture-fastai-app-"))
    png = overlay(image, cam, out_dir / f"{Path(path).stem}_gradcam.png", f"Grad-CAM of {classes[best]}")
    return message, {c: float(v) for c, v in zip(classes, probs)}, str(png)


def build_app(
    run_dir,  # a run folder of fracture_fastai.run (or its model.json / export.pkl)
    out_dir,  # where the overlays go; `launch` must allow serving it (allowed_paths)
):
    "The Gradio Blocks page of the model in `run_dir`."
    import gradio as gr
    from .model_io import load_any, read_decision, read_heat_map, read_tta
    learn = load_any(run_dir)
    decision, tta, heat_map, about = read_decision(run_dir), read_tta(run_dir), read_heat_map(run_dir), provenance(run_dir)
    classes = [str(c) for c in learn.dls.vocab]

    def _on_upload(path):
        return analyse(learn, path, decision, out_dir, tta, heat_map)

    with gr.Blocks(title="fracture_fastai") as page:
        gr.Markdown("## fracture_fastai: try the model on one radiograph\nResearch software, not a medical device.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Radiograph (JPEG, PNG or DICOM)", type="filepath", elem_id="upload")
                gr.Markdown(about, elem_id="provenance")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                probs = gr.Label(label="Class probabilities", num_top_classes=len(classes), elem_id="probabilities")
                gradcam = gr.Image(label="Grad-CAM", type="filepath", elem_id="gradcam", interactive=False)
        upload.change(_on_upload, upload, [message, probs, gradcam])
    return page


def _theme():
    import gradio as gr
    # System fonts: the default theme fetches Google fonts, which an offline hospital network cannot reach.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _parser():
    p = ArgumentParser(prog="python -m fracture_fastai.app",
                       description="Serve a page to try a trained model: upload a radiograph, see the class "
                                   "probabilities, the Grad-CAM overlay and the model's provenance.")
    p.add_argument("run", metavar="RUN_DIR", help="a run folder of fracture_fastai.run (or its model.json)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 serves the network "
                                                       "(default: %(default)s, this machine only)")
    return p


@cli_errors
def main(argv=None) -> int:
    "Command line: build the page and serve it until interrupted."
    from .runtime import tune_malloc
    tune_malloc()
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536: raise UserError(f"--port must be 1..65535; got {args.port}")
    run = Path(args.run)
    if not run.exists(): raise UserError(f"cannot load {run}: no such run folder (make one with python -m fracture_fastai.run)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the demo page needs Gradio: pip install 'fracture_fastai[app]'") from None
    out_dir = Path(tempfile.mkdtemp(prefix="fracture-fastai-app-"))
    page = build_app(run, out_dir)
    print(f"serving http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    page.launch(server_name=args.host, server_port=args.port, theme=_theme(), allowed_paths=[str(out_dir)],
                show_error=False, share=False, quiet=True, ssr_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
