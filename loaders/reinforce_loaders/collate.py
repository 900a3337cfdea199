"""Batches on their way to the device: a soft-target collate that keeps images uint8 (4x less to pin and copy),
normalization on the device, batch MixUp / CutMix of soft targets for stores without stored mixing, the
device side of ``ReinforcedDataset(output="crops")`` (replay of everything after the crop on the GPU) and of
``ReinforcedDataset(decode="gpu")`` (JPEGs decoded on the GPU, then the whole replay there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .augment import AugmentPipeline
from .errors import ReinforceError, SourceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Crop(NamedTuple):
    """One sample of ``ReinforcedDataset(output="crops")``: its source crop at the output size, its mixing
    partner's (zeros if the record is not mixed) and the record's parameters with both crop boxes set to the
    whole crop, so that replaying them on the crops gives the full replay."""

    image: torch.Tensor
    partner: torch.Tensor
    params: torch.Tensor


class Encoded(NamedTuple):
    """One sample of ``ReinforcedDataset(decode="gpu")``: its source image as the file's bytes (uint8 ``[B]``,
    a plain JPEG) or, for files no JPEG decoder reads alike, decoded in the worker (uint8 ``[3, H, W]``); its
    mixing partner's likewise (empty if the record is not mixed); the record's parameters as stored; and the
    output side ``size``. :func:`replay_encoded` turns a batch of them into the replayed images."""

    image: torch.Tensor
    partner: torch.Tensor
    params: torch.Tensor
    size: torch.Tensor


def soft_target_collate(samples: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
    """Stack ``(image, target)`` samples without changing dtypes: uint8 images stay uint8 (pass
    ``transform=torch.nn.Identity()`` to the dataset); dense targets become ``[N, C]``, sparse ``(indices,
    probs)`` pairs ``([N, K], [N, K])``, :class:`Crop` samples a :class:`Crop` of stacked tensors.

    Use with ``DataLoader(..., collate_fn=soft_target_collate, pin_memory=True)`` and :func:`to_device`.
    """
    images, targets = zip(*samples)
    first = images[0]
    if isinstance(first, Encoded):  # sources of many sizes: lists, decoded and replayed by replay_encoded
        own, partners, params, sizes = zip(*images)
        stacked: Any = Encoded(list(own), list(partners), torch.stack(params), torch.stack(sizes))
    elif isinstance(first, Crop):
        stacked = Crop(*(torch.stack(part) for part in zip(*images)))
    else:
        stacked = torch.stack(images)
    if isinstance(targets[0], (tuple, list)):
        return stacked, tuple(torch.stack(part) for part in zip(*targets))
    return stacked, torch.stack(targets)


def to_device(images: torch.Tensor, device: str | torch.device, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (pinned, ideally) to normalized float32 on ``device``: copied as uint8, converted
    there. Raises ``TypeError`` for other dtypes (float images in [0, 1] would come out nearly constant)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_device takes uint8 images (0-255), got {images.dtype}: build the dataset with "
                        "transform=torch.nn.Identity() to get them, or normalize float images yourself")
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def replay_crops(pipeline: AugmentPipeline, crops: Crop, device: str | torch.device | None = None,
                 resolution: int | None = None) -> torch.Tensor:
    """The rest of each record's stored augmentation (flip, RandAugment, erasing, MixUp / CutMix with the
    partner) on a batch of :class:`Crop` s, batched on ``device`` (default: where the crops are): uint8
    ``[N, C, S, S]``. It equals the dataset's own replay bit for bit on any device: the ops' pixel arithmetic is
    integer (format_spec.md 4.5; checked on the CPU here, the CUDA test asserts it where a GPU is present)."""
    device = crops.image.device if device is None else torch.device(device)
    images = crops.image.to(device, non_blocking=True)
    params = crops.params.cpu().numpy()
    partners = pipeline.partner_indices(params)
    partner_images = None
    if partners is not None:
        mixed = torch.from_numpy(partners >= 0)
        on_device = crops.partner.to(device, non_blocking=True)
        partner_images = [on_device[r] if mixed[r] else None for r in range(len(params))]
    size = resolution or images.shape[-1]
    return pipeline.apply_batch(list(images), params, size, partner_images)


def decode_on_device(images: Sequence[torch.Tensor], device: str | torch.device) -> list[torch.Tensor | None]:
    """Every encoded JPEG (uint8 ``[B]``) of ``images`` decoded on ``device`` in one call to
    ``torchvision.io.decode_jpeg`` (nvjpeg on CUDA, libjpeg-turbo on the CPU), as RGB uint8 ``[3, H, W]``;
    decoded images (``[3, H, W]``) moved there; empty ones None. Raises :class:`SourceError` if one cannot be
    decoded."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(images)
    encoded = [r for r, image in enumerate(images) if image.ndim == 1 and image.numel()]
    if encoded:
        try:
            with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to TorchCodec
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_jpeg([images[r] for r in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as error:
            raise SourceError(f"a JPEG of this batch could not be decoded on {device} ({error}): train with "
                              "decode='exact' (--decode exact) once to have the workers name the file") from error
        for r, image in zip(encoded, decoded):
            out[r] = image
    for r, image in enumerate(images):
        if image.ndim == 3:
            out[r] = image.to(device, non_blocking=True)
    return out


def replay_encoded(pipeline: AugmentPipeline, batch: Encoded, device: str | torch.device) -> torch.Tensor:
    """A batch of :class:`Encoded` samples decoded on ``device`` (:func:`decode_on_device`) and replayed there,
    every op batched, the crop included: uint8 ``[N, C, S, S]``. The ops are device-exact, so the batch differs
    from ``decode="exact"``'s only where the decoder's pixels differ from Pillow's."""
    sizes = torch.unique(batch.size)
    if len(sizes) != 1:
        raise ValueError(f"a batch of Encoded samples needs one output size, got {sizes.tolist()}")
    decoded = decode_on_device(list(batch.image) + list(batch.partner), device)
    images, partners = decoded[:len(batch.image)], decoded[len(batch.image):]
    params = batch.params.cpu().numpy()
    partner_images = partners if pipeline.partner_indices(params) is not None else None
    return pipeline.apply_batch(images, params, int(sizes[0]), partner_images)


class MixingStoreError(ReinforceError):
    """Batch mixing was asked for on a store whose records already mix (their targets are the mixed ones)."""


class SoftTargetMixup:
    """MixUp / CutMix of a batch with its reverse, mixing dense soft targets with the same weight as the pixels
    (timm's ``Mixup`` one-hot encodes integer labels; this takes the teacher's distributions as they are).

    Per call: with probability ``prob`` the batch is mixed, by CutMix with probability ``switch_prob`` when
    both alphas are positive (else the one that is), the weight drawn from Beta(alpha, alpha); the CutMix
    box is clipped to the image and the weight corrected to its area. Draws come from a generator keyed by
    (``seed``, ``step``), so a resumed run mixes the same way. Use only with stores built without mixing
    (:meth:`for_dataset` checks): a mixed record's target already describes its mixed image.
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha == cutmix_alpha == 0:
            raise ValueError(f"need mixup_alpha >= 0 and cutmix_alpha >= 0, not both 0; got {mixup_alpha}, "
                             f"{cutmix_alpha}")
        if not (0 <= prob <= 1 and 0 <= switch_prob <= 1):
            raise ValueError(f"prob and switch_prob must be in [0, 1], got {prob}, {switch_prob}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.seed = float(prob), float(switch_prob), int(seed)

    @classmethod
    def for_dataset(cls, dataset: Any, **options: Any) -> SoftTargetMixup:
        """A mixer for ``dataset`` (a ReinforcedDataset), refused if its store already mixes."""
        if dataset.pipeline.mixes:
            raise MixingStoreError(
                "this store's records are already mixed (MixUp / CutMix stored with the teacher's label of the "
                "mixed image): mixing batches again would pair the wrong labels; drop the batch mixer")
        return cls(**options)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | Sequence[torch.Tensor], step: int,
                 ) -> tuple[torch.Tensor, Any]:
        """Mixed ``(images, targets)`` of batch number ``step``. ``targets`` are dense ``[N, C]`` distributions, or
        a tuple of them (e.g. one-hot labels and a teacher's targets), each mixed with the same weight as the
        pixels. uint8 images stay uint8 (rounded); float images are mixed as they are."""
        several = isinstance(targets, (tuple, list))
        for target in targets if several else (targets,):
            if target.ndim != 2 or not target.is_floating_point():
                raise ValueError(f"SoftTargetMixup mixes dense soft targets [N, C]; got {target.dtype} "
                                 f"{tuple(target.shape)} (use target='dense')")
        generator = np.random.default_rng([self.seed, int(step)])
        if generator.random() >= self.prob:
            return images, targets
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or generator.random() < self.switch_prob)
        lam = float(generator.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha])))
        partners = images.flip(0)
        if cutmix:
            images, lam = _cutmix(images, partners, lam, generator)
        else:
            mixed = images.float() * lam + partners.float() * (1 - lam)
            images = mixed.round_().clamp_(0, 255).to(images.dtype) if images.dtype == torch.uint8 else mixed
        if several:
            return images, tuple(_mix(target, lam) for target in targets)
        return images, _mix(targets, lam)


def _mix(target: torch.Tensor, lam: float) -> torch.Tensor:
    return target * lam + target.flip(0) * (1 - lam)


def _cutmix(images: torch.Tensor, partners: torch.Tensor, lam: float,
            generator: np.random.Generator) -> tuple[torch.Tensor, float]:
    height, width = images.shape[-2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(generator.integers(height)), int(generator.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    out = images.clone()
    out[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
    return out, 1 - (bottom - top) * (right - left) / (height * width)
