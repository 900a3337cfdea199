"""Base classes of augmentation ops and the helpers they share.

Every op splits, like a ``torchvision.transforms.v2`` transform, into making parameters and applying them:
``sample_batch`` draws the parameters of many records at once from their keyed uniforms (numpy, on the CPU),
and ``apply_batch`` replays the parameters of many records at once on uint8 ``[N, C, H, W]`` tensors on any
device. The student replays one record as a batch of one through the same ``apply_batch``, so the build
(teacher) and the student see the same pixels. Each op declares how its parameters are stored
(``param_codecs``, see :mod:`reinforce_loaders.codecs`).

Parameter conventions, so a store replays at any output resolution and quantizes well:

* boxes in the *source* image are integer source pixels (:class:`SourceOp`);
* boxes in the *output* image are fractions of the output side;
* everything else is a small integer (flags, op ids, magnitude bins) or a fraction in ``[0, 1]``.

Sampling arithmetic is IEEE binary64; transcendental functions (exp, log, cos) are the C library's, through
Python's ``math`` module (:func:`libm`), so that a record's parameters are the same whether it is sampled alone
or in a batch.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..codecs import Codec
from ..errors import AugmentationError


@dataclasses.dataclass(frozen=True)
class SampleContext:
    """What ops may know about the records they sample, one entry per record.

    ``heights``/``widths`` are the decoded source image's size. Mixers also use the record's ``samples``
    index, the dataset's ``num_samples`` and the block's ``partner_pool`` (sorted sample indices, or None for
    the whole dataset).
    """

    heights: np.ndarray
    widths: np.ndarray
    samples: np.ndarray | None = None
    num_samples: int | None = None
    partner_pool: np.ndarray | None = None

    @classmethod
    def single(cls, height: int, width: int, **kwargs: Any) -> SampleContext:
        return cls(np.array([int(height)], dtype=np.int64), np.array([int(width)], dtype=np.int64), **kwargs)


class AugmentOp(ABC):
    """One augmentation of a pipeline: ``sample_batch`` draws its parameters, ``apply_batch`` replays them.

    Ops after the first take and return uint8 ``[N, C, S, S]`` batches at the pipeline's output side ``S``.
    Subclasses set ``name`` (the key in configs) and ``param_names`` (the stored parameter layout) and declare
    ``param_codecs`` (one per name).
    """

    name: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]]

    @property
    @abstractmethod
    def param_codecs(self) -> tuple[Codec, ...]:
        """How each parameter of ``param_names`` is stored."""

    @abstractmethod
    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        """Parameters ``(n, P)`` of ``n`` records from their ``(n, rng.UNIFORMS_PER_SLOT)`` uniforms."""

    @abstractmethod
    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Replay ``params[r]`` (float64 ``[N, P]``, on the images' device) on uint8 ``images[r]``."""

    def sample(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        """Parameters of one record of a ``height`` x ``width`` source (:meth:`sample_batch` on one row)."""
        return self.sample_batch(np.asarray(u, dtype=np.float64)[None], SampleContext.single(height, width))[0]

    def config(self) -> dict[str, Any]:
        """JSON description of the op (its constructor arguments), stored in the store header."""
        return {"name": self.name, **self._kwargs()}

    def _kwargs(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._kwargs().items())
        return f"{type(self).__name__}({args})"


class SourceOp(AugmentOp):
    """The first op of every pipeline: maps source images of any size to ``size`` x ``size`` outputs."""

    @abstractmethod
    def apply_sources(self, images: Sequence[torch.Tensor], params: torch.Tensor, size: int) -> torch.Tensor:
        """Replay ``params[r]`` on uint8 ``[C, H, W]`` ``images[r]``; returns uint8 ``[N, C, size, size]``."""

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.apply_sources(list(images), params, images.shape[-1])


class Mixer(AugmentOp):
    """An op that combines each record's image with a partner sample's (MixUp, CutMix).

    Its first parameter is the partner's sample index (-1: the record is not mixed). The pipeline replays the
    ops before the mixer on the partner with the partner's own stored parameters and hands both images to
    :meth:`apply_mixed`; ``apply_batch`` replays records without a partner (it refuses mixed ones).
    """

    @abstractmethod
    def apply_mixed(self, images: torch.Tensor, partners: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Mix uint8 ``images[r]`` with ``partners[r]`` (the partner's image at the same stage) by ``params[r]``."""

    @abstractmethod
    def unmixed(self, count: int) -> np.ndarray:
        """Parameters ``(count, P)`` of records that are not mixed."""

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if bool((params[:, 0] >= 0).any()):
            raise AugmentationError(f"{self.name}: mixed records need their partner images; replay them with "
                                    "AugmentPipeline.apply_batch(..., partner_images=...)")
        return images


def libm(function: Callable[[float], float], values: np.ndarray) -> np.ndarray:
    """``function`` (from :mod:`math`) applied to every element: the C library's result for each value."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    return np.fromiter(map(function, flat.tolist()), dtype=np.float64, count=flat.size).reshape(np.shape(values))


def as_int(values: np.ndarray) -> np.ndarray:
    """Truncation toward zero to int64 (Python's ``int`` of a float)."""
    return np.asarray(values).astype(np.int64)


def check_probability(op: str, name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise AugmentationError(f"{op} {name} must be in [0, 1], got {value}")
    return float(value)


def check_range(op: str, name: str, values: Sequence[float], low: float = 0.0, high: float = math.inf,
                ) -> tuple[float, float]:
    """A ``(min, max)`` pair of finite numbers with ``low < min <= max <= high``."""
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        raise AugmentationError(f"{op} {name} must be a pair (min, max), got {values!r}") from None
    if not (low < lo <= hi <= high) or not (math.isfinite(lo) and math.isfinite(hi)):
        raise AugmentationError(f"{op} {name} must satisfy {low} < min <= max <= {high}, got {values!r}")
    return lo, hi


FRACTION_BITS = 16
ONE = 1 << FRACTION_BITS
"""Fixed-point unit of blend and mixing weights (format_spec.md 4.5, "Replay arithmetic")."""


def fixed(values: torch.Tensor) -> torch.Tensor:
    """Weights in ``[0, 2]`` (binary64) to int32 fixed point: ``floor(v * 2^16 + 1/2)``.

    ``v * 2^16`` is exact in binary64 and adding 1/2 is exact below 2^52, so every device gives the same
    integers.
    """
    return torch.floor(values.to(torch.float64) * ONE + 0.5).to(torch.int32)


def fixed_host(value: float) -> int:
    """:func:`fixed` of one host value (the same rule in Python)."""
    return math.floor(float(value) * ONE + 0.5)


def round_fixed(accumulated: torch.Tensor) -> torch.Tensor:
    """uint8 of an integer sum in units of ``2^-16``: ``clip(floor(acc / 2^16 + 1/2), 0, 255)``."""
    return ((accumulated + ONE // 2) >> FRACTION_BITS).clamp_(0, 255).to(torch.uint8)


def blend(images: torch.Tensor, degenerate: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``images * F + degenerate * (1 - F)`` per record in fixed point: ``weights`` is int32 ``[N]`` (``F`` as
    :func:`fixed`), ``degenerate`` an integer tensor that broadcasts to ``images``; rounded by :func:`round_fixed`.

    Computed as ``D + (((x - D) F + 2^15) >> 16)``, which equals ``(x F + D (2^16 - F) + 2^15) >> 16`` exactly
    (``D 2^16`` is a multiple of ``2^16``), with fewer passes over the pixels.
    """
    w = weights.to(torch.int32).view(-1, 1, 1, 1)
    d = degenerate.to(torch.int32)
    return (((images.to(torch.int32) - d) * w + ONE // 2) >> FRACTION_BITS).add_(d).clamp_(0, 255).to(torch.uint8)


def selected_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the true entries of a ``[N]`` mask on the CPU (where a host sync costs nothing), or None on
    other devices: ops then compute every record and select with ``torch.where``, with no host sync."""
    return torch.nonzero(mask).flatten() if mask.device.type == "cpu" else None


def beta_batch(u: np.ndarray, alpha: float) -> np.ndarray:
    """Beta(alpha, alpha) draws ``(n,)`` from rows of uniforms ``u`` ``(n, m)`` (a pure function of each row).

    alpha == 1 uses ``u[:, 0]`` directly. Otherwise Joehnk's rejection method on consecutive pairs of uniforms,
    in log space so that small alphas do not underflow; a row whose every pair is rejected (probability below
    1e-6 for alpha <= 1) gets the mean 0.5.
    """
    u = np.asarray(u, dtype=np.float64)
    if alpha == 1.0:
        return u[:, 0].copy()
    out = np.full(len(u), 0.5)
    pending = np.arange(len(u))
    for first in range(0, u.shape[1] - 1, 2):
        if not pending.size:
            break
        log_x = libm(math.log, np.maximum(u[pending, first], 1e-300)) / alpha
        log_y = libm(math.log, np.maximum(u[pending, first + 1], 1e-300)) / alpha
        top = np.maximum(log_x, log_y)
        log_sum = top + libm(math.log, libm(math.exp, log_x - top) + libm(math.exp, log_y - top))
        accepted = log_sum <= 0.0
        out[pending[accepted]] = libm(math.exp, log_x[accepted] - log_sum[accepted])
        pending = pending[~accepted]
    return out


def beta_sample(u: np.ndarray, alpha: float) -> float:
    """One Beta(alpha, alpha) draw from the uniforms ``u`` (:func:`beta_batch` on one row)."""
    return float(beta_batch(np.asarray(u, dtype=np.float64)[None], alpha)[0])


TWO_PI = 2.0 * math.pi


def normal_batch(u0: np.ndarray, u1: np.ndarray) -> np.ndarray:
    """Standard normal draws from pairs of uniforms (Box-Muller: ``sqrt(-2 log(1 - u0)) cos(2 pi u1)``)."""
    radius = np.sqrt(-2.0 * libm(math.log, np.maximum(1.0 - u0, 1e-300)))
    return radius * libm(math.cos, TWO_PI * u1)


def output_box(params: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Integer pixel rows/cols ``(top, left, bottom, right)`` of ``[N, 4]`` output-fraction boxes at ``size``."""
    edges = torch.floor(params * size + 0.5).to(torch.int64)
    top, left = edges[:, 0], edges[:, 1]
    bottom = torch.floor((params[:, 0] + params[:, 2]) * size + 0.5).to(torch.int64)
    right = torch.floor((params[:, 1] + params[:, 3]) * size + 0.5).to(torch.int64)
    return top, left, bottom.clamp(max=size), right.clamp(max=size)


def box_mask(params: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean ``[N, 1, size, size]`` mask of output-fraction boxes ``(top, left, height, width)``."""
    top, left, bottom, right = output_box(params, size)
    coords = torch.arange(size, device=params.device)
    rows = (coords >= top[:, None]) & (coords < bottom[:, None])
    cols = (coords >= left[:, None]) & (coords < right[:, None])
    return (rows[:, :, None] & cols[:, None, :])[:, None]
