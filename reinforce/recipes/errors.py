"""The recipes' errors: what to change when a run cannot start or goes wrong."""

from __future__ import annotations

from reinforce_loaders.errors import ReinforceError


class TrainError(ReinforceError):
    """Training cannot start or continue; the message says what to change."""


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite."""
