"""ReinforcedDataset: the drop-in training dataset that replays stored augmentations and soft labels."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torchvision.transforms import v2

from . import format as fmt
from .augment import AugmentPipeline
from .errors import SourceMismatchError, StoreFormatError
from .rng import slot_for_epoch
from .source import ImageSource, MapDataset, fingerprint, open_source
from .targets import RemainingMass, dense_target

TargetKind = Literal["dense", "sparse"]


class ReinforcedDataset(torch.utils.data.Dataset):
    """Map-style dataset over a source and its reinforced store.

    ``ds[i]`` decodes source image ``i``, picks the stored slot for (seed, epoch, i), replays that slot's
    augmentation at ``resolution`` and returns ``(transform(image), target)``. The target is a dense
    ``num_classes`` probability vector (``target="dense"``) or the stored ``(indices, probs)`` pair
    (``target="sparse"``).

    Args:
        source: ImageFolder directory or map-style dataset returning ``(PIL image or tensor, label)``, in the
            order the store was built from.
        store: path, fsspec URL or zarr store of a complete reinforced store.
        resolution: output side in pixels (default: the size the store was built at).
        target: ``"dense"`` or ``"sparse"``.
        remaining_mass: how a dense target treats the mass outside the top-k (see :func:`dense_target`).
        transform: applied to the replayed uint8 ``[3, H, W]`` image (default: float32 in [0, 1]).
        seed: seed of the per-epoch slot choice (default: the store's seed).
        verify: ``"lazy"`` checks each image's fingerprint the first time it is loaded, ``"full"`` checks every image
            now, ``"none"`` skips the check. Labels and counts are always checked.
        storage_options: fsspec options for remote stores.

    Call :meth:`set_epoch` before each epoch; it reaches DataLoader workers, persistent ones included.
    """

    _MAX_CACHED_BLOCKS = 8

    def __init__(self, source: str | os.PathLike[str] | MapDataset | ImageSource, store: Any, *,
                 resolution: int | None = None, target: TargetKind = "dense",
                 remaining_mass: RemainingMass = "renormalize",
                 transform: Callable[[torch.Tensor], Any] | None = None, seed: int | None = None,
                 verify: Literal["lazy", "full", "none"] = "lazy",
                 storage_options: dict[str, Any] | None = None) -> None:
        if target not in ("dense", "sparse"):
            raise ValueError(f"target must be 'dense' or 'sparse', got {target!r}")
        if verify not in ("lazy", "full", "none"):
            raise ValueError(f"verify must be 'lazy', 'full' or 'none', got {verify!r}")
        self._store_ref = str(store) if isinstance(store, os.PathLike) else store
        self._storage_options = storage_options
        group = fmt.open_store_group(self._store_ref, storage_options=storage_options)
        self.header = fmt.read_header(group)
        self.source = open_source(source)
        self.pipeline = AugmentPipeline.from_config(self.header.augmentation)
        self.resolution = int(resolution) if resolution is not None else self.pipeline.size
        self.target = target
        self.remaining_mass = remaining_mass
        self.transform = transform if transform is not None else v2.ToDtype(torch.float32, scale=True)
        self.seed = self.header.seed if seed is None else int(seed)
        self.verify = verify
        # Shared tensors, so set_epoch and records loaded by one DataLoader worker reach all of them.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._group: Any = group
        self._codec = self.header.param_codec
        self._labels = fmt.read_array(group, fmt.LABELS)
        self._image_sizes = fmt.read_array(group, fmt.IMAGE_SIZES).astype(np.int64)
        self._fingerprints = fmt.read_array(group, fmt.FINGERPRINTS) if verify != "none" else None
        # Read-only like the labels, so a plain array (shared copy-on-write by forked workers), kept out of
        # /dev/shm, which containers often cap at 64 MB (2 V bytes per sample: 82 MB for ImageNet at V = 32).
        self._vocabulary = fmt.read_vocabulary(group, self.header)
        skipped = self.header.skipped_indices
        _check_per_sample_arrays(self._labels, self._image_sizes, self._fingerprints, skipped)
        # Samples whose image was unreadable at build time have no records: the dataset leaves them out.
        self._samples = np.setdiff1d(np.arange(len(self._labels)), skipped) if skipped.size else None
        # The current epoch's records, one row per sample, filled a block at a time as samples are asked for;
        # _block_epoch[b] is the epoch whose slot block b's rows hold (-1: none yet).
        itemsize = self.header.dtype.itemsize
        self._epoch_rows = torch.zeros((len(self._labels), self.header.record_width * itemsize),
                                       dtype=torch.uint8).share_memory_()
        self._block_epoch = torch.full((self.header.num_blocks,), -1, dtype=torch.int64).share_memory_()
        self._other_slots: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        # Samples whose fingerprint has been checked, shared so each is hashed about once per training run.
        self._verified = torch.zeros(len(self._labels), dtype=torch.bool).share_memory_()
        self._check_source_matches()
        if verify == "full":
            self.verify_fingerprints()

    @property
    def num_classes(self) -> int:
        return self.header.num_classes

    @property
    def classes(self) -> list[str] | None:
        return self.header.class_names

    def __len__(self) -> int:
        """Number of samples with records: the store's samples less those skipped at build time."""
        return self.header.num_samples if self._samples is None else len(self._samples)

    def store_index(self, position: int) -> int:
        """Store (and source) index of the dataset's ``position``-th sample; they differ only after skips."""
        return position if self._samples is None else int(self._samples[position])

    def set_epoch(self, epoch: int) -> None:
        """Select the stored slots for ``epoch`` (each stored slot is used once per ``num_augmentations``)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def slot(self, index: int, epoch: int | None = None) -> int:
        """The stored slot sample ``index`` uses in ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        return slot_for_epoch(self.seed, epoch, index, self.header.num_augmentations)

    def __getitem__(self, position: int) -> tuple[Any, Any]:
        if not 0 <= position < len(self):
            raise IndexError(f"index {position} out of range for {len(self)} samples")
        index = self.store_index(position)
        return self.replay(index, self.slot(index))

    def replay(self, index: int, slot: int, resolution: int | None = None) -> tuple[Any, Any]:
        """``(transform(image), target)`` of record (index, slot) at ``resolution``.

        A mixed record (MixUp / CutMix) also decodes its partner sample and replays the partner's stored
        augmentation before mixing; the target is the teacher's on the mixed image, as stored.
        """
        image = self._load_checked(index)
        params, indices, probs = self._record(index, slot)
        indices = torch.from_numpy(indices.astype(np.int64))
        probs = torch.from_numpy(probs.astype(np.float32))
        partners = self.pipeline.partner_indices(params[None])
        partner_image = None
        if partners is not None and partners[0] >= 0:
            if partners[0] >= self.header.num_samples:
                raise StoreFormatError(f"record ({index}, {slot}) mixes with sample {int(partners[0])}, beyond the "
                                       f"store's {self.header.num_samples} samples: the store is damaged, rebuild it")
            partner_image = self._load_checked(int(partners[0]))
        image = self.pipeline.apply(image, params, resolution or self.resolution, partner_image=partner_image)
        if self.target == "sparse":
            return self.transform(image), (indices, probs)
        return self.transform(image), dense_target(indices, probs, self.num_classes, self.remaining_mass)

    def _load_checked(self, index: int) -> torch.Tensor:
        image, _ = self.source.load(index)
        if self.verify == "lazy" and not self._verified[index]:
            self._check_fingerprint(index, image)
            self._verified[index] = True
        return image

    def verify_fingerprints(self) -> None:
        """Decode every source image and raise :class:`SourceMismatchError` at the first that differs."""
        for position in range(len(self)):
            index = self.store_index(position)
            image, _ = self.source.load(index)
            self._check_fingerprint(index, image)

    def _check_source_matches(self) -> None:
        if len(self.source) != self.header.num_samples:
            raise SourceMismatchError(
                f"source {self.source.description} has {len(self.source)} samples but the store was built from "
                f"{self.header.num_samples}: pass the same dataset, in the same order, that was reinforced"
            )
        if self.source.targets is not None:
            mismatched = np.flatnonzero(np.asarray(self.source.targets) != self._labels)
            if mismatched.size:
                first = int(mismatched[0])
                raise SourceMismatchError(
                    f"source sample {first} ({self.source.name_of(first)}) has label {self.source.targets[first]} "
                    f"but the store has {int(self._labels[first])} ({mismatched.size} labels differ): pass the same "
                    "dataset, in the same order, that was reinforced"
                )

    def _check_fingerprint(self, index: int, image: torch.Tensor) -> None:
        if self._fingerprints is not None and fingerprint(image) != int(self._fingerprints[index]):
            raise SourceMismatchError(
                f"source sample {index} ({self.source.name_of(index)}) differs from the image the store was built "
                "from (fingerprint mismatch): pass the same dataset, in the same order, that was reinforced"
            )

    def _record(self, index: int, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(aug params, top-k indices, top-k probs) of a record.

        Records are read one (block, slot) chunk at a time: the current epoch's slot into the shared table
        (so each chunk is read once per epoch across all workers), any other slot into a small LRU cache.
        """
        row = self._raw_row(index, slot)
        height, width = self._image_sizes[index]
        vocabulary = None if self._vocabulary is None else self._vocabulary[index]
        decoded = fmt.decode_records(self.header, row, np.array(height), np.array(width), codec=self._codec,
                                     vocabulary=vocabulary)
        return decoded.params, decoded.indices, decoded.probs

    def teacher_entropy(self, index: int, slot: int) -> float:
        """Entropy (nats) of the full teacher distribution of record (index, slot), as stored."""
        row = self._raw_row(index, slot)
        return float(row[self.header.record_columns["teacher_entropy"].start]) / self.header.entropy_levels \
            * float(np.log(self.header.num_classes))

    def _raw_row(self, index: int, slot: int) -> np.ndarray:
        block = index // self.header.block_size
        epoch = self.epoch
        if slot == self.slot(index, epoch):
            table = self._epoch_rows.numpy().view(self.header.dtype)
            if int(self._block_epoch[block]) != epoch:
                start, stop = self.header.block_range(block)
                table[start:stop] = fmt.read_block_slot(self._store_group(), self.header, block, slot)
                self._block_epoch[block] = epoch  # after the rows, so other workers never see a half block
            return table[index]
        key = (block, slot)
        rows = self._other_slots.get(key)
        if rows is None:
            rows = fmt.read_block_slot(self._store_group(), self.header, block, slot)
            self._other_slots[key] = rows
            if len(self._other_slots) > self._MAX_CACHED_BLOCKS:
                self._other_slots.popitem(last=False)
        else:
            self._other_slots.move_to_end(key)
        return rows[index - block * self.header.block_size]

    def _store_group(self) -> Any:
        if self._group is None:  # opened lazily so that each DataLoader worker has its own handles
            self._group = fmt.open_store_group(self._store_ref, storage_options=self._storage_options)
        return self._group

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"] = None
        state["_other_slots"] = collections.OrderedDict()
        return state


def _check_per_sample_arrays(labels: np.ndarray, sizes: np.ndarray, fingerprints: np.ndarray | None,
                             skipped: np.ndarray) -> None:
    """Missing chunks read as fill values (label -1, size 0, fingerprint 0): refuse them, never use them."""
    missing = (labels < 0) | (sizes <= 0).any(axis=-1)
    if fingerprints is not None:
        missing |= fingerprints == 0
    missing[skipped] = labels[skipped] < 0  # a skipped sample has no size or fingerprint, but keeps its label
    if missing.any():
        first = int(np.argmax(missing))
        raise StoreFormatError(
            f"per-sample data of sample {first} ({int(missing.sum())} samples in all) is missing from the store "
            "(chunk absent): the store is damaged or truncated; re-download it or rebuild it"
        )
