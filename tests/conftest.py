"Shared fixtures: the real shared dataset (skipped where absent), tiny synthetic datasets, an offline environment."
import os
import tempfile
from pathlib import Path

import pytest

# Tests never reach a model hub, and plots never need a display.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# The preprocessing cache of the test session lives apart from the user's own (subprocesses inherit it too).
os.environ.setdefault("FRACTURE_FASTAI_CACHE", tempfile.mkdtemp(prefix="fracture-fastai-test-cache-"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
YOLO_EXPORT = SHARED_DATA / "bone-fracture-yolo8"


@pytest.fixture(scope="session")
def yolo_export() -> Path:
    "The seed's real Kaggle export, read in place."
    if not (YOLO_EXPORT / "data.yaml").exists():
        pytest.skip(f"real data absent: {YOLO_EXPORT} not found (it sits beside the project root as ../shared/data)")
    return YOLO_EXPORT


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory) -> Path:
    "A small synthetic YOLO export made by the package's demo generator."
    from fracture_fastai.demo import make_demo
    return make_demo(tmp_path_factory.mktemp("demo") / "demo", n_train=6, n_valid=2, n_test=2, size=64)


@pytest.fixture(scope="module")
def one_torch_thread():
    "One torch thread for a module: tiny batches gain nothing from two, and on a busy 2-core machine two can stall for seconds."
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


FRACATLAS = SHARED_DATA / "fracatlas"
FRACATLAS_COLUMNS = ["image_id", "hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan", "fractured",
                     "fracture_count", "frontal", "lateral", "oblique"]


@pytest.fixture(scope="session")
def fracatlas_real() -> Path:
    "The shared FracAtlas folder, read in place."
    if not (FRACATLAS / "dataset.csv").exists():
        pytest.skip(f"real data absent: {FRACATLAS} not found (it sits beside the project root as ../shared/data)")
    return FRACATLAS


def make_fracatlas(root: Path, n_fractured: int = 6, n_normal: int = 18, size=(40, 32), seed: int = 0) -> Path:
    "A tiny folder in FracAtlas's layout: dataset.csv (its real columns), images/{Fractured,Non_fractured}, YOLO boxes."
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    rows = []
    for label, n in (("Fractured", n_fractured), ("Non_fractured", n_normal)):
        for i in range(n):
            image_id = f"IMG{len(rows):07d}.jpg"
            part = ("hand", "leg")[i % 2]
            pixels = rng.integers(40, 90, size[::-1]).astype(np.uint8)
            box = None
            if label == "Fractured":  # a bright patch where the box says the fracture is
                cx, cy, bw, bh = 0.25 + 0.5 * rng.random(), 0.25 + 0.5 * rng.random(), 0.3, 0.3
                x0, y0 = int((cx - bw / 2) * size[0]), int((cy - bh / 2) * size[1])
                pixels[y0:y0 + int(bh * size[1]), x0:x0 + int(bw * size[0])] = 230
                box = f"0 {cx:.4f} {cy:.4f} {bw:.4f} {bh:.4f}\n"
            (root / "images" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "images" / label / image_id, quality=95)
            (root / "Annotations" / "YOLO").mkdir(parents=True, exist_ok=True)
            (root / "Annotations" / "YOLO" / image_id.replace(".jpg", ".txt")).write_text(box or "")
            rows.append([image_id, int(part == "hand"), int(part == "leg"), 0, 0, 0, int(i % 3 == 0), 0,
                         int(label == "Fractured"), int(label == "Fractured"), 1, 0, 0])
    lines = [",".join(FRACATLAS_COLUMNS)] + [",".join(map(str, r)) for r in rows]
    (root / "dataset.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def fracatlas_maker():
    "`make_fracatlas(root, n_fractured, n_normal, ...)`: writes a tiny FracAtlas-shaped folder and returns it."
    return make_fracatlas
