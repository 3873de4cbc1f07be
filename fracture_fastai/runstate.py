"""Is the run in a folder alive, finished, failed or interrupted? A training process records its host and process id in
config.json and touches a `heartbeat` file while it works; a run killed hard (SIGKILL, a power cut) leaves
`"status": "running"` behind, and these two tell a live run from a dead one."""
from __future__ import annotations

import os
import shlex
import socket
import threading
import time
from pathlib import Path

__all__ = ["HEARTBEAT", "BEAT_SECONDS", "STALE_SECONDS", "Heartbeat", "owner", "run_state", "resume_command"]

HEARTBEAT = "heartbeat"  # file in the run folder whose modification time is the last sign of life
BEAT_SECONDS = 20  # how often a live run touches it
STALE_SECONDS = 120  # silent this long: dead, even where its process id cannot be checked (another machine)


def owner() -> dict:
    "Who is running this: the host and process id that `run_state` checks."
    return {"host": socket.gethostname(), "pid": os.getpid()}


class Heartbeat:
    "`with Heartbeat(run_dir):` touches `run_dir/heartbeat` every `every` seconds from a daemon thread."
    def __init__(self, run_dir, every: float = BEAT_SECONDS):
        self.path, self.every, self._stop = Path(run_dir) / HEARTBEAT, every, threading.Event()

    def _beat(self):
        while not self._stop.wait(self.every):
            try: self.path.touch()
            except OSError: pass  # a full or vanished disk shows up where the run writes, not here

    def __enter__(self):
        self.path.touch()
        self._thread = threading.Thread(target=self._beat, name="fracture_fastai-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _pid_alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except PermissionError: return True  # it exists, under another user
    except OSError: return False
    return True


def run_state(
    run_dir,  # a run folder
    config: dict,  # its config.json
    now: float | None = None,  # the time to judge at (seconds since the epoch); default: now
) -> str:
    "'done', 'failed', 'interrupted' (stopped, or dead while config.json still says running), 'running', or the recorded status."
    status = config.get("status", "unknown")
    if status != "running": return status
    beat = Path(run_dir) / HEARTBEAT
    age = (now or time.time()) - beat.stat().st_mtime if beat.is_file() else None
    proc = config.get("process") or {}
    if proc.get("host") == socket.gethostname() and isinstance(proc.get("pid"), int) and not _pid_alive(proc["pid"]):
        return "interrupted"  # its process is gone on this machine: no need to wait for the heartbeat to go stale
    return "running" if age is not None and age < STALE_SECONDS else "interrupted"


def resume_command(run_dir) -> str:
    "The command line that continues the run in `run_dir`."
    return f"python -m fracture_fastai.run --resume {shlex.quote(str(run_dir))}"
