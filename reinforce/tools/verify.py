"""``reinforce verify``: whether a store is complete, sound, and matches its source images."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from reinforce_loaders import format as fmt
from reinforce_loaders.augment import AugmentPipeline
from reinforce_loaders.codecs import ParamLayout
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import fingerprint, open_source

from ..errors import VerificationError


def verify_store(store: str | os.PathLike[str], source: Any | None = None, *, quick: bool = False,
                 source_manifest: str | os.PathLike[str] | None = None) -> list[str]:
    """Check a store (and optionally its source); return lines describing the checks that passed.

    ``quick``: check the source directory against the source manifest (default: ``source-manifest.jsonl``
    beside the store, written by ``reinforce publish``) by names, sizes and sha256, without decoding, before
    the records are read.

    Raises :class:`VerificationError` naming the first defect found: an incomplete build, a missing or
    damaged (checksum) chunk, a shape that disagrees with the header, or a value out of range.
    """
    group = fmt.open_store_group(store)
    try:
        header = fmt.read_header(group)
    except fmt.IncompleteStoreError as error:
        raise VerificationError(str(error)) from None
    passed = [f"header: {header.format_name} {header.format_version}, complete"]
    n, a, w = header.num_samples, header.num_augmentations, header.layout.width
    pipeline = AugmentPipeline.from_config(header.augmentation)
    if len(header.param_encodings or []) != pipeline.num_params:
        raise VerificationError(f"header has {len(header.param_encodings or [])} param encodings for a pipeline "
                                f"of {pipeline.num_params} parameters")
    try:
        fmt.check_store(group, header)
    except ReinforceError as error:
        raise VerificationError(str(error)) from None
    passed.append(f"arrays: {len(header.array_names)} present with the shapes, dtypes, chunks, shards and "
                  "compressors of format v1; the last block written")
    _check_blocks_done(group, header)
    passed.append(f"blocks: {header.num_blocks} of {header.num_blocks} written")
    labels = _read(group, fmt.LABELS)
    sizes = _read(group, fmt.IMAGE_SIZES).astype(np.int64)
    fingerprints = _read(group, fmt.FINGERPRINTS)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= header.num_classes:
        first = int(np.argmax((labels < 0) | (labels >= header.num_classes)))
        raise VerificationError(f"label of sample {first} is {int(labels[first])}, outside [0, {header.num_classes})"
                                " (a negative label is a missing chunk)")
    skipped = np.zeros(n, dtype=bool)
    skipped[header.skipped_indices] = True
    marked = (sizes == np.array(fmt.SKIPPED_IMAGE_SIZE)).all(-1) & (fingerprints == 0)
    if (skipped & ~marked).any():
        first = int(np.argmax(skipped & ~marked))
        raise VerificationError(f"sample {first} is listed as skipped in the header but has an image size or "
                                "fingerprint in the store")
    absent = ((sizes <= 0).any(-1) | (fingerprints == 0)) & ~skipped
    if absent.any():
        first = int(np.argmax(absent))
        raise VerificationError(f"image size or fingerprint of sample {first} is missing (chunk absent)")
    passed.append(f"samples: {n} labels in range, sizes and fingerprints present"
                  + (f" ({int(skipped.sum())} skipped at build, listed in the header)" if skipped.any() else ""))
    if quick and source is None:
        raise VerificationError("--quick checks the source images against the source manifest: pass --data SOURCE")
    if source is not None and quick:
        from ..share.manifest import check_source, find_source_manifest, read_source_manifest

        rows = read_source_manifest(source_manifest or find_source_manifest(store))
        passed.extend(check_source(source, rows, fingerprints))
    vocabulary = None
    if header.class_vocabulary_size:
        vocabulary = _read(group, fmt.CLASS_VOCABULARY).astype(np.int64)
        _check_vocabulary(header, vocabulary, skipped)
        passed.append(f"class vocabulary: {n} rows of {header.class_vocabulary_size} distinct valid classes")
    codec = header.layout.params
    for block in range(header.num_blocks):
        start, stop = header.block_range(block)
        rows = _read(group, fmt.RECORDS, slice(start, stop), what=f"block {block} (samples [{start}, {stop}))")
        kept = np.flatnonzero(~skipped[start:stop])
        block_vocabulary = None if vocabulary is None else vocabulary[start:stop][kept][:, None, :]
        decoded_layout = _with_derived_params(group, header, block, rows, sizes) if header.derives_params else rows
        _check_records(header, codec, decoded_layout[kept], start + kept, sizes[start:stop][kept], block_vocabulary)
        if block == header.num_blocks - 1:
            passed.append(_check_slot_read(group, header, block, rows))
    passed.append(f"records: {n * a} rows of {w} checksummed columns; valid class indices, sorted probabilities "
                  "in [0, 1] summing to <= 1, entropies in range, parameters that decode to themselves"
                  + ("; parameters re-derived and every block slot's digest matched" if header.derives_params
                     else ""))
    if source is not None and not quick:
        passed.extend(_check_source(open_source(source, allow_empty_classes=True), header, labels, sizes,
                                    fingerprints))
    return passed


def _check_blocks_done(group: Any, header: fmt.StoreHeader, step: int = 4096) -> None:
    """Read ``blocks_done`` a slice at a time, stopping at the first block not written."""
    for first in range(0, header.num_blocks, step):
        done = _read(group, fmt.BLOCKS_DONE, slice(first, first + step))
        if not done.all():
            raise VerificationError(f"block {first + int(np.argmin(done))} is not written (blocks_done is 0): the "
                                    "store is damaged or truncated; re-download or rebuild it")


def _read(group: Any, name: str, selection: Any = slice(None), what: str = "") -> np.ndarray:
    try:
        return fmt.read_array(group, name, selection, what=what)
    except ReinforceError as error:
        raise VerificationError(str(error)) from None


def _with_derived_params(group: Any, header: fmt.StoreHeader, block: int, rows: np.ndarray,
                         sizes: np.ndarray) -> np.ndarray:
    """A derived-parameter store's block ``(n, A, W_s)`` with every slot's parameters re-derived, checked against
    its digest and put back in place: ``(n, A, W)`` rows in the decoded layout."""
    digests = _read(group, fmt.PARAM_DIGESTS, block, what=f"block {block}")
    slots = []
    for slot in range(header.num_augmentations):
        columns = fmt.derive_param_columns(header, block, slot, sizes)
        try:
            fmt.check_param_digest(header, block, slot, columns, sizes, int(digests[slot]))
        except ReinforceError as error:
            raise VerificationError(str(error)) from None
        slots.append(fmt.expand_rows(header, rows[:, slot], columns))
    return np.stack(slots, axis=1)


def _check_slot_read(group: Any, header: fmt.StoreHeader, block: int, rows: np.ndarray) -> str:
    """Read one slot of ``block`` alone, as a training epoch does (the shard's index, then one chunk: range
    requests on a remote store), and compare it with the same rows of the whole-shard read ``rows``."""
    slot = header.num_augmentations - 1
    start, stop = header.block_range(block)
    alone = _read(group, fmt.RECORDS, (slice(start, stop), slot), what=f"block {block} slot {slot} alone")
    if not np.array_equal(alone, rows[:, slot]):
        raise VerificationError(f"slot {slot} of block {block} read alone, as training does, differs from the "
                                "same rows of the whole block: the store or its server returns wrong byte ranges")
    return f"slot reads: slot {slot} of block {block} read alone, as training does, equals the whole-block read"


def _check_vocabulary(header: fmt.StoreHeader, vocabulary: np.ndarray, skipped: np.ndarray) -> None:
    """Each row: distinct classes in [0, C), then only fill values; rows of built samples are not empty."""
    fill = header.fill_value
    empty = vocabulary == fill
    if (empty[:, 0] & ~skipped).any():
        first = int(np.argmax(empty[:, 0] & ~skipped))
        raise VerificationError(f"class vocabulary of sample {first} is missing (chunk absent)")
    bad = (~empty & (vocabulary >= header.num_classes)).any(-1) | (empty[:, :-1] & ~empty[:, 1:]).any(-1)
    ordered = np.sort(np.where(empty, -1 - np.arange(vocabulary.shape[1]), vocabulary), axis=-1)
    bad |= (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    if bad.any():
        first = int(np.argmax(bad))
        raise VerificationError(f"class vocabulary of sample {first} is invalid: {vocabulary[first].tolist()} "
                                f"(entries must be distinct classes < {header.num_classes}, then {fill} padding)")


def _check_records(header: fmt.StoreHeader, codec: ParamLayout, rows: np.ndarray, samples: np.ndarray,
                   sizes: np.ndarray, vocabulary: np.ndarray | None = None) -> None:
    columns = header.layout.columns
    fill = header.fill_value
    where = f"samples [{samples[0]}, {samples[-1] + 1})" if len(samples) else "no samples"
    missing = (rows[..., 0] == fill)
    if missing.any():
        sample, slot = np.argwhere(missing)[0]
        raise VerificationError(f"record ({samples[sample]}, {slot}) is missing (its chunk is absent)")
    try:
        indices = fmt.decode_indices(header, rows[..., columns["topk_indices"]], vocabulary)
    except ReinforceError:
        invalid = fmt.invalid_vocabulary_references(header, rows[..., columns["topk_indices"]], vocabulary)
        sample, slot = np.argwhere(invalid.any(-1))[0]
        raise VerificationError(f"record ({samples[sample]}, {slot}) refers to an empty class vocabulary "
                                "entry") from None
    q = fmt.quantized_probs(header, rows)
    entropy = rows[..., columns["teacher_entropy"].start].astype(np.int64)
    for fault, what in fmt.record_faults(header, indices, q, entropy):
        if fault.any():
            sample, slot = np.argwhere(fault)[0]
            raise VerificationError(f"record ({samples[sample]}, {slot}) {what}")
    if (q.sum(axis=-1) <= 0).any():  # beyond the reader's checks: a record with no probability at all
        sample, slot = np.argwhere(q.sum(axis=-1) <= 0)[0]
        raise VerificationError(f"record ({samples[sample]}, {slot}) has top-k probabilities summing to 0")
    heights, widths = sizes[:, :1], sizes[:, 1:]
    params = codec.decode(rows[..., columns["aug_params"]], heights, widths)
    if not np.isfinite(params).all() or not np.array_equal(codec.quantize(params, heights, widths), params):
        bad = ~np.isfinite(params) | (codec.quantize(np.nan_to_num(params), heights, widths) != params)
        sample, slot, p = np.argwhere(bad)[0]
        raise VerificationError(f"record ({samples[sample]}, {slot}) parameter {codec.names[p]} does not decode "
                                f"to a representable value ({params[sample, slot, p]}) in {where}")
    stored = rows[..., columns["aug_params"]]
    mismatch = codec.encode(params, heights, widths) != stored
    if mismatch.any():  # decoded for an image size other than the one the parameters were encoded for
        sample, slot, p = np.argwhere(mismatch)[0]
        raise VerificationError(f"record ({samples[sample]}, {slot}) parameter {codec.names[p]} was not encoded for "
                                f"the {int(heights[sample, 0])} x {int(widths[sample, 0])} image the store records for "
                                f"sample {samples[sample]} (image_sizes): the store is damaged or hostile")
    _check_source_boxes(codec, params, samples, heights, widths)


SOURCE_BOX_OPS = ("random_resized_crop", "random_crop")
"""Ops whose parameters are a box ``(top, left, height, width)`` in pixels of the source image."""


def _check_source_boxes(codec: ParamLayout, params: np.ndarray, samples: np.ndarray, heights: np.ndarray,
                        widths: np.ndarray) -> None:
    """Every stored source box must lie inside the image size the store records for its sample."""
    names = list(codec.names)
    for op in SOURCE_BOX_OPS:
        parts = [f"{op}.{part}" for part in ("top", "left", "height", "width")]
        if not all(part in names for part in parts):
            continue
        top, left, height, width = (params[..., names.index(part)] for part in parts)
        outside = (top < 0) | (left < 0) | (height < 1) | (width < 1) | (top + height > heights) | (
            left + width > widths)
        if outside.any():
            sample, slot = np.argwhere(outside)[0]
            box = tuple(int(value[sample, slot]) for value in (top, left, height, width))
            raise VerificationError(
                f"record ({samples[sample]}, {slot}): its {op} box (top, left, height, width) = {box} lies outside "
                f"the {int(heights[sample, 0])} x {int(widths[sample, 0])} image the store records for sample "
                f"{samples[sample]} (image_sizes): the store is damaged or hostile")


def _check_source(source: Any, header: fmt.StoreHeader, labels: np.ndarray, sizes: np.ndarray,
                  fingerprints: np.ndarray) -> list[str]:
    """Compare the source with the store's per-sample arrays (already read and checked by the caller)."""
    if len(source) != header.num_samples:
        raise VerificationError(
            f"source {source.description} has {len(source)} samples but the store holds {header.num_samples}")
    skipped = set(header.skipped_indices.tolist())
    for index in range(len(source)):
        if index in skipped:
            continue
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
    return [f"source: {len(source) - len(skipped)} samples match labels, sizes and fingerprints"
            + (f"; {len(skipped)} skipped at build not checked" if skipped else "")]
