"""Record encoding (format_spec.md section 4): one ``records`` row per (sample, slot) from top-k class indices
(through the per-sample class vocabulary), quantized probabilities, encoded augmentation parameters and the
quantized teacher entropy; and the checks a reader makes of every record it decodes (section 8)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import StoreFormatError
from .header import StoreHeader


@dataclasses.dataclass
class DecodedRecords:
    """Records of some (sample, slot) pairs: ``indices``/``probs`` ``(..., K)``, ``params`` ``(..., P)``."""

    indices: np.ndarray
    probs: np.ndarray
    params: np.ndarray
    entropy: np.ndarray


def class_vocabulary(indices: np.ndarray, size: int, fill: int) -> np.ndarray:
    """Per-sample class vocabulary ``(n, size)`` of top-k ``indices`` ``(n, A, K)``: each sample's classes by
    descending number of occurrences among its ``A * K`` indices, ties by ascending class, padded with
    ``fill`` when the sample has fewer than ``size`` distinct classes."""
    indices = np.asarray(indices, dtype=np.int64)
    out = np.full((indices.shape[0], size), fill, dtype=np.int64)
    for sample, classes in enumerate(indices.reshape(len(indices), -1)):
        values, counts = np.unique(classes, return_counts=True)
        ranked = values[np.lexsort((values, -counts))][:size]
        out[sample, :len(ranked)] = ranked
    return out


def check_rows_present(header: StoreHeader, rows: np.ndarray, where: str) -> None:
    """Raise if any row holds the fill value (its chunk was never written or its file is missing)."""
    fill = header.fill_value
    top1 = rows[..., 0]
    if (top1 == fill).any():
        raise StoreFormatError(f"records of {where} are missing from the store (chunk absent): the store is "
                               "damaged or truncated; re-download it or rebuild it")


def decode_records(header: StoreHeader, rows: np.ndarray, heights: np.ndarray, widths: np.ndarray, *,
                   vocabulary: np.ndarray | None = None, where: str = "",
                   present: np.ndarray | None = None) -> DecodedRecords:
    """Decode raw ``records`` rows ``(..., W)`` given the source ``heights``/``widths`` of their samples and,
    for a store with a class vocabulary, their samples' ``class_vocabulary`` rows (broadcast like the
    heights, with a trailing ``V`` axis: ``(n, 1, V)`` for rows ``(n, A, W)``, ``(V,)`` for one row).

    Every record is checked as it is decoded (:func:`check_records`), except where the mask ``present``
    (broadcast against ``(...)``) is False: skipped samples, whose records are zeros; ``where`` names the rows
    in the error."""
    layout = header.layout
    columns = layout.columns
    indices = decode_indices(header, rows[..., columns["topk_indices"]], vocabulary)
    quantized = quantized_probs(header, rows)
    entropy_levels = rows[..., columns["teacher_entropy"].start]
    if present is None:
        check_records(header, indices, quantized, entropy_levels, where)
    else:
        mask = np.broadcast_to(present, indices.shape[:-1])
        check_records(header, indices[mask], quantized[mask], entropy_levels[mask], where)
    return DecodedRecords(
        indices=indices,
        probs=quantized.astype(np.float32) / layout.prob_scale,
        params=layout.params.decode(rows[..., columns["aug_params"]], heights, widths),
        entropy=entropy_levels.astype(np.float32) / layout.entropy_levels * layout.max_entropy,
    )


def check_records(header: StoreHeader, indices: np.ndarray, quantized: np.ndarray, entropy_levels: np.ndarray,
                  where: str = "") -> None:
    """Raise :class:`StoreFormatError` unless every record holds distinct class indices below ``num_classes``,
    quantized probabilities in ``[0, prob_scale]`` summing to at most ``prob_scale`` (plus rounding), and an
    entropy level of at most ``entropy_levels``: what a damaged or hostile store could otherwise turn into
    wrong targets (format_spec.md, "Checks a reader makes")."""
    k = indices.shape[-1]
    if indices.ndim == 1:  # one record (a reader's per-sample path): plain Python is cheaper than numpy here
        classes, q = indices.tolist(), quantized.tolist()
        bad = not (len(set(classes)) == k and 0 <= min(classes) and max(classes) < header.num_classes
                   and q[0] <= header.prob_scale and q[-1] >= 0 and sum(q) <= header.prob_scale + (k + 1) // 2
                   and int(entropy_levels) <= header.entropy_levels)
        if bad:
            _invalid_record((), header, where)
        return
    bad = np.logical_or.reduce([mask for mask, _ in record_faults(header, indices, quantized, entropy_levels)])
    if bad.any():
        _invalid_record(tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else (), header, where)


def record_faults(header: StoreHeader, indices: np.ndarray, quantized: np.ndarray,
                  entropy_levels: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """The per-record rules of format_spec.md section 8 ("Checks a reader makes") over records ``(..., K)``:
    for each rule, the mask ``(...)`` of records that break it and what such a record has wrong. Readers
    (:func:`check_records`) refuse any; ``reinforce verify`` names the first record and its fault."""
    k = indices.shape[-1]
    ordered = np.sort(indices, axis=-1)
    return [
        ((ordered[..., 0] < 0) | (ordered[..., -1] >= header.num_classes),
         f"has a class index outside [0, {header.num_classes})"),
        ((ordered[..., :-1] == ordered[..., 1:]).any(axis=-1), "repeats a class index"),
        (quantized[..., 0] > header.prob_scale, "has a probability above 1"),
        # drops are unsigned, so the order is descending by construction; they can overshoot
        (quantized[..., -1] < 0, "has probability drops larger than its top-1 probability (negative probabilities)"),
        # each of the k rounded probabilities may be up to half a step high
        (quantized.sum(axis=-1) > header.prob_scale + (k + 1) // 2, "has top-k probabilities summing past 1"),
        (entropy_levels > header.entropy_levels, "has an entropy above log(num_classes)"),
    ]


def _invalid_record(position: tuple[int, ...], header: StoreHeader, where: str) -> None:
    raise StoreFormatError(
        f"record {position if position else ''} of {where or 'the store'} is invalid (class indices outside "
        f"[0, {header.num_classes}) or repeated, probabilities outside [0, 1] or summing past 1, or entropy "
        "out of range): the store is damaged or was not written by reinforce; run `reinforce verify`")


def decode_indices(header: StoreHeader, stored: np.ndarray, vocabulary: np.ndarray | None) -> np.ndarray:
    """Class indices (int64) of stored index columns ``(..., K)``: a value ``x < V`` is position ``x`` of the
    sample's vocabulary, any other value is the class ``x - V``."""
    stored = stored.astype(np.int64)
    size = header.class_vocabulary_size
    if not size:
        return stored
    in_vocabulary, looked_up = _vocabulary_lookup(header, stored, vocabulary)
    if (in_vocabulary & (looked_up >= header.num_classes)).any():
        raise StoreFormatError("a record refers to an empty or invalid class_vocabulary entry: the store is "
                               "damaged; re-download it, or run `reinforce verify` to find the damage")
    return np.where(in_vocabulary, looked_up, stored - size)


def invalid_vocabulary_references(header: StoreHeader, stored: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Mask ``(..., K)`` of stored index values that point at a padding or out-of-range vocabulary entry."""
    in_vocabulary, looked_up = _vocabulary_lookup(header, stored.astype(np.int64), vocabulary)
    return in_vocabulary & (looked_up >= header.num_classes)


def _vocabulary_lookup(header: StoreHeader, stored: np.ndarray,
                       vocabulary: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(stored value is a vocabulary position, the vocabulary entry it points at) for int64 ``stored``."""
    size = header.class_vocabulary_size
    if vocabulary is None:
        raise ValueError("this store stores class indices in per-sample vocabularies: pass the samples' "
                         "class_vocabulary rows (format.read_vocabulary)")
    vocabulary = np.asarray(vocabulary)
    positions = np.minimum(stored, size - 1)
    if vocabulary.ndim == 1:  # one sample's records (the reader's per-sample path)
        return stored < size, vocabulary[positions].astype(np.int64)
    table = np.broadcast_to(vocabulary.astype(np.int64), stored.shape[:-1] + (size,))
    return stored < size, np.take_along_axis(table, positions, axis=-1)


def encode_indices(header: StoreHeader, indices: np.ndarray, vocabulary: np.ndarray | None) -> np.ndarray:
    """Stored index columns of class ``indices`` ``(..., K)``: the inverse of :func:`decode_indices`; a class in
    the sample's vocabulary MUST be stored as its position."""
    size = header.class_vocabulary_size
    if not size:
        return indices
    if vocabulary is None:
        raise ValueError("a store with class_vocabulary_size > 0 needs the samples' vocabularies to encode indices")
    vocabulary = np.asarray(vocabulary, dtype=np.int64)
    # One sorted search over every vocabulary row at once: row r's entries and keys are offset by r * span.
    span = int(max(vocabulary.max(initial=0), indices.max(initial=0))) + 1
    rows = np.arange(vocabulary[..., 0].size).reshape(vocabulary.shape[:-1])
    order = np.argsort(vocabulary, axis=-1, kind="stable")
    entries = (np.take_along_axis(vocabulary, order, axis=-1) + rows[..., None] * span).ravel()
    keys = indices + np.broadcast_to(rows, indices.shape[:-1])[..., None] * span
    at = np.minimum(np.searchsorted(entries, keys), entries.size - 1)
    found = entries[at] == keys
    return np.where(found, order.ravel()[at], indices + size)


def quantized_probs(header: StoreHeader, rows: np.ndarray) -> np.ndarray:
    """Quantized probabilities ``q`` (int64, ``(..., K)``) of raw rows: ``q[0]`` minus the cumulative drops."""
    stored = rows[..., header.layout.columns["topk_probs"]].astype(np.int64)
    drops = np.add.accumulate(stored[..., 1:], axis=-1)
    return np.concatenate([stored[..., :1], stored[..., :1] - drops], axis=-1)


def encode_records(header: StoreHeader, indices: np.ndarray, probs: np.ndarray, param_columns: np.ndarray,
                   entropy: np.ndarray, *, vocabulary: np.ndarray | None = None) -> np.ndarray:
    """Raw ``records`` rows ``(..., W)`` from top-k ``indices``/``probs`` ``(..., K)``, the encoded parameter
    columns ``(..., C)`` (``header.layout.params.encode`` of the float parameters) and entropy in nats
    ``(...)``, and the samples' ``vocabulary`` rows (see :func:`decode_records`) when the store has one."""
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= header.num_classes):
        raise StoreFormatError(f"top-k class index outside [0, {header.num_classes})")
    probs = np.asarray(probs, dtype=np.float64)
    if not np.isfinite(probs).all() or probs.min(initial=0) < 0 or probs.max(initial=0) > 1 + 1e-6:
        raise StoreFormatError("top-k probabilities must be finite and in [0, 1]")
    out = np.empty(indices.shape[:-1] + (header.layout.width,), dtype=header.dtype)
    columns = header.layout.columns
    out[..., columns["topk_indices"]] = encode_indices(header, indices.astype(np.int64), vocabulary)
    q = np.rint(np.clip(probs, 0, 1) * header.prob_scale).astype(np.int64)
    drops = -np.diff(q, axis=-1)
    if (drops < 0).any():
        raise StoreFormatError("top-k probabilities must be in descending order (sort them with their indices)")
    out[..., columns["topk_probs"].start] = q[..., 0]
    out[..., columns["topk_probs"].start + 1:columns["topk_probs"].stop] = drops
    out[..., columns["aug_params"]] = param_columns
    max_entropy = math.log(header.num_classes) if header.num_classes > 1 else 1.0
    normalized = np.clip(np.asarray(entropy, dtype=np.float64) / max_entropy, 0, 1)
    out[..., columns["teacher_entropy"].start] = np.rint(normalized * header.entropy_levels)
    return out
