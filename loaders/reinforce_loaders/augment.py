"""Parametrized augmentations: each op samples its parameters once, then applies them.

This is the split torchvision.transforms.v2 uses (make params, then apply them): the builder samples and
stores the parameters of every (sample, slot) record, and the student replays them with the same ``apply``.
Parameters are resolution independent: crop boxes are in source-image pixels and the output size is an
argument of ``apply``, so one store serves students at any resolution.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from . import rng
from .errors import AugmentationError


class AugmentOp(ABC):
    """One augmentation: ``sample`` draws its parameters from uniforms, ``apply`` replays them."""

    name: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]]

    @abstractmethod
    def sample(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        """Parameters for a source image of ``height`` x ``width`` from ``rng.UNIFORMS_PER_SLOT`` uniforms."""

    @abstractmethod
    def apply(self, image: torch.Tensor, params: Sequence[float], size: int) -> torch.Tensor:
        """Apply parameters to a uint8 ``[C, H, W]`` image; ``size`` is the side of the pipeline's output."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON description of the op (its constructor arguments), stored in the store header."""


class RandomResizedCrop(AugmentOp):
    """Crop a random area and aspect ratio of the source, resize it to ``size`` x ``size``.

    Parameters: the crop box ``(top, left, height, width)`` in source-image pixels. The sampling follows
    torchvision's RandomResizedCrop: ten tries at a random scale and log-uniform ratio, then a central crop.
    """

    name = "random_resized_crop"
    param_names = ("top", "left", "height", "width")
    _TRIES = 10

    def __init__(self, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise AugmentationError(f"random_resized_crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise AugmentationError(f"random_resized_crop ratio must satisfy 0 < min <= max, got {ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def sample(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for t in range(self._TRIES):
            target_area = area * (self.scale[0] + u[2 * t] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + u[2 * t + 1] * (log_hi - log_lo))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(u[2 * self._TRIES + 2 * t] * (height - h + 1))
                left = int(u[2 * self._TRIES + 2 * t + 1] * (width - w + 1))
                return np.array([top, left, h, w], dtype=np.float64)
        return np.array(_central_crop(height, width, self.ratio), dtype=np.float64)

    def apply(self, image: torch.Tensor, params: Sequence[float], size: int) -> torch.Tensor:
        top, left, h, w = (int(p) for p in params)
        return F.resized_crop(image, top, left, h, w, [size, size], antialias=True)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": list(self.scale), "ratio": list(self.ratio)}


def _central_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class HorizontalFlip(AugmentOp):
    """Mirror left-right with probability ``p``. Parameter: ``flip`` (1.0 or 0.0)."""

    name = "horizontal_flip"
    param_names = ("flip",)

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise AugmentationError(f"horizontal_flip p must be in [0, 1], got {p}")
        self.p = float(p)

    def sample(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        return np.array([1.0 if u[0] < self.p else 0.0])

    def apply(self, image: torch.Tensor, params: Sequence[float], size: int) -> torch.Tensor:
        return F.horizontal_flip(image) if params[0] >= 0.5 else image

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "p": self.p}


OPS: dict[str, type[AugmentOp]] = {op.name: op for op in (RandomResizedCrop, HorizontalFlip)}


class AugmentPipeline:
    """An ordered list of ops producing ``size`` x ``size`` images; op ``k`` draws from RNG stream ``k``."""

    def __init__(self, ops: Sequence[AugmentOp], size: int) -> None:
        if not ops:
            raise AugmentationError("an augmentation pipeline needs at least one op")
        if size < 1:
            raise AugmentationError(f"augmentation output size must be positive, got {size}")
        self.ops = list(ops)
        self.size = int(size)
        self._offsets = np.cumsum([0] + [len(op.param_names) for op in self.ops])

    @property
    def num_params(self) -> int:
        return int(self._offsets[-1])

    @property
    def param_names(self) -> list[str]:
        return [f"{op.name}.{name}" for op in self.ops for name in op.param_names]

    def sample(self, seed: int, sample: int, slot: int, height: int, width: int) -> np.ndarray:
        """Parameters of record (sample, slot) as a ``(num_params,)`` vector."""
        parts = [op.sample(rng.slot_uniforms(seed, sample, slot, k), height, width) for k, op in enumerate(self.ops)]
        return np.concatenate(parts)

    def sample_slots(self, seed: int, sample: int, num_slots: int, height: int, width: int) -> np.ndarray:
        """Parameters of slots ``0..num_slots-1`` of one sample, shape ``(num_slots, num_params)``."""
        out = np.empty((num_slots, self.num_params), dtype=np.float64)
        for k, op in enumerate(self.ops):
            u = rng.all_slot_uniforms(seed, sample, num_slots, k)
            lo, hi = self._offsets[k], self._offsets[k + 1]
            for slot in range(num_slots):
                out[slot, lo:hi] = op.sample(u[slot], height, width)
        return out

    def apply(self, image: torch.Tensor, params: Sequence[float], size: int | None = None) -> torch.Tensor:
        """Replay ``params`` on a uint8 ``[C, H, W]`` image; ``size`` overrides the pipeline's output side."""
        size = self.size if size is None else int(size)
        for k, op in enumerate(self.ops):
            image = op.apply(image, params[self._offsets[k]:self._offsets[k + 1]], size)
        return image

    def apply_batch(self, images: Sequence[torch.Tensor], params: np.ndarray, size: int | None = None,
                    partner_images: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Replay record ``r``'s ``params[r]`` on ``images[r]`` for every record at once: ``[n, 3, size, size]``.

        ``images`` are uint8 ``[3, H, W]`` tensors on one device (the same tensor may repeat, one entry per
        record); ``partner_images[r]`` is the image of :meth:`partner_indices` ``[r]`` for mixing pipelines.
        The result equals :meth:`apply` record by record (the student path) within the fidelity bounds of
        ``format_spec.md``.
        """
        return torch.stack([self.apply(image, row, size) for image, row in zip(images, params)])

    def partner_indices(self, params: np.ndarray) -> np.ndarray | None:
        """Source sample each record of ``params`` (``[n, num_params]``) mixes with, or None without mixing."""
        return None

    def config(self) -> dict[str, Any]:
        return {"size": self.size, "ops": [op.config() for op in self.ops], "param_names": self.param_names}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AugmentPipeline:
        ops = []
        for op_config in config["ops"]:
            kwargs = dict(op_config)
            name = kwargs.pop("name")
            if name not in OPS:
                raise AugmentationError(
                    f"the store uses augmentation op {name!r}, which this version does not know "
                    f"(known: {', '.join(sorted(OPS))}): upgrade reinforce-loaders"
                )
            ops.append(OPS[name](**kwargs))
        pipeline = cls(ops, config["size"])
        if "param_names" in config and list(config["param_names"]) != pipeline.param_names:
            raise AugmentationError(
                f"stored parameter layout {config['param_names']} differs from this version's "
                f"{pipeline.param_names}: upgrade reinforce-loaders"
            )
        return pipeline


PRESETS: dict[str, Any] = {
    "rrc": lambda: [RandomResizedCrop(), HorizontalFlip(0.5)],
}


def make_pipeline(preset: str, size: int = 224) -> AugmentPipeline:
    """Pipeline of a named preset (see ``PRESETS``) producing ``size`` x ``size`` images."""
    if preset not in PRESETS:
        raise AugmentationError(f"unknown augmentation preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return AugmentPipeline(PRESETS[preset](), size)
