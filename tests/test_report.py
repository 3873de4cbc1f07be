"report.html: self-contained (every PNG embedded), escaped, and complete or gracefully partial."
import base64
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fracture_fastai.report import main, render_report, write_report

CLASSES = ["elbow", "wrist"]


def _split(acc, ci, loc=None):
    s = {"n": 20, "accuracy": acc, "accuracy_ci95": list(ci), "macro_f1": 0.7421, "loss": 0.61,
         "per_class": {c: {"precision": 0.8, "recall": 0.7, "f1": 0.7467, "support": 10} for c in CLASSES},
         "confusion_matrix": [[7, 3], [2, 8]], "classes": CLASSES}
    if loc is not None:
        s["localisation"] = loc
    return s


def _png(path, value):
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def fake_run(tmp_path, arch="resnet18", test=True, localisation=True, pngs=("curves.png", "lr_find.png", "extra.png")):
    "A run folder as run.py leaves it, written by hand: config, metrics, history and a few PNGs."
    run = tmp_path / "20260101-000000-run"
    run.mkdir()
    config = {"options": {"arch": arch, "size": 64, "epochs": 2, "freeze_epochs": 1},
              "data": {"path": "/data/x", "synthetic_demo": False, "source": "yolo", "classes": CLASSES,
                       "splits": {"train": {"elbow": 5, "wrist": 4}, "valid": {"elbow": 10, "wrist": 10}},
                       "notes": ["split 'test' missing"]},
              "versions": {"fastai": "2.8.12"}, "weights": "package:resnet18", "fp16": False, "status": "done",
              "training": {"lr": 1e-3, "epochs_run": 3}}
    (run / "config.json").write_text(json.dumps(config))
    loc = {"n": 12, "pointing_game": 0.5833, "pointing_game_ci95": [0.32, 0.81], "mass_inside": 0.27} if localisation else None
    metrics = {"valid": _split(0.75, (0.531, 0.888), loc), "tta": True}
    if test:
        metrics["test"] = _split(0.65, (0.433, 0.819))
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "history.csv").write_text("epoch,phase,train_loss,valid_loss,accuracy\n0,frozen,1.2,1.1,0.5\n1,unfrozen,0.9,0.8,0.75\n")
    for i, name in enumerate(pngs):
        _png(run / name, 40 * i)
    return run


def test_report_holds_config_metrics_history_and_every_png(tmp_path):
    run = fake_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    text = path.read_text(encoding="utf-8")
    assert "<h1>resnet18 &mdash; 20260101-000000-run</h1>" in text and "package:resnet18" in text
    assert "0.750 (95 % CI 0.531-0.888)" in text and "0.650 (95 % CI 0.433-0.819)" in text
    assert "0.583 (95 % CI 0.320-0.810)" in text and "mass_inside" in text  # localisation
    assert "<th>actual \\ predicted</th>" in text and ">0.747<" in text and "unfrozen" in text
    pngs = sorted(run.glob("*.png"))
    assert text.count("data:image/png;base64,") == len(pngs) == 3
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode() in text
    # self-contained: no script, nothing fetched from elsewhere
    assert "<script" not in text.lower() and not re.search(r"(src|href)=\"(?!data:)", text)


def test_text_from_the_run_folder_is_escaped(tmp_path):
    run = fake_run(tmp_path, arch='<script>alert("x")</script>')
    text = render_report(run)
    assert "<script" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text


def test_missing_optional_pieces_are_skipped(tmp_path):
    run = fake_run(tmp_path, test=False, localisation=False, pngs=())
    (run / "history.csv").unlink()
    text = render_report(run)
    assert "Validation" in text and "<h3>Test</h3>" not in text and "Localisation" not in text
    assert "Training history" not in text and "data:image/png" not in text
    (run / "metrics.json").unlink()  # a run that never reached evaluation still gets a report
    assert "No metrics.json" in render_report(run)


def test_cli_prints_the_path_and_bad_folder_is_one_line(tmp_path, capsys):
    run = fake_run(tmp_path)
    main([str(run)])
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])  # a folder, but not a run
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no config.json" in err[0]


def test_report_of_a_real_run_in_a_fresh_process(tmp_path):
    "The runner's real folder, through the command line as a user calls it."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FRACTURE_FASTAI_HOME": str(tmp_path / "home")}
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.run", "--arch", "cnn", "--sample", "2", "--size", "32",
                          "--epochs", "1", "--bs", "4", "--no-tta", "--out", str(run)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.report", str(run)], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == str(run / "report.html"), res.stderr[-3000:]
    text = (run / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['valid']['accuracy']:.3f} (95 % CI" in text and "SYNTHETIC" in text and "cnn" in text
    assert text.count("data:image/png;base64,") == len(list(run.glob("*.png"))) >= 4


def test_report_opens_with_the_verdict(tmp_path):
    "The held-out split's headline numbers and its confusion matrix and heat maps first; options and history last."
    run = fake_run(tmp_path, pngs=("curves.png", "confusion_matrix.png", "gradcam.png"))
    text = render_report(run)
    verdict = text[text.index("<h2>Verdict</h2>"):text.index("<h2>Metrics</h2>")]
    assert "test split, 20 images" in verdict and "0.650 (95 % CI 0.433-0.819)" in verdict
    assert 'alt="Grad-CAM"' in verdict and "confusion_matrix.png" in verdict
    assert text.index("<h2>Verdict</h2>") < text.index("<h2>Figures</h2>") < text.index("<h2>Configuration</h2>")
    assert text.count("data:image/png;base64,") == 3  # each plot once: the verdict's are not repeated below
