"""Exceptions raised by reinforce and reinforce_loaders.

Every message names the problem and what to do about it; the command line prints it without a traceback.
"""

from __future__ import annotations


class ReinforceError(Exception):
    """Base class of every error this project raises on purpose."""


class StoreFormatError(ReinforceError):
    """The store is not a reinforce store, is damaged, or uses a format this reader does not support."""


class IncompleteStoreError(StoreFormatError):
    """The store's build has not finished: some blocks have not been written."""


class SourceError(ReinforceError):
    """The source images cannot be listed or read."""


class SourceMismatchError(ReinforceError):
    """The source images are not the ones the store was built from."""


class AugmentationError(ReinforceError):
    """An augmentation pipeline or preset is unknown or malformed."""
