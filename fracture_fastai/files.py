"""Writing run artefacts atomically: a temporary file beside the target, then one rename. A reader (a browser, `compare`,
a second process) never finds half a file, and a run killed mid-write leaves the previous version whole."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["atomic_path", "write_text", "write_json", "save_figure"]


@contextmanager
def atomic_path(path):
    "Yield a temporary path beside `path` (same suffix, so writers that go by it still do); rename it onto `path` on success."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp): os.unlink(tmp)


def write_text(text: str, path) -> Path:
    "Write `text` (UTF-8) to `path` atomically."
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _plain(o):
    if isinstance(o, np.generic): return o.item()
    if isinstance(o, np.ndarray): return o.tolist()
    if isinstance(o, Path): return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_json(
    obj,  # JSON-serialisable object (numpy scalars and Paths are converted)
    path,  # file to write
) -> Path:
    "Write `obj` as indented JSON, atomically; numpy numbers and Paths become plain numbers and strings."
    return write_text(json.dumps(obj, indent=2, default=_plain) + "\n", path)


def save_figure(fig, path, **kwargs) -> Path:
    "Save a matplotlib figure to `path` atomically, tightly cropped (the format from the suffix)."
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format=path.suffix.lstrip(".") or "png", **kwargs)
    return path
