"The safe model format: model.safetensors + model.json rebuild every kind of arch without unpickling, to the export's outputs."
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from fracture_fastai.data import load_table, radiograph_dataloaders
from fracture_fastai.errors import UserError
from fracture_fastai.model_io import load_any, load_model, save_model
from fracture_fastai.train import export_learner, radiograph_learner


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch", ["cnn", "tf_efficientnet_lite0", "resnet18"])  # custom, timm, torchvision
def test_safe_model_equals_the_export_in_a_fresh_process(arch, demo_export, tmp_path):
    table = load_table(demo_export)
    dls = radiograph_dataloaders(table, size=32, bs=4, device="cpu", clahe_clip=3.0, median=5)
    learn = radiograph_learner(arch, dls, path=tmp_path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    export_learner(learn, tmp_path / "export.pkl")
    save_model(learn, tmp_path, decision_threshold=None)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["arch"] == arch and meta["preprocess"]["clahe_clip"] == 3.0 and meta["preprocess"]["median"] == 5
    assert "decision_threshold" in meta and not list(tmp_path.glob(".*.tmp"))
    files = [str(f) for f in table.df.file[:5]]
    # One fresh process loads both (the safe format first, before anything is unpickled), as a user's would.
    code = ("import sys; from fracture_fastai.model_io import load_any; from fracture_fastai.predict import predict_files; "
            "[predict_files(load_any(src), sys.argv[5:])[0].to_csv(csv, index=False) "
            "for src, csv in (sys.argv[1:3], sys.argv[3:5])]")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "safe.csv"),
                          str(tmp_path / "export.pkl"), str(tmp_path / "pickle.csv"), *files],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    safe, pickle = pd.read_csv(tmp_path / "safe.csv"), pd.read_csv(tmp_path / "pickle.csv")
    assert (safe.iloc[:, 2:] - pickle.iloc[:, 2:]).abs().max().max() <= 1e-5


def test_loading_never_unpickles(tmp_path, monkeypatch, demo_export):
    import pickle
    dls = radiograph_dataloaders(load_table(demo_export), size=32, bs=4, device="cpu")
    save_model(radiograph_learner("cnn", dls, path=tmp_path), tmp_path)
    def refuse(*a, **k): raise AssertionError("unpickling")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_model(tmp_path / "model.json").dls.vocab == list(dls.vocab)


def test_bad_model_files_are_user_errors(tmp_path, demo_export):
    with pytest.raises(UserError, match="no model.json or export.pkl"):
        load_any(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="not a fracture_fastai model.json"):
        load_model(tmp_path)
    dls = radiograph_dataloaders(load_table(demo_export), size=32, bs=4, device="cpu")
    save_model(radiograph_learner("cnn", dls, path=tmp_path), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    json.dump({**meta, "arch": "resnet18"}, open(tmp_path / "model.json", "w"))
    with pytest.raises(UserError, match="do not fit a resnet18"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_model(tmp_path)


@pytest.mark.parametrize("saved,read", [(None, {"levels": 1, "flip": False}),  # older models: the body's output alone
                                        ({"levels": 2, "flip": True}, {"levels": 2, "flip": True}),
                                        ({"levels": 0, "flip": "yes"}, {"levels": 1, "flip": False}),
                                        ({"levels": True}, {"levels": 1, "flip": False}),
                                        ("two", {"levels": 1, "flip": False})])
def test_read_heat_map_says_how_the_run_made_its_maps(saved, read, tmp_path):
    from fracture_fastai.model_io import read_heat_map
    meta = {"format": "fracture_fastai-model/1", **({"heat_map": saved} if saved is not None else {})}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    assert read_heat_map(tmp_path) == read_heat_map(tmp_path / "model.json") == read_heat_map(tmp_path / "export.pkl") == read
    assert read_heat_map(tmp_path / "bare" / "export.pkl") == {"levels": 1, "flip": False}  # no model.json beside it
