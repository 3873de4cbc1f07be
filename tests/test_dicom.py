"DICOM in: pydicom's bundled files and DICOMs written here (MONOCHROME1, 16-bit, signed, windows), each against a known array; a DICOM folder trains and predicts."
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom not installed: pip install 'fracture_fastai[dicom]'")
from pydicom.data import get_testdata_file  # noqa: E402

from fracture_fastai.data import image_problem, load_table  # noqa: E402
from fracture_fastai.dicom import dicom_size, is_dicom, read_dicom  # noqa: E402
from fracture_fastai.errors import DataError, UserError  # noqa: E402
from fracture_fastai.preprocess import _window_to_uint8, image_size, read_radiograph, radiograph_pixels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, rescale=None, window=None, preamble=True):
    "A minimal uncompressed DICOM radiograph of `pixels` (uint8/uint16/int16 HxW); `rescale` (slope, intercept), `window` ([centres], [widths])."
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if rescale is not None: ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None: ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=preamble)
    return Path(path)


RAMP = np.array([[0, 500, 1000, 1500, 4095]], dtype=np.uint16)  # 12 bits stored


def test_16_bit_without_window_keeps_every_value_until_the_8_bit_step(tmp_path):
    f = write_dicom(tmp_path / "a.dcm", RAMP, bits_stored=12)
    grey, value_range = read_dicom(f)
    assert value_range is None and grey.dtype == np.uint16
    np.testing.assert_array_equal(grey, RAMP)
    np.testing.assert_array_equal(_window_to_uint8(grey.astype(np.float32), value_range),
                                  np.rint(RAMP / 4095 * 255).astype(np.uint8))


def test_monochrome1_is_inverted_within_its_range(tmp_path):
    f = write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1", bits_stored=12)
    grey, value_range = read_dicom(f)
    assert value_range is None and grey.dtype == np.uint16
    np.testing.assert_array_equal(grey, 4095 - RAMP)  # min 0 + max 4095 - x




def test_8_bit_monochrome1_stays_in_its_dtype(tmp_path):
    pixels = np.array([[10, 20, 250]], dtype=np.uint8)
    grey, _ = read_dicom(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    assert grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, [[250, 240, 10]])


def test_signed_pixels_and_modality_lut(tmp_path):
    pixels = np.array([[-1024, -1, 0, 1, 2047]], dtype=np.int16)
    grey, value_range = read_dicom(write_dicom(tmp_path / "s.dcm", pixels, rescale=(2, -1000)))
    assert value_range is None
    np.testing.assert_allclose(grey, pixels.astype(float) * 2 - 1000)  # signed kept signed, then slope/intercept


# The first window: centre 1000, width 1001, LINEAR (DICOM PS3.3 C.11.2.1.2.1): black at or below 499.5, white above
# 1499.5, mid-grey at 1000 -> 0, 0, 128, 255, 255 in 8 bits. The second window (centre 3000, width 2001): 0, 0, 0, 0, 255.
WINDOWS = ([1000, 3000], [1001, 2001])


@pytest.mark.parametrize("which, expected", [("first", [0, 0, 128, 255, 255]), (0, [0, 0, 128, 255, 255]),
                                             (1, [0, 0, 0, 0, 255]),
                                             ("full", list(np.rint(RAMP[0] / 4095 * 255).astype(int)))])
def test_voi_window_choice(tmp_path, which, expected):
    f = write_dicom(tmp_path / "w.dcm", RAMP, bits_stored=12, window=WINDOWS)
    grey, value_range = read_dicom(f, which)
    np.testing.assert_array_equal(_window_to_uint8(np.asarray(grey, np.float32), value_range)[0], expected)


def test_monochrome1_with_a_window_inverts_the_window(tmp_path):
    f = write_dicom(tmp_path / "w1.dcm", RAMP, photometric="MONOCHROME1", bits_stored=12, window=([1000], [1001]))
    grey, value_range = read_dicom(f)
    np.testing.assert_array_equal(_window_to_uint8(np.asarray(grey, np.float32), value_range)[0], [255, 255, 127, 0, 0])


def test_a_window_whose_image_fills_only_part_of_it_is_not_stretched(tmp_path):
    "All pixels inside the window: they keep the window's grey levels rather than being min-max stretched to 0..255."
    pixels = np.array([[900, 1000, 1100]], dtype=np.uint16)
    grey, value_range = read_dicom(write_dicom(tmp_path / "in.dcm", pixels, bits_stored=12, window=([1000], [1001])))
    np.testing.assert_array_equal(_window_to_uint8(np.asarray(grey, np.float32), value_range)[0], [102, 128, 153])


def test_voi_lut_sequence_maps_through_its_table(tmp_path):
    "A VOI LUT (here x -> x // 2 over 0..4095, 16-bit entries): black and white are the table's own ends, 0 and 2047."
    from pydicom.dataset import Dataset
    f = write_dicom(tmp_path / "lut.dcm", RAMP, bits_stored=12)
    ds = pydicom.dcmread(f)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first input value, bits per entry
    item.add_new(0x00283006, "US", (np.arange(4096) // 2).tolist())  # LUT Data
    ds.VOILUTSequence = [item]
    ds.save_as(f)
    grey, value_range = read_dicom(f)
    assert value_range == (0.0, 2047.0)
    np.testing.assert_array_equal(grey, RAMP // 2)
    np.testing.assert_array_equal(_window_to_uint8(np.asarray(grey, np.float32), value_range)[0],
                                  [0, 31, 62, 93, 255])  # rint(x // 2 * 255 / 2047)


def test_bad_window_choices(tmp_path):
    f = write_dicom(tmp_path / "w.dcm", RAMP, bits_stored=12, window=WINDOWS)
    with pytest.raises(DataError, match="has 2 VOI window"): read_dicom(f, 2)
    with pytest.raises(UserError, match="dicom_window must be"): read_dicom(f, "middle")


def test_pydicoms_ct_file_gets_its_rescale():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    grey, value_range = read_dicom(path, "full")
    expected = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert value_range is None
    np.testing.assert_allclose(grey, expected)
    assert image_size(path) == dicom_size(path) == (ds.Columns, ds.Rows)


def test_pydicoms_mr_file_with_and_without_its_window():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    grey, value_range = read_dicom(path)
    if "WindowCenter" in ds:  # the window clips: every output lies within the window's black..white
        assert value_range is not None and value_range[0] <= grey.min() and grey.max() <= value_range[1]
    np.testing.assert_array_equal(read_dicom(path, "full")[0], raw)  # no rescale, no window: the stored values


def test_pydicoms_rgb_file_reaches_the_model_as_gray():
    path = get_testdata_file("SC_rgb_small_odd.dcm")
    grey, value_range = read_dicom(path)
    assert grey.ndim == 3 and grey.shape[2] == 3 and value_range is None
    assert radiograph_pixels(path, 16, clahe_clip=0, median=0).shape == (16, 16)


def test_compressed_dicom_without_its_decoder_names_the_package():
    path = get_testdata_file("JPEGLSNearLossless_16.dcm")
    if _decodes(path): pytest.skip("a JPEG-LS decoder is installed here: nothing is missing to report")
    with pytest.raises(DataError, match=r"needs a decoder plugin; pip install 'fracture_fastai\[dicom-codecs\]'") as e:
        read_dicom(path)
    assert "\n" not in str(e.value)
    assert image_problem(path).startswith("DICOM not decoded: ")


def test_detection_and_unreadable_files(tmp_path):
    f = write_dicom(tmp_path / "no_ext", RAMP)
    assert is_dicom(f) and is_dicom(f.read_bytes())
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 300)
    assert image_problem(bad) == "unreadable DICOM"
    assert image_problem(f) is None
    np.testing.assert_array_equal(read_radiograph(f)[0], RAMP)


def _dicom_folder(root, n=4, size=40):
    "class folders 'dark' and 'bright' of 16-bit DICOMs (half MONOCHROME1, half windowed): bright shows a bright disc."
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    for label in ("dark", "bright"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            img = rng.normal(1000, 100, (size, size))
            if label == "bright": img[disc] += 2000
            img = np.clip(img, 0, 4095).astype(np.uint16)
            mono1 = i % 2 == 1
            write_dicom(root / label / f"{label}_{i}.dcm", 4095 - img if mono1 else img,
                        photometric="MONOCHROME1" if mono1 else "MONOCHROME2", bits_stored=12,
                        window=([2000], [4000]) if i % 3 == 0 else None)
    return root


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_folder_of_dicoms_is_a_table(tmp_path):
    table = load_table(_dicom_folder(tmp_path / "data"))
    assert len(table.df) == 8 and set(table.df.label) == {"dark", "bright"}
    assert all(f.endswith(".dcm") for f in table.df.file)


def test_a_dicom_folder_trains_and_predicts_like_jpegs(tmp_path):
    data = _dicom_folder(tmp_path / "data")
    out = tmp_path / "run"
    res = _cli("fracture_fastai.run", "--arch", "cnn", "--data", data, "--size", "32", "--epochs", "1", "--bs", "4",
               "--lr", "1e-3", "--no-tta", "--out", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _cli("fracture_fastai.predict", out, data, "--csv", tmp_path / "p.csv", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    import pandas as pd
    table = pd.read_csv(tmp_path / "p.csv")
    assert len(table) == 8 and set(table["class"]) <= {"dark", "bright"}
    assert np.allclose(table[["bright", "dark"]].sum(axis=1), 1, atol=1e-4)
    if _decodes(get_testdata_file("JPEGLSNearLossless_16.dcm")): return
    # A compressed DICOM without its decoder: skipped with what to install, the others still predicted (exit 1).
    res = _cli("fracture_fastai.predict", out, data / "dark", get_testdata_file("JPEGLSNearLossless_16.dcm"), cwd=tmp_path)
    assert res.returncode == 1 and len(res.stdout.splitlines()) == 4
    assert "fracture_fastai[dicom-codecs]" in res.stderr, res.stderr


def _decodes(path) -> bool:
    try:
        pydicom.dcmread(path).pixel_array
        return True
    except Exception:
        return False
