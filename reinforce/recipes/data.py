"""Training and validation samples for the recipes.

Every training sample is ``(uint8 image [3, S, S], label, soft target)``: normalization happens in the training
loop on the batch (so an online teacher can see the same pixels with its own normalization). A sample index may
be a plain position or a ``(position, resolution)`` pair from the multi-scale sampler. Random choices are keyed
by (seed, epoch, position), so a batch does not depend on the worker count or on where a run was resumed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders.source import ImageSource, open_source
from torchvision.transforms import v2

from .config import TrainError

NO_TARGET = torch.zeros(0)


def split_index(item: int | tuple[int, int]) -> tuple[int, int | None]:
    """``position`` or ``(position, resolution)`` -> (position, resolution or None)."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


def sample_seed(seed: int, epoch: int, position: int, purpose: int = 0) -> int:
    """A seed that depends only on (seed, epoch, position, purpose): sample augmentation 0, epoch order 1,
    batch mixing 2, curriculum 3."""
    return int(np.random.SeedSequence([seed, epoch, position, purpose]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochDataset(torch.utils.data.Dataset):
    """A dataset whose samples change with the epoch; :meth:`set_epoch` must reach DataLoader workers."""

    def __init__(self) -> None:
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())


class StoreSamples(EpochDataset):
    """The reinforced store: stored augmentation replayed, stored soft target, and the hard label.

    ``slot_for(position, epoch)`` may be replaced (a curriculum) to choose which stored record a sample uses.
    """

    def __init__(self, source: Any, store: str, resolution: int | None = None, seed: int | None = None,
                 decode: str = "exact") -> None:
        super().__init__()
        self.dataset = ReinforcedDataset(source, store, resolution=resolution, target="dense",
                                         transform=v2.Identity(), seed=seed, decode=decode)
        self.labels = _labels_of(self.dataset.source, self.dataset)
        self.slot_policy: Any = None

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def classes(self) -> list[str] | None:
        return self.dataset.classes or self.dataset.source.classes

    @property
    def resolution(self) -> int:
        return self.dataset.resolution

    @property
    def mixes(self) -> bool:
        """Whether the store's records are MixUp/CutMix images (their targets are the teacher's on the mix)."""
        return bool(self.dataset.pipeline.mixes)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, torch.Tensor]:
        position, resolution = split_index(item)
        index = self.dataset.store_index(position)
        if self.slot_policy is None and resolution is None:
            image, target = self.dataset[position]
        else:
            slot = self.dataset.slot(index) if self.slot_policy is None else self.slot_policy(index, self.epoch)
            image, target = self.dataset.replay(index, slot, resolution)
        return image, int(self.labels[index]), target.float()


class AugmentedSamples(EpochDataset):
    """Source images with torchvision's RandomResizedCrop + horizontal flip (the plain baseline's augmentation)."""

    def __init__(self, source: Any, resolution: int, seed: int, allow_empty_classes: bool = False) -> None:
        super().__init__()
        self.source = open_source(source, allow_empty_classes=allow_empty_classes)
        self.resolution = int(resolution)
        self.seed = int(seed)

    @property
    def classes(self) -> list[str] | None:
        return self.source.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(max(_labels_of(self.source))) + 1

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, torch.Tensor]:
        position, resolution = split_index(item)
        image, label = self.source.load(position)
        size = resolution or self.resolution
        augment = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, position))
            image = augment(image)
        return image, int(label), NO_TARGET


class EvalSamples(torch.utils.data.Dataset):
    """Validation images: resize the short side to ``size / crop``, then center-crop ``size``.

    A class folder without images is kept as a class without samples (a store built with
    ``--allow-empty-classes`` names such a class, and so does its validation split): its label does not shift
    the later ones, and :func:`check_classes` compares the folder names with the training set's in order.
    """

    def __init__(self, source: Any, size: int, crop: float) -> None:
        self.source = open_source(source, allow_empty_classes=True)
        resize = int(round(size / crop))
        self.transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])

    @property
    def classes(self) -> list[str] | None:
        return self.source.classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        image, label = self.source.load(position)
        return self.transform(image), int(label)


def _labels_of(source: ImageSource, dataset: ReinforcedDataset | None = None) -> np.ndarray:
    if source.targets is not None:
        return np.asarray(source.targets, dtype=np.int64)
    return np.asarray([source.load(i)[1] for i in range(len(source))], dtype=np.int64)


def check_classes(train_classes: list[str] | None, val_classes: list[str] | None, num_classes: int) -> None:
    """Refuse a validation set whose classes are not the training set's, in the same order."""
    if val_classes is None or train_classes is None:
        return
    if list(val_classes) != list(train_classes):
        missing = sorted(set(train_classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(train_classes))
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}")
        if extra:
            detail.append(f"unknown {extra[:5]}")
        if not detail:
            detail.append("same names in another order")
        raise TrainError(
            f"the validation set's classes differ from the training set's ({'; '.join(detail)}): label indices "
            "would not match. Use a validation folder with the same class subdirectories"
        )
    if len(val_classes) != num_classes:
        raise TrainError(f"the validation set has {len(val_classes)} classes but the store has {num_classes}")


def describe_source(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
