"ONNX out: export a run, predict with onnxruntime alone (no torch, no fastai), the same probabilities as fastai's within 1e-4."
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'fracture_fastai[onnx]'")
pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install 'fracture_fastai[onnx]'")

from fracture_fastai.errors import UserError  # noqa: E402
from fracture_fastai.model_io import export_onnx, load_model, load_onnx, save_model  # noqa: E402
from fracture_fastai.predict import predict_files, predict_files_onnx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_IMAGES = REPO.parent / "shared" / "data" / "bone-fracture-yolo8" / "val" / "images"
TOL = 1e-4


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _images(folder, n, rng):
    "Radiograph-like PNGs of mixed kinds: 8-bit and 16-bit, wide and tall; their paths."
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = [(40, 64), (64, 40), (50, 50), (33, 71)][i % 4]
        a = rng.normal(0.5, 0.2, (h, w)).clip(0, 1)
        img = Image.fromarray((a * 65535).astype(np.uint16) if i % 2 else (a * 255).astype(np.uint8))
        paths.append(folder / f"img_{i}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def run(tiny_run):
    "(run folder with model.onnx, test images) from conftest's `tiny_run`: made and exported by the command lines."
    out, files = tiny_run
    assert (out / "model.onnx").is_file()
    return out, files


def _compare(run_dir, files, one_torch_thread=None):
    "Largest difference between the fastai and the ONNX probabilities of `files`; both tables' classes agree."
    torch_table, torch_failed = predict_files(load_model(run_dir), files)
    onnx_table, onnx_failed = predict_files_onnx(load_onnx(run_dir), files)
    assert not torch_failed and not onnx_failed and len(torch_table) == len(files)
    assert list(torch_table.file) == list(onnx_table.file)
    classes = json.loads((Path(run_dir) / "model.json").read_text())["classes"]
    return float(np.abs(torch_table[classes].to_numpy() - onnx_table[classes].to_numpy()).max())


def test_model_json_says_what_inference_needs(run):
    meta = json.loads((run[0] / "model.json").read_text())
    assert {"classes", "size", "stats", "preprocess", "onnx"} <= set(meta) and meta["onnx"] == "model.onnx"
    assert meta["preprocess"]["dicom_window"] == "first" and meta["size"] == [32, 32]


def test_onnx_matches_fastai_on_generated_images(run, one_torch_thread):
    assert _compare(run[0], run[1]) <= TOL


def test_onnx_matches_fastai_on_real_images(run, one_torch_thread):
    if not REAL_IMAGES.is_dir(): pytest.skip(f"real data absent: {REAL_IMAGES} not found")
    files = sorted(REAL_IMAGES.glob("*.jpg"))[:16]
    assert _compare(run[0], files) <= TOL


def test_predict_backend_onnx_imports_neither_torch_nor_fastai(run, tmp_path):
    code = ("import sys; from fracture_fastai.predict import main; "
            f"rc = main([{str(run[0])!r}, *sys.argv[1:], '--backend', 'onnx', '--csv', {str(tmp_path / 'p.csv')!r}]); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastai', 'torchvision', 'timm')); "
            "print('heavy:', heavy); sys.exit(rc)")
    res = _cli("-c", code, *run[1], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "heavy: []" in res.stdout, res.stdout
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(run[1])


def test_lite0_exports_and_matches(tmp_path, one_torch_thread):
    "EfficientNet-Lite0 (timm), untrained head, through the real save_model -> export_onnx path."
    from fracture_fastai.data import load_table, radiograph_dataloaders
    from fracture_fastai.models import arch_stats
    from fracture_fastai.train import radiograph_learner
    rng = np.random.default_rng(1)
    for label in ("a", "b"): _images(tmp_path / "data" / label, 3, rng)
    dls = radiograph_dataloaders(load_table(tmp_path / "data"), size=48, bs=2, stats=arch_stats("tf_efficientnet_lite0"),
                                 cache=False, num_workers=0, device="cpu")
    learn = radiograph_learner("tf_efficientnet_lite0", dls, pretrained="none", path=tmp_path)
    (tmp_path / "run").mkdir()
    save_model(learn, tmp_path / "run")
    assert export_onnx(tmp_path / "run") == tmp_path / "run" / "model.onnx"
    assert _compare(tmp_path / "run", _images(tmp_path / "test", 4, rng)) <= TOL


def test_missing_pieces_are_one_line_errors(run, tmp_path):
    res = _cli("-m", "fracture_fastai.export", tmp_path, "--onnx", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: cannot load") and res.stderr.count("\n") == 1
    res = _cli("-m", "fracture_fastai.export", run[0], cwd=tmp_path)
    assert res.returncode == 2 and "--onnx" in res.stderr
    no_onnx = tmp_path / "copy"
    no_onnx.mkdir()
    (no_onnx / "model.json").write_text((run[0] / "model.json").read_text())
    with pytest.raises(UserError, match="fracture_fastai.export .* --onnx"): load_onnx(no_onnx)
    res = _cli("-m", "fracture_fastai.predict", run[0], run[1][0], "--backend", "onnx", "--tta", "aug", cwd=tmp_path)
    assert res.returncode == 2 and "--tta aug runs through fastai" in res.stderr
