"""Radiograph preprocessing (grayscale, 16->8-bit windowing, denoise, median, CLAHE) as fastai Transforms,
and the item / batch augmentation presets that the DataBlock uses."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from fastai.data.transforms import Normalize
import torch
from fastai.torch_core import TensorImage
from fastai.vision.core import PILImage, imagenet_stats
from fasttransform import DisplayedTransform
from PIL import Image

from .errors import DataError, UserError

__all__ = ["DENOISE", "preprocess_radiograph", "RadiographPreprocess", "RadiographImage", "RadiographLoader", "find_loader",
           "radiograph_item_tfms", "radiograph_aug_transforms"]

DENOISE = (None, "gaussian", "bilateral")
# Small on purpose: a fracture line is one to a few pixels wide at 224-512 px, and a larger blur erases it.
_GAUSSIAN_KSIZE, _GAUSSIAN_SIGMA = (5, 5), 1.0
# Bilateral smooths differences of ~sigma_color grey levels (sensor noise) but keeps steeper steps (cortex edges,
# fracture lines), which is why it is offered beside the Gaussian.
_BILATERAL_D, _BILATERAL_SIGMA_COLOR, _BILATERAL_SIGMA_SPACE = 5, 30.0, 3.0
_SHAPES = "HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)"
# Pillow modes that numpy reads directly as intensities; the others (P, 1, LA, PA, CMYK, YCbCr, ...) are converted.
_ARRAY_MODES = {"L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "RGB", "RGBA"}


def _is_int(x) -> bool: return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_params(clahe_clip, clahe_grid, median, denoise) -> tuple:
    "Validated `(clahe_clip, clahe_grid, median, denoise)` as (float, int, int, str|None); `UserError` otherwise."
    if isinstance(clahe_clip, bool) or not isinstance(clahe_clip, (int, float, np.integer, np.floating)) \
            or not math.isfinite(clahe_clip) or clahe_clip < 0:
        raise UserError(f"clahe_clip must be a number >= 0 (0 turns CLAHE off, 2.0 is usual), got {clahe_clip!r}")
    if not _is_int(clahe_grid) or clahe_grid < 1:
        raise UserError(f"clahe_grid must be an int >= 1 (tiles per side, 8 is usual), got {clahe_grid!r}")
    if not _is_int(median) or median < 0 or (median > 1 and median % 2 == 0):
        raise UserError(f"median must be 0 or 1 (off) or an odd int >= 3 (kernel size), got {median!r}")
    if denoise not in DENOISE:
        raise UserError(f"denoise must be one of None, 'gaussian', 'bilateral', got {denoise!r}")
    return float(clahe_clip), int(clahe_grid), int(median), denoise


def _to_gray(arr: np.ndarray) -> np.ndarray:
    "HxW gray from an HxW / HxWx1 / RGB / RGBA array, keeping its dtype class (uint8 stays uint8, the rest float32)."
    if arr.size == 0: raise DataError(f"radiograph is empty (shape {arr.shape}); expected a non-empty {_SHAPES} array")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"radiograph must hold integers or floats, got dtype {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise DataError(f"radiograph must be {_SHAPES}, got shape {arr.shape}")
    # uint16 is exact in float32; cv2 takes neither big-endian (Pillow's I;16B) nor int32/int64/bool arrays.
    if arr.dtype != np.uint8: arr = arr.astype(np.float32)
    if arr.ndim == 2: return arr
    if arr.shape[2] == 1: return arr[..., 0]
    return cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)  # alpha dropped


def _window_to_uint8(gray: np.ndarray) -> np.ndarray:
    "Min-max window a non-uint8 gray image onto 0..255."
    # Min-max, not percentile clipping: it clips nothing and keeps the order of every intensity. The brightest
    # values are cortical bone and hardware, where fractures show, and CLAHE afterwards restores the local contrast
    # that a few outlier pixels cost the global window.
    if gray.dtype == np.uint8: return gray  # already an 8-bit display image: re-windowing would change what was exported
    finite = np.isfinite(gray)
    if not finite.any(): return np.zeros(gray.shape, np.uint8)
    lo, hi = float(gray[finite].min()), float(gray[finite].max())
    if hi <= lo: return np.zeros(gray.shape, np.uint8)  # a constant image holds no contrast to window
    scaled = (np.where(finite, gray, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def preprocess_radiograph(
    arr: np.ndarray,  # HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA); uint8, uint16, other ints or float
    clahe_clip: float = 2.0,  # CLAHE clip limit; 0 turns CLAHE off
    clahe_grid: int = 8,  # CLAHE tiles per side
    median: int = 3,  # median filter kernel size; 0 or 1 turns it off, else odd >= 3
    denoise: str | None = None,  # None, 'gaussian' or 'bilateral', applied before the median filter
) -> np.ndarray:  # uint8 HxWx3, the gray image in all three channels
    "Grayscale, window to 8 bits, denoise, median-filter and CLAHE a radiograph; gray replicated to RGB for ImageNet models."
    return _gray_to_rgb(_preprocess_gray(arr, clahe_clip, clahe_grid, median, denoise))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray: return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _preprocess_gray(arr, clahe_clip=2.0, clahe_grid=8, median=3, denoise=None) -> np.ndarray:
    "`preprocess_radiograph` before the gray image is copied into three channels: uint8 HxW."
    clahe_clip, clahe_grid, median, denoise = _check_params(clahe_clip, clahe_grid, median, denoise)
    gray = _window_to_uint8(_to_gray(np.asarray(arr)))
    # Noise removal comes before CLAHE because CLAHE amplifies whatever local contrast it finds, noise included.
    if denoise == "gaussian": gray = cv2.GaussianBlur(gray, _GAUSSIAN_KSIZE, _GAUSSIAN_SIGMA)
    elif denoise == "bilateral":
        gray = cv2.bilateralFilter(gray, _BILATERAL_D, _BILATERAL_SIGMA_COLOR, _BILATERAL_SIGMA_SPACE)
    if median > 1: gray = cv2.medianBlur(gray, median)
    # The CLAHE object is made per call: it is cheap, and cv2 objects neither pickle nor share safely across workers.
    if clahe_clip > 0: gray = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(clahe_grid, clahe_grid)).apply(gray)
    return gray


def _pil_to_array(img: Image.Image) -> np.ndarray:
    "A Pillow image of any mode as an array that `preprocess_radiograph` accepts."
    if img.mode not in _ARRAY_MODES: img = img.convert("L" if img.mode in ("1", "LA", "La") else "RGB")
    return np.asarray(img)


class RadiographPreprocess(DisplayedTransform):
    "Item transform: `preprocess_radiograph` on a `PILImage` of any mode (8/16-bit gray, RGB, RGBA, palette), giving an RGB `PILImage`."
    order = 0  # before fastai's `Resize` (order 1): CLAHE and the median filter see native pixels, not resampled ones

    def __init__(self,
        clahe_clip: float = 2.0,  # CLAHE clip limit; 0 turns CLAHE off
        clahe_grid: int = 8,  # CLAHE tiles per side
        median: int = 3,  # median filter kernel size; 0 or 1 turns it off, else odd >= 3
        denoise: str | None = None,  # None, 'gaussian' or 'bilateral'
    ):
        super().__init__()
        # Validated here so that a bad option fails when the DataBlock is built, not in a DataLoader worker.
        self.clahe_clip, self.clahe_grid, self.median, self.denoise = _check_params(clahe_clip, clahe_grid, median, denoise)

    def encodes(self, img: PILImage) -> PILImage:
        return PILImage.create(preprocess_radiograph(_pil_to_array(img), self.clahe_clip, self.clahe_grid,
                                                     self.median, self.denoise))


class RadiographImage(PILImage):
    "A `PILImage` opened in the file's own mode, so 16-bit radiographs reach `RadiographPreprocess` with all their bits."
    # fastai's PILImage opens with mode='RGB', which drops a 16-bit PNG to 8 bits by clipping (not scaling) at 255.
    _open_args = {'mode': None}


def _open_radiograph(source) -> Image.Image:
    "A radiograph file (path or bytes) decoded in its own mode; a colour JPEG straight to its luma channel."
    import io
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    # The JPEG decoder's own luma (Y) is what RGB -> gray recomputes, less its rounding: identical on gray radiographs
    # (checked on 100 of the YOLO export's), and twice as fast to decode, with no colour conversion after.
    if img.format == "JPEG" and img.mode in ("RGB", "YCbCr"): img.draft("L", img.size)
    img.load()
    return img


class RadiographLoader(DisplayedTransform):
    "Type transform: a radiograph file -> the preprocessed, zero-padded `size` image (uint8 `TensorImage`), as the item transforms give it at validation."
    # fastai's presizing split: everything deterministic (decode, windowing, median, CLAHE, pad-resize) happens here,
    # once per image content when a `cache` is given; only the random augmentation runs per epoch, on the batch.
    # Unlike `radiograph_item_tfms` at training time, the padding is always centred (the validation placement).
    input_types = (str, Path)  # what `test_dl` may be given: fastai infers from these where the pipeline starts
    def __init__(self,
        size: int | tuple = 224,  # output size (int or (h, w)); the image is padded to it, never cropped
        clahe_clip: float = 2.0,  # CLAHE clip limit; 0 turns CLAHE off
        clahe_grid: int = 8,  # CLAHE tiles per side
        median: int = 3,  # median filter kernel size; 0 or 1 turns it off, else odd >= 3
        denoise: str | None = None,  # None, 'gaussian' or 'bilateral'
        cache=None,  # a `cache.PreprocessCache`, or None to compute every time
    ):
        super().__init__()
        self.preprocess, self.resize = radiograph_item_tfms(size, True, clahe_clip, clahe_grid, median, denoise)
        self.cache = cache

    @property
    def signature(self) -> str:
        "Everything the output depends on besides the file's bytes; a cache entry is valid only under the same one."
        import PIL
        pre, rs = self.preprocess, self.resize
        return (f"radiograph-v1 size={tuple(rs.size)} method={rs.method} pad={rs.pad_mode} clip={pre.clahe_clip} "
                f"grid={pre.clahe_grid} median={pre.median} denoise={pre.denoise} cv2={cv2.__version__} "
                f"pillow={PIL.__version__}")

    def _gray(self, source) -> np.ndarray:
        "The preprocessed, resized radiograph as one uint8 HxW channel."
        pre = self.preprocess
        gray = _preprocess_gray(_pil_to_array(_open_radiograph(source)), pre.clahe_clip, pre.clahe_grid,
                                pre.median, pre.denoise)
        # Resized as one gray channel: the same pixels as the RGB copy that RadiographPreprocess gives, a third of
        # the work. split_idx=1: the Resize places the image as at validation (centred), the deterministic choice.
        return np.array(self.resize(PILImage(Image.fromarray(gray)), split_idx=1))  # a writable copy, for torch

    def encodes(self, fn) -> TensorImage:
        if self.cache is None: gray = self._gray(fn)
        else:
            data = open(fn, "rb").read()
            key = self.cache.key(data, self.signature)
            gray = self.cache.get(key)
            if gray is None:
                gray = self._gray(data)
                self.cache.put(key, gray)
        # Straight to the uint8 CHW tensor that ToTensor would make of the RGB image: no PIL round trip.
        return TensorImage(torch.from_numpy(gray).unsqueeze(0).repeat(3, 1, 1))

    def __getstate__(self):
        # The cache belongs to this machine, not to the model: an export (pickle) never carries it.
        return {k: v for k, v in self.__dict__.items() if k != "cache"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.cache = None


def find_loader(dl) -> RadiographLoader | None:
    "The `RadiographLoader` that makes the inputs of the DataLoader `dl`, or None (a pipeline of another kind)."
    for tl in getattr(getattr(dl, "dataset", None), "tls", [])[:1]:
        for tfm in tl.tfms.fs:
            if isinstance(tfm, RadiographLoader): return tfm
    return None


def radiograph_item_tfms(
    size: int | tuple = 224,  # output size (int or (h, w)); the image is padded to it, never cropped
    clahe: bool = True,  # False: no CLAHE and no median filter, just grayscale (16-bit windowed) -> RGB
    clahe_clip: float = 2.0,  # CLAHE clip limit
    clahe_grid: int = 8,  # CLAHE tiles per side
    median: int = 3,  # median filter kernel size (0 or 1 off, else odd >= 3); only with `clahe`
    denoise: str | None = None,  # None, 'gaussian' or 'bilateral'; applies whether or not `clahe`
) -> list:
    "Item transforms for radiographs: `RadiographPreprocess`, then a zero-padding `Resize` that keeps the whole image."
    # Imported here, not at the top, so that importing this module does not pay for fastai.vision.augment (~2 s).
    from fastai.vision.augment import PadMode, Resize, ResizeMethod
    # The median filter is there to keep CLAHE from amplifying noise, so `clahe=False` drops both; `denoise` is
    # a separate, explicit choice and is kept.
    if not clahe: clahe_clip, median = 0, 0
    return [RadiographPreprocess(clahe_clip, clahe_grid, median, denoise),
            Resize(size, method=ResizeMethod.Pad, pad_mode=PadMode.Zeros)]


def radiograph_aug_transforms(
    size: int | tuple | None = None,  # output size of the affine transforms; None keeps the item size
    flip_vert: bool = False,  # also flip vertically / rotate by 90 degrees (dihedral); radiographs rarely want it
    max_rotate: float = 15.0,  # maximum rotation in degrees
    min_zoom: float = 0.9,  # minimum zoom; < 1 zooms out (zero-padded)
    max_zoom: float = 1.1,  # maximum zoom
    max_lighting: float = 0.2,  # maximum brightness / contrast change
    normalize: bool = True,  # append `Normalize` with `stats` (pretrained models expect it)
    stats: tuple = imagenet_stats,  # (mean, std) the model's pretrained weights were trained with
) -> list:
    "Batch transforms for radiographs: flips, rotation, zoom and lighting, no perspective warp, zero padding."
    from fastai.vision.augment import PadMode, aug_transforms  # see `radiograph_item_tfms` on why here
    if max_rotate < 0: raise UserError(f"max_rotate must be >= 0 degrees, got {max_rotate!r}")
    if not 0 < min_zoom <= max_zoom:
        raise UserError(f"zoom must satisfy 0 < min_zoom <= max_zoom, got min_zoom={min_zoom!r}, max_zoom={max_zoom!r}")
    if not 0 <= max_lighting < 1: raise UserError(f"max_lighting must be in [0, 1), got {max_lighting!r}")
    # No warp: a perspective warp bends straight cortices, which can imitate or hide a fracture line.
    # Zero padding matches the black border that `Resize(method=Pad)` adds, instead of mirroring anatomy into it.
    tfms = aug_transforms(do_flip=True, flip_vert=flip_vert, max_rotate=max_rotate, min_zoom=min_zoom,
                          max_zoom=max_zoom, max_warp=0.0, max_lighting=max_lighting, pad_mode=PadMode.Zeros, size=size)
    if normalize: tfms.append(Normalize.from_stats(*stats))
    return tfms
