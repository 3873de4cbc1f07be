"The runner end to end: one tiny run on the real export (and the demo), its folder, predict on its export, bad input."
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

RUN_FILES = {"config.json", "history.csv", "metrics.json", "lr_find.png", "curves.png", "confusion_matrix.png",
             "top_losses.png", "export.pkl", "report.html", "gradcam.png", "model.json", "model.safetensors"}


def _cli(*args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def real_run(yolo_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cnn-real"
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--data", str(yolo_export), "--sample", "3", "--size", "64",
               "--epochs", "1", "--bs", "8", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_run_writes_every_file(real_run):
    out, res = real_run
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert res.stdout.strip().splitlines()[-1] == str(out)  # the last line is the run folder
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "done" and config["options"]["arch"] == "cnn" and config["weights"] == "none (custom CNN)"
    assert {"fastai", "torch", "timm"} <= set(config["versions"])
    assert config["data"]["splits"]["train"] == {c: 3 for c in config["data"]["classes"]}
    # every second accounted for: each phase of the run, one entry per epoch
    assert {"data", "learner", "lr_find", "train", "epochs", "evaluate", "localisation", "plots", "gradcam", "export",
            "report"} <= set(config["phases"])
    assert len(config["phases"]["epochs"]) == 1 and all(v >= 0 for k, v in config["phases"].items() if k != "epochs")
    assert config["precision"] == "fp32" and config["data"]["num_workers"] == 0
    # one image of each source radiograph per epoch: the sample's 18 images are fewer radiographs
    assert config["data"]["images_per_epoch"] <= 18 and config["options"]["copies"] == "one"
    metrics = json.loads((out / "metrics.json").read_text())
    valid = metrics["valid"]
    assert valid["n"] == 18 and 0 <= valid["accuracy_ci95"][0] <= valid["accuracy"] <= valid["accuracy_ci95"][1] <= 1
    assert len(valid["confusion_matrix"]) == 6 and set(valid["per_class"]) == set(config["data"]["classes"])
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 1 and history.valid_loss.notna().all()
    loc = valid["localisation"]  # every labelled image of the export carries its fracture polygon
    assert loc["n"] == 18 and 0 <= loc["pointing_game"] <= 1 and 0 <= loc["mass_inside"] <= 1
    report = (out / "report.html").read_text()
    assert "cnn" in report and report.count("data:image/png;base64,") == len(list(out.glob("*.png")))


def test_predict_on_the_export_in_a_fresh_process(real_run, yolo_export, tmp_path):
    out, _ = real_run
    images = sorted((yolo_export / "val" / "images").iterdir())[:3]
    res = _cli("fracture_fastai.predict", str(out / "export.pkl"), *map(str, images), "--csv", str(tmp_path / "p.csv"))
    assert res.returncode == 0, res.stderr[-2000:]
    preds = pd.read_csv(tmp_path / "p.csv")
    assert list(preds.columns[:3]) == ["file", "class", "probability"] and len(preds) == 3
    assert set(preds["class"]) <= set(preds.columns[3:])


def test_the_safe_model_predicts_as_the_export_in_fresh_processes(real_run, yolo_export, tmp_path):
    "The run folder (model.json + model.safetensors, no pickle) gives the export.pkl's probabilities."
    out, _ = real_run
    images = [str(p) for p in sorted((yolo_export / "val" / "images").iterdir())[:6]]
    safe = _cli("fracture_fastai.predict", str(out), *images, "--csv", str(tmp_path / "safe.csv"))
    pickle = _cli("fracture_fastai.predict", str(out / "export.pkl"), *images, "--csv", str(tmp_path / "pickle.csv"))
    assert safe.returncode == 0 and pickle.returncode == 0, safe.stderr[-2000:] + pickle.stderr[-2000:]
    assert "is a pickle" in pickle.stderr and "pickle" not in safe.stderr  # the pickle path says what it is, once
    a, b = pd.read_csv(tmp_path / "safe.csv"), pd.read_csv(tmp_path / "pickle.csv")
    assert list(a["class"]) == list(b["class"]) and (a.iloc[:, 2:] - b.iloc[:, 2:]).abs().max().max() <= 1e-5
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"] == "cnn" and meta["size"] == [64, 64] and len(meta["classes"]) == 6
    assert {"clahe_clip", "clahe_grid", "median", "denoise"} <= set(meta["preprocess"]) and "fastai" in meta["versions"]


def test_existing_run_folder_is_never_overwritten(real_run):
    out, _ = real_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--out", str(out))
    assert res.returncode == 2 and "already holds a run" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_demo_run_is_synthetic_and_says_so(tmp_path):
    out = tmp_path / "demo-run"
    # a relative --out, from another working directory: every file still lands in the run folder
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--sample", "2", "--size", "32", "--epochs", "1", "--bs", "4",
               "--no-tta", "--out", "demo-run", env={"FRACTURE_FASTAI_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert "SYNTHETIC" in res.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["synthetic_demo"] is True and "test" in json.loads((out / "metrics.json").read_text())
    assert (tmp_path / "home" / "demo-v1" / "data.yaml").exists()


@pytest.mark.parametrize("args,message", [(["--arch", "alexnet"], "unknown architecture 'alexnet'"),
                                          (["--data", "/no/such/folder"], "does not exist"),
                                          (["--epochs", "0"], "--epochs must be at least 1"),
                                          (["--min-size", "8"], "--min-size must be 0 (off) or at least 32"),
                                          (["--num-workers", "-1"], "--num-workers must be 0 or more")])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    res = _cli("fracture_fastai.run", *args, "--out", str(tmp_path / "never"))
    assert res.returncode == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "never").exists()  # no empty run folder left behind


def test_help_lists_the_architectures():
    res = _cli("fracture_fastai.run", "--help")
    from fracture_fastai.models import list_archs
    assert res.returncode == 0 and all(a in res.stdout for a in list_archs())


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "--lr: must be a positive number"), (["--lr", "fast"], "expected a number or 'find'"),
    (["--schedule", "sgdr", "--cycle-len", "0"], "--cycle-len must be at least 1"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"), (["--wd", "-0.1"], "--wd must be 0 or more"),
    (["--lr-mult", "0"], "--lr-mult must be a positive number"), (["--valid-pct", "1.5"], "--valid-pct must be between"),
    (["--weights", "/no/such.pth"], "no such file"), (["--schedule", "cosine"], "invalid choice"),
    (["--bogus"], "unrecognized arguments")])
def test_options_are_checked_before_any_work(args, message, tmp_path):
    res = _cli("fracture_fastai.run", "--data", "/no/such/folder", *args, "--out", str(tmp_path / "never"))
    assert res.returncode == 2 and message in res.stderr, res.stderr  # the option, not the missing data, is reported
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_unusable_out_is_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for out, message in [(tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "run", "lies under the file")]:
        res = _cli("fracture_fastai.run", "--data", "/no/such/folder", "--out", str(out))
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert (tmp_path / "a_file").read_text() == "x"


def test_check_writable_without_permission(tmp_path):
    import os
    from fracture_fastai.errors import UserError, check_writable
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not bind")
        with pytest.raises(UserError, match="no permission"):
            check_writable(locked / "run", "--out", folder=True)
    finally:
        locked.chmod(0o700)
