"""Radiograph files -> model inputs with numpy, OpenCV and Pillow alone (no torch, no fastai): reading (DICOM through
dicom.py), grayscale, 16->8-bit windowing, denoise, median, CLAHE, the zero-padding resize and the normalisation.

The fastai Transforms (transforms.py) and the ONNX backend (predict --backend onnx) both call these, so both see the
same pixels.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from .dicom import dicom_size, is_dicom, read_dicom
from .errors import DataError, UserError

__all__ = ["DENOISE", "preprocess_radiograph", "read_radiograph", "image_size", "pad_resize", "radiograph_pixels",
           "normalise", "model_input"]

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


def _window_to_uint8(gray: np.ndarray, value_range: tuple | None = None) -> np.ndarray:
    "Window a non-uint8 gray image onto 0..255: `value_range` (black, white) where the file names one (a DICOM VOI window), else min-max."
    # Min-max, not percentile clipping: it clips nothing and keeps the order of every intensity. The brightest
    # values are cortical bone and hardware, where fractures show, and CLAHE afterwards restores the local contrast
    # that a few outlier pixels cost the global window.
    if gray.dtype == np.uint8: return gray  # already an 8-bit display image: re-windowing would change what was exported
    finite = np.isfinite(gray)
    if not finite.any(): return np.zeros(gray.shape, np.uint8)
    if value_range is not None: lo, hi = (float(v) for v in value_range)
    else: lo, hi = float(gray[finite].min()), float(gray[finite].max())
    if hi <= lo: return np.zeros(gray.shape, np.uint8)  # a constant image holds no contrast to window
    scaled = (np.clip(np.where(finite, gray, lo), lo, hi) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def preprocess_radiograph(
    arr: np.ndarray,  # HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA); uint8, uint16, other ints or float
    clahe_clip: float = 2.0,  # CLAHE clip limit; 0 turns CLAHE off
    clahe_grid: int = 8,  # CLAHE tiles per side
    median: int = 3,  # median filter kernel size; 0 or 1 turns it off, else odd >= 3
    denoise: str | None = None,  # None, 'gaussian' or 'bilateral', applied before the median filter
    value_range: tuple | None = None,  # (black, white) grey values for the 8-bit window; None: the image's min and max
) -> np.ndarray:  # uint8 HxWx3, the gray image in all three channels
    "Grayscale, window to 8 bits, denoise, median-filter and CLAHE a radiograph; gray replicated to RGB for ImageNet models."
    return _gray_to_rgb(_preprocess_gray(arr, clahe_clip, clahe_grid, median, denoise, value_range))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray: return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _preprocess_gray(arr, clahe_clip=2.0, clahe_grid=8, median=3, denoise=None, value_range=None) -> np.ndarray:
    "`preprocess_radiograph` before the gray image is copied into three channels: uint8 HxW."
    clahe_clip, clahe_grid, median, denoise = _check_params(clahe_clip, clahe_grid, median, denoise)
    gray = _window_to_uint8(_to_gray(np.asarray(arr)), value_range)
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




def _open_radiograph(source) -> Image.Image:
    "A radiograph file (path or bytes) decoded in its own mode; a colour JPEG straight to its luma channel."
    import io
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    # The JPEG decoder's own luma (Y) is what RGB -> gray recomputes, less its rounding: identical on gray radiographs
    # (checked on 100 of the YOLO export's), and twice as fast to decode, with no colour conversion after.
    if img.format == "JPEG" and img.mode in ("RGB", "YCbCr"): img.draft("L", img.size)
    img.load()
    return img


def read_radiograph(
    source,  # a path, or a file's bytes
    dicom_window: str | int = "first",  # DICOM only: 'first' VOI window, 'full' range, or a window index
    dicom: bool | None = None,  # whether `source` is DICOM; None: from its extension or its 'DICM' mark
) -> tuple:
    "`(pixels, value_range)` of any radiograph file: DICOM through `dicom.read_dicom`, the rest through Pillow (value_range None)."
    if dicom if dicom is not None else is_dicom(source): return read_dicom(source, dicom_window)
    return _pil_to_array(_open_radiograph(source)), None


def image_size(path) -> tuple:
    "`(width, height)` of a radiograph file from its header (no pixels decoded), DICOM or not."
    if is_dicom(path): return dicom_size(path)
    with Image.open(path) as img: return img.size


def pad_resize(
    gray: np.ndarray,  # uint8 HxW
    size: int | tuple,  # output (h, w), or one int for a square
) -> np.ndarray:  # uint8 of `size`
    "Zero-pad to the aspect of `size` (centred) and resize bilinearly: fastai's `Resize(size, method='pad', pad_mode='zeros')` at validation, pixel for pixel."
    # fastai's own arithmetic, step by step (fastai.vision.augment.Resize.encodes and _do_crop_pad): int() truncation
    # included, since a one-pixel shift of the padding changes the model's input.
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = gray.shape[:2]
    m = w / tw if w / tw > h / th else h / th
    cw, ch = int(m * tw), int(m * th)
    left, top = int(0.5 * (w - cw)), int(0.5 * (h - ch))
    if left >= 0 or top >= 0 or left + cw <= w or top + ch <= h:
        gray = gray[max(top, 0):min(top + ch, h), max(left, 0):min(left + cw, w)]
    if left < 0 or top < 0 or left + cw >= w or top + ch >= h:
        gray = np.pad(gray, ((max(-top, 0), max(ch - h + top, 0)), (max(-left, 0), max(cw - w + left, 0))))
    return np.asarray(Image.fromarray(np.ascontiguousarray(gray)).resize((tw, th), Image.BILINEAR))


def radiograph_pixels(
    source,  # a path, or a file's bytes
    size: int | tuple = 224,  # output (h, w) or one int; padded to it, never cropped
    clahe_clip: float = 2.0,  # CLAHE clip limit; 0 turns CLAHE off
    clahe_grid: int = 8,  # CLAHE tiles per side
    median: int = 3,  # median filter kernel size; 0 or 1 turns it off, else odd >= 3
    denoise: str | None = None,  # None, 'gaussian' or 'bilateral'
    dicom_window: str | int = "first",  # DICOM only: 'first' VOI window, 'full' range, or a window index
    dicom: bool | None = None,  # whether `source` is DICOM; None: detect
) -> np.ndarray:  # uint8 HxW of `size`
    "A radiograph file read, preprocessed and pad-resized: the one gray channel the model sees (three times)."
    pixels, value_range = read_radiograph(source, dicom_window, dicom)
    return pad_resize(_preprocess_gray(pixels, clahe_clip, clahe_grid, median, denoise, value_range), size)


def normalise(
    gray: np.ndarray,  # uint8 HxW or NxHxW
    mean,  # per-channel means of the 0..1 image (3 values)
    std,  # per-channel standard deviations (3 values)
) -> np.ndarray:  # float32 3xHxW or Nx3xHxW
    "What fastai's `IntToFloatTensor` then `Normalize` make of the gray image copied to RGB: (x/255 - mean)/std, in float32."
    x = gray.astype(np.float32) / np.float32(255)
    x = np.repeat(x[..., None, :, :], 3, axis=-3)
    shape = (3, 1, 1)
    return (x - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)


def model_input(
    files,  # radiograph paths
    meta: dict,  # a model description (model.json): size, preprocess, stats
) -> np.ndarray:  # float32 Nx3xHxW
    "The normalised batch that the model of `meta` takes for `files`, as its training pipeline at validation makes it."
    pre = {"dicom_window": "first", **meta["preprocess"]}
    grays = [radiograph_pixels(f, tuple(meta["size"]), **pre) for f in files]
    return normalise(np.stack(grays), meta["stats"]["mean"], meta["stats"]["std"])
