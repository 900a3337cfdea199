"""ReinforcedDataset: the drop-in training dataset that replays stored augmentations and soft labels."""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torchvision.transforms import v2

from . import format as fmt
from .augment import AugmentPipeline
from .augment.geometric import RandomCrop, RandomResizedCrop
from .collate import Crop, Encoded
from .errors import ReinforceError, SourceMismatchError, StoreFormatError
from .rng import slot_for_epoch
from .source import (ImageSource, MapDataset, distrust_libjpeg_bindings, fast_decode_applies, fingerprint,
                     open_source, set_max_image_pixels)
from .targets import RemainingMass, dense_target

TargetKind = Literal["dense", "sparse"]
DecodeMode = Literal["exact", "fast", "gpu"]
TransformPolicy = Literal["refuse", "ignore"]
Output = Literal["replayed", "crops"]

FAST_FINGERPRINT_EVERY = 64
"""In ``decode="fast"`` mode, every this-many-th sample is still decoded in full once and fingerprinted."""

_AUGMENTING_TRANSFORM_WORDS = ("Random", "Crop", "Resize", "Flip", "Augment", "AugMix", "Erasing", "Jitter",
                               "Mixup", "MixUp", "CutMix", "Affine", "Perspective", "Rotation", "Solarize",
                               "Posterize", "Equalize", "Grayscale", "Blur", "Elastic")


class ReplayTransformError(ReinforceError):
    """A transform that would augment the replayed images again was given to a :class:`ReinforcedDataset`."""


class ReinforcedDataset(torch.utils.data.Dataset):
    """Map-style dataset over a source and its reinforced store.

    ``ds[i]`` decodes source image ``i``, picks the stored slot for (seed, epoch, i), replays that slot's
    augmentation at ``resolution`` and returns ``(transform(image), target)``. The target is a dense
    ``num_classes`` probability vector (``target="dense"``) or the stored ``(indices, probs)`` pair
    (``target="sparse"``). ``ds.__getitems__(positions)`` (used by DataLoader) replays a whole batch at once.

    Args:
        source: ImageFolder directory or map-style dataset returning ``(PIL image or tensor, label)``, in the
            order the store was built from.
        store: path, fsspec URL or zarr store of a complete reinforced store.
        resolution: output side in pixels (default: the size the store was built at).
        target: ``"dense"`` or ``"sparse"``.
        remaining_mass: how a dense target treats the mass outside the top-k (see :func:`dense_target`).
        transform: applied to the replayed uint8 ``[3, H, W]`` image (default: float32 in [0, 1]; pass
            ``torch.nn.Identity()`` to keep uint8 until the device, see :mod:`reinforce_loaders.collate`).
            Transforms that would augment again (random crops, flips, RandAugment...) are refused.
        seed: seed of the per-epoch slot choice (default: the store's seed).
        verify: ``"lazy"`` checks each image's fingerprint the first time it is loaded, ``"full"`` checks every image
            now, ``"none"`` skips the check. Labels and counts are always checked. In ``decode="fast"`` mode
            ``"lazy"`` checks every image's pixel size (from its header, no decode) and the full fingerprint
            of every :data:`FAST_FINGERPRINT_EVERY`-th sample.
        decode: ``"exact"`` replays the teacher's pixels bit for bit; ``"fast"`` decodes a JPEG at 1/2, 1/4 or
            1/8 scale when its stored crop is downscaled by 2x or more, and with ``simplejpeg`` installed
            (``pip install 'reinforce-loaders[fast]'``) decodes every plain JPEG with libjpeg's plain chroma
            upsampling (one or two levels of mean pixel difference, see benchmarks/RESULTS.md). Other files,
            and without ``simplejpeg`` the crops not downscaled 2x, are replayed exactly. Targets never change.
            ``"gpu"``: the workers only read files; samples are :class:`~reinforce_loaders.collate.Encoded`, whose
            plain JPEGs :func:`~reinforce_loaders.collate.replay_encoded` decodes batched on the device (nvjpeg)
            before replaying every op there (other files are decoded exactly in the workers).
        table_dir: directory of the memory-mapped epoch table (default: the system temporary directory). It
            lives in the page cache, not in ``/dev/shm``.
        transform_policy: what assigning an augmenting ``transform`` later does (timm's ``create_loader`` does):
            ``"refuse"`` raises :class:`ReplayTransformError`, ``"ignore"`` keeps the current transform and
            warns.
        output: ``"replayed"`` (the default) or ``"crops"``: samples are then ``(Crop, target)``, the source crop
            (and the mixing partner's) at the output size with the record's parameters, for
            :func:`~reinforce_loaders.collate.replay_crops` to replay the other ops batched on the GPU
            (``transform`` is not applied). Needs a pipeline whose crop is antialiased (the default).
        storage_options: fsspec options for remote stores.
        max_image_pixels: largest source image decoded, in pixels (sets ``PIL.Image.MAX_IMAGE_PIXELS`` for the
            process and its DataLoader workers; 0: no limit; default: leave Pillow's 89,478,485). A larger image
            raises :class:`~reinforce_loaders.errors.SourceError` naming it, before it is decoded.

    Call :meth:`set_epoch` before each epoch (or use :class:`~reinforce_loaders.samplers.ReinforcedSampler`,
    which does); it reaches DataLoader workers, persistent ones included.
    """

    _MAX_CACHED_BLOCKS = 8

    def __init__(self, source: str | os.PathLike[str] | MapDataset | ImageSource, store: Any, *,
                 resolution: int | None = None, target: TargetKind = "dense",
                 remaining_mass: RemainingMass = "renormalize",
                 transform: Callable[[torch.Tensor], Any] | None = None, seed: int | None = None,
                 verify: Literal["lazy", "full", "none"] = "lazy", decode: DecodeMode = "exact",
                 table_dir: str | os.PathLike[str] | None = None, transform_policy: TransformPolicy = "refuse",
                 output: Output = "replayed", storage_options: dict[str, Any] | None = None,
                 max_image_pixels: int | None = None) -> None:
        set_max_image_pixels(max_image_pixels)
        self.max_image_pixels = max_image_pixels
        _check_choice("target", target, ("dense", "sparse"))
        _check_choice("verify", verify, ("lazy", "full", "none"))
        _check_choice("decode", decode, ("exact", "fast", "gpu"))
        _check_choice("transform_policy", transform_policy, ("refuse", "ignore"))
        _check_choice("output", output, ("replayed", "crops"))
        _check_choice("remaining_mass", remaining_mass, ("renormalize", "spread"))
        if output == "crops" and decode == "gpu":
            raise ValueError("output='crops' crops in the workers, decode='gpu' decodes on the device: choose one")
        if resolution is not None and (isinstance(resolution, bool) or int(resolution) != resolution
                                       or resolution < 1):
            raise ValueError(f"resolution must be a whole number of pixels of at least 1, got {resolution!r}")
        self._store_ref = str(store) if isinstance(store, os.PathLike) else store
        self._storage_options = storage_options
        group = fmt.open_store_group(self._store_ref, storage_options=storage_options)
        self.header = fmt.read_header(group)
        self.source = open_source(source, allow_empty_classes=True)  # labels are checked against the store
        self._check_source_count()  # first: a hostile header's sizes are checked before anything is read
        fmt.check_store(group, self.header)
        self.pipeline = self.header.pipeline  # parsed once, with the header (format.read_header)
        self.resolution = int(resolution) if resolution is not None else self.pipeline.size
        self.target = target
        self.remaining_mass = remaining_mass
        self.transform_policy = transform_policy
        self._transform: Callable[[torch.Tensor], Any] = v2.ToDtype(torch.float32, scale=True)
        if transform is not None:
            self.transform = transform
        self.seed = self.header.seed if seed is None else int(seed)
        self.verify = verify
        self.decode = decode
        self._group: Any = group
        self._crops = CropColumns.of(self.pipeline)
        if output == "crops" and self._crops.own is None:
            raise ValueError(f"output='crops' needs a pipeline that starts with an antialiased random_resized_crop "
                             f"or random_crop; this store's starts with {self.pipeline.ops[0]!r}")
        self.output = output
        self._labels = fmt.read_array(group, fmt.LABELS)
        self._image_sizes = fmt.read_array(group, fmt.IMAGE_SIZES).astype(np.int64)
        self._fingerprints = fmt.read_array(group, fmt.FINGERPRINTS) if verify != "none" else None
        # Read-only like the labels, so a plain array (shared copy-on-write by forked workers).
        self._vocabulary = fmt.read_vocabulary(group, self.header)
        skipped = self.header.skipped_indices
        _check_per_sample_arrays(self._labels, self._image_sizes, self._fingerprints, skipped)
        # Samples whose image was unreadable at build time have no records: the dataset leaves them out.
        self._samples = np.setdiff1d(np.arange(len(self._labels)), skipped) if skipped.size else None
        self._table = EpochTable(len(self._labels), self.header.layout.width * self.header.dtype.itemsize,
                                 self.header.num_blocks, table_dir)
        self._other_slots: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        self._slot_cache = (-1, -1)
        self._check_source_matches()
        if verify == "full":
            self.verify_fingerprints()

    # -- configuration ----------------------------------------------------------------------------------------

    @property
    def transform(self) -> Callable[[torch.Tensor], Any]:
        return self._transform

    @transform.setter
    def transform(self, transform: Callable[[torch.Tensor], Any] | None) -> None:
        augmenting = augmenting_parts(transform)
        if transform is None and self.transform_policy == "ignore" and hasattr(self, "_transform"):
            augmenting = ["None"]  # timm clears it before wrapping the dataset in its own transforms
        if not augmenting:
            self._transform = transform if transform is not None else v2.ToDtype(torch.float32, scale=True)
            return
        message = (f"transform {', '.join(augmenting)} would augment the replayed images again (the store already "
                   "holds each image's augmentation and the teacher's label for exactly those pixels)")
        if self.transform_policy == "refuse":
            raise ReplayTransformError(message + ": pass only dtype/normalization transforms, or build the "
                                       "dataset with transform_policy='ignore' for training scripts that assign "
                                       "dataset.transform themselves (timm's create_loader)")
        warnings.warn(message + "; ignored (transform_policy='ignore'), keeping " + repr(self._transform),
                      stacklevel=2)

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
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._table.epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._table.epoch[0])

    def slot(self, index: int, epoch: int | None = None) -> int:
        """The stored slot sample ``index`` uses in ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        return slot_for_epoch(self.seed, epoch, index, self.header.num_augmentations)

    def _epoch_slot(self, epoch: int) -> int:
        """:meth:`slot` of ``epoch`` (the same for every sample), computed once per epoch and process."""
        if self._slot_cache[0] != epoch:
            self._slot_cache = (epoch, self.slot(0, epoch))
        return self._slot_cache[1]

    # -- loading ----------------------------------------------------------------------------------------------

    def __getitem__(self, position: int) -> tuple[Any, Any]:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[Any, Any]]:
        """Samples at ``positions``, replayed as one batch (DataLoader calls this with a batch's indices)."""
        for position in positions:
            if not 0 <= position < len(self):
                raise IndexError(f"index {position} out of range for {len(self)} samples")
        indices = np.array([self.store_index(int(p)) for p in positions], dtype=np.int64)
        epoch = self.epoch
        return self._replay(indices, self._epoch_slot(epoch), self.resolution, epoch)

    def replay(self, index: int, slot: int, resolution: int | None = None) -> tuple[Any, Any]:
        """``(transform(image), target)`` of record (index, slot) at ``resolution``.

        A mixed record (MixUp / CutMix) also decodes its partner sample and replays the partner's stored
        augmentation before mixing; the target is the teacher's on the mixed image, as stored.
        """
        return self._replay(np.array([index]), slot, resolution or self.resolution, self.epoch)[0]

    def _replay(self, indices: np.ndarray, slot: int, resolution: int, epoch: int) -> list[tuple[Any, Any]]:
        params, topk, probs = self._decoded_records(indices, slot, epoch)
        partners = self.pipeline.partner_indices(params)
        if partners is not None and (partners >= self.header.num_samples).any():
            bad = int(np.argmax(partners >= self.header.num_samples))
            raise StoreFormatError(f"record ({int(indices[bad])}, {slot}) mixes with sample {int(partners[bad])}, "
                                   f"beyond the store's {self.header.num_samples} samples: the store is damaged, "
                                   "rebuild it")
        params = params.copy()
        if self.decode == "gpu":
            return self._encoded_samples(indices, params, partners, topk, probs, resolution)
        decoded: dict[int, torch.Tensor] = {}  # full decodes of this batch: a partner also in it is decoded once
        images = [self._source_image(int(i), params, r, self._crops.own, resolution, decoded)
                  for r, i in enumerate(indices)]
        partner_images = None
        if partners is not None:
            partner_images = [None if p < 0 else
                              self._source_image(int(p), params, r, self._crops.partner, resolution, decoded)
                              for r, p in enumerate(partners)]
        if self.output == "crops":
            return self._crop_samples(images, partner_images, params, resolution, topk, probs)
        replayed = self.pipeline.apply_batch(images, params, resolution, partner_images)
        targets = self._targets(topk, probs)
        return [(self.transform(replayed[r]), targets[r]) for r in range(len(indices))]

    def _encoded_samples(self, indices: np.ndarray, params: np.ndarray, partners: np.ndarray | None,
                         topk: np.ndarray, probs: np.ndarray, resolution: int) -> list[tuple[Encoded, Any]]:
        none, read = torch.empty(0, dtype=torch.uint8), {}  # read: a partner also in the batch is read once
        partners = np.full(len(indices), -1) if partners is None else partners
        params_t, size, targets = torch.from_numpy(params), torch.tensor(resolution), self._targets(topk, probs)
        return [(Encoded(self._encoded_source(int(i), read), none if p < 0 else self._encoded_source(int(p), read),
                         params_t[r], size), targets[r]) for r, (i, p) in enumerate(zip(indices, partners))]

    def _encoded_source(self, index: int, read: dict[int, torch.Tensor]) -> torch.Tensor:
        """Sample ``index``'s file, undecoded if a plain JPEG (its size checked from the header), else decoded."""
        if index not in read:
            if self._needs_full_check(index):
                self._load_checked(index)
            expected = tuple(self._image_sizes[index]) if self.verify != "none" else None
            data = self.source.load_encoded(index, expected)
            read[index] = data if data is not None else self._load_checked(index)
        return read[index]

    def _crop_samples(self, images: list[torch.Tensor], partner_images: list[torch.Tensor | None] | None,
                      params: np.ndarray, resolution: int, topk: np.ndarray, probs: np.ndarray,
                      ) -> list[tuple[Crop, Any]]:
        own = self._crop_to_output(images, params, self._crops.own, resolution)
        blank = torch.zeros_like(own[0])
        partners = [blank] * len(images)
        if partner_images is not None:
            rows = [r for r, image in enumerate(partner_images) if image is not None]
            if rows:
                cropped = self._crop_to_output([partner_images[r] for r in rows], params[rows], self._crops.partner,
                                               resolution)
                params[rows, self._crops.partner] = (0, 0, resolution, resolution)
                for r, image in zip(rows, cropped):
                    partners[r] = image
        params_t = torch.from_numpy(params)
        targets = self._targets(topk, probs)
        return [(Crop(own[r], partners[r], params_t[r]), targets[r]) for r in range(len(images))]

    def _crop_to_output(self, images: list[torch.Tensor], params: np.ndarray, columns: slice, resolution: int,
                        ) -> torch.Tensor:
        """The crop op alone on ``images`` (those already cropped pass through); their boxes become whole."""
        boxes = torch.from_numpy(np.ascontiguousarray(params[:, columns]))
        cropped = self.pipeline.ops[0].apply_sources(images, boxes, resolution)
        params[:, columns] = (0, 0, resolution, resolution)
        return cropped

    def _targets(self, topk: np.ndarray, probs: np.ndarray) -> list[Any]:
        indices_t, probs_t = torch.from_numpy(topk), torch.from_numpy(probs)
        if self.target == "sparse":
            return list(zip(indices_t, probs_t))
        return list(dense_target(indices_t, probs_t, self.num_classes, self.remaining_mass))

    def _source_image(self, index: int, params: np.ndarray, row: int, crop: slice | None, resolution: int,
                      decoded: dict[int, torch.Tensor]) -> torch.Tensor:
        """Source image of ``index`` for record ``row``. In fast mode a JPEG crop (``params[row, crop]``) that
        :func:`decode_crop` handles comes back already cropped to ``resolution``, and ``params[row, crop]`` is
        rewritten to the whole image, which the crop op then passes through unchanged."""
        if self.decode == "fast" and crop is not None and fast_decode_applies(params[row, crop], resolution):
            if self._needs_full_check(index):  # checked in full, replayed like the others: order-independent
                self._load_checked(index)
            expected = tuple(self._image_sizes[index]) if self.verify != "none" else None
            cropped = self.source.load_crop(index, params[row, crop], resolution, expected)
            if cropped is not None:
                params[row, crop] = (0, 0, resolution, resolution)
                return cropped
        if index not in decoded:
            decoded[index] = self._load_checked(index)
        return decoded[index]

    def _needs_full_check(self, index: int) -> bool:
        return (self.verify == "lazy" and index % FAST_FINGERPRINT_EVERY == 0
                and not self._table.verified[index])

    def _load_checked(self, index: int) -> torch.Tensor:
        image, label = self.source.load(index, decoder="pillow" if self._table.pillow_only[0] else "auto")
        self._check_size_and_label(index, image, label)
        if self.verify == "lazy" and not self._table.verified[index]:
            image = self._checked(index, image)
            self._table.verified[index] = True
        return image

    def _checked(self, index: int, image: torch.Tensor) -> torch.Tensor:
        """``image`` if its fingerprint matches the store's; a Pillow decode of it if only that one matches."""
        if self._fingerprint_matches(index, image):
            return image
        pillow, _ = self.source.load(index, decoder="pillow")
        if not torch.equal(pillow, image) and self._fingerprint_matches(index, pillow):
            distrust_libjpeg_bindings()
            self._table.pillow_only[0] = True  # in every worker: a sample verified with Pillow stays Pillow's
            return pillow
        raise SourceMismatchError(
            f"source sample {index} ({self.source.name_of(index)}) differs from the image the store was built "
            "from (fingerprint mismatch): pass the same dataset, in the same order, that was reinforced"
        )

    def _fingerprint_matches(self, index: int, image: torch.Tensor) -> bool:
        return self._fingerprints is None or fingerprint(image) == int(self._fingerprints[index])

    def verify_fingerprints(self) -> None:
        """Decode every source image and raise :class:`SourceMismatchError` at the first that differs (pixel
        size, fingerprint, or label when the source has no ``.targets``)."""
        for position in range(len(self)):
            index = self.store_index(position)
            image, label = self.source.load(index)
            self._check_size_and_label(index, image, label)
            self._checked(index, image)

    def _check_size_and_label(self, index: int, image: torch.Tensor, label: int) -> None:
        """Every decoded image must have the size its records were encoded against, and a source without
        ``.targets`` (whose labels were not compared up front) the stored label."""
        stored = tuple(int(v) for v in self._image_sizes[index])
        if tuple(image.shape[1:]) != stored:
            raise SourceMismatchError(
                f"source sample {index} ({self.source.name_of(index)}) is {image.shape[1]} x {image.shape[2]} pixels "
                f"but the store records {stored[0]} x {stored[1]}: the store is damaged, or the source is not the "
                "dataset that was reinforced")
        if self.source.targets is None and int(label) != int(self._labels[index]):
            raise SourceMismatchError(
                f"source sample {index} ({self.source.name_of(index)}) has label {int(label)} but the store has "
                f"{int(self._labels[index])}: pass the same dataset, in the same order, that was reinforced")

    def _check_source_count(self) -> None:
        if len(self.source) != self.header.num_samples:
            raise SourceMismatchError(
                f"source {self.source.description} has {len(self.source)} samples but the store was built from "
                f"{self.header.num_samples}: pass the same dataset, in the same order, that was reinforced"
            )

    def _check_source_matches(self) -> None:
        if self.source.targets is not None:
            mismatched = np.flatnonzero(np.asarray(self.source.targets) != self._labels)
            if mismatched.size:
                first = int(mismatched[0])
                raise SourceMismatchError(
                    f"source sample {first} ({self.source.name_of(first)}) has label {self.source.targets[first]} "
                    f"but the store has {int(self._labels[first])} ({mismatched.size} labels differ): pass the same "
                    "dataset, in the same order, that was reinforced"
                )

    # -- records ----------------------------------------------------------------------------------------------

    def _decoded_records(self, indices: np.ndarray, slot: int, epoch: int,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(aug params ``(n, P)``, top-k indices ``(n, K)`` int64, top-k probs ``(n, K)`` float32)."""
        rows = self._raw_rows(indices, slot, epoch)
        sizes = self._image_sizes[indices]
        vocabulary = None if self._vocabulary is None else self._vocabulary[indices]
        decoded = fmt.decode_records(self.header, rows, sizes[:, 0], sizes[:, 1], vocabulary=vocabulary)
        return decoded.params, decoded.indices, decoded.probs

    def record(self, index: int, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(aug params ``(P,)``, top-k indices ``(K,)``, top-k probs ``(K,)``) of record (index, slot)."""
        params, indices, probs = self._decoded_records(np.array([index]), slot, self.epoch)
        return params[0], indices[0], probs[0]

    def partner_positions(self, epoch: int) -> np.ndarray | None:
        """Per dataset position, the position of the sample its record of ``epoch`` mixes with (-1: none), or
        None for a store without mixing. Reads the epoch's records (into the shared table) in this process."""
        if not self.pipeline.mixes:
            return None
        positions = np.arange(len(self))
        indices = positions if self._samples is None else self._samples
        partners = np.empty(len(indices), dtype=np.int64)
        step = 1 << 16
        for first in range(0, len(indices), step):
            params = self._decoded_records(indices[first:first + step], self._epoch_slot(epoch), epoch)[0]
            partners[first:first + step] = self.pipeline.partner_indices(params)
        if self._samples is None:
            return partners
        found = np.searchsorted(self._samples, partners)  # a skipped sample is never a partner
        return np.where(partners >= 0, found, -1)

    def teacher_entropy(self, index: int, slot: int) -> float:
        """Entropy (nats) of the full teacher distribution of record (index, slot), as stored."""
        row = self._raw_rows(np.array([index]), slot, self.epoch)[0]
        return float(row[self.header.layout.columns["teacher_entropy"].start]) / self.header.entropy_levels \
            * float(np.log(self.header.num_classes))

    def _raw_rows(self, indices: np.ndarray, slot: int, epoch: int) -> np.ndarray:
        """Raw record rows of ``indices`` in ``slot``, read one (block, slot) chunk at a time: the epoch's slot
        into the shared table (each chunk read once per epoch across all workers), others into a small cache."""
        blocks = indices // self.header.block_size
        if slot == self._epoch_slot(epoch):
            table = self._table.rows.view(self.header.dtype)
            for block in np.unique(blocks).tolist():
                if int(self._table.block_epoch[block]) != epoch:
                    start, stop = self.header.block_range(block)
                    table[start:stop] = fmt.read_block_slot(self._store_group(), self.header, block, slot,
                                                            self._image_sizes)
                    self._table.block_epoch[block] = epoch  # after the rows: no worker sees a half block
            return table[indices]
        return np.stack([self._other_slot_rows(int(block), slot)[index - block * self.header.block_size]
                         for index, block in zip(indices.tolist(), blocks.tolist())])

    @property
    def _block_epoch(self) -> np.ndarray:
        """Per block, the epoch whose slot the shared table holds (-1: none yet); tests inspect it."""
        return self._table.block_epoch

    def _other_slot_rows(self, block: int, slot: int) -> np.ndarray:
        key = (block, slot)
        rows = self._other_slots.get(key)
        if rows is None:
            rows = fmt.read_block_slot(self._store_group(), self.header, block, slot, self._image_sizes)
            self._other_slots[key] = rows
            if len(self._other_slots) > self._MAX_CACHED_BLOCKS:
                self._other_slots.popitem(last=False)
        else:
            self._other_slots.move_to_end(key)
        return rows

    def _store_group(self) -> Any:
        if self._group is None:  # opened lazily so that each DataLoader worker has its own handles
            self._group = fmt.open_store_group(self._store_ref, storage_options=self._storage_options)
        return self._group

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"] = None
        state["_other_slots"] = collections.OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        set_max_image_pixels(self.max_image_pixels)  # a spawned worker is a fresh process


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def augmenting_parts(transform: Any) -> list[str]:
    """Class names of the parts of ``transform`` (a Compose is searched) that would augment an image again."""
    if transform is None:
        return []
    parts = getattr(transform, "transforms", None)
    if isinstance(parts, (list, tuple)):
        return [name for part in parts for name in augmenting_parts(part)]
    name = type(transform).__name__
    return [name] if any(word in name for word in _AUGMENTING_TRANSFORM_WORDS) else []


@dataclasses.dataclass(frozen=True)
class CropColumns:
    """Parameter columns of the pipeline's source crop box (own, and the mixing partner's), when the crop can be
    done ahead of the pipeline: a whole-pixel box resized with antialiasing, which passes an image already of
    the output size through unchanged."""

    own: slice | None
    partner: slice | None

    @classmethod
    def of(cls, pipeline: AugmentPipeline) -> CropColumns:
        crop = pipeline.ops[0]
        if not isinstance(crop, (RandomResizedCrop, RandomCrop)) or crop.resample != "antialias":
            return cls(None, None)
        names = pipeline.param_names
        own = names.index(f"{crop.name}.top")
        partner = None
        if pipeline.mix_index is not None:
            mixer = pipeline.ops[pipeline.mix_index]
            first = names.index(f"{mixer.name}.partner.{crop.name}.top")
            partner = slice(first, first + 4)
        return cls(slice(own, own + 4), partner)


class EpochTable:
    """Shared state of a dataset's DataLoader workers in a memory-mapped temporary file (page cache, not
    ``/dev/shm``): the current epoch, whether JPEGs must be decoded by Pillow (a worker found torchvision's
    decoder differing), per block the epoch its rows hold (-1: none), per sample whether its
    fingerprint was checked, and the current epoch's record rows (``num_samples x row_bytes``).

    Forked workers share the mapping; spawned workers map the file again by name. The file is removed when
    the dataset of the process that made it is garbage collected or the process exits normally (a killed
    process leaves a ``reinforce-epoch-table-*`` file in the temporary directory).
    """

    def __init__(self, num_samples: int, row_bytes: int, num_blocks: int,
                 directory: str | os.PathLike[str] | None = None) -> None:
        self.shape = (int(num_samples), int(row_bytes), int(num_blocks))
        descriptor, self.path = tempfile.mkstemp(prefix="reinforce-epoch-table-", suffix=".bin",
                                                 dir=None if directory is None else os.fspath(directory))
        try:
            os.ftruncate(descriptor, self._offsets()[-1])
        finally:
            os.close(descriptor)
        self._remover = weakref.finalize(self, _remove_file, self.path, os.getpid())
        self._map(fresh=True)

    def _offsets(self) -> tuple[int, int, int, int]:
        num_samples, row_bytes, num_blocks = self.shape
        verified = 16 + 8 * num_blocks
        rows = -(-(verified + num_samples) // 8) * 8
        return 16, verified, rows, rows + num_samples * row_bytes

    def _map(self, fresh: bool = False) -> None:
        num_samples, row_bytes, num_blocks = self.shape
        blocks, verified, rows, end = self._offsets()
        memory = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(end,))
        self.epoch = memory[:8].view(np.int64)
        self.pillow_only = memory[8:9].view(np.bool_)
        self.block_epoch = memory[blocks:verified].view(np.int64)
        self.verified = memory[verified:verified + num_samples].view(np.bool_)
        self.rows = memory[rows:end].reshape(num_samples, row_bytes)
        if fresh:
            self.block_epoch[:] = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"shape": self.shape, "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.shape, self.path = state["shape"], state["path"]
        self._map()


def _remove_file(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked worker that inherited the finalizer
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


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
