"""The on-disk cache of preprocessed radiographs: the deterministic part of the item pipeline (decode, grayscale,
windowing, denoise, median, CLAHE, pad-resize) computed once per (image content, options, size).

`python -m fracture_fastai.cache` shows where it lives and how big it is; `--clear` empties it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import ArgumentParser, UserError, cli_errors

__all__ = ["CACHE_ENV", "MAX_BYTES_ENV", "default_cache_dir", "PreprocessCache", "main"]

CACHE_ENV = "FRACTURE_FASTAI_CACHE"  # folder of the cache; "off" (or "0", "none") disables it
MAX_BYTES_ENV = "FRACTURE_FASTAI_CACHE_GB"  # size limit in GiB (default 2)
_DEFAULT_GB = 2.0
_TRIM_EVERY = 256  # entries written between two size checks: a check lists the whole folder


def default_cache_dir() -> Path | None:
    "`$FRACTURE_FASTAI_CACHE`, else `~/.cache/fracture_fastai/preprocessed` (XDG honoured); None when set to off."
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"): return None
    if env: return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fracture_fastai" / "preprocessed"


def _max_bytes() -> int:
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    try: gb = float(raw) if raw else _DEFAULT_GB
    except ValueError: raise UserError(f"{MAX_BYTES_ENV} must be a number of GiB, got {raw!r}") from None
    return int(gb * 2**30)


class PreprocessCache:
    "Arrays keyed by a file's bytes and a signature of the options, one .npy each; safe for several processes at once."
    def __init__(self,
                 root=None,  # folder; None: `default_cache_dir()`
                 max_bytes: int | None = None):  # oldest entries are removed past this; None: `$FRACTURE_FASTAI_CACHE_GB` or 2 GiB
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        if self.root is None: raise UserError(f"the preprocessing cache is off ({CACHE_ENV}); pass a folder to use one")
        self.max_bytes = _max_bytes() if max_bytes is None else int(max_bytes)
        self.hits = self.misses = self._written = 0

    @staticmethod
    def key(data: bytes, signature: str) -> str:
        "The entry name of a file's `data` under `signature`: a change of either gives another entry."
        return hashlib.blake2b(data + b"\0" + signature.encode(), digest_size=20).hexdigest()

    def _path(self, key: str) -> Path: return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        "The array stored under `key`, or None (never stored, or unreadable: then it is simply made again)."
        try:
            arr = np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, key: str, arr: np.ndarray):
        "Store `arr` under `key` atomically (temporary file, then rename), so a reader never sees half an entry."
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
            with os.fdopen(fd, "wb") as f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk costs speed, never the run
            try: os.unlink(tmp)
            except (OSError, UnboundLocalError): pass
            return
        self._written += 1
        if self._written % _TRIM_EVERY == 0: self.trim()

    def entries(self) -> list:
        "Every stored entry's (mtime, bytes, path)."
        out = []
        for p in self.root.glob("??/*.npy") if self.root.is_dir() else []:
            try: st = p.stat()
            except OSError: continue  # removed by another process meanwhile
            out.append((st.st_mtime, st.st_size, p))
        return out

    def size(self) -> int: return sum(s for _, s, _ in self.entries())

    def trim(self) -> int:
        "Remove the oldest entries until the cache fits `max_bytes`; the number removed."
        entries = sorted(self.entries())
        total, removed = sum(s for _, s, _ in entries), 0
        for _, s, p in entries:
            if total <= self.max_bytes: break
            try: p.unlink()
            except OSError: continue
            total -= s
            removed += 1
        return removed

    def clear(self) -> int:
        "Remove every entry; the number removed."
        n = 0
        for _, _, p in self.entries():
            try: p.unlink(); n += 1
            except OSError: pass
        return n


@cli_errors
def main(argv=None):
    p = ArgumentParser(prog="python -m fracture_fastai.cache",
                                description="Where the cache of preprocessed radiographs lives and how big it is.",
                                epilog=f"The folder comes from ${CACHE_ENV} (off disables caching), the size limit "
                                       f"from ${MAX_BYTES_ENV} (GiB, default {_DEFAULT_GB:g}).")
    p.add_argument("--clear", action="store_true", help="remove every cached image")
    args = p.parse_args(argv)
    root = default_cache_dir()
    if root is None:
        print(f"cache: off ({CACHE_ENV}={os.environ.get(CACHE_ENV)})")
        return
    cache = PreprocessCache(root)
    if args.clear:
        print(f"removed {cache.clear()} cached images from {root}")
        return
    entries = cache.entries()
    print(f"cache: {root}\nentries: {len(entries)}\nsize: {sum(s for _, s, _ in entries) / 2**20:.1f} MiB "
          f"(limit {cache.max_bytes / 2**30:g} GiB)")


if __name__ == "__main__":
    main()
