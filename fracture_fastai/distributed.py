"""Data-parallel training on Hugging Face accelerate through fastai's `distrib_ctx`: one process per GPU (or CPU
worker, gloo backend), started by `torchrun` or `accelerate launch`. Rank 0 alone writes the run folder.

Outside such a launch (no WORLD_SIZE above 1) every function here is a no-op, so a plain run pays nothing.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["world_size", "rank", "is_main", "setup", "rank0_first", "share_path", "worker_dir", "data_parallel",
           "finish"]


def world_size() -> int:
    "Processes in this training (torchrun's and accelerate's WORLD_SIZE); 1 when not launched by them."
    return max(1, int(os.environ.get("WORLD_SIZE", 1)))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    "Whether this process writes: rank 0, or the only process."
    return rank() == 0


def setup():
    "Join the process group (accelerate's PartialState: NCCL on GPUs, gloo on CPUs) when launched with several processes."
    if world_size() < 2: return
    try:
        from accelerate import PartialState
    except ImportError:
        from .errors import UserError
        raise UserError("multi-process training needs accelerate: pip install 'fracture_fastai[distributed]'") from None
    import torch
    PartialState(cpu=not torch.cuda.is_available())  # accelerate takes CPU processes for one process unless told


def _barrier():
    import torch.distributed as dist
    if world_size() > 1 and dist.is_initialized(): dist.barrier()


def rank0_first(func, *args, **kwargs):
    "`func(*args, **kwargs)` on rank 0 first, then on the others (they find the demo made and the cache filled)."
    if world_size() < 2: return func(*args, **kwargs)
    if is_main(): result = func(*args, **kwargs)
    _barrier()
    if not is_main(): result = func(*args, **kwargs)
    return result


def share_path(path) -> Path:
    "Rank 0's `path` on every rank (a run folder named by a timestamp differs between processes otherwise)."
    if world_size() < 2: return Path(path)
    import torch.distributed as dist
    box = [str(path)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def worker_dir(run_dir) -> Path:
    """A scratch folder for a rank other than 0: what it would write lands there and is removed by `finish`. Its
    `models/` is rank 0's, from which fastai's SaveModelCallback reloads the best epoch on every rank."""
    scratch = Path(tempfile.mkdtemp(prefix=f"fracture-rank{rank()}-"))
    (Path(run_dir) / "models").mkdir(parents=True, exist_ok=True)
    (scratch / "models").symlink_to(Path(run_dir).resolve() / "models", target_is_directory=True)
    return scratch


def finish(out):
    "A rank other than 0 removes its scratch folder."
    if not is_main(): shutil.rmtree(out, ignore_errors=True)


@contextmanager
def _on_cpus():
    """fastai's distributed pieces assume GPUs: DistributedDL broadcasts the batch order as a CUDA tensor (NCCL only)
    and DistributedTrainer asks the DDP-wrapped model for its `.device`, which a CPU DDP lacks. On gloo (CPU
    processes) both are swapped for CPU versions inside this block only."""
    import torch
    import torch.distributed as dist
    from fastai.distributed import DistributedDL, DistributedTrainer
    if dist.get_backend() == "nccl":
        yield
        return
    def _broadcast(self, t, rank):
        t = torch.tensor(t, dtype=torch.long)
        dist.broadcast(t, rank)
        return t.tolist()
    def _wrap_dl(self, dl):
        return dl if isinstance(dl, DistributedDL) else DistributedDL(dl, device=self.learn.dls.device)
    old = DistributedDL._broadcast, DistributedTrainer._wrap_dl
    DistributedDL._broadcast, DistributedTrainer._wrap_dl = _broadcast, _wrap_dl
    try: yield
    finally: DistributedDL._broadcast, DistributedTrainer._wrap_dl = old


@contextmanager
def data_parallel(learn):
    """Train `learn` in this block with fastai's `distrib_ctx` (DistributedDataParallel through accelerate) when
    launched with several processes. After it, rank 0 works alone: fastai gathers predictions across ranks whenever
    WORLD_SIZE says there are several, so the evaluation would otherwise see each image once per process."""
    if world_size() < 2:
        yield learn
        return
    import fastai.distributed  # noqa: F401  (Learner.distrib_ctx)
    import torch
    # SyncBatchNorm runs on GPUs only; on CPUs each process keeps its own batch statistics.
    cuda = torch.cuda.is_available()
    with _on_cpus(), learn.distrib_ctx(sync_bn=cuda, cpu=not cuda):
        yield learn
    _barrier()  # every rank has reloaded the best epoch before rank 0 goes on alone
    os.environ["WORLD_SIZE"] = "1"
