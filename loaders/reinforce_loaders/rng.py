"""Counter-based random numbers keyed by (seed, sample, slot, stream).

Every random decision of a build is a pure function of its key, so it does not depend on the order,
batching or number of workers that computed it. The generator is Philox4x64-10 as implemented by
``numpy.random.Philox``; ``format_spec.md`` fixes the key and counter layout below so any reader can
regenerate the same numbers.

* key = (seed, KEY_TAG)
* counter = (block, sample, stream, 0) where ``block`` counts 4-word Philox blocks
* uniform = (word >> 11) * 2**-53, in [0, 1)

Augmentation op ``k`` of the pipeline draws from stream ``k``; slot ``j`` owns blocks
``[j * BLOCKS_PER_SLOT, (j + 1) * BLOCKS_PER_SLOT)`` of that stream, i.e. UNIFORMS_PER_SLOT uniforms.
The per-epoch slot choice of a reader draws from stream SLOT_SELECTION_STREAM with sample 0; the mixing-partner
pool of the block starting at sample ``s`` draws from stream PARTNER_POOL_STREAM with sample ``s``.
"""

from __future__ import annotations

import functools

import numpy as np

KEY_TAG = 0x5245494E464F5243  # "REINFORC"
UNIFORMS_PER_SLOT = 64
BLOCKS_PER_SLOT = UNIFORMS_PER_SLOT // 4
SLOT_SELECTION_STREAM = 0xFFFF_FFFF
PARTNER_POOL_STREAM = 0xFFFF_FFFE
_MASK64 = (1 << 64) - 1


def uniforms(seed: int, sample: int, stream: int, first_block: int, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) starting at Philox block ``first_block`` of (seed, sample, stream)."""
    key = np.array([seed & _MASK64, KEY_TAG], dtype=np.uint64)
    counter = np.array([first_block, sample, stream, 0], dtype=np.uint64)
    words = np.random.Philox(key=key, counter=counter).random_raw(count)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def slot_uniforms(seed: int, sample: int, slot: int, stream: int) -> np.ndarray:
    """The UNIFORMS_PER_SLOT uniforms that op ``stream`` may use for record (sample, slot)."""
    return uniforms(seed, sample, stream, slot * BLOCKS_PER_SLOT, UNIFORMS_PER_SLOT)


def all_slot_uniforms(seed: int, sample: int, num_slots: int, stream: int) -> np.ndarray:
    """Uniforms of slots ``0..num_slots-1`` at once, shape (num_slots, UNIFORMS_PER_SLOT)."""
    return uniforms(seed, sample, stream, 0, num_slots * UNIFORMS_PER_SLOT).reshape(num_slots, UNIFORMS_PER_SLOT)


def partner_pool(seed: int, block_start: int, num_samples: int, size: int) -> np.ndarray:
    """The samples that records of the block starting at ``block_start`` may mix with, sorted ascending.

    All samples when ``size >= num_samples``; else the first ``size`` distinct values of
    ``floor(u * num_samples)`` over the uniforms of (seed, block_start, PARTNER_POOL_STREAM), in order. A
    block then decodes at most ``size`` partner images instead of up to the whole dataset, while each
    record's partner is still uniform over the dataset.
    """
    if size >= num_samples:
        return np.arange(num_samples, dtype=np.int64)
    chosen = np.empty(0, dtype=np.int64)
    first_block = 0
    while len(chosen) < size:
        draws = np.floor(uniforms(seed, block_start, PARTNER_POOL_STREAM, first_block, 4 * size)
                         * num_samples).astype(np.int64)
        first_block += size
        merged = np.concatenate([chosen, draws])
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)]
    return np.sort(chosen[:size])


def slot_for_epoch(seed: int, epoch: int, sample: int, num_slots: int) -> int:
    """The stored slot a reader uses for ``sample`` in ``epoch``: the same slot for every sample of an epoch.

    Epochs are grouped in cycles of ``num_slots``; each cycle visits a random permutation of the slots, so
    every stored augmentation is used once before any is reused. Because the slots of a sample are
    independent draws, sharing the slot across samples changes no sample's distribution, and it lets an
    epoch be read as one contiguous chunk per block (``format_spec.md``, "Slot selection"). ``sample`` is
    accepted so that callers need not change if a later minor version keys the choice by sample.
    """
    return epoch_slot(seed, epoch, num_slots)


def epoch_slot(seed: int, epoch: int, num_slots: int) -> int:
    """Slot of ``epoch``: position ``epoch % num_slots`` of the permutation of cycle ``epoch // num_slots``."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    cycle, position = divmod(int(epoch), int(num_slots))
    return int(_cycle_permutation(int(seed), cycle, int(num_slots))[position])


@functools.lru_cache(maxsize=64)
def _cycle_permutation(seed: int, cycle: int, num_slots: int) -> np.ndarray:
    blocks_per_cycle = -(-num_slots // 4)
    keys = uniforms(seed, 0, SLOT_SELECTION_STREAM, cycle * blocks_per_cycle, num_slots)
    return np.argsort(keys, kind="stable")
