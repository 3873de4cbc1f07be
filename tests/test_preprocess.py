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
