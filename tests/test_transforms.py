"Tests for fracture_fastai.transforms: synthetic arrays whose right answer is known."
import pickle

import cv2
import numpy as np
import pytest
import torch
from fastai.data.transforms import Normalize
from fastai.vision.augment import Dihedral, Flip, Warp
from fastai.vision.core import PILImage, imagenet_stats
from fasttransform import Pipeline
from PIL import Image

from fracture_fastai.errors import UserError
from fracture_fastai.transforms import (RadiographImage, RadiographPreprocess, preprocess_radiograph,
                                        radiograph_aug_transforms, radiograph_item_tfms)

OFF = dict(clahe_clip=0, median=0)  # no filtering: the output is the (windowed) gray input


def _rng(): return np.random.default_rng(0)


def _gray(out):
    "The single channel of a preprocessed image, after checking it is uint8 HxWx3 with identical channels."
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    return out[..., 0]


def _run_item_tfms(img, tfms):
    "Item transforms in fastai's order, on the validation split so Resize is deterministic."
    return Pipeline(tfms, split_idx=1)(img)


# --- preprocess_radiograph ---------------------------------------------------------------------------------------

def test_clahe_raises_local_contrast():
    faint = _rng().integers(100, 111, (128, 128)).astype(np.uint8)  # a texture spanning only 11 grey levels
    out = _gray(preprocess_radiograph(faint, clahe_clip=2.0, median=0)).astype(float)
    assert out.std() > 2 * faint.std()
    assert np.ptp(out[:32, :32]) > 2 * np.ptp(faint[:32, :32])


def test_clahe_off_leaves_gray_unchanged():
    gray = _rng().integers(0, 256, (32, 48)).astype(np.uint8)
    assert np.array_equal(_gray(preprocess_radiograph(gray, **OFF)), gray)


def test_median_removes_salt_and_pepper():
    img = np.full((64, 64), 128, np.uint8)
    noisy = _rng().random(img.shape)
    img[noisy < 0.025], img[noisy > 0.975] = 0, 255  # 5% salt and pepper
    out = _gray(preprocess_radiograph(img, clahe_clip=0, median=3))
    assert (img == 128).mean() < 0.96 and (out == 128).mean() > 0.99


@pytest.mark.parametrize("shape", [(24, 32), (24, 32, 1), (24, 32, 3), (24, 32, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_output_is_uint8_rgb_for_any_input(shape, dtype):
    hi = {np.uint8: 255, np.uint16: 65535, np.float32: 1}[dtype]
    arr = (_rng().random(shape) * hi).astype(dtype)
    assert _gray(preprocess_radiograph(arr)).shape == shape[:2]


def test_color_channels_become_gray_and_alpha_is_dropped():
    gray = _rng().integers(0, 256, (16, 20)).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgba = np.dstack([rgb, np.zeros_like(gray)])  # fully transparent: alpha must not matter
    for arr in (gray[..., None], rgb, rgba):
        assert np.array_equal(_gray(preprocess_radiograph(arr, **OFF)), gray)


def test_16bit_is_windowed_to_full_range_keeping_order():
    arr = _rng().permutation(np.linspace(1000, 5000, 32 * 32)).astype(np.uint16).reshape(32, 32)
    out = _gray(preprocess_radiograph(arr, **OFF))
    assert out.min() == 0 and out.max() == 255
    assert (np.diff(out.ravel()[np.argsort(arr.ravel())].astype(int)) >= 0).all()  # brighter in -> not darker out


@pytest.mark.parametrize("denoise", ["gaussian", "bilateral"])
def test_denoise_reduces_noise(denoise):
    noisy = np.clip(128 + _rng().normal(0, 10, (64, 64)), 0, 255).astype(np.uint8)
    out = _gray(preprocess_radiograph(noisy, denoise=denoise, **OFF)).astype(float)
    assert out.std() < 0.5 * noisy.std()


@pytest.mark.parametrize("kwargs, match", [
    (dict(clahe_clip=-1.0), r"clahe_clip must be a number >= 0"),
    (dict(clahe_clip=float("nan")), r"clahe_clip must be a number >= 0"),
    (dict(clahe_grid=0), r"clahe_grid must be an int >= 1"),
    (dict(clahe_grid=2.5), r"clahe_grid must be an int >= 1"),
    (dict(median=4), r"median must be 0 or 1 \(off\) or an odd int >= 3"),
    (dict(median=-3), r"median must be 0 or 1 \(off\) or an odd int >= 3"),
    (dict(denoise="nlm"), r"denoise must be one of None, 'gaussian', 'bilateral'"),
])
def test_bad_arguments_name_allowed_values(kwargs, match):
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match=match): preprocess_radiograph(img, **kwargs)
    with pytest.raises(UserError, match=match): RadiographPreprocess(**kwargs)  # fails at construction
    with pytest.raises(ValueError, match=match): radiograph_item_tfms(64, **kwargs)


@pytest.mark.parametrize("shape, match", [
    ((8,), r"HxW, HxWx1, HxWx3 \(RGB\) or HxWx4 \(RGBA\)"),
    ((8, 8, 2), r"HxW, HxWx1, HxWx3 \(RGB\) or HxWx4 \(RGBA\)"),
    ((8, 8, 5), r"HxW, HxWx1, HxWx3 \(RGB\) or HxWx4 \(RGBA\)"),
    ((2, 8, 8, 3), r"HxW, HxWx1, HxWx3 \(RGB\) or HxWx4 \(RGBA\)"),
    ((0, 8), r"empty"),
])
def test_bad_arrays_name_allowed_shapes(shape, match):
    with pytest.raises(ValueError, match=match): preprocess_radiograph(np.zeros(shape, np.uint8))


# --- RadiographPreprocess / RadiographImage ----------------------------------------------------------------------

@pytest.mark.parametrize("img", [
    Image.fromarray(np.full((20, 30), 90, np.uint8)),  # L
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)),  # RGB
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 50),  # I;16
], ids=["L", "RGB", "I;16"])
def test_preprocess_transform_gives_rgb_pilimage(img):
    out = RadiographPreprocess()(PILImage(img))
    assert isinstance(out, PILImage) and out.mode == "RGB" and out.size == img.size


def test_preprocess_transform_pickles():
    tfm = RadiographPreprocess(clahe_clip=3.0, clahe_grid=4, median=5, denoise="bilateral")
    back = pickle.loads(pickle.dumps(tfm))
    assert (back.clahe_clip, back.clahe_grid, back.median, back.denoise, back.order) == (3.0, 4, 5, "bilateral", 0)
    img = RadiographImage.create(_rng().integers(0, 4096, (24, 24)).astype(np.uint16))
    assert np.array_equal(np.asarray(back(img)), np.asarray(tfm(img)))
    assert "clahe_clip" in repr(tfm)


def test_radiograph_image_keeps_16_bits_from_every_source(tmp_path):
    arr = (np.arange(40 * 50).reshape(40, 50) * 20 + 1000).astype(np.uint16)  # 1000..40980
    fn = tmp_path / "x16.png"
    assert cv2.imwrite(str(fn), arr)
    for src in (fn, str(fn), fn.read_bytes(), arr):
        img = RadiographImage.create(src)
        assert isinstance(img, RadiographImage) and img.mode.startswith("I")
        assert np.array_equal(np.asarray(img).astype(np.int64), arr)
    assert RadiographImage.create(torch.from_numpy(arr.astype(np.int32))).size == (50, 40)
    assert PILImage.create(fn).mode == "RGB"  # what the subclass avoids: fastai's default is 8-bit RGB


def test_item_tfms_on_16bit_png(tmp_path):
    fn = tmp_path / "x16.png"
    cv2.imwrite(str(fn), (_rng().random((48, 40)) * 60000).astype(np.uint16))
    out = _run_item_tfms(RadiographImage.create(fn), radiograph_item_tfms(64))
    assert isinstance(out, PILImage) and out.mode == "RGB" and out.size == (64, 64)


def test_item_tfms_pad_not_crop():
    wide = RadiographImage.create(np.full((40, 80), 255, np.uint8))  # h=40, w=80
    out = np.asarray(_run_item_tfms(wide, radiograph_item_tfms(64, clahe=False)))[..., 0]
    # Padded to 80x80 then scaled to 64: a 32-row white band centred between black rows (the two rows at each
    # border are blended by the bilinear resize), white across the whole width.
    assert (out[:15] == 0).all() and (out[49:] == 0).all() and (out[17:47] == 255).all()


def test_clahe_false_is_plain_grayscale():
    pre = radiograph_item_tfms(64, clahe=False, median=5)[0]
    assert (pre.clahe_clip, pre.median, pre.denoise) == (0, 0, None)
    assert radiograph_item_tfms(64, clahe=False, denoise="gaussian")[0].denoise == "gaussian"


# --- augmentation preset -----------------------------------------------------------------------------------------

def test_aug_transforms_normalize_no_warp():
    tfms = radiograph_aug_transforms()
    assert not any(isinstance(t, Warp) for t in tfms)
    norm = [t for t in tfms if isinstance(t, Normalize)]
    assert len(norm) == 1 and torch.allclose(norm[0].mean.flatten().cpu(), torch.tensor(imagenet_stats[0]))
    flip = next(t for t in tfms if isinstance(t, Flip))
    assert flip.pad_mode == "zeros"
    assert not any(isinstance(t, Normalize) for t in radiograph_aug_transforms(normalize=False))
    assert any(isinstance(t, Dihedral) for t in radiograph_aug_transforms(flip_vert=True))
    with pytest.raises(ValueError, match="min_zoom <= max_zoom"): radiograph_aug_transforms(min_zoom=1.2)


def test_datablock_end_to_end(tmp_path):
    "The intended use: ImageBlock(cls=RadiographImage) + the two presets give a normalised float batch."
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import IndexSplitter, parent_label
    from fastai.vision.data import ImageBlock
    files = []
    for i, label in enumerate(["neg", "pos"] * 2):
        (tmp_path / label).mkdir(exist_ok=True)
        files.append(tmp_path / label / f"{i}.png")
        cv2.imwrite(str(files[-1]), (_rng().random((30 + i, 40)) * 50000).astype(np.uint16))
    dblock = DataBlock(blocks=(ImageBlock(cls=RadiographImage), CategoryBlock), get_y=parent_label,
                       splitter=IndexSplitter([3]), item_tfms=radiograph_item_tfms(32),
                       batch_tfms=radiograph_aug_transforms())
    xb, yb = dblock.dataloaders(files, bs=2, num_workers=0, device="cpu").one_batch()
    assert xb.shape == (2, 3, 32, 32) and xb.dtype == torch.float32 and xb.min() < 0  # normalised
