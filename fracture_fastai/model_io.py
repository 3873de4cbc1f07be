"""The model files of a run: `model.safetensors` + `model.json`, which load without running any code from the file,
beside fastai's `export.pkl`, a pickle. `load_any` takes a run folder, a model.json or an export.pkl."""
from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

from .errors import UserError
from .files import atomic_path, write_json

__all__ = ["MODEL_FORMAT", "save_model", "load_model", "load_any", "describe_model"]

MODEL_FORMAT = "fracture_fastai-model/1"
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
                           "denoise": pre.denoise}}


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
    from .transforms import RadiographLoader
    loader = RadiographLoader(tuple(meta["size"]), **meta["preprocess"])
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


def load_model(
    path,  # model.json, or the run folder that holds it
):
    "A fastai Learner rebuilt from model.json + model.safetensors: no pickle, so nothing in the files can run code."
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar and progress bars, as on any fastai Learner)
    import torch
    from fastai.learner import Learner
    from safetensors.torch import load_file
    from .models import build_model
    path = Path(path)
    meta_file = path / "model.json" if path.is_dir() else path
    if not meta_file.is_file(): raise UserError(f"cannot load {path}: no model.json there ({_MAKE_ONE})")
    try:
        meta = json.loads(meta_file.read_text())
        assert meta.get("format") == MODEL_FORMAT
        classes, weights_file = list(meta["classes"]), meta_file.parent / meta["weights"]
    except Exception:
        raise UserError(f"cannot load {meta_file}: not a fracture_fastai model.json ({MODEL_FORMAT})") from None
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
