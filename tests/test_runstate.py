"Telling a live run from a dead one: status, host and process id, heartbeat."
import os
import socket
import subprocess
import sys
import time

from fracture_fastai.runstate import STALE_SECONDS, Heartbeat, resume_command, run_state


def _config(status="running", pid=None, host=None):
    return {"status": status, "process": {"host": host or socket.gethostname(), "pid": pid or os.getpid()}}


def test_finished_and_failed_runs_keep_their_status(tmp_path):
    assert run_state(tmp_path, {"status": "done"}) == "done"
    assert run_state(tmp_path, {"status": "failed"}) == "failed"
    assert run_state(tmp_path, {"status": "interrupted"}) == "interrupted"


def test_a_live_process_with_a_fresh_heartbeat_is_running(tmp_path):
    (tmp_path / "heartbeat").touch()
    assert run_state(tmp_path, _config()) == "running"
    # ...until the heartbeat goes stale (a hung machine, or a process id taken over by another program)
    assert run_state(tmp_path, _config(), now=time.time() + STALE_SECONDS + 1) == "interrupted"


def test_a_dead_process_is_interrupted_at_once(tmp_path):
    (tmp_path / "heartbeat").touch()  # fresh: the process died a moment ago
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert run_state(tmp_path, _config(pid=gone.pid)) == "interrupted"


def test_another_machine_is_judged_by_its_heartbeat(tmp_path):
    config = _config(pid=1, host="another-host.invalid")
    assert run_state(tmp_path, config) == "interrupted"  # no heartbeat at all: never seen alive
    (tmp_path / "heartbeat").touch()
    assert run_state(tmp_path, config) == "running"


def test_heartbeat_beats_while_inside(tmp_path):
    beat = tmp_path / "heartbeat"
    with Heartbeat(tmp_path, every=0.05):
        first = beat.stat().st_mtime_ns
        time.sleep(0.3)
        assert beat.stat().st_mtime_ns > first
    stopped = beat.stat().st_mtime_ns
    time.sleep(0.15)
    assert beat.stat().st_mtime_ns == stopped  # the thread stops with the block


def test_resume_command_quotes_the_folder():
    assert resume_command("runs/my run") == "python -m fracture_fastai.run --resume 'runs/my run'"
