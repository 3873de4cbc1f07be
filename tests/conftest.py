"Shared fixtures: the real shared dataset (skipped where absent), tiny synthetic datasets, an offline environment."
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Tests never reach a model hub, and plots never need a display.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# The preprocessing cache of the test session lives apart from the user's own (subprocesses, xdist's workers among
# them, inherit it), and goes when the process that made it ends.
if "FRACTURE_FASTAI_CACHE" not in os.environ:
    os.environ["FRACTURE_FASTAI_CACHE"] = tempfile.mkdtemp(prefix="fracture-fastai-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FRACTURE_FASTAI_CACHE"], ignore_errors=True)

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    "(run folder, test images): a cnn run (1 epoch, 32 px) on generated 8/16-bit PNGs and JPEGs, exported to ONNX by the CLIs."
    import subprocess
    import sys
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp("tiny_run")
    rng = np.random.default_rng(0)

    def images(folder, n, bright):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = [(40, 64), (64, 40), (50, 50), (33, 71)][i % 4]
            a = rng.normal(0.5, 0.2, (h, w))
            a[h // 4:h // 2, w // 3:w // 2] += 0.4 * bright
            a = a.clip(0, 1)
            if i % 3 == 0: Image.fromarray((a * 65535).astype(np.uint16)).save(folder / f"img_{i}.png")
            else: Image.fromarray((a * 255).astype(np.uint8)).save(folder / f"img_{i}.{'png' if i % 3 == 1 else 'jpg'}")
        return sorted(folder.iterdir())

    for label, bright in (("a", 0), ("b", 1)): images(root / "data" / label, 6, bright)
    out, repo = root / "run", Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    for cmd in (["fracture_fastai.run", "--arch", "cnn", "--data", str(root / "data"), "--size", "32", "--epochs", "1",
                 "--bs", "4", "--lr", "1e-3", "--no-tta", "--out", str(out)],
                ["fracture_fastai.export", str(out), "--onnx"]):
        res = subprocess.run([sys.executable, "-m", *cmd], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    return out, images(root / "test", 8, 1)


@pytest.fixture
def cli_exit(capsys):
    """Call a command line's `main(argv)` in this process: `(exit code, stderr)`. For the many bad-input checks, which
    fail before any work; one check per command still runs in a fresh process (`python -m`), imports and all."""
    import signal

    def _call(main, argv):
        sigterm = signal.getsignal(signal.SIGTERM)  # run's main turns SIGTERM into Ctrl-C: not in the test process
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        return code, capsys.readouterr().err
    return _call


# The child of `held_process`: it runs a module's command line with one patch that makes it wait at a known place.
_HOLD = """
import pathlib, runpy, sys, time
module, hold, mark, *argv = sys.argv[1:]
def wait():
    pathlib.Path(mark).touch()
    time.sleep(120)
if hold == "checkpoint":  # after the first checkpoint is written
    from fracture_fastai import train
    save = train.Checkpoint.save
    def held_save(self, *a, **k):
        save(self, *a, **k)
        wait()
    train.Checkpoint.save = held_save
else:  # "fit:NAME": when training starts in the run folder NAME
    from fastai.learner import Learner
    import fracture_fastai.run as R
    out, run, fit = [None], R.run, Learner.fit
    def held_run(args, *a, **k):
        out[0] = pathlib.Path(args.out)
        return run(args, *a, **k)
    def held_fit(self, *a, **k):
        if out[0].name == hold[4:]: wait()
        return fit(self, *a, **k)
    R.run, Learner.fit = held_run, held_fit
sys.argv = [module, *argv]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def held_process(tmp_path):
    """Start `python -m module *args` so that it stops at a known place and waits there for the test's signal:
    `hold="checkpoint"` after the first checkpoint is written, `hold="fit:NAME"` as training starts in the run folder
    NAME. Returns the process once it waits, so the signal lands there however fast or slow the machine is."""
    def start(module, args, hold, env=None, **popen):
        mark = tmp_path / f"held-{time.monotonic_ns()}"
        # pytest-xdist's workers ignore SIGINT, and an ignored signal stays ignored in a child: give it back Ctrl-C.
        proc = subprocess.Popen([sys.executable, "-c", _HOLD, module, hold, str(mark), *map(str, args)],
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
        deadline = time.time() + 300
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if not mark.exists():
            proc.kill()
            pytest.fail(f"{module} {' '.join(map(str, args))} ended or stalled before it reached {hold!r}: "
                        f"exit {proc.wait()}")
        return proc
    return start
