"Data-parallel training: two CPU processes under torchrun or accelerate launch (gloo) write one complete run folder, from rank 0 only."
import json
import os
import shutil
import subprocess
import sys

import pytest

from fracture_fastai import distributed


def test_single_process_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    distributed.setup()  # joins nothing
    assert distributed.rank0_first(lambda x: x + 1, 1) == 2
    assert distributed.share_path(tmp_path) == tmp_path
    with distributed.data_parallel("a learner") as learn:
        assert learn == "a learner"
    distributed.finish(tmp_path)  # rank 0 keeps its folder
    assert tmp_path.is_dir()


BIN = os.path.dirname(sys.executable)
LAUNCHERS = {  # two CPU processes each; accelerate takes --multi_gpu for its torch launcher, gloo on CPUs
    "torchrun": ["torchrun", "--nproc_per_node", "2"],
    "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_cpu_processes_write_one_run_folder(tmp_path, launcher):
    if shutil.which(LAUNCHERS[launcher][0], path=BIN) is None:
        pytest.skip(f"{LAUNCHERS[launcher][0]} not installed")
    out, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch), "HF_HUB_OFFLINE": "1"}
    cmd = [os.path.join(BIN, LAUNCHERS[launcher][0]), *LAUNCHERS[launcher][1:], "-m", "fracture_fastai.run",
           "--arch", "cnn", "--size", "32", "--epochs", "1", "--lr", "1e-3", "--num-workers", "0", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "done" and config["world_size"] == 2
    for name in ("metrics.json", "history.csv", "predictions.csv", "export.pkl", "model.safetensors", "report.html"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["valid"]["n"] == 60  # every validation image once, not once per process
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("run", "tmp")] == []  # no second run folder
    assert [p for p in scratch.iterdir() if p.name.startswith("fracture-rank")] == []  # rank 1's scratch removed
    assert r.stdout.strip().splitlines()[-1] == str(out)  # the run folder, printed once
