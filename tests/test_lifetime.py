"""Worker processes end with their parent, even a SIGKILLed one: the demo's trainings (death signal and polling)
and a pool whose processes are started by another thread (polling alone, as the importer's joblib workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

DEMO_PARENT = """
import os, sys, time
from reinforce.demo import Job, JobRunner

def forever(folder, report):
    open(os.path.join(folder, str(os.getpid())), "w").close()
    while True:
        time.sleep(0.05)

if __name__ == "__main__":
    with JobRunner(2) as runner:
        runner.run([Job("a", 1, forever, (sys.argv[1],)), Job("b", 1, forever, (sys.argv[1],))])
"""

THREAD_PARENT = """
import multiprocessing, os, sys, threading, time
from reinforce.lifetime import exit_with_parent

def child(folder, parent):
    exit_with_parent(parent, death_signal=False)
    open(os.path.join(folder, str(os.getpid())), "w").close()
    while True:
        time.sleep(0.05)

def start():
    multiprocessing.get_context("fork").Process(target=child, args=(sys.argv[1], os.getpid())).start()

if __name__ == "__main__":
    thread = threading.Thread(target=start)
    thread.start()
    thread.join()  # the thread that started the child is gone: only the polling can notice the parent's death
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("script, workers", [(DEMO_PARENT, 2), (THREAD_PARENT, 1)], ids=["demo", "thread"])
def test_workers_exit_when_their_parent_is_killed(tmp_path, script, workers):
    (tmp_path / "parent.py").write_text(textwrap.dedent(script))
    folder = tmp_path / "pids"
    folder.mkdir()
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: len(list(folder.iterdir())) == workers, 120), "the workers never started"
        pids = [int(path.name) for path in folder.iterdir()]
        assert all(_alive(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # A generous bound on a loaded machine: the point is that they go at all (orphans otherwise run on).
        assert _wait(lambda: not any(_alive(pid) for pid in pids), 30), "orphaned workers are still running"
    finally:
        if parent.poll() is None:
            parent.kill()
        for path in folder.iterdir():
            try:
                os.kill(int(path.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
