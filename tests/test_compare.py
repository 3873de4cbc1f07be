"The leaderboard: table logic on hand-made run folders, params and CPU timing on two real tiny runs, the command line."
import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest

from fracture_fastai.compare import COLUMNS, collect_runs, leaderboard, main, to_markdown


def _cli(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)


def _split(acc, ci, n=100, loc=None):
    "A metrics.json split as evaluate_learner writes it (per-class detail left out: compare does not read it)."
    s = {"n": n, "accuracy": acc, "accuracy_ci95": list(ci), "macro_f1": acc - 0.05, "loss": 0.5}
    if loc is not None:
        s["localisation"] = loc
    return s


def fake_run(root, name, acc=0.8, ci=(0.7, 0.9), arch="resnet18", status="done", test=None, loc=None, error=None):
    "A run folder with only config.json and metrics.json, as run.py writes them."
    run = root / name
    run.mkdir(parents=True)
    config = {"options": {"arch": arch, "size": 224, "epochs": 10, "freeze_epochs": 1}, "data": {"path": "/nowhere"},
              "weights": "package:resnet18", "status": status, "training": {"epochs_run": 8, "train_seconds": 305.0}}
    if error:
        config["error"] = error
    (run / "config.json").write_text(json.dumps(config))
    if status == "done":
        metrics = {"valid": _split(acc, ci, loc=loc), "tta": False}
        if test is not None:
            metrics["test"] = _split(*test)
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def fake_runs(tmp_path):
    root = tmp_path / "runs"
    loc = {"n": 40, "pointing_game": 0.625, "pointing_game_ci95": [0.468, 0.759], "mass_inside": 0.31,
           "mass_inside_ci95": [0.27, 0.35]}
    fake_run(root, "b-mid", 0.80, (0.75, 0.84), arch="cnn")
    fake_run(root, "a-best", 0.871, (0.8134, 0.9128), arch="tf_efficientnet_lite0", test=(0.85, (0.8, 0.9)), loc=loc)
    fake_run(root, "c-low", 0.60, (0.5, 0.7), arch="convnext_tiny")
    fake_run(root, "d-running", status="running")  # no heartbeat, no process: killed long ago
    fake_run(root, "e-failed", status="failed", error="RuntimeError: out of memory")
    live = fake_run(root, "f-live", status="running")  # this very process, beating now
    config = json.loads((live / "config.json").read_text())
    (live / "config.json").write_text(json.dumps({**config, "process": {"host": socket.gethostname(), "pid": os.getpid()}}))
    (live / "heartbeat").touch()
    return root


def test_collect_runs_skips_unfinished_runs_with_reasons(fake_runs, capsys):
    runs = collect_runs([fake_runs, fake_runs / "a-best"])  # a folder of runs, and a run again: no repeat
    assert sorted(r.name for r in runs) == ["a-best", "b-mid", "c-low"]
    err = capsys.readouterr().err
    assert f"d-running: interrupted before the end; continue it with: python -m fracture_fastai.run --resume {fake_runs / 'd-running'}" in err
    assert "e-failed: the run failed (RuntimeError: out of memory); continue it with" in err
    assert "f-live: still running" in err


def test_leaderboard_order_ci_and_blanks(fake_runs):
    df = leaderboard(collect_runs([fake_runs]), timing=False)
    assert list(df.columns) == list(COLUMNS)
    assert list(df.run) == ["a-best", "b-mid", "c-low"]  # by validation accuracy, not by name or arch
    best, mid = df.iloc[0], df.iloc[1]
    assert (best.valid_acc_low, best.valid_acc_high, best.test_accuracy) == (0.8134, 0.9128, 0.85)
    assert best.localisation_split == "valid" and best.pointing_game == 0.625 and best.mass_inside == 0.31
    assert pd.isna(mid.test_accuracy) and pd.isna(mid.pointing_game) and pd.isna(mid.params)
    assert (mid.epochs_run, mid.epochs_asked) == (8, 11)  # pretrained: --epochs plus --freeze-epochs

    md = to_markdown(df).splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in md[2:5]}
    col = header.index
    assert rows["a-best"][col("valid acc [95% CI]")] == "0.871 [0.813-0.913]"
    assert rows["a-best"][col("test acc [95% CI]")] == "0.850 [0.800-0.900]"
    assert rows["a-best"][col("pointing game [95% CI]")] == "0.625 [0.468-0.759]"
    assert rows["b-mid"][col("test acc [95% CI]")] == "" and rows["b-mid"][col("pointing game [95% CI]")] == ""
    assert rows["b-mid"][col("mass inside")] == "" and rows["b-mid"][col("train time")] == "5.1 min"
    assert rows["b-mid"][col("epochs")] == "8/11"


def test_markdown_cells_cannot_break_the_table(tmp_path):
    run = fake_run(tmp_path, "pipe")
    cfg = json.loads((run / "config.json").read_text())
    cfg["weights"] = "file:/a|b"
    (run / "config.json").write_text(json.dumps(cfg))
    md = to_markdown(leaderboard([run], timing=False)).splitlines()
    assert "file:/a\\|b" in md[2] and md[2].count(" | ") == md[0].count(" | ")


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    "Two tiny real runs on the synthetic demo (a custom CNN and a resnet18 from scratch), made once for the module."
    root = tmp_path_factory.mktemp("real") / "runs"
    home = root.parent / "home"
    for name, extra in (("cnn", []), ("resnet18", ["--pretrained", "none"])):
        res = _cli("fracture_fastai.run", "--arch", name, *extra, "--sample", "2", "--size", "32", "--epochs", "1",
                   "--bs", "4", "--no-tta", "--out", str(root / name), env={"FRACTURE_FASTAI_HOME": str(home)})
        assert res.returncode == 0, res.stderr[-3000:]
    return root, home


def test_params_and_cpu_time_of_real_exports(real_runs, monkeypatch):
    root, home = real_runs
    monkeypatch.setenv("FRACTURE_FASTAI_HOME", str(home))  # where the runs' demo data is: timing uses its valid set
    df = leaderboard(collect_runs([root]), n_images=4).set_index("run")
    assert df.loc["resnet18", "params"] > df.loc["cnn", "params"] > 0
    assert (df.cpu_ms_per_image > 0).all() and set(df.cpu_timing_images) == {"4 valid"}
    assert df.attrs["torch_threads"] >= 1

    monkeypatch.setenv("FRACTURE_FASTAI_HOME", str(root.parent / "elsewhere"))  # data gone: synthetic stand-ins
    df = leaderboard([root / "cnn"], n_images=3)
    assert df.cpu_ms_per_image[0] > 0 and df.cpu_timing_images[0] == "3 synthetic"


def test_cli_writes_markdown_csv_and_plot(real_runs):
    root, home = real_runs
    res = _cli("fracture_fastai.compare", str(root), "--n-images", "2", env={"FRACTURE_FASTAI_HOME": str(home)})
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout.strip().splitlines()
    assert out[0].startswith("| run | arch |") and out[-3:] == [str(root / f"leaderboard.{e}") for e in ("md", "csv", "png")]
    assert (root / "leaderboard.md").read_text().count("| resnet18 |") == 1
    assert set(pd.read_csv(root / "leaderboard.csv").run) == {"cnn", "resnet18"}
    assert (root / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_runs_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "not-a-run").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: no finished runs in {tmp_path / 'empty'}: no run folders")
