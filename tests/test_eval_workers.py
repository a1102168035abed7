"""Evaluation worker processes end when the evaluating process is killed."""
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from conftest import process_gone as gone
from mirage import workers

# The evaluation's own pool (mirage.evaluate.scoring._map_in_workers) with a task that never
# ends; each worker writes <pid>.worker when it starts a task.
PARENT = r'''
import os, sys, time
sys.path.insert(0, sys.argv[1])
from mirage.evaluate.scoring import _map_in_workers
OUT = sys.argv[2]
def work(item):
    open(os.path.join(OUT, f"{os.getpid()}.worker"), "w").close()
    time.sleep(300)
    return item
for _ in _map_in_workers(work, list(range(8)), 2):
    pass
'''


def worker_pids(out):
    return [int(Path(p).name.split(".")[0]) for p in glob.glob(f"{out}/*.worker")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_the_evaluation_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(REPO), str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while len(worker_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = worker_pids(tmp_path)
        assert len(started) == 2
        parent.send_signal(signal.SIGKILL)  # no chance to shut its pool down
        parent.wait(timeout=30)
        assert [pid for pid in started if not gone(pid)] == []
    finally:
        parent.kill()
        for pid in worker_pids(tmp_path):  # only if the test failed: leave nothing behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_polling_fallback_ends_a_worker_whose_parent_died(tmp_path, monkeypatch):
    """Without prctl (not Linux) a thread polls the parent pid; here a child forked by a
    short-lived middle process loses its parent."""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    monkeypatch.setattr(workers, "POLL_S", 0.05)
    monkeypatch.setattr(workers.sys, "platform", "other")
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:  # middle process: fork the worker, report its pid, exit at once
        try:
            worker = os.fork()
            if worker == 0:
                try:
                    workers.die_with_parent(os.getppid())
                    time.sleep(300)  # "works"; the middle process exits meanwhile
                finally:
                    os._exit(0)
            os.write(write, str(worker).encode())
        finally:
            os._exit(0)
    os.close(write)
    worker = int(os.read(read, 64).decode())
    os.close(read)
    os.waitpid(middle, 0)
    try:
        assert gone(worker)
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
