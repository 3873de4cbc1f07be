"""DICOM radiographs -> grey values with pydicom: Modality LUT, VOI LUT or window, MONOCHROME1 inverted.

The one place that reads DICOM; `preprocess.read_radiograph` calls it for every `.dcm` the package meets.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import DataError, UserError

__all__ = ["DICOM_EXTS", "DICOM_WINDOWS", "check_window", "is_dicom", "read_dicom", "dicom_size"]

DICOM_EXTS = {".dcm", ".dicom"}
DICOM_WINDOWS = ("first", "full")  # or an int: the index of the VOI LUT / window to apply
_INSTALL = "pip install 'fracture_fastai[dicom]' (pydicom)"
_CODECS = "pip install 'fracture_fastai[dicom-codecs]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"


def check_window(window) -> str | int:
    "A valid `window`: 'first' (the file's first VOI LUT or window), 'full' (no VOI: the whole range) or an index >= 0."
    if isinstance(window, str) and window.strip().lower() in DICOM_WINDOWS: return window.strip().lower()
    if isinstance(window, str) and window.strip().isdigit(): return int(window)
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool) and window >= 0: return int(window)
    raise UserError(f"dicom_window must be 'first', 'full' or a window index >= 0, got {window!r}")


def is_dicom(source) -> bool:
    "Whether `source` (a path or a file's bytes) is DICOM: by its extension, or by the 'DICM' mark after the preamble."
    if isinstance(source, (bytes, bytearray, memoryview)): return bytes(source[128:132]) == b"DICM"
    if Path(source).suffix.lower() in DICOM_EXTS: return True
    try:
        with open(source, "rb") as f: return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError(f"reading DICOM needs pydicom: {_INSTALL}") from None
    return pydicom


def _read_dataset(source, stop_before_pixels: bool = False):
    pydicom = _pydicom()
    name = "DICOM bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        # force: a file without the 128-byte preamble (older writers) is still DICOM.
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                               force=True, stop_before_pixels=stop_before_pixels)
    except Exception as e:
        raise DataError(f"cannot read {name}: not a readable DICOM file ({type(e).__name__})") from None


def _pixels(ds, name: str) -> np.ndarray:
    "The stored pixel values of the first frame; a one-line error naming the plugin packages for a compressed file."
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"cannot read {name}: the DICOM file holds no image (no Pixel Data)")
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if tsyntax is not None and tsyntax.is_compressed:
            raise DataError(f"cannot decode {name}: its transfer syntax '{tsyntax.name}' needs a decoder plugin; "
                            f"{_CODECS}") from None
        raise DataError(f"cannot decode {name}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise DataError(f"cannot decode {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1 and arr.ndim == (4 if samples > 1 else 3): arr = arr[0]  # a radiograph is one frame: the first
    return arr


def read_dicom(
    source,  # a path to a DICOM file, or its bytes
    window: str | int = "first",  # 'first' VOI LUT / window in the file, 'full' range (none applied), or its index
) -> tuple:
    "`(grey, value_range)`: the displayed grey values (MONOCHROME1 inverted) and the `(black, white)` values of the window, or None for the data's own range."
    window = check_window(window)
    ds = _read_dataset(source)
    name = "DICOM bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    arr = _pixels(ds, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if not photometric.startswith("MONOCHROME"):
        return arr, None  # colour (RGB, YBR decoded to RGB by pydicom, palette): no LUTs apply; gray made later
    # Pixel values -> modality units (e.g. Hounsfield, optical density): RescaleSlope/Intercept or a Modality LUT.
    arr = apply_modality_lut(arr, ds)
    value_range = None
    has_voi = bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)
    if window != "full" and has_voi:
        index = 0 if window == "first" else window
        n = _n_windows(ds)
        if index >= n:
            raise DataError(f"{name} has {n} VOI window(s); dicom_window {index} does not exist (use 0..{n - 1}, "
                            "'first' or 'full')")
        voi = apply_voi_lut(arr, ds, index=index)
        lo, hi = _window_range(arr, ds, index)
        arr, value_range = voi, (min(lo, hi), max(lo, hi))
    if photometric == "MONOCHROME1":  # low values are white: turned so that bone is bright, as in MONOCHROME2
        if value_range is not None: arr = (value_range[0] + value_range[1]) - np.asarray(arr, dtype=np.float64)
        else:  # mirrored within the data's own range, in its own dtype: 8-bit data stays 8-bit (not re-windowed)
            flipped = int(arr.max()) + int(arr.min()) - arr.astype(np.int64) if arr.dtype.kind in "iu" \
                else float(arr.max()) + float(arr.min()) - arr
            arr = flipped.astype(arr.dtype)
    return arr, value_range


def _window_range(arr, ds, index: int) -> tuple:
    "The `(black, white)` values of VOI view `index`: pydicom's own output at the ends of its input range."
    # Mapping these (not the image's own min/max) to 0..255 keeps the window that the file asks for.
    from pydicom.pixels import apply_voi_lut
    if ds.get("VOILUTSequence"):
        n, first = (int(v) for v in ds.VOILUTSequence[index].LUTDescriptor[:2])
        ends = np.arange(first, first + (n or 2 ** 16)).reshape(1, -1)  # the whole LUT: it need not be monotonic
    else:  # a window clips everything beyond its ends to its output range
        ends = np.array([[float(np.min(arr)) - 2.0 ** 32, float(np.max(arr)) + 2.0 ** 32]])
    out = apply_voi_lut(ends, ds, index=index)
    return float(out.min()), float(out.max())


def _n_windows(ds) -> int:
    "How many alternative VOI views the file offers (VOI LUT items, else Window Center values)."
    if ds.get("VOILUTSequence"): return len(ds.VOILUTSequence)
    return int(ds["WindowCenter"].VM)


def dicom_size(path) -> tuple:
    "`(width, height)` of a DICOM image from its header alone, as Pillow's `Image.size` gives it."
    ds = _read_dataset(path, stop_before_pixels=True)
    try:
        return int(ds.Columns), int(ds.Rows)
    except AttributeError:
        raise DataError(f"cannot read {path}: the DICOM file names no Rows/Columns") from None
