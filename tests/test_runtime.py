"Process settings of the command lines: glibc's allocator keeps freed memory, and the collector skips what is loaded."
import gc
import platform
import subprocess
import sys

import pytest

from fracture_fastai.runtime import MALLOC_ENV, frozen_gc, tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's options are glibc's")
def test_tune_malloc_sets_glibc_and_can_be_turned_off(monkeypatch):
    # In a child process: the setting is process-wide, and the test process keeps its own allocator.
    code = "from fracture_fastai.runtime import tune_malloc; print(tune_malloc())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
    monkeypatch.setenv(MALLOC_ENV, "default")
    assert tune_malloc() is False


_REALLOCATE = """
import resource, torch
from fracture_fastai.runtime import tune_malloc
tune_malloc()
faults = []
for _ in range(12):  # 128 MiB tensors, as a 320 px batch's activations: made, used and freed step after step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(32 << 20); y = x * 2; del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[6:]))  # once the heap has grown to hold them
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's options are glibc's")
def test_tune_malloc_reuses_the_memory_of_large_tensors(monkeypatch):
    "Freed 128 MiB blocks are reused, where glibc's default maps fresh pages, and faults on each, every step."
    def faults(setting):
        monkeypatch.setenv(MALLOC_ENV, setting)
        done = subprocess.run([sys.executable, "-c", _REALLOCATE], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)
    tuned, default = faults("tune"), faults("default")
    assert tuned * 4 < default, (tuned, default)


def test_frozen_gc_freezes_within_and_releases_after():
    assert gc.get_freeze_count() == 0
    with frozen_gc():
        assert gc.get_freeze_count() > 1000  # the interpreter, pytest, torch: all left out of collections
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyError), frozen_gc():
        raise KeyError("released on an error too")
    assert gc.get_freeze_count() == 0
