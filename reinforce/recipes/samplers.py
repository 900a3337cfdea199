"""Batch samplers and curricula.

- :class:`FixedBatchSampler`: this rank's batches of one epoch, cut from the loader's
  :class:`reinforce_loaders.samplers.ReinforcedSampler` (the same keyed per-epoch permutation and per-rank split
  that a hand-written loop over a ``ReinforcedDataset`` gets; ``drop_last``, so every rank runs the same number
  of steps and DDP does not hang at the end of an epoch). Resuming mid-epoch moves the sampler's position past
  the batches already trained on.
- :class:`VariableBatchSampler`: paper 003's multi-scale sampler with variable batch size: every step draws a
  resolution from a set and a batch size inversely proportional to its pixels; the store replays each record
  at that resolution, so nothing is rebuilt. It cuts the same epoch permutation into batches of varying size.
- :class:`EntropyCurriculum`: paper 001, Appendix C.4: each sample's stored records are ranked by the stored
  teacher entropy and each epoch draws from a window of ranks that widens from the easiest (or hardest) 10 %
  to all of them along a cosine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from reinforce_loaders.samplers import ReinforcedSampler

from .errors import TrainError


def sample_seed(seed: int, epoch: int, position: int, purpose: int = 0) -> int:
    """A seed that depends only on (seed, epoch, position, purpose): sample augmentation 0, epoch order 1,
    curriculum 3 (2 was batch mixing, which the mixer now keys itself)."""
    return int(np.random.SeedSequence([seed, epoch, position, purpose]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, epoch, 0, purpose=1))


class FixedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches (lists of positions) of one epoch: ``batch_size`` consecutive samples of the
    rank's share of :class:`ReinforcedSampler`'s sequence (rank ``r`` holds positions ``r, r + W, ...``)."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # check_epochs off: the loop also calls set_epoch to plan its schedule, and every rank runs the same loop.
        self.positions = ReinforcedSampler(range(num_samples), seed=seed, rank=rank, world_size=world_size,
                                           drop_last=True, check_epochs=False)
        if len(self) == 0:
            raise TrainError(f"{num_samples} training samples cannot fill one step of {world_size} x {batch_size}: "
                             "lower --batch-size")

    @property
    def epoch(self) -> int:
        return self.positions.epoch

    def set_epoch(self, epoch: int) -> None:
        self.positions.set_epoch(epoch)
        self.set_start(0)

    def set_start(self, step: int) -> None:
        """Skip the first ``step`` batches of the epoch (a resumed run)."""
        state = self.positions.state_dict()
        self.positions.load_state_dict({**state, "position": self.start_position(step)})

    def start_position(self, step: int) -> int:
        """Samples of the epoch's sequence (all ranks together) consumed before ``step``."""
        return step * self.batch_size * self.world_size

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        mine = iter(self.positions)
        for _ in range(len(self.positions) // self.batch_size):
            yield [next(mine) for _ in range(self.batch_size)]


def multiscale_sizes(base: int, low: float = 0.5, high: float = 1.5) -> list[int]:
    """Resolutions from ``low * base`` to ``high * base`` on a grid of 32 px, scaled down for small images
    (a grid of ``max(8, 32 * base / 224)`` rounded to a multiple of 8), always including ``base``."""
    grid = 32 if base >= 224 else max(8, int(round(32 * base / 224 / 8)) * 8)
    sizes = set(range(int(math.ceil(low * base / grid)) * grid, int(high * base) + 1, grid))
    sizes.add(base)
    return sorted(size for size in sizes if size > 0)


class VariableBatchSampler(FixedBatchSampler):
    """Yields this rank's batches of ``(position, resolution)``: resolution ``r`` drawn per step from ``sizes``,
    batch ``batch_size * base^2 // r^2`` rounded down to a multiple of ``multiple_of`` (at least one multiple;
    2 under MixUp/CutMix, which pair a batch with itself reversed) (paper 003, MSc-VBS). Each step takes the
    next ``batch x world_size`` samples of the epoch's :class:`ReinforcedSampler` sequence, rank ``r`` the
    ``r``-th ``batch`` of them."""

    def __init__(self, num_samples: int, batch_size: int, base: int, sizes: Sequence[int], *, seed: int,
                 rank: int = 0, world_size: int = 1, multiple_of: int = 1) -> None:
        self.base = base
        self.sizes = list(sizes)
        self.multiple_of = int(multiple_of)
        self.start = 0
        super().__init__(num_samples, batch_size, seed=seed, rank=rank, world_size=world_size)

    def set_start(self, step: int) -> None:
        self.start = step

    def batch_for(self, resolution: int) -> int:
        batch = self.batch_size * self.base ** 2 // resolution ** 2
        return max(self.multiple_of, batch // self.multiple_of * self.multiple_of)

    def _plan(self) -> list[tuple[int, int, int]]:
        """(first position in the permutation, resolution, per-rank batch) of every step of this epoch."""
        generator = epoch_generator(self.seed + 1, self.epoch)
        plan, cursor = [], 0
        while True:
            resolution = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=generator))]
            batch = self.batch_for(resolution)
            if cursor + batch * self.world_size > self.num_samples:
                return plan
            plan.append((cursor, resolution, batch))
            cursor += batch * self.world_size

    def __len__(self) -> int:
        return len(self._plan())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.positions.order(self.epoch).tolist()
        for first, resolution, batch in self._plan()[self.start:]:
            mine = first + self.rank * batch
            yield [(position, resolution) for position in order[mine:mine + batch]]


class EntropyCurriculum:
    """Chooses the stored slot of (index, epoch) from a window of its records ranked by teacher entropy.

    ``kind="easy"`` starts at the 10 % lowest-entropy records, ``"hard"`` at the 10 % highest; the window widens
    to all records by the last epoch along a cosine (the "easy -> all" and "hard -> all" curricula).
    """

    def __init__(self, entropies: np.ndarray, kind: str, epochs: int, seed: int, start_fraction: float = 0.1) -> None:
        if kind not in ("easy", "hard"):
            raise TrainError(f"unknown curriculum {kind!r}: use easy or hard")
        self.ranked = np.argsort(entropies, axis=1, kind="stable")  # [num_samples, A] slots, easiest first
        self.kind = kind
        self.epochs = epochs
        self.seed = seed
        self.start_fraction = start_fraction

    def window(self, epoch: int) -> tuple[int, int]:
        """[first, stop) of the allowed entropy ranks in ``epoch``."""
        slots = self.ranked.shape[1]
        progress = 0.5 * (1 - math.cos(math.pi * min(1.0, epoch / max(self.epochs - 1, 1))))
        width = self.start_fraction + (1 - self.start_fraction) * progress
        count = max(1, int(round(width * slots)))
        return (0, count) if self.kind == "easy" else (slots - count, slots)

    def __call__(self, index: int, epoch: int) -> int:
        first, stop = self.window(epoch)
        rank = first + sample_seed(self.seed, epoch, index, purpose=3) % (stop - first)
        return int(self.ranked[index, rank])


def stored_entropies(dataset, block_size: int) -> np.ndarray:
    """``[num_samples, A]`` stored teacher entropies of every record, read one (block, slot) chunk at a time."""
    header = dataset.header
    slots = header.num_augmentations
    entropies = np.zeros((header.num_samples, slots), dtype=np.float32)
    for start in range(0, header.num_samples, block_size):
        stop = min(start + block_size, header.num_samples)
        for slot in range(slots):
            for index in range(start, stop):
                entropies[index, slot] = dataset.teacher_entropy(index, slot)
    return entropies
