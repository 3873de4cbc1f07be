"""The model files of a run: `model.safetensors` + `model.json`, which load without running any code from the file,
beside fastai's `export.pkl`, a pickle. `load_any` takes a run folder, a model.json or an export.pkl.

model.json describes everything inference needs (classes, input size, normalisation, preprocessing); `export_onnx`
adds `model.onnx` beside it, which `load_onnx` runs with onnxruntime alone: no torch, no fastai on that path."""
from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .files import atomic_path, write_json

if TYPE_CHECKING:  # for the annotations only: the functions import numpy where they use it
    import numpy

__all__ = ["MODEL_FORMAT", "save_model", "load_model", "load_any", "describe_model", "read_description", "read_decision", "read_tta",
           "read_heat_map",
           "export_onnx", "OnnxModel", "load_onnx"]

MODEL_FORMAT = "fracture_fastai-model/1"
TTA = ("flip", "aug", "none")  # test-time augmentations (evaluate.predict_probs); model.json saves the run's
_MAKE_ONE = "make one with python -m fracture_fastai.run"


def describe_model(learn) -> dict:
    "What it takes to rebuild `learn`'s model and its input pipeline: arch, classes, input size, normalisation, preprocessing."
    from fastai.data.transforms import Normalize
    from .transforms import find_loader
    loader = find_loader(learn.dls.train)
    if loader is None:
        raise UserError("the model's inputs do not come from a RadiographLoader; only fracture_fastai's DataLoaders "
                        "(data.radiograph_dataloaders) can be saved as model.json")
    norm = next(t for t in learn.dls.after_batch.fs if isinstance(t, Normalize))
    pre = loader.preprocess
    return {"format": MODEL_FORMAT, "arch": learn.weights_info.arch, "classes": [str(c) for c in learn.dls.vocab],
            "size": [int(s) for s in loader.resize.size[::-1]],  # (h, w), as Resize takes it
            "stats": {"mean": [float(v) for v in norm.mean.flatten()], "std": [float(v) for v in norm.std.flatten()]},
            "preprocess": {"clahe_clip": pre.clahe_clip, "clahe_grid": pre.clahe_grid, "median": pre.median,
                           "denoise": pre.denoise, "dicom_window": loader.dicom_window, "reduce": loader.reduce}}


def save_model(
    learn,  # a trained Learner from `train.radiograph_learner`
    folder,  # where model.safetensors and model.json go
    **extra,  # more JSON-able facts for model.json (versions, a decision threshold, ...)
) -> Path:
    "Write `model.safetensors` (the weights) and `model.json` (how to rebuild the model); the path of model.json."
    from safetensors.torch import save_file
    folder = Path(folder)
    meta = {**describe_model(learn), **extra, "weights": "model.safetensors"}
    # Plain contiguous CPU tensors: safetensors stores no strides, and a channels-last layout is the CPU's choice.
    state = {k: v.detach().cpu().contiguous() for k, v in learn.model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT})
    write_json(meta, folder / "model.json")
    return folder / "model.json"


def _constant(value, _item): return value


def _inference_dls(meta: dict):
    "DataLoaders with no items that turn an image file into the model's input as training did: loader, scaling, normalisation."
    from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
    from fastai.data.transforms import IntToFloatTensor, Normalize
    from .preprocess import model_preprocess
    from .transforms import RadiographLoader
    loader = RadiographLoader(tuple(meta["size"]), **model_preprocess(meta))
    import numpy as np
    from PIL import Image
    block = DataBlock(blocks=(TransformBlock(type_tfms=loader, batch_tfms=IntToFloatTensor),
                              CategoryBlock(vocab=meta["classes"])),
                      get_y=partial(_constant, meta["classes"][0]), batch_tfms=[Normalize.from_stats(meta["stats"]["mean"], meta["stats"]["std"])])
    # fastai sets a pipeline up on its first item: one blank image stands in, then goes, as Learner.export empties dls.
    with tempfile.TemporaryDirectory() as tmp:
        blank = Path(tmp) / "blank.png"
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(blank)
        return block.dataloaders([str(blank)], bs=16, num_workers=0, device="cpu").new_empty()


def read_description(
    path,  # model.json, or the run folder that holds it
) -> tuple:
    "`(model.json's path, its content)`; a `UserError` when it is missing or not a fracture_fastai model description."
    path = Path(path)
    meta_file = path / "model.json" if path.is_dir() else path
    if not meta_file.is_file(): raise UserError(f"cannot load {path}: no model.json there ({_MAKE_ONE})")
    try:
        meta = json.loads(meta_file.read_text())
        assert meta.get("format") == MODEL_FORMAT
        assert {"classes", "weights", "size", "stats", "preprocess"} <= set(meta)
    except Exception:
        raise UserError(f"cannot load {meta_file}: not a fracture_fastai model.json ({MODEL_FORMAT})") from None
    return meta_file, meta


def load_model(
    path,  # model.json, or the run folder that holds it
):
    "A fastai Learner rebuilt from model.json + model.safetensors: no pickle, so nothing in the files can run code."
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar and progress bars, as on any fastai Learner)
    import torch
    from fastai.learner import Learner
    from safetensors.torch import load_file
    from .models import build_model
    meta_file, meta = read_description(path)
    classes, weights_file = list(meta["classes"]), meta_file.parent / meta["weights"]
    if not weights_file.is_file(): raise UserError(f"cannot load {meta_file}: its weights {weights_file} are missing")
    try:
        state = load_file(str(weights_file), device="cpu")
    except Exception:
        raise UserError(f"cannot load {weights_file}: not a safetensors file") from None
    model = build_model(meta["arch"], len(classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"cannot load {weights_file}: its tensors do not fit a {meta['arch']} with "
                        f"{len(classes)} classes ({str(e).splitlines()[0]})") from None
    learn = Learner(_inference_dls(meta), model.eval(), loss_func=torch.nn.CrossEntropyLoss())
    learn.model.to(memory_format=torch.channels_last)  # the CPU's faster layout, as load_export does
    return learn


def load_any(
    path,  # a run folder, its model.json, or an export.pkl
):
    "The Learner at `path`: a run folder or model.json through `load_model` (no code runs); an export.pkl through `load_export`."
    from .predict import load_export
    path = Path(path)
    if path.is_dir():
        if (path / "model.json").is_file(): return load_model(path)
        if (path / "export.pkl").is_file(): path = path / "export.pkl"
        else: raise UserError(f"cannot load {path}: no model.json or export.pkl in that folder ({_MAKE_ONE})")
    if path.suffix == ".json": return load_model(path)
    return load_export(path)  # which warns, once, that it is a pickle


def _saved_meta(path) -> dict:
    "model.json's content for a run folder, its model.json, or an export.pkl (its run folder's model.json); {} if none."
    path = Path(path)
    meta_file = path / "model.json" if path.is_dir() else path if path.suffix == ".json" else path.with_name("model.json")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def read_decision(
    path,  # a run folder, its model.json, or an export.pkl (whose run folder's model.json is read)
) -> dict | None:
    "The decision rule saved with a binary model, `{'positive', 'threshold', ...}` from model.json; None if it has none."
    decision = _saved_meta(path).get("decision")
    return decision if isinstance(decision, dict) and {"positive", "threshold"} <= set(decision) else None


def read_tta(
    path,  # a run folder, its model.json, or an export.pkl (whose run folder's model.json is read)
) -> str:
    """The test-time augmentation the model's metrics, and a binary model's threshold, were measured with ('none',
    'flip' or 'aug'), from model.json; 'none' where it says nothing (older models, an export.pkl on its own)."""
    tta = _saved_meta(path).get("tta", "none")
    return tta if tta in TTA else "none"


def read_heat_map(
    path,  # a run folder, its model.json, or an export.pkl (whose run folder's model.json is read)
) -> dict:
    """`{'levels', 'flip'}`, the Grad-CAM the model's localisation was scored with (keyword arguments of `cam.gradcam`),
    from model.json; the body's output alone, unmirrored, where it says nothing (older models, an export.pkl alone)."""
    saved = _saved_meta(path).get("heat_map")
    saved = saved if isinstance(saved, dict) else {}
    levels = saved.get("levels")
    return {"levels": levels if isinstance(levels, int) and not isinstance(levels, bool) and levels >= 1 else 1,
            "flip": saved.get("flip") is True}


# ---------------------------------------------------------------- ONNX

ONNX_OPSET = 18  # the dynamo exporter's own default in torch 2.14; onnxruntime >= 1.14 runs it


def export_onnx(
    path,  # a run folder, or its model.json
    check: bool = True,  # run the ONNX model on a random batch and compare it with torch's (max difference 1e-4)
) -> Path:
    "Write `model.onnx` (image batch -> class probabilities) beside model.json and name it there; its path."
    import numpy as np
    import torch
    meta_file, meta = read_description(path)
    learn = load_model(meta_file)
    # The activation is part of the graph: the ONNX model gives probabilities, as predict_probs does, so the
    # runtime side needs no arithmetic of its own.
    net = torch.nn.Sequential(learn.model.eval().to(memory_format=torch.contiguous_format), torch.nn.Softmax(dim=1)).eval()
    h, w = meta["size"]
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    onnx_file = meta_file.parent / "model.onnx"
    batch = torch.export.Dim("batch", min=1)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; checked first for a one-line error)
    except ImportError:
        raise UserError("exporting to ONNX needs onnx and onnxscript: pip install 'fracture_fastai[onnx]'") from None

    import contextlib, io, warnings
    # torch.export (dynamo), not the TorchScript exporter that torch 2.9+ deprecates: both work on every
    # registered arch we tried (cnn, tf_efficientnet_lite0), and this one stays. Its progress lines go nowhere.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (x,), dynamo=True, input_names=["image"], output_names=["probabilities"],
                                    dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, verbose=False)
    with atomic_path(onnx_file) as tmp:
        program.save(str(tmp))
    if check:
        with torch.no_grad(): expected = net(x).numpy()
        got = load_onnx(meta_file, onnx_file).run(x.numpy())
        diff = float(np.abs(got - expected).max())
        if not diff <= 1e-4:
            onnx_file.unlink()
            raise UserError(f"the ONNX export of {meta['arch']} differs from torch by {diff:.2g} (> 1e-4); not written")
    meta.update(onnx="model.onnx", onnx_opset=ONNX_OPSET,
                onnx_io={"input": "image: float32 N x 3 x H x W, normalised with stats",
                         "output": "probabilities: float32 N x classes, in the order of classes"})
    write_json(meta, meta_file)
    return onnx_file


class OnnxModel:
    "A model.onnx with its model.json: image files or normalised batches -> class probabilities, on onnxruntime alone."
    def __init__(self, meta: dict, session):
        self.meta, self.session = meta, session
        self.classes = [str(c) for c in meta["classes"]]
        self.input_name = session.get_inputs()[0].name

    def run(self, x) -> numpy.ndarray:
        "Probabilities (N x classes) of a normalised float32 N x 3 x H x W batch."
        import numpy as np
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def inputs(self, files) -> numpy.ndarray:
        "The normalised batch of `files`, made as the training pipeline makes it at validation (preprocess.py)."
        from .preprocess import model_input
        return model_input(files, self.meta)

    def predict(self, files) -> numpy.ndarray:
        "Probabilities (N x classes) of the images `files`."
        return self.run(self.inputs(files))


def load_onnx(
    path,  # a run folder, or its model.json (which names its model.onnx)
    onnx_file=None,  # the .onnx file; default: the one model.json names, or model.onnx beside it
    threads: int | None = None,  # onnxruntime intra-op threads; None: its default (all cores)
) -> OnnxModel:
    "The ONNX model of a run, on onnxruntime's CPU provider; imports neither torch nor fastai."
    meta_file, meta = read_description(path)
    onnx_file = Path(onnx_file) if onnx_file is not None else meta_file.parent / meta.get("onnx", "model.onnx")
    if not onnx_file.is_file():
        raise UserError(f"cannot load {onnx_file}: no ONNX model there; make it with "
                        f"python -m fracture_fastai.export {meta_file.parent} --onnx")
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("running ONNX models needs onnxruntime: pip install 'fracture_fastai[onnx]'") from None
    options = ort.SessionOptions()
    if threads: options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"cannot load {onnx_file}: not an ONNX model onnxruntime can run ({type(e).__name__})") from None
    return OnnxModel(meta, session)
