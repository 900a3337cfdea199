"""Progress bars that suit where they are written: a terminal, or the log file of a batch job.

tqdm redraws a bar up to ten times a second. On a terminal each redraw replaces the last; in a log file (a Slurm
or Kubernetes job's stderr, ``2> build.log``) every redraw is kept, so an hours-long build or training run would
write megabytes of bars. Written anywhere but a terminal, our bars redraw once every :data:`LOG_INTERVAL_SECONDS`
instead: the log keeps a progress line a minute, with its rate and estimated time left.
"""

from __future__ import annotations

import sys
from typing import IO, Any

LOG_INTERVAL_SECONDS = 60.0
"""Seconds between two redraws of a bar written to a file or a pipe."""


def bar_options(stream: IO[str] | None = None) -> dict[str, Any]:
    """tqdm keyword arguments for a bar written to ``stream`` (default ``sys.stderr``, tqdm's): none on a
    terminal; elsewhere a redraw every :data:`LOG_INTERVAL_SECONDS` (``mininterval``, with ``miniters=1`` so a
    slow step still shows once the interval has passed)."""
    stream = sys.stderr if stream is None else stream
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        interactive = False
    if interactive:
        return {}
    return {"mininterval": LOG_INTERVAL_SECONDS, "maxinterval": LOG_INTERVAL_SECONDS, "miniters": 1}
