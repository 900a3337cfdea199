"""Writing a reinforced store: create or resume, write whole blocks, mark them done, finalize.

Layout facts (names, dtypes, header) come from :mod:`reinforce_loaders.format`; this module only decides
chunking and the order of writes. A block's data is written before its ``blocks_done`` flag, and the
header says ``complete`` only after every flag is set, so a crash at any moment leaves a store that a resumed
build completes and that readers refuse until then.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from reinforce_loaders import format as fmt
from reinforce_loaders.errors import StoreFormatError


@dataclasses.dataclass
class BlockResult:
    """Everything a block of samples ``[start, start + n)`` contributes to the store."""

    start: int
    labels: np.ndarray          # (n,)
    fingerprints: np.ndarray    # (n,)
    image_sizes: np.ndarray     # (n, 2) height, width
    aug_params: np.ndarray      # (n, A, P)
    topk_indices: np.ndarray    # (n, A, K)
    topk_probs: np.ndarray      # (n, A, K)


class StoreWriter:
    """Writes blocks of a store whose header is fixed at creation."""

    def __init__(self, group: zarr.Group, header: fmt.StoreHeader) -> None:
        self.group = group
        self.header = header

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike[str], header: fmt.StoreHeader, num_params: int) -> StoreWriter:
        """Open ``path`` for writing: create a new store, or resume one built with the same settings."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            try:
                group = zarr.open_group(str(path), mode="r+", zarr_format=3)
                existing = fmt.StoreHeader.from_attrs(group.attrs.asdict())
            except (StoreFormatError, FileNotFoundError, zarr.errors.GroupNotFoundError,
                    zarr.errors.NodeTypeValidationError):
                raise StoreFormatError(
                    f"--out {path} exists and is not a reinforce store: choose another path or remove it"
                ) from None
            differences = _differences(existing.settings(), header.settings())
            if differences:
                raise StoreFormatError(
                    f"--out {path} holds a store built with different settings ({'; '.join(differences)}): "
                    "re-run with the original settings to resume it, or choose another --out"
                )
            return cls(group, existing)
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        _create_arrays(group, header, num_params)
        group.attrs[fmt.ATTRS_KEY] = header.to_attrs()
        return cls(group, header)

    def pending_blocks(self) -> list[int]:
        done = self.group[fmt.BLOCKS_DONE][:]
        return [int(block) for block in np.flatnonzero(done == 0)]

    def write_block(self, block: int, result: BlockResult) -> None:
        start, stop = self.header.block_range(block)
        if result.start != start or len(result.labels) != stop - start:
            raise ValueError(f"block {block} covers samples [{start}, {stop}), got {len(result.labels)} from {result.start}")
        for name in fmt.PER_SAMPLE_ARRAYS + fmt.PER_RECORD_ARRAYS:
            array = self.group[name]
            array[start:stop] = np.asarray(getattr(result, name), dtype=array.dtype)
        self.group[fmt.BLOCKS_DONE][block] = 1

    def finalize(self) -> fmt.StoreHeader:
        """Mark the store complete (only if every block is written) and consolidate its metadata."""
        pending = self.pending_blocks()
        if pending:
            raise StoreFormatError(f"cannot finalize: {len(pending)} blocks are not written (first: {pending[0]})")
        self.header = dataclasses.replace(self.header, complete=True)
        self.group.attrs[fmt.ATTRS_KEY] = self.header.to_attrs()
        with warnings.catch_warnings():
            # zarr warns that consolidated metadata is not yet in the v3 spec; our readers rely on it, see spec.
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.group.store)
        return self.header


def _create_arrays(group: zarr.Group, header: fmt.StoreHeader, num_params: int) -> None:
    n, a, k, b = header.num_samples, header.num_augmentations, header.top_k, header.block_size
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        fmt.LABELS: ((n,), fmt.LABEL_DTYPE),
        fmt.FINGERPRINTS: ((n,), fmt.FINGERPRINT_DTYPE),
        fmt.IMAGE_SIZES: ((n, 2), fmt.IMAGE_SIZE_DTYPE),
        fmt.AUG_PARAMS: ((n, a, num_params), fmt.AUG_PARAMS_DTYPE),
        fmt.TOPK_INDICES: ((n, a, k), header.index_dtype),
        fmt.TOPK_PROBS: ((n, a, k), fmt.TOPK_PROBS_DTYPE),
    }
    for name, (shape, dtype) in specs.items():
        group.create_array(name, shape=shape, chunks=(b, *shape[1:]), dtype=dtype, fill_value=0)
    group.create_array(fmt.BLOCKS_DONE, shape=(header.num_blocks,), chunks=(1,), dtype=fmt.BLOCK_DONE_DTYPE,
                       fill_value=0)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{key}: store has {old.get(key)!r}, this run has {new.get(key)!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def store_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of every file under ``path``."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())
