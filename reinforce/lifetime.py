"""Worker processes that do not outlive their parent.

A pool's worker (the demo's trainings, the importer's conversions) would otherwise go on working, orphaned, when
its parent is killed without a chance to shut the pool down (SIGKILL, the out-of-memory killer). Each worker
calls :func:`exit_with_parent` once, when it starts (or with its first task).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.5

_watched: int | None = None  # the parent this process watches, once exit_with_parent has run here


def exit_with_parent(parent: int | None = None, *, death_signal: bool = True) -> None:
    """End this process as soon as its parent process (``parent``: its pid, as the parent passed it; default: the
    current parent) is gone.

    A daemon thread polls :func:`os.getppid` every :data:`POLL_SECONDS` (the parent's children are re-parented
    when it dies) and ends the process with ``os._exit``. With ``death_signal`` on Linux, ``PR_SET_PDEATHSIG``
    also has the kernel SIGKILL it at once, even while it holds the GIL in a long native call; but that signal
    comes when the parent *thread* that started this process ends, so pass it only for a pool whose processes
    are started by the parent's main thread. Calling it again in the same process, or in the parent itself (a pool
    that runs its tasks in-process), does nothing.
    """
    global _watched
    parent = os.getppid() if parent is None else parent
    if _watched == parent or parent == os.getpid():
        return
    _watched = parent
    if death_signal and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl in this C library: the thread below still watches
            pass
    if os.getppid() != parent:  # the parent died before anything watched it (or this is not its child)
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="exit-with-parent", daemon=True).start()


def _watch(parent: int) -> None:
    while True:
        time.sleep(POLL_SECONDS)
        if os.getppid() != parent:
            os._exit(1)
