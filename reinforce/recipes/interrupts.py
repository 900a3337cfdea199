"""Ctrl-C during training: taken at the end of the step it interrupts, so a checkpoint holds whole steps."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class StepBoundaryInterrupts:
    """Ctrl-C (SIGINT) during a training step takes effect when the step has ended, so the checkpoint written on
    an interrupt holds a whole number of steps and ``--resume`` continues exactly: the step's random draws,
    optimizer update, LR step and EMA update are all in it or all out. Between steps it takes effect at once; a
    second Ctrl-C inside a step stops at once (:attr:`mid_step`, and no checkpoint is written of that step).

    Only in the main thread of a single-process run: under ``torchrun`` the ranks would have to agree on the
    step to stop after, and a rank that had already left would leave the others waiting in DDP's all-reduce.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.in_step = False
        self.requested = False
        self.mid_step = False
        self._previous: Any = None

    def __enter__(self) -> StepBoundaryInterrupts:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:  # None: a handler not installed from Python; Python's own is the closest
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Context of one step: an interrupt inside it is raised (as KeyboardInterrupt) at its end."""
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
        if self.requested:
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: Any) -> None:
        if self.in_step and not self.requested:
            self.requested = True
            return
        self.mid_step = self.in_step
        raise KeyboardInterrupt
