"""ReinforcedSampler: a per-epoch sample order that resumes mid-epoch and splits evenly across ranks.

The order of an epoch is a pure function of (seed, epoch), so a resumed run, any number of DataLoader workers
and any number of ranks see the same global sequence. The state is a position in that sequence: how many of
its samples all ranks together have consumed. Resuming with another world size re-splits what is left.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import numpy as np
import torch

from .errors import ReinforceError

STATE_VERSION = 1


class SamplerStateError(ReinforceError):
    """A sampler state that does not belong to this dataset or sampler, or ranks that disagree on the epoch."""


class ReinforcedSampler(torch.utils.data.Sampler[int]):
    """Sample order for ``DataLoader(dataset, sampler=ReinforcedSampler(dataset), ...)``.

    Args:
        dataset: the dataset (its length is used; if it has ``set_epoch``, e.g. a ``ReinforcedDataset``,
            :meth:`set_epoch` and :meth:`load_state_dict` also select its stored slots).
        shuffle: a fresh permutation every epoch (keyed by ``seed`` and the epoch), else ascending order.
        seed: seed of the permutations.
        rank, world_size: this process's share in distributed training (default: from ``torch.distributed``
            when it is initialized, else 0 and 1). Rank ``r`` takes positions ``r, r + W, ...`` of the epoch's
            sequence; the sequence is padded with its own first samples (``drop_last=False``) or cut
            (``drop_last=True``) to a multiple of the world size, so every rank runs the same number of steps.
        drop_last: see above.
        check_epochs: in :meth:`set_epoch`, compare the epoch and position of every rank (one all-reduce) and
            raise :class:`SamplerStateError` if they differ (all ranks must call :meth:`set_epoch`).
        pair_partners: for stores with stored MixUp / CutMix: order each rank's samples by a depth-first walk
            of the partner graph, so that most samples sit next to their partner and a batch decodes most
            images once for both uses. The order stays a keyed permutation, but a batch then holds both images
            of most mixed pairs (fewer distinct images per batch), and a resumed run needs the same world size.

    Resuming: wrap the loader in :meth:`track` (or pass ``samples_consumed`` to :meth:`state_dict`), save
    :meth:`state_dict` with the checkpoint, and after a restart call :meth:`load_state_dict` before iterating;
    the loop starts at :attr:`resume_epoch`. A resumed epoch yields only what was not consumed; the next
    epoch is whole again.
    """

    def __init__(self, dataset: Sized, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, check_epochs: bool = True,
                 pair_partners: bool = False) -> None:
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.check_epochs = bool(check_epochs)
        self.pair_partners = bool(pair_partners)
        if pair_partners and not callable(getattr(dataset, "partner_positions", None)):
            raise ValueError("pair_partners needs a dataset with partner_positions (a ReinforcedDataset)")
        self._orders: dict[int, np.ndarray] = {}
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        if self.num_samples < 1:
            raise ValueError("ReinforcedSampler needs a dataset with at least one sample")
        self.epoch = 0
        self._start = 0  # position in the epoch's sequence where the current (or next) iteration starts
        self._delivered = 0  # samples this rank handed to the training loop since _start (see track)
        self._finished = False  # the last iteration ran to its end: the next one is a whole new pass

    # -- order ------------------------------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """The global sequence of sample positions of ``epoch`` (all ranks together, before the split)."""
        epoch = int(epoch)
        if epoch not in self._orders:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle
                     else np.arange(self.num_samples, dtype=np.int64))
            partners = self.dataset.partner_positions(epoch) if self.pair_partners else None
            self._orders = {epoch: order if partners is None else _group_partners(order, partners, self.world_size)}
        return self._orders[epoch]

    def _shares(self, start: int) -> np.ndarray:
        """``(per_rank, world_size)`` array: column ``r`` is rank ``r``'s positions from ``start`` on."""
        rest = self.order(self.epoch)[start:]
        per_rank = len(rest) // self.world_size if self.drop_last else -(-len(rest) // self.world_size)
        wanted = per_rank * self.world_size
        if wanted > len(rest):  # pad with the sequence's own first samples, cyclically (tiny datasets)
            rest = np.concatenate([rest, np.resize(self.order(self.epoch), wanted - len(rest))])
        return rest[:wanted].reshape(per_rank, self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self._finished:
            self._start, self._finished = 0, False
        self._delivered = 0
        yield from self._shares(self._start)[:, self.rank].tolist()
        self._finished = True

    def __len__(self) -> int:
        return len(self._shares(0 if self._finished else self._start))

    # -- epochs and state -------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: from where a loaded state left it if it is that state's epoch, else from its start.
        Also selects the dataset's stored slots for ``epoch``."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch or self._finished:
            self.epoch, self._start, self._delivered, self._finished = epoch, 0, 0, False
        self._select_dataset_epoch()
        if self.check_epochs:
            self._check_ranks_agree()

    @property
    def position(self) -> int:
        """Samples of the current epoch's sequence consumed by all ranks together (at most its length)."""
        return min(self._start + self._delivered * self.world_size, self.num_samples)

    @property
    def resume_epoch(self) -> int:
        """The epoch a resumed training loop should start at: this one, or the next if it was finished."""
        return self.epoch + 1 if self.position >= self.num_samples else self.epoch

    def track(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield ``batches`` (a DataLoader over this sampler), counting each batch as consumed when it is handed
        out, so that :meth:`state_dict` inside the loop body includes the batch being trained on. Handing out
        the last batch (``len(batches)``, or the loop's end) completes the epoch even when ``drop_last`` (the
        sampler's or the DataLoader's) left samples out, so :attr:`resume_epoch` is then the next epoch."""
        try:
            count = len(batches)  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length: the loop's end completes the epoch
            count = None
        for index, batch in enumerate(batches, 1):
            self._delivered += _batch_length(batch)
            if index == count:
                self._complete_epoch()
            yield batch
        self._complete_epoch()

    def _complete_epoch(self) -> None:
        """Count this rank's share of the rest of the epoch as delivered (what drop_last left out included)."""
        self._delivered = max(self._delivered, -(-(self.num_samples - self._start) // self.world_size))

    def state_dict(self, samples_consumed: int | None = None) -> dict[str, Any]:
        """JSON-able state. ``samples_consumed``: samples this rank has trained on in this iteration of the
        epoch (default: what :meth:`track` counted). DataLoader workers prefetch ahead of the training loop,
        so the sampler's own iterator position is not used."""
        if samples_consumed is not None:
            self._delivered = int(samples_consumed)
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "num_samples": self.num_samples, "shuffle": self.shuffle, "seed": self.seed,
                "drop_last": self.drop_last, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see :meth:`state_dict`); the world size may differ from the saved one."""
        if state.get("version") != STATE_VERSION:
            raise SamplerStateError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}: "
                                    "it was saved by another version of reinforce_loaders")
        for key in ("num_samples", "shuffle", "seed"):
            if state[key] != getattr(self, key):
                raise SamplerStateError(
                    f"the sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}: "
                    "resume with the dataset and sampler settings of the saved run")
        position = int(state["position"])
        if not 0 <= position <= self.num_samples:
            raise SamplerStateError(f"sampler state position {position} is outside 0..{self.num_samples}")
        if self.pair_partners and state["world_size"] != self.world_size and 0 < position < self.num_samples:
            raise SamplerStateError(
                f"the state was saved mid-epoch with world size {state['world_size']}; with pair_partners the order "
                f"depends on the world size, so resume with {state['world_size']} ranks or at an epoch boundary")
        self.epoch, self._start, self._delivered, self._finished = int(state["epoch"]), position, 0, False
        self._select_dataset_epoch()

    def _select_dataset_epoch(self) -> None:
        select = getattr(self.dataset, "set_epoch", None)
        if callable(select):
            select(self.epoch)

    def _check_ranks_agree(self) -> None:
        if self.world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        extremes = torch.tensor([self.epoch, -self.epoch, self._start, -self._start], dtype=torch.int64,
                                device=collective_device())
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
        extremes = extremes.cpu()
        if extremes[0] != -extremes[1] or extremes[2] != -extremes[3]:
            raise SamplerStateError(
                f"ranks disagree on the epoch or position: rank {self.rank} is at epoch {self.epoch} position "
                f"{self._start}, others range over epochs {-int(extremes[1])}..{int(extremes[0])} and positions "
                f"{-int(extremes[3])}..{int(extremes[2])}: call set_epoch with the same epoch on every rank and "
                "load the same sampler state everywhere")


def collective_device() -> torch.device:
    """Where a tensor for a collective of the default process group must live: the CPU when the group has a CPU
    backend (gloo, MPI, or a ``"cpu:gloo,cuda:nccl"`` pair), else this rank's current CUDA device (an NCCL-only
    group, the usual ``init_process_group("nccl")``, carries no CPU tensors)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _group_partners(order: np.ndarray, partners: np.ndarray, world_size: int) -> np.ndarray:
    """``order`` regrouped so that mixing partners sit close together on one rank: a depth-first walk of the
    partner graph (an edge between each sample and its partner) from the samples in ``order``, whose ``r``-th
    contiguous part becomes rank ``r``'s positions ``r, r + W, ...``."""
    count = len(order)
    mixed = np.flatnonzero((partners >= 0) & (partners != np.arange(count)))
    sources = np.concatenate([mixed, partners[mixed]])
    targets = np.concatenate([partners[mixed], mixed])
    by_source = np.argsort(sources, kind="stable")
    neighbours = targets[by_source].tolist()
    bounds = np.concatenate([[0], np.cumsum(np.bincount(sources, minlength=count))]).tolist()
    placed = np.zeros(count, dtype=bool)
    walk: list[int] = []
    for start in order.tolist():
        stack = [start]
        while stack:
            sample = stack.pop()
            if placed[sample]:
                continue
            placed[sample] = True
            walk.append(sample)
            stack.extend(neighbours[bounds[sample]:bounds[sample + 1]][::-1])
    sizes = [count // world_size + (rank < count % world_size) for rank in range(world_size)]
    out = np.empty(count, dtype=np.int64)
    first = 0
    for rank, size in enumerate(sizes):
        out[rank::world_size] = walk[first:first + size]
        first += size
    return out


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
    return int(rank), int(world_size)


def _batch_length(batch: Any) -> int:
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if not hasattr(first, "__len__"):
        raise TypeError("track() counts samples by the first tensor of each batch; pass samples_consumed to "
                        "state_dict() instead")
    return len(first)
