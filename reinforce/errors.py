"""Errors of the ``reinforce`` side that more than one of its packages raises or catches.

Every error the project raises on purpose is a :class:`~reinforce_loaders.errors.ReinforceError`; the CLI
prints its message and exits 2.
"""

from __future__ import annotations

from reinforce_loaders.errors import ReinforceError

__all__ = ["ReinforceError", "VerificationError"]


class VerificationError(ReinforceError):
    """The store is incomplete, inconsistent, or does not match the source data."""
