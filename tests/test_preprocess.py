"The torch-free preprocessing reproduces fastai's: the padding resize pixel for pixel, the normalisation in float32."
import numpy as np
import pytest
import torch
from PIL import Image

from fracture_fastai.preprocess import normalise, pad_resize, radiograph_pixels
from fracture_fastai.transforms import RadiographLoader


@pytest.mark.parametrize("shape", [(37, 64), (64, 37), (50, 50), (100, 7), (7, 100), (299, 401), (30, 29), (1, 1)])
@pytest.mark.parametrize("size", [32, (24, 40), (40, 24)])
def test_pad_resize_is_fastais_resize_pad_at_validation(shape, size):
    from fastai.vision.augment import PadMode, Resize, ResizeMethod
    from fastai.vision.core import PILImage
    gray = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    expected = np.array(Resize(size, method=ResizeMethod.Pad, pad_mode=PadMode.Zeros)(PILImage(Image.fromarray(gray)),
                                                                                         split_idx=1))
    np.testing.assert_array_equal(pad_resize(gray, size), expected)


def test_normalise_is_int_to_float_then_normalize():
    from fastai.data.transforms import IntToFloatTensor, Normalize
    from fastai.torch_core import TensorImage
    from fastai.vision.core import imagenet_stats
    gray = np.random.default_rng(0).integers(0, 256, (2, 9, 7), dtype=np.uint8)
    x = TensorImage(torch.from_numpy(gray)[:, None].repeat(1, 3, 1, 1))
    expected = Normalize.from_stats(*imagenet_stats, cuda=False)(IntToFloatTensor()(x))
    got = normalise(gray, *imagenet_stats)
    assert got.dtype == np.float32 and got.shape == (2, 3, 9, 7)
    np.testing.assert_array_equal(got, expected.numpy())


def test_radiograph_pixels_is_the_loaders_output(tmp_path):
    rng = np.random.default_rng(1)
    f = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 65535, (45, 70), dtype=np.uint16)).save(f)
    loader = RadiographLoader(32, clahe_clip=2.0, median=3)
    np.testing.assert_array_equal(radiograph_pixels(f, 32), loader.encodes(str(f))[0].numpy())


def test_reduce_halves_by_area_while_both_sides_hold_the_model_input():
    from fracture_fastai.preprocess import reduce_radiograph
    a = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    half = reduce_radiograph(a, 8)  # 16x24 -> 8x12: 2x2 block means; one more halving would go below 8
    assert half.shape == (8, 12) and np.allclose(half, a.reshape(8, 2, 12, 2).mean(axis=(1, 3)))
    assert reduce_radiograph(a, 9) is a and reduce_radiograph(a, 40) is a  # nothing to gain: already small
    assert reduce_radiograph(np.zeros((1000, 1200), np.uint16), 50).shape == (63, 75)  # by 8, then by 2 again


def test_a_reduced_jpeg_matches_the_same_image_reduced_as_png(tmp_path):
    "The JPEG decoder's DCT scaling and the area reduction of any other format give (nearly) the same pixels."
    from fracture_fastai.preprocess import radiograph_pixels
    y, x = np.mgrid[0:256, 0:320]
    img = (127 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=98)
    Image.fromarray(np.asarray(Image.open(tmp_path / "a.jpg"))).save(tmp_path / "a.png")  # the JPEG's own pixels
    jpg, png = (radiograph_pixels(tmp_path / f, 64, reduce=True).astype(int) for f in ("a.jpg", "a.png"))
    full = radiograph_pixels(tmp_path / "a.png", 64).astype(int)
    assert np.abs(jpg - png).mean() < 2.0  # same content, two reductions
    assert np.abs(png - full).mean() < 12.0  # CLAHE's tiles see the same picture at a quarter of the pixels
