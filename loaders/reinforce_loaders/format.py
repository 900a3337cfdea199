"""Single source of truth for the layout of a reinforced store (see ``format_spec.md``).

The builder (``reinforce``) writes with these names, dtypes and attributes and the readers in this package
read with them; nothing about the layout is written down anywhere else in code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from .errors import IncompleteStoreError, StoreFormatError

FORMAT_NAME = "reinforce-store"
FORMAT_VERSION = (0, 1)
"""(major, minor). Readers reject another major version and accept any minor version of their major."""

ATTRS_KEY = "reinforce"
"""The group attribute holding the :class:`StoreHeader` as JSON."""

# Array names, one place.
LABELS = "labels"
FINGERPRINTS = "fingerprints"
IMAGE_SIZES = "image_sizes"
AUG_PARAMS = "aug_params"
TOPK_INDICES = "topk_indices"
TOPK_PROBS = "topk_probs"
BLOCKS_DONE = "blocks_done"

PER_SAMPLE_ARRAYS = (LABELS, FINGERPRINTS, IMAGE_SIZES)
PER_RECORD_ARRAYS = (AUG_PARAMS, TOPK_INDICES, TOPK_PROBS)

LABEL_DTYPE = np.dtype("<i4")
FINGERPRINT_DTYPE = np.dtype("<u8")
IMAGE_SIZE_DTYPE = np.dtype("<u4")
AUG_PARAMS_DTYPE = np.dtype("<f4")
TOPK_PROBS_DTYPE = np.dtype("<f4")
BLOCK_DONE_DTYPE = np.dtype("u1")

SKIPPED_IMAGE_SIZE = (0, 0)
"""``image_sizes`` of a sample whose image could not be read and was skipped (``--on-bad-image skip``);
its fingerprint and records are zeros, and the header's ``provenance["skipped"]`` lists it with its path."""


def topk_index_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds every class index below ``num_classes``."""
    if num_classes <= 2**8:
        return np.dtype("u1")
    if num_classes <= 2**16:
        return np.dtype("<u2")
    return np.dtype("<u4")


@dataclasses.dataclass(frozen=True)
class StoreHeader:
    """Everything a reader needs to interpret a store, stored as the group attribute ``reinforce``.

    ``settings`` (all fields but ``provenance`` and ``complete``) decide the contents of the arrays;
    re-running a build on an existing store is only allowed when they are equal.
    """

    num_samples: int
    num_classes: int
    top_k: int
    num_augmentations: int
    seed: int
    block_size: int
    augmentation: dict[str, Any]
    teachers: list[dict[str, Any]]
    class_names: list[str] | None = None
    compute: dict[str, Any] = dataclasses.field(default_factory=dict)
    """How the teachers were run, as far as it changes the stored bytes (micro-batch size, precision, ...)."""
    fingerprint: str = "blake2b-64 of the decoded RGB uint8 CHW pixels, prefixed by the shape"
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    complete: bool = False
    format_name: str = FORMAT_NAME
    format_version: str = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.top_k > self.num_classes:
            raise StoreFormatError(f"top_k={self.top_k} must be between 1 and num_classes={self.num_classes}")
        if self.num_augmentations < 1:
            raise StoreFormatError(f"num_augmentations={self.num_augmentations} must be at least 1")
        if self.block_size < 1:
            raise StoreFormatError(f"block_size={self.block_size} must be at least 1")

    @property
    def num_blocks(self) -> int:
        return -(-self.num_samples // self.block_size)

    @property
    def index_dtype(self) -> np.dtype:
        return topk_index_dtype(self.num_classes)

    def block_range(self, block: int) -> tuple[int, int]:
        """Sample range ``[start, stop)`` covered by ``block``."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_samples)

    def settings(self) -> dict[str, Any]:
        """The fields that determine array contents (JSON-normalized, so stored and fresh headers compare)."""
        fields = dataclasses.asdict(self)
        for volatile in ("provenance", "complete", "format_version"):
            fields.pop(volatile)
        return json.loads(json.dumps(fields))

    def to_attrs(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreHeader:
        if ATTRS_KEY not in attrs:
            raise StoreFormatError(
                f"this is not a reinforce store: its root group has no '{ATTRS_KEY}' attribute; "
                "pass the directory written by `reinforce build --out`"
            )
        raw = dict(attrs[ATTRS_KEY])
        if raw.get("format_name") != FORMAT_NAME:
            raise StoreFormatError(
                f"unknown store format {raw.get('format_name')!r}; expected {FORMAT_NAME!r}"
            )
        check_format_version(str(raw.get("format_version", "")))
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys are minor-version additions: ignored by this reader.
        return cls(**{key: value for key, value in raw.items() if key in known})


def check_format_version(version: str) -> tuple[int, int]:
    """Parse ``"MAJOR.MINOR"``; raise if this reader cannot read that major version."""
    try:
        major, minor = (int(part) for part in version.split("."))
    except ValueError:
        raise StoreFormatError(f"store has a malformed format_version {version!r}; expected 'MAJOR.MINOR'") from None
    if major != FORMAT_VERSION[0]:
        supported = f"{FORMAT_VERSION[0]}.x"
        advice = (
            "upgrade reinforce-loaders (pip install -U reinforce-loaders)"
            if major > FORMAT_VERSION[0]
            else "rebuild the store with this version of reinforce"
        )
        raise StoreFormatError(
            f"store format version {version} is not supported by this reader (it reads {supported}): {advice}"
        )
    return major, minor


def open_store_group(store: Any, mode: str = "r", storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Open the root group of a store given as a path, an fsspec URL or a zarr store object."""
    try:
        return zarr.open_group(store=str(store) if hasattr(store, "__fspath__") else store, mode=mode,
                               storage_options=storage_options, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise StoreFormatError(
            f"no reinforce store at {store!s}: check the path or URL (it must be the directory written by "
            "`reinforce build --out`)"
        ) from None


def read_header(group: zarr.Group, *, require_complete: bool = True) -> StoreHeader:
    """Read and validate the header of an open store group."""
    header = StoreHeader.from_attrs(group.attrs.asdict())
    if require_complete and not header.complete:
        raise IncompleteStoreError(
            f"the store's build has not finished ({_blocks_done_summary(group, header)}): "
            "re-run the same `reinforce build` command to resume it"
        )
    return header


def _blocks_done_summary(group: zarr.Group, header: StoreHeader) -> str:
    try:
        done = int(np.count_nonzero(group[BLOCKS_DONE][:]))
    except KeyError:
        done = 0
    return f"{done} of {header.num_blocks} blocks written"
