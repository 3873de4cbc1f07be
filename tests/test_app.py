"The demo page end to end in a real headless browser (Debian's chromium driven by Playwright); the page's pieces without one."
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="Gradio not installed: pip install 'fracture_fastai[app]'")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags that keep a headless chromium off the network and away from a GPU, in a container without a sandbox.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_analyse_gives_probabilities_and_overlay_or_a_message(tiny_run, tmp_path, one_torch_thread):
    from fracture_fastai.app import analyse, provenance
    from fracture_fastai.model_io import load_any
    run, files = tiny_run
    learn = load_any(run)
    message, probs, png = analyse(learn, files[0], out_dir=tmp_path)
    assert set(probs) == {"a", "b"} and abs(sum(probs.values()) - 1) < 1e-5 and Path(png).is_file()
    assert message.startswith(f"**{max(probs, key=probs.get)}**")
    message, probs, png = analyse(learn, files[0], {"positive": "b", "threshold": 0.0}, tmp_path)
    assert message.startswith("**b** at the saved threshold 0.000")
    # A model measured with flip TTA (model.json's tta) gets its probabilities as its metrics and threshold did
    from fracture_fastai.predict import predict_files
    flipped = predict_files(learn, files[:1], tta="flip")[0].iloc[0]
    passes = []
    with learn.model.register_forward_hook(lambda *_: passes.append(1)):
        _, probs, _ = analyse(learn, files[0], out_dir=tmp_path, tta="flip")
    assert probs == pytest.approx({c: float(flipped[c]) for c in ("a", "b")}, abs=1e-5)
    assert len(passes) == 2  # the Grad-CAM's pass is the plain one; only the mirror is added
    assert abs(probs["a"] - float(predict_files(learn, files[:1])[0].iloc[0]["a"])) > 1e-6  # not the plain pass
    # The map follows the run's heat map, the probabilities its TTA, where the two differ (a model made before
    # flip-TTA runs mirror-averaged their maps)
    from fracture_fastai.cam import explain_file
    plain = predict_files(learn, files[:1])[0].iloc[0]
    p_plain, map_plain, _ = explain_file(learn, files[0])
    p_flip, map_flip, _ = explain_file(learn, files[0], tta="flip")
    assert np.abs(map_plain - map_flip).max() > 1e-3  # a mirror-averaged map is another map
    p, m, _ = explain_file(learn, files[0], tta="flip", flip=False)
    assert np.allclose(m, map_plain, atol=1e-6) and p == pytest.approx([flipped["a"], flipped["b"]], abs=1e-5)
    p, m, _ = explain_file(learn, files[0], tta="none", flip=True)
    assert np.allclose(m, map_flip, atol=1e-6) and p == pytest.approx([plain["a"], plain["b"]], abs=1e-5)
    _, _, png = analyse(learn, files[0], out_dir=tmp_path, tta="flip", heat_map={"levels": 2, "flip": False})
    assert Path(png).is_file()
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    message, probs, png = analyse(learn, bad, out_dir=tmp_path)
    assert message.startswith("**Cannot use this file** (unreadable image)") and probs is None and png is None
    about = provenance(run)
    assert "**Model**: cnn" in about and "**valid**: accuracy" in about and "95% CI" in about


def test_bad_port_and_missing_run_are_one_line_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, text in (([str(tmp_path / "nope")], "no such run folder"), ([str(tmp_path), "--port", "0"], "--port")):
        res = subprocess.run([sys.executable, "-m", "fracture_fastai.app", *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 2 and text in res.stderr and res.stderr.count("\n") == 1, res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_run, tmp_path):
    "The page of `tiny_run` served by `python -m fracture_fastai.app` in its own process; its URL."
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fracture_fastai.app", str(tiny_run[0]), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):
            if proc.poll() is not None: break
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_the_page_in_a_real_browser(served, tiny_run, tmp_path):
    pytest.importorskip("playwright", reason="Playwright not installed: pip install playwright")
    if not Path(CHROMIUM).is_file():
        pytest.skip("no browser installed: apt-get install -y chromium (Debian's package, driven through executable_path)")
    from playwright.sync_api import sync_playwright
    pytest.importorskip("pydicom", reason="the DICOM upload needs pydicom: pip install 'fracture_fastai[dicom]'")
    dicom = tmp_path / "upload.dcm"
    _write_dicom(dicom)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            for upload in (tiny_run[1][0], dicom):  # a PNG, then a MONOCHROME1 DICOM
                page.goto(served, wait_until="domcontentloaded")
                page.set_input_files("#upload input[type=file]", str(upload), timeout=30000)
                page.wait_for_selector("#gradcam img", timeout=60000)
                assert "probability" in page.inner_text("#message")
                probs = page.inner_text("#probabilities")
                assert "a" in probs.split() and "b" in probs.split() and "%" in probs
            assert "95% CI" in page.inner_text("#provenance")
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            page.goto(served, wait_until="domcontentloaded")
            page.set_input_files("#upload input[type=file]", str(bad), timeout=30000)
            page.wait_for_function("document.querySelector('#message').innerText.includes('Cannot use this file')",
                                   timeout=60000)
            assert "Traceback" not in page.content()
        finally:
            browser.close()


def _write_dicom(path):
    "A 16-bit MONOCHROME1 DICOM radiograph with a window."
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
    pixels = np.random.default_rng(0).integers(0, 4096, (48, 40)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *pixels.shape, 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
