"""Radiograph preprocessing (grayscale, 16->8-bit windowing, denoise, median, CLAHE) as fastai Transforms,
and the item / batch augmentation presets that the DataBlock uses. The arithmetic itself lives in preprocess.py."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from fastai.data.transforms import Normalize
import torch
from fastai.torch_core import TensorImage
from fastai.vision.core import PILImage, imagenet_stats
from fasttransform import DisplayedTransform

from .dicom import check_window, is_dicom
from .errors import UserError
# Re-exported: these were defined here before preprocess.py held the torch-free arithmetic.
from .preprocess import (DENOISE, _check_params, _open_radiograph, _pil_to_array, _preprocess_gray,  # noqa: F401
                         _to_gray, _window_to_uint8, image_size, pad_resize, preprocess_radiograph, read_radiograph)

__all__ = ["DENOISE", "preprocess_radiograph", "RadiographPreprocess", "RadiographImage", "RadiographView", "MaskedRadiograph",
           "fracture_mask", "SplitMask", "RadiographLoader",
           "find_loader", "radiograph_item_tfms", "radiograph_aug_transforms"]

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


class RadiographView(str):
    "A radiograph's path with the part of it to show: `crop` = (x0, y0, x1, y1) as shares of its width and height."
    crop: tuple

    def __new__(cls, path, crop):
        view = super().__new__(cls, str(path))
        view.crop = tuple(float(v) for v in crop)
        if not 0 <= view.crop[0] < view.crop[2] <= 1 or not 0 <= view.crop[1] < view.crop[3] <= 1:
            raise UserError(f"crop must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {crop}")
        return view

    def __reduce__(self): return (RadiographView, (str(self), self.crop))  # DataLoader workers get the crop too

    def cut(self, pixels: np.ndarray) -> np.ndarray:
        "`pixels` (the whole decoded radiograph, HxW[xC]) cut to the crop, at least one pixel each way."
        h, w = pixels.shape[:2]
        x0, y0, x1, y1 = self.crop
        left, top = min(int(x0 * w), w - 1), min(int(y0 * h), h - 1)
        return pixels[top:max(int(round(y1 * h)), top + 1), left:max(int(round(x1 * w)), left + 1)]


class MaskedRadiograph(str):
    """A training item whose `RadiographLoader` output carries its fracture mask as a 4th channel (255 inside the
    `polygons`, shares of the image as YOLO gives them), so that the batch augmentation moves the mask with the
    image; `SplitMask` takes it off again before `Normalize` (`--cam-loss`). `item` is the path or `RadiographView`."""
    item: str
    polygons: list

    def __new__(cls, item, polygons):
        obj = super().__new__(cls, str(item))
        obj.item, obj.polygons = item, list(polygons) if isinstance(polygons, (list, tuple, np.ndarray)) else []
        return obj

    def __reduce__(self): return (MaskedRadiograph, (self.item, self.polygons))  # DataLoader workers get both

    def size(self) -> tuple:
        "(w, h) of the radiograph, read from its header once per item, not once per epoch."
        if not hasattr(self, "_size"): self._size = image_size(self.item)
        return self._size


def fracture_mask(polygons, orig_size: tuple, size: tuple) -> np.ndarray:
    "uint8 (h, w) mask of `size` (h, w), 255 where `polygons` (shares of an `orig_size` (w, h) image) lie after the padding resize."
    from .cam import polygon_mask, polygon_to_input
    polygons = [p for p in polygons if len(p)]
    if not polygons: return np.zeros(size, np.uint8)
    return polygon_mask(polygon_to_input(polygons, orig_size, size, "pad"), size).astype(np.uint8) * 255


class SplitMask(DisplayedTransform):
    "Batch transform: takes `MaskedRadiograph`'s mask channel off a 4-channel batch (kept as `last`, for `CamSupervision`)."
    order = 98  # after the augmentation has moved image and mask together, before `Normalize` (99) sees 3 channels
    # Batch transforms run in the main process, right before the training loop gets the batch: `last` is its mask.
    last = None

    def encodes(self, x: TensorImage) -> TensorImage:
        if x.ndim == 4 and x.shape[1] == 4:
            self.last = x[:, 3:].as_subclass(torch.Tensor)
            return x[:, :3]
        self.last = None
        return x

    def __getstate__(self): return {k: v for k, v in self.__dict__.items() if k != "last"}  # exports carry no batch


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
        dicom_window: str | int = "first",  # DICOM files: the 'first' VOI LUT / window, the 'full' range, or an index
        reduce: bool = False,  # decode and preprocess at the smallest power-of-two reduction still >= `size`
    ):
        super().__init__()
        self.preprocess, self.resize = radiograph_item_tfms(size, True, clahe_clip, clahe_grid, median, denoise)
        self.dicom_window = check_window(dicom_window)
        # With `reduce`, the median filter and CLAHE work on the pixels the model will see, not on 2-8 times as many:
        # a 1400 px JPEG for a 192 px model decodes at 350 px in the DCT domain, and what follows costs 1/16. Not the
        # default: on the YOLO export (lite0, 192 px, seeds 42 and 43) it scored 0.838 and 0.792 against 0.879, 0.827.
        self.reduce = bool(reduce)
        self.cache = cache

    @property
    def signature(self) -> str:
        "Everything the output depends on besides the file's bytes; a cache entry is valid only under the same one."
        import PIL
        pre, rs = self.preprocess, self.resize
        return (f"radiograph-v1 size={tuple(rs.size)} method={rs.method} pad={rs.pad_mode} clip={pre.clahe_clip} "
                f"grid={pre.clahe_grid} median={pre.median} denoise={pre.denoise} cv2={cv2.__version__} "
                f"pillow={PIL.__version__}" + ("" if self.dicom_window == "first" else f" dicom_window={self.dicom_window}")
                + (" reduce" if self.reduce else ""))

    def _gray(self, source, dicom: bool | None = None, crop: RadiographView | None = None) -> np.ndarray:
        "The preprocessed, resized radiograph as one uint8 HxW channel."
        pre = self.preprocess
        pixels, value_range = read_radiograph(source, self.dicom_window, dicom, max(self.resize.size) if self.reduce else None)
        if crop is not None: pixels = crop.cut(pixels)  # then windowed, filtered and resized as a radiograph of its own
        gray = _preprocess_gray(pixels, pre.clahe_clip, pre.clahe_grid, pre.median, pre.denoise, value_range)
        # Resized as one gray channel: the same pixels as the RGB copy that RadiographPreprocess gives, a third of
        # the work. pad_resize is `self.resize` at validation (centred), the deterministic choice, without a PIL
        # round trip through fastai, and the very function the ONNX backend calls (tests check both agree).
        return np.array(pad_resize(gray, tuple(self.resize.size[::-1])))  # a writable copy, for torch

    def encodes(self, fn) -> TensorImage:
        if isinstance(fn, MaskedRadiograph):
            image = self.encodes(fn.item)
            size = tuple(image.shape[-2:])
            if fn.polygons and isinstance(fn.item, RadiographView):
                raise UserError("a MaskedRadiograph of a crop needs its polygons in the crop's shares; crops carry none")
            orig = fn.size() if fn.polygons else None
            mask = torch.from_numpy(fracture_mask(fn.polygons, orig, size)) if orig else torch.zeros(size, dtype=torch.uint8)
            return TensorImage(torch.cat([image.as_subclass(torch.Tensor), mask[None]]))
        crop = fn if isinstance(fn, RadiographView) else None
        if self.cache is None: gray = self._gray(fn, crop=crop)
        else:
            data = open(fn, "rb").read()
            key = self.cache.key(data, self.signature + ("" if crop is None else f" crop={crop.crop}"))
            gray = self.cache.get(key)
            if gray is None:
                gray = self._gray(data, is_dicom(fn), crop)  # decided on the path: a DICOM without preamble has no mark
                self.cache.put(key, gray)
        # Straight to the uint8 CHW tensor that ToTensor would make of the RGB image: no PIL round trip.
        return TensorImage(torch.from_numpy(gray).unsqueeze(0).repeat(3, 1, 1))

    def __getstate__(self):
        # The cache belongs to this machine, not to the model: an export (pickle) never carries it.
        return {k: v for k, v in self.__dict__.items() if k != "cache"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.cache = None
        self.__dict__.setdefault("dicom_window", "first")  # exports made before DICOM support
        self.__dict__.setdefault("reduce", False)  # exports made before the reduced decode


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
