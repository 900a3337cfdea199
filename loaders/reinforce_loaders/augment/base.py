"""Base classes of augmentation ops and the helpers they share.

Every op splits into ``sample`` (draw parameters from keyed uniforms, on the CPU, per record) and
``apply_batch`` (replay the parameters of many records at once on uint8 ``[N, C, H, W]`` tensors, on any
device). The student path replays one record as a batch of one through the same ``apply_batch``, so the
build (teacher) and the student see the same pixels.

Parameter conventions, so a store replays at any output resolution and quantizes well:

* boxes in the *source* image are fractions of its height / width (:class:`SourceOp`);
* boxes in the *output* image are fractions of the output side;
* everything else is a small integer (flags, op ids, magnitude bins) or a fraction in ``[0, 1]``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import AugmentationError


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Range of one stored parameter: ``low <= value <= high`` (``high`` None: unbounded), integer or real."""

    low: float
    high: float | None
    integer: bool

    def describe(self) -> str:
        kind = "integer" if self.integer else "real"
        return f"{kind} in [{self.low:g}, {'N-1' if self.high is None else f'{self.high:g}'}]"


FRACTION = ParamSpec(0.0, 1.0, False)
BIT = ParamSpec(0.0, 1.0, True)


class AugmentOp(ABC):
    """One augmentation of a pipeline: ``sample`` draws its parameters, ``apply_batch`` replays them.

    Ops after the first take and return uint8 ``[N, C, S, S]`` batches at the pipeline's output side ``S``.
    Subclasses set ``name`` (the key in configs) and ``param_names`` (the stored parameter layout).
    """

    name: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]]

    @property
    @abstractmethod
    def param_specs(self) -> tuple[ParamSpec, ...]:
        """Range of each parameter of ``param_names`` (for encoders and validation)."""

    @abstractmethod
    def sample(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        """Parameters of one record for a source of ``height`` x ``width`` from ``rng.UNIFORMS_PER_SLOT`` uniforms."""

    @abstractmethod
    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Replay ``params[r]`` (float64 ``[N, P]``, on the images' device) on uint8 ``images[r]``."""

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


def check_probability(op: str, name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise AugmentationError(f"{op} {name} must be in [0, 1], got {value}")
    return float(value)


def check_range(op: str, name: str, values: Sequence[float], low: float = 0.0, high: float = math.inf,
                ) -> tuple[float, float]:
    """A ``(min, max)`` pair with ``low < min <= max <= high``."""
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        raise AugmentationError(f"{op} {name} must be a pair (min, max), got {values!r}") from None
    if not (low < lo <= hi <= high):
        raise AugmentationError(f"{op} {name} must satisfy {low} < min <= max <= {high}, got {values!r}")
    return lo, hi


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Round a float batch to uint8, saturating."""
    return images.round().clamp_(0, 255).to(torch.uint8)


def blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * degenerate`` per sample (``factor`` is ``[N]``), rounded to uint8."""
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    return to_uint8(images.to(torch.float32) * f + degenerate.to(torch.float32) * (1.0 - f))


def beta_sample(u: np.ndarray, alpha: float) -> float:
    """A Beta(alpha, alpha) draw from the uniforms ``u`` (a pure function of them).

    alpha == 1 uses ``u[0]`` directly. Otherwise Joehnk's rejection method on pairs of uniforms, in log space
    so that small alphas do not underflow; if every pair is rejected (probability below 1e-6 for alpha <= 1)
    the mean 0.5 is returned.
    """
    if alpha == 1.0:
        return float(u[0])
    for first in range(0, len(u) - 1, 2):
        a, b = max(u[first], 1e-300), max(u[first + 1], 1e-300)
        log_x, log_y = math.log(a) / alpha, math.log(b) / alpha
        top = max(log_x, log_y)
        log_sum = top + math.log(math.exp(log_x - top) + math.exp(log_y - top))
        if log_sum <= 0.0:
            return math.exp(log_x - log_sum)
    return 0.5


def normal_sample(u0: float, u1: float) -> float:
    """A standard normal draw from two uniforms (Box-Muller)."""
    return math.sqrt(-2.0 * math.log(max(1.0 - u0, 1e-300))) * math.cos(2.0 * math.pi * u1)


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
