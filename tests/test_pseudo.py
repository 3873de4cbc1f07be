"Pseudo-labels on a generated YOLO export with unlabelled train radiographs: what is kept, by group, and the run option."
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fracture_fastai.data import load_table
from fracture_fastai.errors import UserError
from fracture_fastai.pseudo import add_pseudo_labels, pseudo_label


def _cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def export_with_unlabelled(tmp_path_factory):
    """The demo export (6 train, 2 valid images per region) plus 6 unlabelled train radiographs of 2 copies each (the
    demo's test images, empty label files), and one unlabelled copy of a validation radiograph, which must stay out."""
    from fracture_fastai.demo import make_demo
    root = tmp_path_factory.mktemp("pseudo")
    src = make_demo(root / "src", n_train=6, n_valid=2, n_test=1, size=64)
    data = root / "data"
    shutil.copytree(src, data)
    shutil.rmtree(data / "test")
    (data / "data.yaml").write_text((src / "data.yaml").read_text().replace("test: test/images\n", ""))
    images, labels = data / "train" / "images", data / "train" / "labels"
    for i, img in enumerate(sorted((src / "test" / "images").iterdir())):
        for copy in ("a", "b"):
            shutil.copy(img, images / f"u{i}_png.rf.{copy}.png")
            (labels / f"u{i}_png.rf.{copy}.txt").write_text("")
    valid = sorted((data / "valid" / "images").iterdir())[0]
    shutil.copy(valid, images / f"{valid.stem}.rf.z.png")  # the same radiograph as a validation image
    (labels / f"{valid.stem}.rf.z.txt").write_text("")
    return data


@pytest.fixture(scope="module")
def teacher(export_with_unlabelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--data", str(export_with_unlabelled), "--size", "32",
               "--epochs", "1", "--bs", "8", "--lr", "1e-3", "--no-tta", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_unlabelled_images_are_listed_not_trained_on(export_with_unlabelled):
    table = load_table(export_with_unlabelled)
    assert len(table.unlabelled) == 13 and table.skipped["unlabelled"] == 13
    assert set(table.unlabelled.split) == {"train"} and not set(table.unlabelled.file) & set(table.df.file)
    assert table.unlabelled.group.nunique() == 7  # 6 radiographs of 2 copies, and the validation radiograph's copy


def test_whole_groups_get_the_teacher_s_call(export_with_unlabelled, teacher):
    from fracture_fastai.model_io import load_any
    from fracture_fastai.predict import predict_files
    table = load_table(export_with_unlabelled)
    rows, summary = pseudo_label(table, [teacher], threshold=1e-6)  # everything the teacher calls at all
    assert summary["groups"] == 6 and summary["kept_groups"] == 6 and summary["kept_images"] == 12
    assert len(rows) == 12 and rows.pseudo.all() and set(rows.split) == {"train"}
    assert not rows.file.str.contains(".rf.z.").any()  # a validation radiograph's copy is never used
    assert (rows.groupby("group").label.nunique() == 1).all()  # copies of one radiograph share one label
    # The label is the class of the teacher's probabilities averaged over the group's copies.
    probs, _ = predict_files(load_any(teacher), list(rows.file))
    classes = table.classes
    for group, part in probs.assign(group=rows.set_index("file").loc[probs.file, "group"].values).groupby("group"):
        assert rows[rows.group == group].label.iloc[0] == classes[int(np.argmax(part[classes].mean().to_numpy()))]
    assert sum(summary["kept_by_class"].values()) == 6 and summary["share_kept"] == 1.0
    # A threshold keeps only the groups whose mean probability reaches it.
    mean = probs.assign(group=rows.set_index("file").loc[probs.file, "group"].values).groupby("group")[classes].mean()
    cut = float(np.median(mean.max(axis=1)))
    kept, s = pseudo_label(table, [teacher], threshold=cut)
    assert set(kept.group) == set(mean.index[mean.max(axis=1) >= cut]) and s["kept_groups"] == kept.group.nunique()


def test_add_pseudo_labels_refuses_what_cannot_work(export_with_unlabelled, teacher, tiny_run, demo_export):
    table = load_table(export_with_unlabelled)
    with pytest.raises(UserError, match="lower --pseudo-threshold"):
        add_pseudo_labels(table, [teacher], threshold=1.0 + 1e-9)
    with pytest.raises(UserError, match="the teacher predicts a, b but the data's classes are"):
        pseudo_label(table, [tiny_run[0]])
    with pytest.raises(UserError, match="no unlabelled train images"):
        pseudo_label(load_table(demo_export), [teacher])
    n = len(table.df)
    summary = add_pseudo_labels(table, [teacher, teacher], threshold=1e-6)  # an ensemble teacher of two
    assert len(table.df) == n + 12 and table.df.pseudo.sum() == 12 and summary["teachers"] == [str(teacher)] * 2


def test_run_with_pseudo_labels(export_with_unlabelled, teacher, tmp_path):
    out = tmp_path / "student"
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--data", str(export_with_unlabelled), "--size", "32",
               "--epochs", "1", "--bs", "8", "--lr", "1e-3", "--no-tta", "--copies", "all", "--out", str(out),
               "--pseudo-labels", str(teacher), "--pseudo-threshold", "0.000001")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pseudo-labels: 6 of 6 unlabelled train radiographs (12 images)" in res.stderr
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["pseudo_labels"]["kept_images"] == 12 and data["images_per_epoch"] == 36 + 12
    assert "pseudo_labels" in json.loads((out / "config.json").read_text())["phases"]


@pytest.mark.parametrize("args, message", [
    (["--pseudo-labels", "no/such/run"], "--pseudo-labels no/such/run: no such run folder"),
    (["--pseudo-threshold", "0"], "--pseudo-threshold must be in (0, 1]"),
])
def test_bad_pseudo_options_fail_before_any_work(args, message, tmp_path, cli_exit):
    from fracture_fastai.run import main
    code, err = cli_exit(main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
