"Close-up training views of the annotated fractures (`--crops`): where they are cut, what they hold, and a run with them."
import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fracture_fastai.cache import PreprocessCache
from fracture_fastai.data import crop_views, load_table, radiograph_dataloaders
from fracture_fastai.errors import DataError, UserError
from fracture_fastai.transforms import RadiographLoader, RadiographView


def _image(path, size=(120, 80), patch=None, seed=0):
    "A noisy gray image (w, h) = `size`, with a white square at `patch` = (x0, y0, x1, y1) in pixels."
    a = np.random.default_rng(seed).integers(0, 60, size[::-1], dtype=np.uint8)
    if patch:
        x0, y0, x1, y1 = patch
        a[y0:y1, x0:x1] = 255
    Image.fromarray(a).save(path)
    return str(path)


def _table(tmp_path, n_plain=3):
    "Training rows: two annotated images (a box around a white patch) and `n_plain` unannotated ones."
    rows = []
    for i, (patch, label) in enumerate([((20, 30, 30, 40), "fractured"), ((105, 5, 115, 15), "fractured")]):
        f = _image(tmp_path / f"f{i}.png", patch=patch, seed=i)
        x0, y0, x1, y1 = patch
        box = [[x0 / 120, y0 / 80], [x1 / 120, y0 / 80], [x1 / 120, y1 / 80], [x0 / 120, y1 / 80]]
        rows.append({"file": f, "label": label, "split": "train", "group": f"f{i}", "polygons": [box]})
    for i in range(n_plain):
        rows.append({"file": _image(tmp_path / f"n{i}.png", seed=10 + i), "label": "normal", "split": "train",
                     "group": f"n{i}", "polygons": []})
    return pd.DataFrame(rows)


def test_crops_centre_on_the_annotation_and_match_them_with_unannotated_ones(tmp_path):
    train = _table(tmp_path)
    views = crop_views(train, seed=0)
    assert len(views) == 4 and views.label.tolist() == ["fractured", "fractured", "normal", "normal"]
    assert all(isinstance(f, RadiographView) for f in views.file) and list(views.columns) == list(train.columns)
    assert views.group.tolist()[:2] == ["f0#crop", "f1#crop"] and views.group.nunique() == 4
    for view in views.file:
        x0, y0, x1, y1 = view.crop
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert (x1 - x0) * 120 == pytest.approx((y1 - y0) * 80)  # square in pixels
    # The first box (10 px) gets 3x its side (30 px; above the 0.25 * 80 = 20 px floor), centred on it.
    x0, y0, x1, y1 = views.file[0].crop
    assert (x1 - x0) * 120 == pytest.approx(30) and ((x0 + x1) / 2 * 120, (y0 + y1) / 2 * 80) == pytest.approx((25, 35))
    # The second box sits in the top right corner: its crop is moved inside the image, still holding the box.
    x0, y0, x1, y1 = views.file[1].crop
    assert (x1, y0) == pytest.approx((1.0, 0.0)) and x0 * 120 <= 105 and y1 * 80 >= 15
    # The unannotated images' crops have the annotated crops' sizes; the same seed gives the same views.
    assert [v.crop[2] - v.crop[0] for v in views.file[2:]] == pytest.approx([v.crop[2] - v.crop[0] for v in views.file[:2]])
    assert [v.crop for v in crop_views(train, seed=0).file] == [v.crop for v in views.file]
    # Only annotated images: their crops alone (the body-region task, where every labelled image has a fracture).
    assert len(crop_views(train.iloc[:2], seed=0)) == 2


def test_the_loader_cuts_the_view_before_preprocessing_cached_or_not(tmp_path):
    f = _image(tmp_path / "a.png", patch=(20, 30, 30, 40))
    view = RadiographView(f, (10 / 120, 20 / 80, 40 / 120, 50 / 80))  # a 30 px square around the 10 px patch
    plain = RadiographLoader(30, clahe_clip=0, median=0)
    out = plain.encodes(view)[0].numpy()
    expected = np.asarray(Image.open(f))[20:50, 10:40]
    np.testing.assert_array_equal(out, expected)  # 30 px to 30 px: the crop itself, pixel for pixel
    assert out[10:20, 10:20].min() == 255
    cached = RadiographLoader(30, clahe_clip=0, median=0, cache=PreprocessCache(tmp_path / "cache"))
    np.testing.assert_array_equal(cached.encodes(view)[0].numpy(), out)
    np.testing.assert_array_equal(cached.encodes(view)[0].numpy(), out)  # now from the cache
    assert cached.cache.hits == 1
    # The whole image is another cache entry, not the crop served again.
    np.testing.assert_array_equal(cached.encodes(f)[0].numpy(), plain.encodes(f)[0].numpy())
    assert pickle.loads(pickle.dumps(view)).crop == view.crop  # DataLoader workers get the crop too
    with pytest.raises(UserError, match="crop must be"):
        RadiographView(f, (0.5, 0, 0.4, 1))


def test_crops_join_the_training_set_only(tmp_path, fracatlas_maker):
    table = load_table(fracatlas_maker(tmp_path / "fa", n_fractured=12, n_normal=24))
    plain = radiograph_dataloaders(table, size=32, bs=4, num_workers=0, device="cpu", cache=False)
    dls = radiograph_dataloaders(table, size=32, bs=4, num_workers=0, device="cpu", cache=False, crops=True)
    n_fractured = int(((table.df.split == "train") & (table.df.label == "fractured")).sum())
    assert len(dls.train.items) == len(plain.train.items) + 2 * n_fractured
    assert dls.valid.items.file.tolist() == plain.valid.items.file.tolist()
    assert not any(isinstance(f, RadiographView) for f in dls.valid.items.file)
    xb, _ = dls.train.one_batch()
    assert xb.shape == (4, 3, 32, 32)


def test_crops_without_annotations_are_refused(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3): _image(tmp_path / "data" / label / f"{i}.png", seed=i)
    table = load_table(tmp_path / "data", valid_pct=0.34)
    with pytest.raises(DataError, match="crops need fracture annotations"):
        radiograph_dataloaders(table, size=32, bs=2, num_workers=0, device="cpu", cache=False, crops=True)
