"""Training samples for the recipes, and the run's data: training set, validation set and class count.

Every training sample is ``(uint8 image [3, S, S], label, soft target)``: normalization happens in the training
loop on the batch (so an online teacher can see the same pixels with its own normalization). With ``replay="device"`` a store's
sample carries a :class:`~reinforce_loaders.collate.Crop` instead of the image: the workers only read, decode and
crop, and the loop finishes the replay of a whole batch on its device (:meth:`StoreSamples.finish`); with
``decode="gpu"`` it carries an :class:`~reinforce_loaders.collate.Encoded` (the JPEG's bytes), decoded and replayed
whole on the device. A sample index may
be a plain position or a ``(position, resolution)`` pair from the multi-scale sampler. Random choices are keyed
by (seed, epoch, position), so a batch does not depend on the worker count or on where a run was resumed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders.collate import Crop, Encoded, replay_crops, replay_encoded, soft_target_collate
from reinforce_loaders.dataset import CropColumns
from reinforce_loaders.source import ImageSource, open_source
from torchvision.transforms import v2

from ..evaluation import ClassMismatchError, EvalSamples, check_classes
from .errors import TrainError
from .samplers import EntropyCurriculum, sample_seed, stored_entropies

if TYPE_CHECKING:
    from .settings import Settings

NO_TARGET = torch.zeros(0)


def split_index(item: int | tuple[int, int]) -> tuple[int, int | None]:
    """``position`` or ``(position, resolution)`` -> (position, resolution or None)."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


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
                 decode: str = "exact", crops: bool = False) -> None:
        super().__init__()
        self.dataset = ReinforcedDataset(source, store, resolution=resolution, target="dense",
                                         transform=v2.Identity(), seed=seed, decode=decode)
        if crops and decode != "gpu" and CropColumns.of(self.dataset.pipeline).own is not None:
            self.dataset.output = "crops"  # else the full replay, in the workers (or, decode="gpu", on the device)
        self.labels = _labels_of(self.dataset.source, self.dataset)
        self.slot_policy: Any = None

    @property
    def crops(self) -> bool:
        """Whether samples are :class:`~reinforce_loaders.collate.Crop` s or (``decode="gpu"``)
        :class:`~reinforce_loaders.collate.Encoded` s, whose replay :meth:`finish` completes."""
        return self.dataset.output == "crops" or self.dataset.decode == "gpu"

    def finish(self, batch: Crop | Encoded, device: torch.device) -> torch.Tensor:
        """A batch of crops replayed to the end (flip, RandAugment, erasing, stored mixing), or of encoded
        sources decoded and replayed, batched on ``device``: uint8 ``[N, 3, S, S]``."""
        if isinstance(batch, Encoded):
            return replay_encoded(self.dataset.pipeline, batch, device)
        return replay_crops(self.dataset.pipeline, batch, device)

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

    def __getitems__(self, items: list[int | tuple[int, int]]) -> list[tuple[torch.Tensor | Crop | Encoded, int, torch.Tensor]]:
        """A batch's samples (DataLoader calls this with the batch's indices): replayed as one batch, which
        decodes records and partners once per batch, when every sample uses its epoch's slot at the dataset's
        resolution; else one at a time. The same samples either way."""
        split = [split_index(item) for item in items]
        if self.slot_policy is not None or any(resolution is not None for _, resolution in split):
            return [self[item] for item in items]
        samples = self.dataset.__getitems__([position for position, _ in split])
        return [(image, int(self.labels[self.dataset.store_index(position)]), target.float())
                for (position, _), (image, target) in zip(split, samples)]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor | Crop | Encoded, int, torch.Tensor]:
        position, resolution = split_index(item)
        index = self.dataset.store_index(position)
        if self.slot_policy is None and resolution is None:
            image, target = self.dataset[position]
        else:
            slot = self.dataset.slot(index) if self.slot_policy is None else self.slot_policy(index, self.epoch)
            image, target = self.dataset.replay(index, slot, resolution)
        return image, int(self.labels[index]), target.float()


def collate_samples(samples: list[tuple[Any, int, torch.Tensor]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """DataLoader's default collate, except for :class:`~reinforce_loaders.collate.Encoded` samples (sources of
    many sizes), whose parts stay lists (:func:`~reinforce_loaders.collate.soft_target_collate`)."""
    if not isinstance(samples[0][0], Encoded):
        return torch.utils.data.default_collate(samples)
    images, labels, targets = zip(*samples)
    batch, _ = soft_target_collate(list(zip(images, targets)))
    return batch, torch.tensor(labels, dtype=torch.int64), torch.stack(targets)


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
            # The CPU generator only: torch.manual_seed would also (lazily) reseed CUDA's, at a cost per sample.
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, position))
            image = augment(image)
        return image, int(label), NO_TARGET


def _labels_of(source: ImageSource, dataset: ReinforcedDataset | None = None) -> np.ndarray:
    if source.targets is not None:
        return np.asarray(source.targets, dtype=np.int64)
    return np.asarray([source.load(i)[1] for i in range(len(source))], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The samples a run trains and validates on."""

    train_set: StoreSamples | AugmentedSamples
    val_set: EvalSamples | None
    num_classes: int

    @property
    def mixes(self) -> bool:
        """Whether the training set serves a store whose records are MixUp/CutMix images."""
        return isinstance(self.train_set, StoreSamples) and self.train_set.mixes


def open_data(settings: Settings) -> tuple[TrainingData, Settings]:
    """The run's training set (the store's replay, or the plain recipe's augmentation), its validation set, and
    ``settings`` with the training resolution filled in (the store's when not given, else 224)."""
    if settings.store:
        train_set: StoreSamples | AugmentedSamples = StoreSamples(
            settings.train_source, settings.store, resolution=settings.image_size, decode=settings.decode,
            crops=settings.replay == "device")
        if settings.replay == "device" and not train_set.crops:
            settings = settings.complete(replay="workers")
    else:
        train_set = AugmentedSamples(settings.train_source, settings.image_size or 224, settings.seed,
                                     allow_empty_classes=settings.allow_empty_classes)
    settings = settings.complete(image_size=settings.image_size or train_set.resolution)
    val_set = None
    if settings.val_source is not None:
        val_set = EvalSamples(settings.val_source, settings.image_size, settings.test_crop)
        try:
            check_classes(train_set.classes, val_set.classes, train_set.num_classes)
        except ClassMismatchError as error:
            raise TrainError(str(error)) from None
    if settings.curriculum != "none":
        dataset = train_set.dataset
        train_set.slot_policy = EntropyCurriculum(stored_entropies(dataset, dataset.header.block_size),
                                                  settings.curriculum, settings.epochs, settings.seed)
    return TrainingData(train_set, val_set, train_set.num_classes), settings
