"""What the benchmarks share: one `python -m fracture_fastai.run` in a subprocess, timed, its run folder found."""
import subprocess
import sys
import time
from pathlib import Path


def timed_run(args: list) -> tuple:
    "`(run folder, minutes)` of `python -m fracture_fastai.run ARGS`; exits (with its code) where the run fails."
    cmd = [sys.executable, "-m", "fracture_fastai.run", *map(str, args)]
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    minutes = (time.time() - start) / 60
    if res.returncode:
        sys.exit(f"run failed with exit code {res.returncode}")
    return Path(res.stdout.strip().splitlines()[-1]), minutes
