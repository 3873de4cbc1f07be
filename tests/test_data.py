"Data sources -> table -> DataLoaders, on synthetic folders and on the real shared export."
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fracture_fastai.data import (DataError, grouped_split, group_of, load_table, read_csv, read_yolo,
                                  region_of, sample_per_class)

REAL_TRAIN = {"elbow": 306, "fingers": 433, "forearm": 283, "humerus": 299, "shoulder": 315, "wrist": 168}
REAL_VALID = {"elbow": 28, "fingers": 41, "forearm": 37, "humerus": 31, "shoulder": 19, "wrist": 17}


def _png(path: Path, value: int = 128, size=(24, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("name,region", [("elbow positive", "elbow"), ("humerus fracture", "humerus"), ("humerus", "humerus"),
                                         ("Wrist_Positive", "wrist"), ("forearm fracture", "forearm")])
def test_region_of(name, region):
    assert region_of(name) == region


def test_region_of_rejects_finding_only():
    with pytest.raises(DataError, match="names no body region"):
        region_of("fracture positive")


def test_group_of_roboflow_copies():
    assert group_of("a/distal-humeral-fractures-2-_JPEG.rf.39ba3f53.jpg") == "distal-humeral-fractures-2-_JPEG"
    assert group_of("x/plain_image.png") == "plain_image"


def _mini_yolo(root: Path, names, path_entry="/somewhere/that/does/not/exist"):
    (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(f"path: {path_entry}\ntrain: train/images\nval: valid/images\ntest: test/images\n"
                                    f"nc: {len(names)}\nnames: {names!r}\n")
    labels = {
        ("train", "a.rf.1"): "0 0.1 0.1 0.2 0.1 0.2 0.2",  # polygon
        ("train", "a.rf.2"): "0 0.5 0.5 0.2 0.2",  # box
        ("train", "b.rf.1"): "1 0.1 0.1 0.2 0.1 0.2 0.2\n2 0.5 0.5 0.1 0.1",  # classes 1 and 2: both humerus
        ("train", "c"): "",  # unlabelled
        ("train", "d"): "0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2",  # two regions
        ("valid", "e"): "3 0.5 0.5 0.2 0.2",
    }
    for (split, stem), text in labels.items():
        _png(root / split / "images" / f"{stem}.jpg")
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        (root / split / "labels" / f"{stem}.txt").write_text(text)
    return root


def test_read_yolo_synthetic(tmp_path):
    root = _mini_yolo(tmp_path / "exp", ["elbow positive", "humerus fracture", "humerus", "wrist positive"])
    table = read_yolo(root)
    assert table.counts() == {"train": {"elbow": 2, "humerus": 1}, "valid": {"wrist": 1}}
    assert table.skipped == {"unlabelled": 1, "several regions": 1}
    assert any("test" in n for n in table.notes)  # named in data.yaml, missing on disk: reported, not fatal
    box = table.df.set_index("group").loc["a"].iloc[1]
    assert box.polygons == [[[0.4, 0.4], [0.6, 0.4], [0.6, 0.6], [0.4, 0.6]]]
    assert len(table.df.set_index("file").loc[str(root / "train/images/b.rf.1.jpg")].polygons) == 2


def test_yolo_without_val_gets_a_grouped_split(tmp_path):
    root = tmp_path / "exp"
    (root).mkdir()
    (root / "data.yaml").write_text("train: train/images\nnames: ['elbow positive', 'wrist positive']\n")
    for i in range(10):
        for copy in range(3):
            for cls in (0, 1):
                stem = f"r{cls}_{i}.rf.{copy}"
                _png(root / "train/images" / f"{stem}.jpg")
                (root / "train/labels").mkdir(parents=True, exist_ok=True)
                (root / "train/labels" / f"{stem}.txt").write_text(f"{cls} 0.5 0.5 0.1 0.1")
    table = load_table(root, valid_pct=0.2, seed=1)
    _assert_grouped(table.df)
    assert table.counts()["valid"] == {"elbow": 6, "wrist": 6}  # 2 of 10 radiographs per class, 3 copies each


def _assert_grouped(df):
    train, valid = set(df[df.split == "train"].group), set(df[df.split == "valid"].group)
    assert train and valid and not train & valid


def test_folder_tree_with_splits(tmp_path):
    for split, n in (("train", 3), ("valid", 2), ("test", 1)):
        for cls in ("elbow", "wrist"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{cls}{i}.png")
    (tmp_path / "train" / "elbow" / "notes.txt").write_text("not an image")
    table = load_table(tmp_path)
    assert table.source == "folders"
    assert table.counts() == {"train": {"elbow": 3, "wrist": 3}, "valid": {"elbow": 2, "wrist": 2},
                              "test": {"elbow": 1, "wrist": 1}}
    assert table.skipped == {"not an image": 1}


def test_corrupt_images_are_left_out_and_counted(tmp_path):
    for cls in ("elbow", "wrist"):
        for i in range(3):
            _png(tmp_path / "train" / cls / f"{i}.png"); _png(tmp_path / "valid" / cls / f"{i}.png")
    (tmp_path / "train" / "elbow" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    table = load_table(tmp_path)
    assert table.skipped == {"unreadable image": 1}
    assert table.counts()["train"] == {"elbow": 3, "wrist": 3}
    for f in tmp_path.rglob("*.png"):
        f.write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the images can be read"):
        load_table(tmp_path)


def test_flat_folder_tree_split_by_group(tmp_path):
    for cls in ("elbow", "wrist"):
        for i in range(10):
            for copy in range(2):
                _png(tmp_path / cls / f"{cls}{i}.rf.{copy}.jpg")
    table = load_table(tmp_path, valid_pct=0.3, seed=3)
    _assert_grouped(table.df)
    assert table.counts()["valid"] == {"elbow": 6, "wrist": 6}
    assert table.df.equals(load_table(tmp_path, valid_pct=0.3, seed=3).df)  # seeded


def test_csv_source(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"e{i}.png"); _png(tmp_path / "img" / f"w{i}.png")
    rows = [(f"img/e{i}.png", "elbow", "train" if i < 3 else "valid") for i in range(4)]
    rows += [(f"img/w{i}.png", "wrist", "train" if i < 3 else "val") for i in range(4)]
    rows += [("img/missing.png", "wrist", "train")]
    pd.DataFrame(rows, columns=["file", "label", "split"]).to_csv(tmp_path / "data.csv", index=False)
    table = read_csv(tmp_path / "data.csv")
    assert table.counts() == {"train": {"elbow": 3, "wrist": 3}, "valid": {"elbow": 1, "wrist": 1}}
    assert table.skipped == {"missing file": 1}
    pd.DataFrame({"file": ["img/e0.png"], "klass": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="lacks column"):
        read_csv(tmp_path / "bad.csv")


def test_grouped_split_never_splits_a_group():
    df = pd.DataFrame({"file": [f"f{i}" for i in range(60)], "label": ["a", "b"] * 30,
                       "group": [f"g{i // 3}" for i in range(60)], "split": "train"})
    for seed in range(5):
        _assert_grouped(grouped_split(df, 0.25, seed))


def test_sample_per_class_keeps_at_most_n():
    df = pd.DataFrame({"file": [f"f{i}" for i in range(40)], "label": ["a", "b"] * 20,
                       "group": [f"g{i}" for i in range(40)], "split": ["train"] * 30 + ["valid"] * 10})
    out = sample_per_class(df, 4)
    assert out.groupby(["split", "label"]).size().max() <= 4 and len(out) == 4 + 4 + 4 + 4


def _non_images(path):
    (path / "cls").mkdir()
    (path / "cls" / "a.txt").write_text("x")
    return path


@pytest.mark.parametrize("make,message", [(lambda p: p / "missing", "does not exist"), (lambda p: p, "is empty"),
                                          (_non_images, "no images found")])
def test_dataset_cli_bad_input_exits_2(tmp_path, make, message):
    path = make(tmp_path)
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.dataset", str(path)], capture_output=True, text=True)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


# --- the real shared export -------------------------------------------------------------------------------------------

def test_real_export_counts(yolo_export):
    table = read_yolo(yolo_export)
    assert table.counts() == {"train": REAL_TRAIN, "valid": REAL_VALID}
    assert table.skipped == {"unlabelled": 1827 + 175}
    assert all(len(p) >= 1 for p in table.df.polygons)  # every labelled image carries its fracture polygon


def test_real_export_notes_radiographs_shared_across_shipped_splits(yolo_export):
    table = load_table(yolo_export)
    df = table.df
    shared = set(df[df.split == "train"].group) & set(df[df.split == "valid"].group)
    assert shared and any(f"{len(shared)} of" in n and "valid accuracy may be optimistic" in n for n in table.notes)


def test_real_export_cli_json(yolo_export):
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.dataset", str(yolo_export), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(res.stdout) == {"splits": {"train": REAL_TRAIN, "valid": REAL_VALID}, "skipped": {"unlabelled": 2002}}


def test_real_export_carved_split_is_grouped(yolo_export):
    df = read_yolo(yolo_export).df
    train = df[df.split == "train"].copy()
    carved = grouped_split(train, 0.2, seed=42)
    _assert_grouped(carved)
    assert 0.1 < (carved.split == "valid").mean() < 0.3  # roughly the asked share, in images


# --- DataLoaders ------------------------------------------------------------------------------------------------------

def test_demo_dataloaders_have_a_labelled_test_set(demo_export, tmp_path):
    from fracture_fastai.data import radiograph_dataloaders, save_batch
    table = load_table(demo_export)
    dls = radiograph_dataloaders(table, size=48, bs=4, device="cpu")
    assert list(dls.vocab) == ["elbow", "fingers", "forearm", "humerus", "shoulder", "wrist"]
    assert len(dls.loaders) == 3 and len(dls[2].dataset) == 12  # the demo's test split, with labels
    x, y = dls[2].one_batch()
    assert x.shape == (4, 3, 48, 48) and y.shape == (4,)
    png = save_batch(dls, tmp_path / "batch.png", max_n=4)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_balance_options(demo_export):
    import torch
    from fracture_fastai.data import class_weights, radiograph_dataloaders
    table = load_table(demo_export)
    table.df = table.df[~((table.df.label == "wrist") & (table.df.split == "train") & (table.df.file.str.contains("00[1-5]")))]
    dls = radiograph_dataloaders(table, size=32, bs=2, balance="weights", device="cpu")
    w = class_weights(dls)
    assert w.shape == (6,) and torch.isclose(w.mean(), torch.tensor(1.0))
    assert w[list(dls.vocab).index("wrist")] == w.max()  # the rarest class weighs most: 1 wrist vs 6 of the others
    over = radiograph_dataloaders(table, size=32, bs=2, balance="oversample", device="cpu")
    assert over.train.wgts is not None and over.train.n == (table.df.split == "train").sum()  # no groups: every image
    with pytest.raises(DataError, match="balance must be one of"):
        radiograph_dataloaders(table, balance="smote")


def test_real_data_one_batch_at_64px(yolo_export):
    from fracture_fastai.data import radiograph_dataloaders
    table = read_yolo(yolo_export)
    table.df = sample_per_class(table.df, 3, seed=0)
    dls = radiograph_dataloaders(table, size=64, bs=8, device="cpu")
    assert list(dls.vocab) == sorted(REAL_TRAIN)
    x, y = dls.train.one_batch()
    # 3 images per class are one radiograph's Roboflow copies: an epoch draws one of each, 6 in all, a batch of 6
    assert dls.train.n == 6 and x.shape == (6, 3, 64, 64) and set(y.tolist()) == set(range(6))
    assert -3 < float(x.mean()) < 3  # ImageNet-normalised, not raw 0..255


def _grouped_table(tmp_path, n_groups=4, copies=3):
    "Two classes, `n_groups` source radiographs each, every one in `copies` Roboflow-style copies; one valid image each."
    from fracture_fastai.data import DataTable
    rows = []
    for label in ("elbow", "wrist"):
        for g in range(n_groups):
            for c in range(copies):
                f = _png(tmp_path / f"{label}{g}_jpg.rf.{c}.png", value=10 * g + c)
                rows.append(dict(file=str(f), label=label, split="train", group=group_of(f), polygons=[]))
        f = _png(tmp_path / f"{label}-valid.png")
        rows.append(dict(file=str(f), label=label, split="valid", group=group_of(f), polygons=[]))
    return DataTable(pd.DataFrame(rows))


def test_an_epoch_draws_one_copy_of_each_radiograph(tmp_path):
    from fracture_fastai.data import radiograph_dataloaders
    table = _grouped_table(tmp_path)
    dl = radiograph_dataloaders(table, size=16, bs=2, device="cpu", num_workers=0).train
    items = dl.items
    assert dl.n == 8 and len(dl) == 4  # 8 radiographs per epoch, not 24 images
    epochs = []
    for _ in range(6):
        dl.randomize()
        idxs = list(dl.get_idxs())
        assert len(idxs) == 8 and items.group.iloc[idxs].nunique() == 8  # each radiograph exactly once
        epochs.append(sorted(idxs))
    assert len({tuple(e) for e in epochs}) > 1  # a different copy in different epochs
    first, second = (radiograph_dataloaders(table, size=16, bs=2, device="cpu", num_workers=0).train for _ in range(2))
    assert first.get_idxs() == second.get_idxs()  # seeded: the same draw for the same seed
    every = radiograph_dataloaders(table, size=16, bs=2, device="cpu", num_workers=0, copies="all").train
    assert every.n == 24 and sorted(every.get_idxs()) == list(range(24))
    xb, yb = next(iter(dl))  # and it trains: a batch comes out
    assert xb.shape == (2, 3, 16, 16)


def test_one_copy_per_radiograph_with_oversampling(tmp_path):
    from fracture_fastai.data import radiograph_dataloaders
    table = _grouped_table(tmp_path)
    table.df = table.df[~((table.df.label == "wrist") & table.df.group.isin(["wrist1_jpg", "wrist2_jpg", "wrist3_jpg"]))]
    dl = radiograph_dataloaders(table, size=16, bs=2, device="cpu", num_workers=0, balance="oversample").train
    labels = []
    for _ in range(200):
        dl.randomize()
        labels += list(dl.items.label.iloc[list(dl.get_idxs())])
    # 4 elbow radiographs and 1 wrist: drawn about equally often all the same
    assert 0.4 < labels.count("wrist") / len(labels) < 0.6 and dl.n == 5


def test_copies_must_be_known(tmp_path):
    from fracture_fastai.data import radiograph_dataloaders
    with pytest.raises(DataError, match="copies"):
        radiograph_dataloaders(_grouped_table(tmp_path), size=16, copies="some")


def test_an_empty_class_folder_is_reported(tmp_path):
    for cls in ("elbow", "wrist"):
        for i in range(3):
            _png(tmp_path / cls / f"{cls}{i}.png")
    (tmp_path / "shoulder").mkdir()
    table = load_table(tmp_path)
    assert table.classes == ["elbow", "wrist"]
    assert any("shoulder" in n and "no images" in n for n in table.notes)


def test_a_class_without_validation_images_is_noted(tmp_path):
    from fracture_fastai.data import radiograph_dataloaders
    for cls in ("elbow", "wrist"):
        for i in range(4):
            _png(tmp_path / cls / f"{cls}{i}.png")
    table = load_table(tmp_path)
    table.df.loc[table.df.label == "wrist", "split"] = "train"  # every wrist image in train
    dls = radiograph_dataloaders(table, size=16, bs=2, device="cpu", cache=False)
    assert list(dls.vocab) == ["elbow", "wrist"]
    assert any("['wrist']" in n and "no validation images" in n for n in table.notes)


def test_one_class_is_refused(tmp_path):
    from fracture_fastai.data import radiograph_dataloaders
    for i in range(4):
        _png(tmp_path / "elbow" / f"e{i}.png")
    with pytest.raises(DataError, match="one class only"):
        radiograph_dataloaders(load_table(tmp_path), size=16)
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.run", "--arch", "cnn", "--data", str(tmp_path),
                          "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert res.returncode == 2 and "one class only" in res.stderr and not (tmp_path / "run").exists()


def _yolo_export(tmp_path, label_lines, yaml_text="names: ['elbow positive', 'wrist positive']\ntrain: train/images\n"):
    (tmp_path / "data.yaml").write_text(yaml_text)
    for i, line in enumerate(label_lines):
        _png(tmp_path / "train" / "images" / f"r{i}.png")
        (tmp_path / "train" / "labels").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "labels" / f"r{i}.txt").write_text(line + "\n")
    return tmp_path


@pytest.mark.parametrize("line,reason", [
    ("0 inf 0.5 0.2 0.2", "label line with inf or nan"), ("1 nan 0.5 0.2 0.2", "label line with inf or nan"),
    ("0 1e400 0.5 0.2 0.2", "label line with inf or nan"), ("-1 0.5 0.5 0.2 0.2", "negative or fractional class id"),
    ("0 0.5 0.5 3.0 0.2", "label outside the image (coordinates beyond 0..1)"),
    ("0 0.1 0.1 1.7 0.1 0.5 0.9", "label outside the image (coordinates beyond 0..1)"),
    ("zero 0.5 0.5 0.2 0.2", "label line not numeric"), ("0 0.5 0.5 0.2", "label line of the wrong length")])
def test_broken_yolo_label_lines_are_left_out_and_counted(tmp_path, line, reason):
    good = ["0 0.5 0.5 0.2 0.2", "1 0.1 0.1 0.3 0.1 0.2 0.4"]
    table = read_yolo(_yolo_export(tmp_path, good + [line]))
    assert len(table.df) == 2 and table.skipped[reason] == 1 and table.skipped["unlabelled"] == 1


def test_data_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(DataError, match="not a mapping"):
        read_yolo(_yolo_export(tmp_path, ["0 0.5 0.5 0.2 0.2"], yaml_text="- train\n- val\n"))


def test_csv_edge_cases(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    (tmp_path / "header.csv").write_text("file,label\n")
    with pytest.raises(DataError, match="lists no images"):
        read_csv(tmp_path / "header.csv")
    (tmp_path / "two.csv").write_text("file,label\na.png,elbow\na.png,wrist\nb.png,wrist\n")
    with pytest.raises(DataError, match="two or more labels.*a.png: elbow, wrist"):
        read_csv(tmp_path / "two.csv")
    (tmp_path / "gaps.csv").write_text("file,label\na.png,elbow\nb.png,\nc.png,  \n,wrist\na.png,elbow\n")
    table = read_csv(tmp_path / "gaps.csv")
    assert list(table.df.label) == ["elbow"] and table.skipped == {"empty label": 2, "row without a file": 1}


def test_truncated_and_oversized_images_are_left_out_and_counted(tmp_path):
    import io
    for cls in ("elbow", "wrist"):
        for i in range(3):
            _png(tmp_path / cls / f"{cls}{i}.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "elbow" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact
    Image.new("1", (14000, 14000)).save(tmp_path / "wrist" / "bomb.png")  # 196 Mpx, a few kB on disk
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.dataset", str(tmp_path), "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    skipped = json.loads(res.stdout)["skipped"]
    assert skipped == {"unreadable image": 1, "image too large": 1}
    table = load_table(tmp_path)  # the second load reads the verdicts
    assert len(table.df) == 6 and not {Path(f).stem for f in table.df.file} & {"truncated", "bomb"}


def test_image_verdicts_follow_the_file(tmp_path):
    from fracture_fastai.data import drop_unreadable, DataTable
    good = _png(tmp_path / "a.png")
    df = pd.DataFrame([dict(file=str(good), label="x", split="train", group="a", polygons=[])])
    assert len(drop_unreadable(DataTable(df.copy())).df) == 1
    good.write_bytes(b"now broken")  # the same path, new content: checked again
    with pytest.raises(DataError, match="none of the images"):
        drop_unreadable(DataTable(df.copy()))


def _copied_collection(root) -> dict:
    "A class folder as real collections hold them after exports and copies between laptops: odd but valid images, and debris."
    rng = np.random.default_rng(0)
    gray = lambda: rng.integers(0, 256, (40, 48), dtype=np.uint8)  # noqa: E731
    kinds = {"plain.png": lambda: Image.fromarray(gray()), "UPPER.JPG": lambda: Image.fromarray(gray()),
             "Röntgen bild 1.jpeg": lambda: Image.fromarray(gray()),  # non-ASCII, a space
             "cmyk.jpg": lambda: Image.fromarray(np.stack([gray()] * 3, -1)).convert("CMYK"),
             "palette.png": lambda: Image.fromarray(gray()).convert("P"), "onebit.png": lambda: Image.fromarray(gray() > 128),
             "gray_alpha.png": lambda: Image.fromarray(gray()).convert("LA"),
             "sixteen.tif": lambda: Image.fromarray(gray().astype(np.uint16) * 200)}
    for cls in ("elbow", "wrist"):
        d = root / cls
        d.mkdir(parents=True)
        for name, make in kinds.items():
            make().save(d / name)
        (d / "._plain.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 4000)  # macOS AppleDouble twin
        (d / ".DS_Store").write_bytes(b"\x00" * 64)
        (d / ".thumbnails").mkdir()
        Image.fromarray(gray()).save(d / ".thumbnails" / "t.png")  # an image, but in a hidden folder
        (d / "Thumbs.db").write_bytes(b"\x00" * 64)
        (d / "empty.jpg").write_bytes(b"")
        (d / "moved.png").symlink_to(root / "gone" / "target.png")  # a link whose target was not copied
    (root / ".Trashes").mkdir()  # a hidden folder at the top is not a class
    return kinds


def test_a_copied_collection_keeps_every_image_and_counts_the_debris(tmp_path):
    from fracture_fastai.data import radiograph_dataloaders
    kinds = _copied_collection(tmp_path)
    table = load_table(tmp_path)
    assert table.classes == ["elbow", "wrist"] and len(table.df) == 2 * len(kinds)
    assert dict(table.skipped) == {"hidden file": 6, "not an image": 2, "broken link": 2, "unreadable image": 2}
    dls = radiograph_dataloaders(table, size=32, bs=4, device="cpu", cache=False)
    x, y = dls.valid.one_batch()
    assert x.shape[1:] == (3, 32, 32)


def test_predict_reads_the_odd_images_and_passes_over_the_debris(tmp_path):
    from fracture_fastai.predict import find_images
    kinds = _copied_collection(tmp_path)
    files, missing = find_images([tmp_path / "elbow"])
    assert sorted(f.name for f in files) == sorted([*kinds, "empty.jpg"]) and not missing  # empty.jpg: tried, then reported
