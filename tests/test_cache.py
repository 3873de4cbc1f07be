"The preprocessing cache: entries keyed by content and options, atomic writes, a size limit, the CLI, and a cached pipeline equal to the uncached one."
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fracture_fastai.cache import CACHE_ENV, PreprocessCache, default_cache_dir
from fracture_fastai.data import load_table, radiograph_dataloaders
from fracture_fastai.transforms import RadiographImage, RadiographLoader, radiograph_item_tfms


def _radiograph(path, seed=0, size=(70, 50)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).save(path)
    return path


def test_key_changes_with_content_and_signature():
    k = PreprocessCache.key(b"abc", "sig")
    assert k == PreprocessCache.key(b"abc", "sig")
    assert k != PreprocessCache.key(b"abd", "sig") and k != PreprocessCache.key(b"abc", "sig2")


def test_put_get_trim_clear(tmp_path):
    cache = PreprocessCache(tmp_path, max_bytes=10_000)
    assert cache.get("00missing") is None and cache.misses == 1
    arrays = {f"{i:02d}" + "a" * 38: np.full((40, 40), i, np.uint8) for i in range(4)}  # ~1.7 kB each
    for key, arr in arrays.items():
        cache.put(key, arr)
    first = next(iter(arrays))
    np.testing.assert_array_equal(cache.get(first), arrays[first])
    assert cache.hits == 1 and len(cache.entries()) == 4
    assert not list(tmp_path.rglob(".tmp-*"))  # written through a temporary file, then renamed
    cache.max_bytes = 4000
    os.utime(cache._path(first), (1, 1))  # the oldest goes first
    assert cache.trim() >= 2 and cache.get(first) is None and cache.size() <= 4000
    left = len(cache.entries())
    assert cache.clear() == left and cache.entries() == []


def test_a_damaged_entry_is_a_miss(tmp_path):
    cache = PreprocessCache(tmp_path)
    cache.put("ab" * 20, np.zeros((4, 4), np.uint8))
    cache._path("ab" * 20).write_bytes(b"not an npy file")
    assert cache.get("ab" * 20) is None


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.setenv(CACHE_ENV, "off")
    assert default_cache_dir() is None


def test_cli_info_and_clear(tmp_path):
    PreprocessCache(tmp_path).put("cd" * 20, np.zeros((8, 8), np.uint8))
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    info = subprocess.run([sys.executable, "-m", "fracture_fastai.cache"], capture_output=True, text=True, env=env)
    assert info.returncode == 0 and "entries: 1" in info.stdout
    cleared = subprocess.run([sys.executable, "-m", "fracture_fastai.cache", "--clear"], capture_output=True, text=True, env=env)
    assert cleared.returncode == 0 and "removed 1" in cleared.stdout and not PreprocessCache(tmp_path).entries()


def _item_tfms_output(fn, size, **kw):
    "What ImageBlock(RadiographImage) + radiograph_item_tfms give at validation, as ToTensor makes it (uint8 CHW)."
    img = RadiographImage.create(fn)
    for tfm in radiograph_item_tfms(size, **kw):
        img = tfm(img, split_idx=1)
    return np.asarray(img).transpose(2, 0, 1)


@pytest.mark.parametrize("kw", [{}, {"clahe": False}, {"median": 5, "denoise": "gaussian"}])
def test_loader_equals_the_item_transforms_cached_or_not(tmp_path, kw):
    fn = _radiograph(tmp_path / "r.png")
    loader_kw = {k: v for k, v in kw.items() if k != "clahe"}
    if kw.get("clahe") is False: loader_kw.update(clahe_clip=0, median=0)
    expected = _item_tfms_output(fn, 48, **kw)
    cache = PreprocessCache(tmp_path / "cache")
    cached = RadiographLoader(48, cache=cache, **loader_kw)
    for _ in range(2):  # a miss that fills the entry, then a hit that reads it
        np.testing.assert_array_equal(np.asarray(cached(str(fn))), expected)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(np.asarray(RadiographLoader(48, **loader_kw)(str(fn))), expected)


def test_entry_invalidated_by_new_content_or_options(tmp_path):
    fn = _radiograph(tmp_path / "r.png", seed=1)
    cache = PreprocessCache(tmp_path / "cache")
    RadiographLoader(32, cache=cache)(str(fn))
    RadiographLoader(32, cache=cache, clahe_clip=3.0)(str(fn))  # another option: another entry
    RadiographLoader(40, cache=cache)(str(fn))  # another size: another entry
    _radiograph(fn, seed=2)  # the file changes in place
    out = RadiographLoader(32, cache=cache)(str(fn))
    assert cache.misses == 4 and cache.hits == 0
    np.testing.assert_array_equal(np.asarray(out), _item_tfms_output(fn, 32))


def test_loader_pickles_without_its_cache(tmp_path):
    loader = RadiographLoader(32, cache=PreprocessCache(tmp_path))
    clone = pickle.loads(pickle.dumps(loader))
    assert clone.cache is None and clone.signature == loader.signature


def test_cached_and_uncached_dataloaders_give_the_same_tensors(demo_export, tmp_path):
    table = load_table(demo_export)
    batches = []
    for cache in (PreprocessCache(tmp_path), PreprocessCache(tmp_path), False):  # cold, warm, none
        dls = radiograph_dataloaders(table, size=32, bs=4, device="cpu", cache=cache, num_workers=0)
        batches.append([xb for xb, _ in dls.valid])
    for other in batches[1:]:
        assert all(torch.equal(a, b) for a, b in zip(batches[0], other))
