"The source readers of fracture_fastai.sources: FracAtlas on a generated folder and, where present, on the shared one."
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from fracture_fastai.data import DataError, load_table, stratified_split
from fracture_fastai.sources import is_fracatlas, read_any, read_fracatlas


def test_fracatlas_layout_is_recognised(tmp_path, fracatlas_maker):
    root = fracatlas_maker(tmp_path / "fa")
    # the original release's other annotation formats and tools sit beside: ignored
    (root / "Annotations" / "COCO JSON").mkdir()
    (root / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json").write_text("{}")
    (root / "utilities").mkdir()
    assert is_fracatlas(root) and not is_fracatlas(tmp_path)
    table = load_table(root)
    assert table.source == "fracatlas"
    df = table.df
    assert set(df.label) == {"fractured", "normal"}
    assert {"body_part", "hardware"} <= set(df.columns)
    assert set(df.body_part) == {"hand", "leg"} and set(df.hardware) == {"yes", "no"}
    # fractured images carry their box as a 4-point polygon, normal ones none
    fractured = df[df.label == "fractured"]
    assert all(len(p) == 1 and len(p[0]) == 4 for p in fractured.polygons)
    assert not df[df.label == "normal"].polygons.map(len).any()
    # every file is the image of its label's folder
    assert all(("/Fractured/" in f) == (lab == "fractured") for f, lab in zip(df.file, df.label))
    assert set(df.split) == {"train", "valid", "test"}
    assert load_table(root / "dataset.csv").df.file.tolist() == df.file.tolist()  # its csv names the same dataset


def test_fracatlas_split_is_stratified_seeded_and_keeps_copies_together(tmp_path, fracatlas_maker):
    root = fracatlas_maker(tmp_path / "fa", n_fractured=12, n_normal=36)
    # two byte-identical copies under different ids, as in the original release
    src = root / "images" / "Non_fractured" / "IMG0000012.jpg"
    for i in (14, 16):
        shutil.copy(src, root / "images" / "Non_fractured" / f"IMG{i:07d}.jpg")
    a, b = read_fracatlas(root, seed=1), read_fracatlas(root, seed=1)
    pd.testing.assert_frame_equal(a.df, b.df)
    copies = a.df[a.df.file.str.contains("IMG00000(12|14|16)")]
    assert copies.group.nunique() == 1 and copies.split.nunique() == 1
    assert any("byte-identical" in n for n in a.notes)
    # each (label, body part) stratum of 6 or 18 groups: 15 % of them in valid and in test, the rest in train
    for (label, part), rows in a.df.drop_duplicates("group").groupby(["label", "body_part"]):
        n = len(rows)
        assert (rows.split == "valid").sum() == round(0.15 * n), (label, part)
        assert (rows.split == "test").sum() == round(0.15 * n), (label, part)
    assert not read_fracatlas(root, seed=2).df.split.equals(a.df.split)


def test_stratified_split_never_splits_a_group():
    df = pd.DataFrame({"group": [f"g{i // 3}" for i in range(300)], "label": ["a", "b"] * 150})
    out = stratified_split(df, (0.6, 0.2, 0.2), seed=0)
    assert out.groupby("group").split.nunique().max() == 1
    assert out.drop_duplicates("group").split.value_counts().to_dict() == {"train": 60, "valid": 20, "test": 20}
    with pytest.raises(DataError, match="summing to 1"):
        stratified_split(df, (0.5, 0.2, 0.2))


def test_fracatlas_bad_input(tmp_path, fracatlas_maker):
    root = fracatlas_maker(tmp_path / "fa")
    (root / "images" / "Fractured" / "IMG0000000.jpg").unlink()
    assert read_fracatlas(root).skipped["listed in dataset.csv but missing"] == 1
    (root / "dataset.csv").write_text("image,label\nx.jpg,1\n")
    with pytest.raises(DataError, match="lacks column"):
        read_any(root)


def test_dataset_command_counts_body_parts(tmp_path, fracatlas_maker):
    root = fracatlas_maker(tmp_path / "fa")
    out = subprocess.run([sys.executable, "-m", "fracture_fastai.dataset", str(root), "--json"],
                         capture_output=True, text=True, check=True).stdout
    summary = json.loads(out)
    assert sum(sum(c.values()) for c in summary["splits"].values()) == 24
    assert sum(n for split in summary["body_parts"].values() for part in split.values() for n in part.values()) == 24
    text = subprocess.run([sys.executable, "-m", "fracture_fastai.dataset", str(root)],
                          capture_output=True, text=True, check=True).stdout
    assert "source: fracatlas" in text and "hand fractured" in text


def test_real_fracatlas_counts(fracatlas_real):
    table = load_table(fracatlas_real)
    counts = table.counts()
    assert sum(sum(c.values()) for c in counts.values()) == 3188
    assert sum(c["fractured"] for c in counts.values()) == 576
    assert {s: sum(c.values()) for s, c in counts.items()} == {"train": 2230, "valid": 481, "test": 477}
    assert table.df.groupby("group").split.nunique().max() == 1
    # body parts as dataset.csv tags them: 'mixed' where several are tagged (319 rows)
    assert table.df.body_part.value_counts().to_dict() == {"leg": 1650, "hand": 1004, "mixed": 319, "hip": 145,
                                                            "shoulder": 70}
    assert (table.df.hardware == "yes").sum() == 77
    assert table.df[table.df.label == "fractured"].polygons.map(len).gt(0).all()  # every fracture has its box
