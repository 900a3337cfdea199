"""``reinforce inspect``: what a store holds, its layout, and its size per array and per record."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from typing import Any

import zarr
from reinforce_loaders import format as fmt
from zarr.core.sync import sync


def describe_store(store: str | os.PathLike[str]) -> str:
    """Human-readable description of a store: header, layout, sizes per array and bytes per record."""
    group = fmt.open_store_group(store)
    header = fmt.read_header(group, require_complete=False)
    fmt.check_store(group, header, last_block=header.complete)
    records = header.num_samples * header.num_augmentations
    columns = header.layout.columns
    lines = [
        f"store            {store}",
        f"format           {header.format_name} {header.format_version}"
        f" ({'complete' if header.complete else 'INCOMPLETE'})",
        f"samples          {header.num_samples} in {header.num_blocks} blocks of {header.block_size}",
        f"records          {records} ({header.num_augmentations} augmentations per sample)",
        f"classes          {header.num_classes}, top-{header.top_k} stored, probabilities x{header.prob_scale}, "
        + (f"indices via a per-sample vocabulary of {header.class_vocabulary_size} classes"
           if header.class_vocabulary_size else "indices stored as class ids"),
        f"seed             {header.seed}",
        f"augmentation     size {header.augmentation['size']}: "
        + ", ".join(_op_text(op) for op in header.augmentation["ops"]),
        "teachers         " + "; ".join(
            f"{t.get('name')} @{t.get('input_size')} sha256 {str(t.get('weights_sha256'))[:12]}"
            for t in header.teachers) + _teacher_accuracy_text(header),
        f"built            {header.provenance.get('created', '?')} by {header.provenance.get('tool', '?')}"
        f" on {header.provenance.get('device', '?')}",
        f"record row       {header.layout.width} x {header.dtype}: "
        + ", ".join(f"{name} [{cols.start}:{cols.stop})" for name, cols in columns.items()),
        "param encodings  " + ", ".join(_encoding_text(item) for item in header.param_encodings or []),
        "",
        f"{'array':<18}{'shape':<20}{'dtype':<8}{'chunks':<16}{'shards':<18}{'files':>7}{'bytes':>14}"
        f"{'bytes/record':>14}",
    ]
    total = files_total = 0
    for name in header.array_names:
        array = group[name]
        size, files = _array_bytes(array)
        total += size
        files_total += files
        shards = str(array.shards) if array.shards is not None else "-"
        lines.append(f"{name:<18}{str(array.shape):<20}{str(array.dtype):<8}{str(array.chunks):<16}{shards:<18}"
                     f"{files:>7}{size:>14,}{size / max(records, 1):>14.2f}")
    lines.append(f"{'total (data files)':<80}{files_total:>7}{total:>14,}{total / max(records, 1):>14.2f}")
    # Header strings come from whoever made the store: no terminal control sequences reach the screen.
    return "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in "\n".join(lines))


def _op_text(op: dict[str, Any]) -> str:
    args = ", ".join(f"{key}={value}" for key, value in op.items() if key != "name")
    return f"{op['name']}({args})"


def _encoding_text(item: dict[str, Any]) -> str:
    args = ",".join(f"{key}={value}" for key, value in item.items() if key not in ("param", "kind"))
    return f"{item['param']}:{item['kind']}" + (f"({args})" if args else "")


def _array_bytes(array: zarr.Array) -> tuple[int, int]:
    """(bytes, files) of an array's shard (or chunk) files present in the store.

    A local store's directory is listed (as long as the files present, however many blocks a header claims);
    in any other store each file is asked for by its key, as a reader finds it, so a remote store needs no
    directory listing.
    """
    if isinstance(array.store, zarr.storage.LocalStore):
        present = sync(_listed_sizes(array.store, f"{array.path}/c/"))
        return sum(present), len(present)
    step = array.shards or array.chunks
    grid = [range(math.ceil(size / width)) for size, width in zip(array.shape, step)]
    keys = [f"{array.path}/{array.metadata.encode_chunk_key(coords)}" for coords in itertools.product(*grid)]
    present = [size for size in sync(_stored_sizes(array.store, keys)) if size is not None]
    return sum(present), len(present)


async def _listed_sizes(store: zarr.abc.store.Store, prefix: str) -> list[int]:
    return [await store.getsize(key) async for key in store.list_prefix(prefix)]


async def _stored_sizes(store: zarr.abc.store.Store, keys: list[str]) -> list[int | None]:
    """Size of each key's file in ``store`` (None: absent), asked concurrently."""
    async def size(key: str) -> int | None:
        try:
            return await store.getsize(key)
        except FileNotFoundError:
            return None

    sizes: list[int | None] = []
    for first in range(0, len(keys), 4096):  # bounded: a header may claim up to fmt.MAX_BLOCKS blocks
        sizes.extend(await asyncio.gather(*(size(key) for key in keys[first:first + 4096])))
    return sizes


def _teacher_accuracy_text(header: fmt.StoreHeader) -> str:
    recorded = fmt.recorded_teacher_accuracy(header.provenance)
    return "" if recorded is None else f"; top-1 {recorded[0]:.2f} % on {recorded[1]}"
