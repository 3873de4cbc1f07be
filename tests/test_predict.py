"The predict command on a tiny exported Learner: batched predictions, corrupt and missing files, exit codes."
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fracture_fastai.errors import UserError
from fracture_fastai.predict import find_images, load_export, main, predict_files

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["blue", "green", "red"]
COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def _write_images(folder, n, rng, size=32):
    "n noisy solid-colour PNGs per class under folder/<class>/; their paths."
    paths = []
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            paths.append(folder / name / f"{name}_{i}.png")
            Image.fromarray(a).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    "(export.pkl, folder of 6 good images, folder of 3 good images + a corrupt .jpg + a text file)."
    from fastai.vision.all import (Adam, CategoryBlock, CrossEntropyLossFlat, DataBlock, ImageBlock, Learner,
                                   RandomSplitter, Resize, get_image_files, parent_label, set_seed)
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    _write_images(root / "train", 4, rng)
    set_seed(0)
    # Everything pickled into the export is importable: fastai functions and plain torch layers.
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=RandomSplitter(0.25, seed=0), item_tfms=Resize(32))
    dls = block.dataloaders(root / "train", bs=4, num_workers=0, device="cpu")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    learn.export(root / "export.pkl")
    good = root / "good"
    _write_images(good, 2, rng)
    mixed = root / "mixed"
    _write_images(mixed / "nested", 1, rng)
    (mixed / "corrupt.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (mixed / "notes.txt").write_text("not an image")
    return root / "export.pkl", good, mixed


def _run(*args, cwd):
    "`python -m fracture_fastai.predict ARGS` in a fresh process."
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fracture_fastai.predict", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_csv_skips_corrupt_image_in_a_fresh_process(export, tmp_path):
    pkl, _, mixed = export
    out = tmp_path / "out" / "preds.csv"
    r = _run(pkl, mixed, "--csv", out, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "corrupt.jpg: cannot read image" in r.stderr and "1 of 4" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.strip() == str(out)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "class", "probability", *CLASSES]
    assert len(rows) == 1 + 3 and not any("corrupt" in row[0] or "notes" in row[0] for row in rows[1:])
    for _file, cls, prob, *probs in rows[1:]:
        probs = [float(p) for p in probs]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert cls in CLASSES and float(prob) == pytest.approx(max(probs)) and probs[CLASSES.index(cls)] == max(probs)


def test_cli_stdout_one_line_per_image(export, capsys):
    pkl, good, _ = export
    assert main([str(pkl), str(good)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6  # no progress bar or other noise on stdout
    for line in out:
        file, cls, prob = line.split("\t")
        assert Path(file).is_file() and cls in CLASSES and len(prob.split(".")[1]) == 4 and 0 < float(prob) <= 1


def test_cli_missing_path_counts_as_failure(export, capsys):
    pkl, good, _ = export
    assert main([str(pkl), str(good / "blue" / "blue_0.png"), str(good / "nope.png")]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    assert "nope.png: no such file or folder" in captured.err and "1 of 2" in captured.err


def test_cli_missing_export_exits_2_in_one_line(export, tmp_path):
    _, good, _ = export
    r = _run(tmp_path / "missing.pkl", good, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: cannot load") and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""


def test_cli_user_errors_exit_2(export, tmp_path, capsys):
    pkl, good, _ = export
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle at all")
    cases = [[str(bad), str(good)],  # corrupt export
             [str(pkl), str(tmp_path / "empty_dir_missing")],  # no images at all
             [str(pkl), str(good), "--bs", "0"]]
    for argv in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ")
    with pytest.raises(UserError, match="not a fastai export.pkl"):
        load_export(bad)


def test_predict_files_keeps_order_across_chunks(export):
    pkl, good, mixed = export
    learn = load_export(pkl)
    files, missing = find_images([good, mixed, good / "red" / "red_0.png", good / "absent"])
    assert missing == [good / "absent"] and len(files) == 6 + 4  # repeats dropped, notes.txt not an image
    table, failures = predict_files(learn, files, bs=2, chunk=3)  # the corrupt file sits in the 3rd chunk
    assert failures == [(str(mixed / "corrupt.jpg"), "cannot read image")]
    assert list(table.file) == [str(f) for f in files if f.name != "corrupt.jpg"]
    assert list(table.columns) == ["file", "class", "probability", *CLASSES]
    assert np.allclose(table[CLASSES].sum(axis=1), 1.0, atol=1e-5)
    table, failures = predict_files(learn, [mixed / "corrupt.jpg"])
    assert len(table) == 0 and list(table.columns) == ["file", "class", "probability", *CLASSES]


@pytest.mark.parametrize("where,message", [("folder", "is a folder"), ("under_file", "lies under the file")])
def test_cli_csv_place_is_checked_before_predicting(export, tmp_path, where, message):
    pkl, _, mixed = export
    (tmp_path / "a_file").write_text("x")
    csv_path = tmp_path if where == "folder" else tmp_path / "a_file" / "preds.csv"
    r = _run(pkl, mixed, "--csv", csv_path, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_state_dict_is_named_for_what_it_is(tmp_path):
    import torch
    from fracture_fastai.errors import UserError
    from fracture_fastai.predict import load_export
    sd = tmp_path / "best.pth"
    torch.save({"0.weight": torch.zeros(2, 2)}, sd)
    with pytest.raises(UserError, match="it is a state_dict .* pass the run folder"):
        load_export(sd)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(UserError, match="not a fastai export.pkl"):
        load_export(junk)


def test_random_bytes_as_weights_get_our_message(tmp_path):
    from fracture_fastai.errors import WeightsError
    from fracture_fastai.models import resolve_weights
    junk = tmp_path / "weights.pth"
    junk.write_bytes(os.urandom(512))
    with pytest.raises(WeightsError) as err:
        resolve_weights("resnet18", weights=junk).state_dict()
    assert "not a state_dict saved with torch.save" in str(err.value) and "weights_only" not in str(err.value)


def test_an_ensemble_averages_its_models_probabilities(export, tmp_path, capsys):
    "`--ensemble` averages the class probabilities of the models, image by image, and calls the most probable class."
    import pandas as pd
    path, good, _ = export
    other = load_export(path)
    with torch.no_grad():
        other.model[-1].bias += torch.tensor([2.0, 0.0, -2.0])  # a second model that disagrees with the first
    other.export(tmp_path / "other.pkl")
    tables = {}
    for name, args in (("a", [str(path)]), ("b", [str(tmp_path / "other.pkl")]),
                       ("ab", [str(path), "--ensemble", str(tmp_path / "other.pkl")])):
        assert main([*args, str(good), "--csv", str(tmp_path / f"{name}.csv")]) == 0
        tables[name] = pd.read_csv(tmp_path / f"{name}.csv")
    a, b, ab = (tables[k] for k in ("a", "b", "ab"))
    assert list(ab.file) == list(a.file) and len(ab) == 6
    mean = (a[CLASSES] + b[CLASSES]) / 2
    assert np.allclose(ab[CLASSES], mean, atol=2e-6)
    assert list(ab["class"]) == [CLASSES[i] for i in mean.to_numpy().argmax(1)]
    assert not np.allclose(a[CLASSES], b[CLASSES], atol=1e-3)  # the two models do differ


def test_an_ensemble_of_models_with_other_classes_is_refused(export, tiny_run, capsys):
    path, good, _ = export
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), str(good), "--ensemble", str(tiny_run[0])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "same classes" in err and len(err.splitlines()) == 1
