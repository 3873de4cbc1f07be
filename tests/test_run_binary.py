"A binary (fracture or not) run end to end on a generated FracAtlas-shaped folder: its metrics, plots, threshold, predict."
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


BINARY_FILES = {"roc.png", "pr.png", "calibration.png", "metrics.json", "model.json", "report.html"}
BINARY_KEYS = {"positive", "negative", "threshold", "auroc", "auroc_ci95", "average_precision", "sensitivity",
               "sensitivity_ci95", "specificity", "specificity_ci95", "ppv", "ppv_ci95", "npv", "npv_ci95", "brier", "ece",
               "accuracy", "baseline_accuracy", "subgroups"}


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory, fracatlas_maker):
    data = fracatlas_maker(tmp_path_factory.mktemp("fracatlas") / "fa", n_fractured=12, n_normal=24)
    out = tmp_path_factory.mktemp("runs") / "cnn-fracatlas"
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--data", str(data), "--size", "32", "--epochs", "1",
               "--lr", "1e-3", "--bs", "8", "--operating-point", "sens=0.90", "--tta", "flip", "--cam-levels", "2",
               "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return data, out, res


def test_binary_run_writes_the_binary_metrics_and_plots(binary_run):
    _, out, res = binary_run
    assert BINARY_FILES <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    valid, test = metrics["valid"]["binary"], metrics["test"]["binary"]
    assert BINARY_KEYS <= set(valid) and BINARY_KEYS <= set(test)
    assert valid["positive"] == "fractured" and valid["operating_point"] == "sens=0.90"
    assert valid["sensitivity"] >= 0.9  # the rule it was chosen by, on the split it was chosen on
    assert test["threshold"] == valid["threshold"]  # applied unchanged to the test split
    assert valid["baseline_accuracy"] == pytest.approx(4 / 6)  # 2 fractured, 4 normal in valid
    assert set(valid["subgroups"]) == {"body_part", "hardware"} and set(valid["subgroups"]["body_part"]) == {"hand", "leg"}
    # Grad-CAM of 'fractured' on the fractured images: all of them, and the true positives among them
    loc = metrics["valid"]["localisation"]
    assert loc["target"] == "fractured" and loc["images"] == "all positives" and loc["n"] == 2
    assert loc["levels"] == 2 and loc["flip"] is True  # --cam-levels 2, and mirror-averaged as --tta flip scores
    assert metrics["valid"].get("localisation_tp", {"n": 0})["n"] == valid["tp"]
    assert "AUROC" in res.stdout
    assert pd.read_csv(out / "history.csv").auroc.between(0, 1).all()  # two classes: the validation AUROC each epoch
    decision = json.loads((out / "model.json").read_text())["decision"]
    assert decision == {"positive": "fractured", "threshold": valid["threshold"], "operating_point": "sens=0.90",
                        "chosen_on": "valid"}
    assert json.loads((out / "model.json").read_text())["tta"] == "flip"  # what the threshold was chosen with
    assert json.loads((out / "model.json").read_text())["heat_map"] == {"levels": 2, "flip": True}  # what was scored
    report = (out / "report.html").read_text()
    assert "AUROC" in report and "roc.png" in report and "calibration.png" in report
    verdict = report[report.index("<h2>Verdict</h2>"):report.index("<h2>Metrics</h2>")]
    assert "test split" in verdict and "AUROC" in verdict and "roc.png" in verdict and "sensitivity at threshold" in verdict


def test_predict_applies_the_saved_threshold(binary_run, tmp_path, capsys):
    data, out, _ = binary_run
    scored = pd.read_csv(out / "predictions.csv")  # valid and test images, with the run's own probabilities
    images = sorted((data / "images").rglob("*.jpg"))[:3] + [Path(f) for f in scored.file[:3]]
    threshold = json.loads((out / "model.json").read_text())["decision"]["threshold"]
    res = _cli("fracture_fastai.predict", str(out), *map(str, images), "--csv", str(tmp_path / "p.csv"))
    assert res.returncode == 0, res.stderr[-2000:]
    preds = pd.read_csv(tmp_path / "p.csv")
    assert {"fractured", "normal"} <= set(preds.columns)  # one probability column per class
    clear = (preds.fractured - threshold).abs() > 1e-5  # the CSV rounds to 6 decimals; a valid image sits on it
    expected = preds.fractured.ge(threshold).map({True: "fractured", False: "normal"})
    assert clear.sum() >= 4 and (preds["class"] == expected)[clear].all()
    assert preds.probability.tolist() == pytest.approx(preds.fractured.tolist(), abs=1e-6)
    # By default with the run's flip TTA, as its threshold was chosen: the very probabilities the run scored
    assert "test-time augmentation flip, as its metrics and threshold were measured" in res.stderr
    assert preds.fractured[3:].tolist() == pytest.approx(scored.prob_fractured[:3].tolist(), abs=1e-5)
    from fracture_fastai.predict import main
    assert main([str(out), *map(str, images), "--tta", "none", "--csv", str(tmp_path / "plain.csv")]) == 0
    assert "test-time augmentation" not in capsys.readouterr().err
    plain = pd.read_csv(tmp_path / "plain.csv")
    assert (plain.fractured - preds.fractured).abs().max() > 1e-4  # --tta none: one pass, other probabilities
    # --threshold overrides: 0 calls everything fractured (in this process: a second fastai start costs seconds)
    assert main([str(out), *map(str, images), "--threshold", "0"]) == 0
    captured = capsys.readouterr()
    assert [line.split("\t")[1] for line in captured.out.splitlines()] == ["fractured"] * 6
    assert "from 0.0000 on (--threshold)" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        main([str(out), str(images[0]), "--threshold", "1.5"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: --threshold")


def test_bad_positive_and_operating_point_fail_early(binary_run, tmp_path, capsys):
    from fracture_fastai.run import main
    data, _, _ = binary_run
    for option, value, says in (("--positive", "broken", "--positive 'broken' is not a class"),
                                ("--operating-point", "sens=2", "operating point must be")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--arch", "cnn", "--data", str(data), "--size", "32", "--epochs", "1", option, value,
                  "--out", str(tmp_path / "r"), "--no-cache"])
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(f"error: {says}")
        assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())

def test_monitor_auroc_needs_both_classes_in_validation(tmp_path, fracatlas_maker, cli_exit):
    from fracture_fastai.run import main
    data = fracatlas_maker(tmp_path / "fa", n_fractured=1, n_normal=12)  # the one fractured image: in train
    code, err = cli_exit(main, ["--arch", "cnn", "--data", str(data), "--size", "32", "--monitor", "auroc",
                                "--out", str(tmp_path / "never"), "--no-cache"])
    assert code == 2 and "--monitor auroc needs two classes, both in the validation split" in err
    assert "normal 2" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_leaderboard_shows_auroc_and_sensitivity(binary_run):
    from fracture_fastai.compare import leaderboard, to_markdown
    _, out, _ = binary_run
    metrics = json.loads((out / "metrics.json").read_text())
    df = leaderboard([out], timing=False)
    row = df.iloc[0]
    assert row.valid_auroc == pytest.approx(metrics["valid"]["binary"]["auroc"])
    assert row.test_sensitivity == pytest.approx(metrics["test"]["binary"]["sensitivity"])
    assert row.operating_point == "sens=0.90"
    md = to_markdown(df)
    assert "test AUROC [95% CI]" in md and "sens=0.90" in md and "Sorted by validation AUROC" in md


def test_the_onnx_backend_applies_the_saved_threshold_too(binary_run, tmp_path, capsys):
    "A fracture model exported to ONNX makes the same calls at the same threshold as through fastai."
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'fracture_fastai[onnx]'")
    pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install 'fracture_fastai[onnx]'")
    from fracture_fastai.export import main as export
    from fracture_fastai.predict import main
    data, out, _ = binary_run
    scored = pd.read_csv(out / "predictions.csv")  # valid and test images, with the run's own probabilities
    images = [*scored[scored.label == "fractured"].file[:3], *scored[scored.label == "normal"].file[:3]]
    export([str(out), "--onnx"])
    tables = {}
    for backend in ("fastai", "onnx"):
        assert main([str(out), *map(str, images), "--backend", backend, "--csv", str(tmp_path / f"{backend}.csv")]) == 0
        assert "called 'fractured' from" in capsys.readouterr().err
        tables[backend] = pd.read_csv(tmp_path / f"{backend}.csv")
    a, b = tables["fastai"], tables["onnx"]
    assert list(a["class"]) == list(b["class"]) and (a.probability - b.probability).abs().max() <= 1e-4
    # Both flipped, as the run measured: the ONNX table is the run's own probabilities, not one pass's
    assert (b.fractured - scored.set_index("file").loc[images, "prob_fractured"].to_numpy()).abs().max() <= 1e-4
    for tta, says in (("aug", "--tta aug runs through fastai"), (None, "measured with --tta aug")):
        if tta is None:  # a model measured with fastai's tta: the ONNX backend cannot repeat it, and says so
            meta = json.loads((out / "model.json").read_text())
            (tmp_path / "aug").mkdir()
            (tmp_path / "aug" / "model.json").write_text(json.dumps({**meta, "tta": "aug"}))
        with pytest.raises(SystemExit) as exit_info:
            main([str(out if tta else tmp_path / "aug"), str(images[0]), "--backend", "onnx",
                  *(["--tta", tta] if tta else [])])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_split_seed_keeps_the_images_while_the_seed_changes(binary_run, tmp_path):
    "--split-seed: another training seed on the same validation and test images (what paired comparisons and ensembles need)."
    from fracture_fastai.data import load_table
    data, out, _ = binary_run
    splits = {s: load_table(data, seed=s).df.set_index("file").split for s in (7, 42)}
    assert (splits[7] != splits[42]).any()  # without it, seed 7 would split the images otherwise
    other = tmp_path / "seed7"
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--data", str(data), "--size", "32", "--epochs", "1", "--lr", "1e-3",
               "--bs", "8", "--seed", "7", "--split-seed", "42", "--out", str(other))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (pd.read_csv(d / "predictions.csv").set_index("file").sort_index() for d in (out, other))
    assert a.index.equals(b.index) and a.split.equals(b.split)
    assert not a.prob_fractured.equals(b.prob_fractured)  # trained otherwise: another model on the same images
    assert json.loads((other / "config.json").read_text())["options"]["split_seed"] == 42
    # Such seeds make an ensemble: compare --ensemble scores their mean probabilities, its threshold chosen on valid
    from sklearn.metrics import roc_auc_score
    res = _cli("fracture_fastai.compare", str(out), str(other), "--ensemble", "--no-timing", "--out", str(tmp_path / "cmp"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Ensemble of 2 runs" in res.stdout and "chosen on valid for sens=0.90" in res.stdout
    ens = json.loads((tmp_path / "cmp" / "ensemble.json").read_text())
    mean = (a.prob_fractured + b.prob_fractured) / 2
    for split in ("valid", "test"):
        y = (a.label[a.split == split] == "fractured").astype(int)
        assert ens[split]["auroc"] == pytest.approx(roc_auc_score(y, mean[a.split == split]))
        assert ens[split]["tp"] == int(((mean[a.split == split] >= ens["threshold"]) & (y == 1)).sum())
        assert ens["members"][str(other)][split]["auroc"] == pytest.approx(
            json.loads((other / "metrics.json").read_text())[split]["binary"]["auroc"])
    for split in ("valid", "test"):  # the averaged heat maps, scored on the fractured images' boxes
        assert ens[split]["localisation"]["n"] == json.loads((out / "metrics.json").read_text())[split]["localisation"]["n"]
    valid_y = (a.label[a.split == "valid"] == "fractured").astype(int)
    assert ens["valid"]["sensitivity"] >= 0.9 or valid_y.sum() == 0  # the operating point met where it was chosen
    # predict calls the ensemble's images at the threshold chosen for it on valid, not at its members' mean threshold
    images = list(a.index[a.split == "test"][:6])
    ens_json = str(tmp_path / "cmp" / "ensemble.json")
    res = _cli("fracture_fastai.predict", str(out), "--ensemble", str(other), *images, "--threshold", ens_json,
               "--csv", str(tmp_path / "ens.csv"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"from {ens['threshold']:.4f} on (the ensemble's, chosen on validation for sens=0.90" in res.stderr
    called = pd.read_csv(tmp_path / "ens.csv").set_index("file").loc[images]
    assert called.probability.to_numpy() == pytest.approx(mean[images].to_numpy(), abs=1e-4)
    assert list(called["class"]) == ["fractured" if m >= ens["threshold"] else "normal" for m in mean[images]]
    res = _cli("fracture_fastai.predict", str(out), *images, "--threshold", ens_json)  # one member alone: refused
    assert res.returncode == 2 and "was chosen for the ensemble of" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_an_ensemble_of_one_model_twice_points_where_the_model_does(binary_run):
    """The ensemble's heat map is its members' maps averaged: two copies of one model score exactly as that model did,
    its maps made as the model's run made them (model.json: two levels, mirror-averaged)."""
    from fracture_fastai.stats import ensemble_binary
    _, out, _ = binary_run
    ens = ensemble_binary([out, out], localisation=True)
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert ens[split]["auroc"] == pytest.approx(metrics[split]["binary"]["auroc"])
        own, averaged = metrics[split]["localisation"], ens[split]["localisation"]
        assert averaged["n"] == own["n"] > 0
        assert averaged["pointing_game"] == pytest.approx(own["pointing_game"])
        assert averaged["mass_inside"] == pytest.approx(own["mass_inside"], abs=1e-4)
        assert (averaged["levels"], averaged["flip"]) == ([2, 2], [True, True])


def test_each_member_of_an_ensemble_makes_its_map_as_its_run_did(binary_run, tmp_path):
    "Members whose runs made their maps otherwise (model.json's heat_map) each contribute their own kind of map."
    import shutil
    from fracture_fastai.stats import ensemble_binary
    _, out, _ = binary_run
    one = shutil.copytree(out, tmp_path / "one-level")  # the same weights, its maps said to be of one level, unmirrored
    meta = json.loads((one / "model.json").read_text())
    (one / "model.json").write_text(json.dumps({**meta, "heat_map": {"levels": 1, "flip": False}}))
    own = json.loads((out / "metrics.json").read_text())["valid"]["localisation"]  # two levels, mirror-averaged
    alike = ensemble_binary([one, one], localisation=True)["valid"]["localisation"]
    mixed = ensemble_binary([out, one], localisation=True)["valid"]["localisation"]
    assert (alike["levels"], alike["flip"]) == ([1, 1], [False, False])
    assert (mixed["levels"], mixed["flip"]) == ([2, 1], [True, False]) and mixed["n"] == alike["n"] == own["n"] > 0
    # Three kinds of map of one model: its own, the one-level map, and their average
    assert len({round(own["mass_inside"], 6), round(alike["mass_inside"], 6), round(mixed["mass_inside"], 6)}) == 3

def test_split_seed_also_draws_the_sample(binary_run, tmp_path):
    "--sample is drawn with the split's seed, so a smaller run under another training seed still sees the same images."
    from fracture_fastai.data import load_table, sample_per_class
    data, _, _ = binary_run
    table = load_table(data, seed=42).df
    scored = {s: set(sample_per_class(table, 1, seed=s).query("split != 'train'").file) for s in (7, 42)}
    assert scored[7] != scored[42]  # drawn with the training seed, the sample would hold other valid/test images
    out = tmp_path / "sampled"
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--data", str(data), "--size", "32", "--epochs", "1", "--lr", "1e-3",
               "--bs", "2", "--seed", "7", "--split-seed", "42", "--sample", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(pd.read_csv(out / "predictions.csv").file) == scored[42]


def test_keep_last_writes_the_last_epoch_as_a_run_and_scores_the_pair(tmp_path, fracatlas_maker):
    from sklearn.metrics import roc_auc_score
    from fracture_fastai.run import main
    from fracture_fastai.stats import ensemble_binary
    data = fracatlas_maker(tmp_path / "fa", n_fractured=12, n_normal=24)
    common = ["--arch", "cnn", "--data", str(data), "--size", "32", "--epochs", "3", "--bs", "8", "--tta", "none",
              "--operating-point", "sens=0.90", "--keep-last", "--lr", "1e-3"]
    out = tmp_path / "run"
    main([*common, "--out", str(out)])
    history, config = pd.read_csv(out / "history.csv"), json.loads((out / "config.json").read_text())
    assert config["training"]["best_epoch"] == 0, "this seed's validation loss is lowest after the first epoch"
    metrics = json.loads((out / "metrics.json").read_text())
    last = out / "last_epoch"
    mine = json.loads((last / "metrics.json").read_text())
    # each folder holds the weights it says: its loss on the validation split is that epoch's in history.csv
    assert metrics["valid"]["loss"] == pytest.approx(history.valid_loss[0], rel=1e-4)
    assert mine["valid"]["loss"] == pytest.approx(history.valid_loss[2], rel=1e-4)
    assert {"model.json", "model.safetensors", "predictions.csv", "metrics.json", "config.json"} <= {p.name for p in last.iterdir()}
    assert json.loads((last / "config.json").read_text())["last_epoch_of"] == {"run": "..", "epoch": 2}
    assert json.loads((last / "config.json").read_text())["options"]["epoch"] == "last"  # not a second seed to compare
    decision = json.loads((last / "model.json").read_text())["decision"]
    assert decision["threshold"] == mine["valid"]["binary"]["threshold"] == mine["test"]["binary"]["threshold"]
    assert json.loads((last / "config.json").read_text())["decision"] == decision
    # the pair as one ensemble, from the two prediction files, as metrics.json and ensemble_binary score it
    a, b = (pd.read_csv(d / "predictions.csv").query("split == 'valid'") for d in (out, last))
    assert list(a.file) == list(b.file)
    pair = roc_auc_score(a.label == "fractured", (a.prob_fractured + b.prob_fractured) / 2)
    entry = metrics["valid"]["last_epoch"]
    assert entry["epoch"] == 2 and entry["folder"] == "last_epoch" and entry["auroc"] == mine["valid"]["binary"]["auroc"]
    assert entry["ensemble_auroc"] == pytest.approx(pair)
    assert ensemble_binary([out, last])["valid"]["auroc"] == pytest.approx(pair)
    res = _cli("fracture_fastai.compare", str(out), str(last), "--ensemble", "--no-timing", "--out", str(tmp_path / "cmp"))
    assert res.returncode == 0, res.stderr[-2000:]  # the last epoch is a run of its own to compare's leaderboard too
    assert json.loads((tmp_path / "cmp" / "ensemble.json").read_text())["valid"]["auroc"] == pytest.approx(pair)
    assert "last epoch (2, last_epoch/)" in (out / "report.html").read_text()
    assert not (out / "models" / "checkpoint.pth").exists()
    # where the kept epoch is the last one there is no second model
    main([*common, "--monitor", "none", "--out", str(tmp_path / "none")])
    assert json.loads((tmp_path / "none" / "metrics.json").read_text())["valid"]["last_epoch"] == {"epoch": 2, "same_as_best": True}
    assert not (tmp_path / "none" / "last_epoch").exists()
