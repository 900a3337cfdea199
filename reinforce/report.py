"""``reinforce inspect`` and ``reinforce verify``: what a store holds, and whether it is sound."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from reinforce_loaders import format as fmt
from reinforce_loaders.augment import AugmentPipeline
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import fingerprint, open_source


class VerificationError(ReinforceError):
    """The store is incomplete, inconsistent, or does not match the source data."""


def describe_store(store: str | os.PathLike[str]) -> str:
    """Human-readable description of a store: header, arrays, sizes and bytes per record."""
    group = fmt.open_store_group(store)
    header = fmt.read_header(group, require_complete=False)
    records = header.num_samples * header.num_augmentations
    lines = [
        f"store            {store}",
        f"format           {header.format_name} {header.format_version}"
        f" ({'complete' if header.complete else 'INCOMPLETE'})",
        f"samples          {header.num_samples} in {header.num_blocks} blocks of {header.block_size}",
        f"records          {records} ({header.num_augmentations} augmentations per sample)",
        f"classes          {header.num_classes}, top-{header.top_k} stored",
        f"seed             {header.seed}",
        f"augmentation     size {header.augmentation['size']}: "
        + ", ".join(_op_text(op) for op in header.augmentation["ops"]),
        "teachers         " + "; ".join(
            f"{t['name']} @{t['input_size']} sha256 {t['weights_sha256'][:12]}" for t in header.teachers),
        f"built            {header.provenance.get('created', '?')} by {header.provenance.get('tool', '?')}"
        f" on {header.provenance.get('device', '?')}",
        "",
        f"{'array':<14}{'shape':<20}{'dtype':<9}{'chunks':<18}{'bytes':>14}{'bytes/record':>14}",
    ]
    total = 0
    for name in fmt.PER_SAMPLE_ARRAYS + fmt.PER_RECORD_ARRAYS + (fmt.BLOCKS_DONE,):
        array = group[name]
        size = _array_bytes(store, name)
        total += size
        lines.append(f"{name:<14}{str(array.shape):<20}{str(array.dtype):<9}{str(array.chunks):<18}"
                     f"{size:>14,}{size / max(records, 1):>14.2f}")
    lines.append(f"{'total':<61}{total:>14,}{total / max(records, 1):>14.2f}")
    return "\n".join(lines)


def _op_text(op: dict[str, Any]) -> str:
    args = ", ".join(f"{key}={value}" for key, value in op.items() if key != "name")
    return f"{op['name']}({args})"


def _array_bytes(store: str | os.PathLike[str], name: str) -> int:
    root = Path(store) / name
    return sum(file.stat().st_size for file in root.rglob("*") if file.is_file()) if root.exists() else 0


def verify_store(store: str | os.PathLike[str], source: Any | None = None) -> list[str]:
    """Check a store (and optionally its source); return lines describing the checks that passed.

    Raises :class:`VerificationError` naming the first defect found.
    """
    group = fmt.open_store_group(store)
    header = fmt.read_header(group)
    passed = [f"header: {header.format_name} {header.format_version}, complete"]
    n, a, k = header.num_samples, header.num_augmentations, header.top_k
    pipeline = AugmentPipeline.from_config(header.augmentation)
    expected = {
        fmt.LABELS: (n,), fmt.FINGERPRINTS: (n,), fmt.IMAGE_SIZES: (n, 2),
        fmt.AUG_PARAMS: (n, a, pipeline.num_params), fmt.TOPK_INDICES: (n, a, k), fmt.TOPK_PROBS: (n, a, k),
        fmt.BLOCKS_DONE: (header.num_blocks,),
    }
    for name, shape in expected.items():
        if name not in group:
            raise VerificationError(f"array '{name}' is missing from the store: rebuild it")
        if group[name].shape != shape:
            raise VerificationError(f"array '{name}' has shape {group[name].shape}, expected {shape}")
    passed.append("arrays: all present with the expected shapes")
    done = group[fmt.BLOCKS_DONE][:]
    if not done.all():
        raise VerificationError(f"{int((done == 0).sum())} blocks are not written (first: {int(np.argmin(done))})")
    passed.append(f"blocks: {header.num_blocks} of {header.num_blocks} written")
    labels = group[fmt.LABELS][:]
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= header.num_classes:
        raise VerificationError(f"labels outside [0, {header.num_classes}) in the store")
    for start in range(0, n, header.block_size):
        stop = min(start + header.block_size, n)
        _check_records(group, start, stop, header.num_classes)
    passed.append(f"records: {n * a} with valid class indices, sorted probabilities in [0, 1] summing to <= 1")
    if source is not None:
        passed.extend(_check_source(open_source(source), group, header))
    return passed


_PROB_TOLERANCE = 1e-3


def _check_records(group: Any, start: int, stop: int, num_classes: int) -> None:
    indices = group[fmt.TOPK_INDICES][start:stop].astype(np.int64)
    probs = group[fmt.TOPK_PROBS][start:stop].astype(np.float64)
    if indices.max(initial=0) >= num_classes:
        raise VerificationError(f"class index >= {num_classes} among samples [{start}, {stop})")
    duplicate = (np.sort(indices, axis=-1)[..., 1:] == np.sort(indices, axis=-1)[..., :-1]).any(axis=-1)
    if duplicate.any():
        sample, slot = np.argwhere(duplicate)[0]
        raise VerificationError(f"record ({start + sample}, {slot}) repeats a class index")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1 + _PROB_TOLERANCE:
        raise VerificationError(f"probabilities outside [0, 1] among samples [{start}, {stop})")
    if (np.diff(probs, axis=-1) > _PROB_TOLERANCE).any():
        raise VerificationError(f"top-k probabilities not in descending order among samples [{start}, {stop})")
    sums = probs.sum(axis=-1)
    if (sums > 1 + _PROB_TOLERANCE).any() or (sums <= 0).any():
        sample, slot = np.argwhere((sums > 1 + _PROB_TOLERANCE) | (sums <= 0))[0]
        raise VerificationError(f"record ({start + sample}, {slot}) has top-k probabilities summing to "
                                f"{sums[sample, slot]:.4f}, outside (0, 1]")


def _check_source(source: Any, group: Any, header: fmt.StoreHeader) -> list[str]:
    if len(source) != header.num_samples:
        raise VerificationError(
            f"source {source.description} has {len(source)} samples but the store holds {header.num_samples}")
    labels = group[fmt.LABELS][:]
    fingerprints = group[fmt.FINGERPRINTS][:]
    sizes = group[fmt.IMAGE_SIZES][:]
    for index in range(len(source)):
        image, label = source.load(index)
        if label != labels[index]:
            raise VerificationError(f"source sample {index} ({source.name_of(index)}) has label {label}, "
                                    f"the store has {int(labels[index])}")
        if tuple(image.shape[1:]) != tuple(sizes[index]):
            raise VerificationError(f"source sample {index} ({source.name_of(index)}) is {tuple(image.shape[1:])}, "
                                    f"the store recorded {tuple(int(s) for s in sizes[index])}")
        if fingerprint(image) != int(fingerprints[index]):
            raise VerificationError(f"source sample {index} ({source.name_of(index)}) differs from the image "
                                    "the store was built from (fingerprint mismatch)")
    return [f"source: {len(source)} samples match labels, sizes and fingerprints"]
