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


@pytest.fixture(scope="session")
def fracatlas_real() -> Path:
    "The shared FracAtlas folder, read in place."
    if not (FRACATLAS / "dataset.csv").exists():
        pytest.skip(f"real data absent: {FRACATLAS} not found (it sits beside the project root as ../shared/data)")
    return FRACATLAS


@pytest.fixture(scope="session")
def fracatlas_maker():
    "`(root, n_fractured, n_normal, ...)` -> a tiny FracAtlas-shaped folder written there (`demo.make_fracatlas_demo`)."
    from fracture_fastai.demo import make_fracatlas_demo
    return make_fracatlas_demo
