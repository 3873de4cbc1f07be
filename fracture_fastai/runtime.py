"""Process settings that make CPU training and inference faster, applied by the command lines (never on import: a
library must not change its host's allocator or garbage collector behind its back).

- `tune_malloc`: glibc's malloc hands every freed block over 128 KiB back to the kernel (and trims the heap top),
  so each forward pass maps its activation tensors afresh and page-faults on every page. Keeping freed memory for
  reuse measured, on the 2-core CPU (lite0, 192 px): a training step (batch 32) 29 -> 35 img/s, `predict` on 512
  images 80 -> 120 img/s; a plain forward (batch 16) 118 -> 148 img/s with a 32 MiB threshold. At 320 px a batch's
  activations reach hundreds of MiB each, so the threshold is 1 GiB: a training step (lite0, batch 32, plain) 6.6
  -> 10.9 img/s against 8.2 at 64 MiB (page faults 11.8 M -> 1.8 M, peak memory 6.3 -> 7.6 GB).
- `frozen_gc`: everything alive once the libraries and the model are loaded (millions of objects) is left out of
  Python's full collections, which would otherwise walk it all again and again: `predict` on 16 images 4.9 -> 4.1 s.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys

__all__ = ["MALLOC_ENV", "tune_malloc", "frozen_gc"]

MALLOC_ENV = "FRACTURE_FASTAI_MALLOC"  # 'default' leaves the allocator as it is
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 1 << 30  # freed memory kept at the heap top before any is given back: 1 GiB
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, reused, not mapped anew (a batch of 32 at 320 px
# holds activations of 100-300 MiB; at 192 px, predict ran 120 img/s at 64 MiB and 112 at 32 MiB)


def tune_malloc() -> bool:
    "Keep freed memory for reuse (glibc's mallopt); True if set. Linux with glibc only; `$FRACTURE_FASTAI_MALLOC=default` opts out."
    if os.environ.get(MALLOC_ENV, "").lower() == "default" or not sys.platform.startswith("linux"): return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # Both: the trim threshold alone also switches off glibc's adaptive mmap threshold, which measured
        # slower than the default (66 against 118 img/s).
        return libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):  # no glibc (musl, ...): nothing to tune
        return False


@contextlib.contextmanager
def frozen_gc():
    "Within: the objects alive on entry are left out of garbage collection; on exit they are collectable again."
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
