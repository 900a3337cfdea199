"""Derived parameters (``param_storage = "derived"``, format 1.1, format_spec.md section 5.1): a reader
re-derives the parameter columns from the keyed RNG and checks them against the block's ``param_digests``."""

from __future__ import annotations

import hashlib

import numpy as np

from .. import rng
from ..errors import StoreFormatError
from .header import StoreHeader
from .spec import PARAM_DIGEST_DTYPE


def present_samples(image_sizes: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Samples of ``[start, stop)`` that were not skipped (their image size is not ``(0, 0)``)."""
    sizes = np.asarray(image_sizes[start:stop])
    return start + np.flatnonzero((sizes != 0).any(axis=1))


def derive_param_columns(header: StoreHeader, block: int, slot: int, image_sizes: np.ndarray) -> np.ndarray:
    """Encoded parameter columns ``(block samples, C)`` of one slot of one block, re-derived from the keyed RNG
    exactly as the build sampled them (skipped samples: zeros). ``image_sizes`` is the store's ``(N, 2)`` array:
    the sources' sizes, and the mixing partners' (a skipped partner leaves a record unmixed)."""
    pipeline = header.pipeline
    sizes = np.asarray(image_sizes, dtype=np.int64)
    start, stop = header.block_range(block)
    samples = present_samples(sizes, start, stop)
    out = np.zeros((stop - start, header.layout.params.columns), dtype=np.int64)
    if not len(samples):
        return out
    mixing = {}
    if pipeline.mixes:
        mixing = dict(num_samples=header.num_samples,
                      partner_size=lambda p: None if not sizes[p].any() else (int(sizes[p, 0]), int(sizes[p, 1])),
                      partner_pool=rng.partner_pool(header.seed, start, header.num_samples, header.block_size))
    params = pipeline.sample_records(header.seed, samples, slot, sizes[samples, 0], sizes[samples, 1], **mixing)
    out[samples - start] = header.layout.params.encode(params, sizes[samples, 0], sizes[samples, 1])
    return out


def param_digest(columns: np.ndarray) -> int:
    """blake2b-64 of parameter columns ``(n, C)`` as little-endian uint16, row by row (nonzero: 0 is the fill)."""
    data = np.ascontiguousarray(np.asarray(columns, dtype=np.int64).astype("<u2")).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


def block_param_digests(header: StoreHeader, columns: np.ndarray, image_sizes: np.ndarray, start: int) -> np.ndarray:
    """``param_digests`` row ``(A,)`` of a block starting at ``start`` from its parameter columns ``(n, A, C)``:
    one digest per slot over the block's samples that were not skipped."""
    present = present_samples(image_sizes, start, start + len(columns)) - start
    return np.array([param_digest(columns[present, slot]) for slot in range(columns.shape[1])],
                    dtype=PARAM_DIGEST_DTYPE)


def check_param_digest(header: StoreHeader, block: int, slot: int, columns: np.ndarray, image_sizes: np.ndarray,
                       expected: int) -> None:
    start, stop = header.block_range(block)
    present = present_samples(image_sizes, start, stop) - start
    if expected == 0:
        raise StoreFormatError(f"the parameter digest of block {block} slot {slot} is missing: the store is damaged "
                               "or truncated; re-download or rebuild it")
    if param_digest(columns[present]) != expected:
        raise StoreFormatError(
            f"the augmentation parameters re-derived for block {block} slot {slot} differ from those the store "
            "was built with: this machine's arithmetic differs from the builder's (format_spec.md, section 5) "
            "or the store is damaged. Use a store built with stored parameters (reinforce build without "
            "--derived-params), or run `reinforce verify` to locate the damage")


def stored_rows(header: StoreHeader, rows: np.ndarray) -> np.ndarray:
    """The ``records`` array's rows of decoded-layout ``rows``: without the parameter columns when derived."""
    if not header.derives_params:
        return rows
    return np.delete(rows, header.layout.columns["aug_params"], axis=-1)


def expand_rows(header: StoreHeader, rows: np.ndarray, param_columns: np.ndarray) -> np.ndarray:
    """Decoded-layout rows from stored rows of a derived-parameter store and their parameter columns."""
    params = header.layout.columns["aug_params"]
    out = np.empty(rows.shape[:-1] + (header.layout.width,), dtype=rows.dtype)
    out[..., :params.start] = rows[..., :params.start]
    out[..., params] = param_columns
    out[..., params.stop:] = rows[..., params.start:]
    return out
