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
                                          (["--num-workers", "-1"], "--num-workers must be 0 or more"),
                                          (["--freeze-stride", "3"], "--freeze-stride must be 0 (off) or a power of two"),
                                          (["--cam-levels", "0"], "--cam-levels must be 1 to 4, got 0"),
                                          (["--arch", "cnn", "--freeze-stride", "4"], "keeps ImageNet weights"),
                                          (["--arch", "cnn", "--monitor", "auroc"], "--monitor auroc needs two classes")])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, cli_exit):
    from fracture_fastai.run import main
    code, err = cli_exit(main, [*args, "--out", str(tmp_path / "never")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "never").exists()  # no empty run folder left behind


def test_bad_input_in_a_fresh_process_is_one_line_and_exit_2(tmp_path):
    "As a user meets it: `python -m`, imports and all, print nothing but the one line."
    res = _cli("fracture_fastai.run", "--arch", "alexnet", "--out", str(tmp_path / "never"))
    assert res.returncode == 2 and res.stderr.startswith("error: unknown architecture 'alexnet'")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_a_recipe_sets_defaults_and_explicit_options_win(monkeypatch):
    from fracture_fastai import run
    assert run.parse_args([]).recipe == "fast" and run.parse_args([]).arch == "tf_efficientnet_lite0"
    best = run.parse_args(["--recipe", "best"])
    assert (best.arch, best.pretrained, best.size) == ("tf_efficientnet_lite1", "require", None)
    assert run.parse_args(["--recipe", "best", "--pretrained", "auto"]).pretrained == "auto"
    frac = run.parse_args(["--recipe", "fracture", "--data", "x"])
    assert (frac.size, frac.balance, frac.freeze_epochs, frac.epochs, frac.operating_point) == (320, "oversample", 1, 4, "spec=0.90")
    assert (frac.cam_loss, frac.cam_form, frac.tta) == (1.0, "features", "flip")
    # Its loss can be turned off for data without boxes: the form it set is then no error (given explicitly, it is).
    off = run.parse_args(["--recipe", "fracture", "--cam-loss", "0"])
    assert (off.cam_loss, off.cam_form, off.size) == (0.0, "features", 320)
    from fracture_fastai.errors import UserError
    with pytest.raises(UserError, match="add --cam-loss WEIGHT"): run.parse_args(["--cam-form", "features"])
    monkeypatch.setitem(run.RECIPES, "wide", {"size": 256, "epochs": 12, "label_smoothing": 0.1})
    args = run.parse_args(["--recipe", "wide"])
    assert (args.size, args.epochs, args.label_smoothing, args.bs) == (256, 12, 0.1, 32)
    args = run.parse_args(["--epochs", "3", "--recipe", "wide"])  # given explicitly, wherever on the line: wins
    assert (args.size, args.epochs) == (256, 3)
    assert "--size 256 --epochs 12 --label-smoothing 0.1" in run.recipe_options("wide")


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
    (["--snapshots"], "--snapshots takes the weights at the end of each SGDR cycle: add --schedule sgdr"),
    (["--bogus"], "unrecognized arguments")])
def test_options_are_checked_before_any_work(args, message, tmp_path, cli_exit):
    from fracture_fastai.run import main
    code, err = cli_exit(main, ["--data", "/no/such/folder", *args, "--out", str(tmp_path / "never")])
    assert code == 2 and message in err, err  # the option, not the missing data, is reported
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_unusable_out_is_refused_before_any_work(tmp_path, cli_exit):
    from fracture_fastai.run import main
    (tmp_path / "a_file").write_text("x")
    for out, message in [(tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "run", "lies under the file")]:
        code, err = cli_exit(main, ["--data", "/no/such/folder", "--out", str(out)])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
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


RESUMABLE = ["--arch", "cnn", "--sample", "4", "--size", "48", "--epochs", "5", "--bs", "4", "--no-tta"]


def _run_until_checkpoint(held_process, out, sig, args=RESUMABLE):
    "Start a demo run, send `sig` once its first checkpoint is written; the finished process."
    import signal
    proc = held_process("fracture_fastai.run", [*args, "--out", out], "checkpoint",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.send_signal(getattr(signal, sig))
    proc.stderr_text = proc.communicate()[1]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    res = _cli("fracture_fastai.run", *RESUMABLE, "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_a_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path, held_process):
    "SIGKILL after an epoch, shown as interrupted with its resume command; --resume ends where an unbroken run ends."
    out = tmp_path / "killed"
    proc = _run_until_checkpoint(held_process, out, "SIGKILL")
    assert proc.returncode == -9
    assert json.loads((out / "config.json").read_text())["status"] == "running"  # what a hard kill leaves behind
    report = _cli("fracture_fastai.compare", str(out), "--no-timing")
    assert f"interrupted before the end; continue it with: python -m fracture_fastai.run --resume {out}" in report.stderr

    res = _cli("fracture_fastai.run", "--resume", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout and res.stdout.strip().splitlines()[-1] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "done" and len(config["resumed"]) == 1 and config["training"]["resumed_from"]["epochs_done"] >= 1
    assert not (out / "models" / "checkpoint.pth").exists() and (out / "export.pkl").is_file()
    history, whole = pd.read_csv(out / "history.csv"), pd.read_csv(uninterrupted / "history.csv")
    assert list(history.epoch) == [0, 1, 2, 3, 4]  # appended, not restarted
    # Model, optimiser, schedule position and random states all came back: the very numbers of the unbroken run.
    cols = ["train_loss", "valid_loss", "accuracy"]
    assert (history[cols] - whole[cols]).abs().max().max() < 1e-6
    a, b = (json.loads((d / "metrics.json").read_text())["valid"] for d in (out, uninterrupted))
    assert a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_ctrl_c_says_how_to_resume_and_a_finished_run_is_not_resumed(uninterrupted, tmp_path, held_process):
    out = tmp_path / "stopped"
    proc = _run_until_checkpoint(held_process, out, "SIGINT")
    assert proc.returncode == 130 and f"--resume {out}" in proc.stderr_text and "Traceback" not in proc.stderr_text
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "interrupted" and config["resume"].endswith(f"--resume {out}")
    assert "Continue it with" in (out / "report.html").read_text()
    for args, message in [(["--resume", str(uninterrupted)], "finished already"),
                          (["--resume", str(tmp_path / "nowhere")], "not a run folder"),
                          (["--resume", str(out), "--epochs", "9"], "--resume takes no other options (given: --epochs)")]:
        res = _cli("fracture_fastai.run", *args)
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert json.loads((out / "config.json").read_text()) == config  # a refused resume touches nothing
    (out / "config.json").write_text(json.dumps({**config, "data": {**config["data"], "images_per_epoch": 1}}))
    res = _cli("fracture_fastai.run", "--resume", str(out))  # the data it would load differs from the run's
    assert res.returncode == 2 and "changed since the run started" in res.stderr, res.stderr


def test_a_run_killed_in_its_frozen_phase_resumes_there(tmp_path, held_process):
    "A pretrained arch killed after its first head-only epoch goes on with the second, then the unfrozen ones."
    args = ["--arch", "tf_efficientnet_lite0", "--sample", "4", "--size", "64", "--freeze-epochs", "2", "--epochs", "1",
            "--bs", "4", "--no-tta"]
    whole = tmp_path / "whole"
    assert _cli("fracture_fastai.run", *args, "--out", str(whole)).returncode == 0
    out = tmp_path / "killed"
    assert _run_until_checkpoint(held_process, out, "SIGKILL", args).returncode == -9
    res = _cli("fracture_fastai.run", "--resume", str(out))
    assert res.returncode == 0 and "frozen phase, 1 of 2 epochs done" in res.stdout, res.stderr[-3000:]
    a, b = pd.read_csv(out / "history.csv"), pd.read_csv(whole / "history.csv")
    assert list(a.phase) == ["frozen", "frozen", "unfrozen"]
    assert (a[["train_loss", "valid_loss"]] - b[["train_loss", "valid_loss"]]).abs().max().max() < 1e-6


def test_snapshot_ensemble_is_scored_and_predicts(demo_export, tmp_path):
    "--snapshots: each SGDR cycle's end kept as a model folder, their mean scored in metrics.json, predict takes them."
    from fracture_fastai.run import main
    out = tmp_path / "snap"
    main(["--arch", "cnn", "--data", str(demo_export), "--size", "32", "--epochs", "2", "--bs", "4", "--schedule", "sgdr",
          "--cycle-len", "1", "--snapshots", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        ens = metrics[split]["snapshot_ensemble"]
        assert ens["models"] == ["snapshot0", "snapshot1"] and len(ens["member_accuracy"]) == 2
        assert ens["n"] == metrics[split]["n"] and 0 <= ens["accuracy"] <= 1
    assert {p.name for p in (out / "models").iterdir()} == {"best.pth"}  # the .pth snapshots became model folders
    assert "snapshot ensemble accuracy" in (out / "report.html").read_text()
    images = sorted(p for p in demo_export.rglob("*") if p.suffix in (".jpg", ".png"))[:2]
    res = _cli("fracture_fastai.predict", str(out / "snapshots" / "snapshot0"), "--ensemble",
               str(out / "snapshots" / "snapshot1"), *map(str, images), "--csv", str(tmp_path / "p.csv"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(images)
