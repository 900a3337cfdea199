"""RandomErasing, and MixUp / CutMix with a partner sample drawn from the record's keyed RNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..codecs import FRACTION_255, Codec, IntCodec
from ..errors import AugmentationError
from .base import (AugmentOp, Mixer, SampleContext, as_int, beta_batch, blend, box_mask, check_probability,
                   check_range, fixed, libm, selected_rows)

_MAX_TRIES = 10


class RandomErasing(AugmentOp):
    """Erase a random box of the output with probability ``p`` (0.25 in the DR paper), as torchvision's
    ``RandomErasing``: up to ten tries at an area fraction uniform in ``scale`` and a log-uniform aspect
    ratio in ``ratio``; no erasing if none fits. The box is filled with ``value`` (one or three 0..255 values).

    Parameters (fractions of the output side, in [0, 1]): ``top``, ``left``, ``height``, ``width``; a zero
    height means the record is not erased. At output side S the box covers rows
    ``floor(top*S + 0.5)`` to ``floor((top+height)*S + 0.5) - 1``, and likewise for columns.
    """

    name = "random_erasing"
    param_names = ("top", "left", "height", "width")
    param_codecs: tuple[Codec, ...] = (FRACTION_255,) * 4

    def __init__(self, p: float = 0.25, scale: Sequence[float] = (0.02, 0.33), ratio: Sequence[float] = (0.3, 3.3),
                 value: int | Sequence[int] = 0) -> None:
        self.p = check_probability(self.name, "p", p)
        self.scale = check_range(self.name, "scale", scale, 0.0, 1.0)
        self.ratio = check_range(self.name, "ratio", ratio)
        values = [value] if isinstance(value, (int, float)) else list(value)
        if len(values) not in (1, 3) or not all(0 <= v <= 255 and float(v).is_integer() for v in values):
            raise AugmentationError(f"random_erasing value must be one or three integers in 0..255, got {value!r}")
        self.value = [int(v) for v in values] if len(values) == 3 else int(values[0])

    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        out = np.zeros((len(u), 4))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        pending = np.flatnonzero(u[:, 0] < self.p)
        for t in range(_MAX_TRIES):  # erased rows still looking for a box that fits
            if not pending.size:
                break
            rows = u[pending]
            area = self.scale[0] + rows[:, 1 + 4 * t] * (self.scale[1] - self.scale[0])
            aspect = libm(math.exp, log_lo + rows[:, 2 + 4 * t] * (log_hi - log_lo))
            h, w = np.sqrt(area * aspect), np.sqrt(area / aspect)
            fits = (h < 1.0) & (w < 1.0)
            rows, h, w = rows[fits], h[fits], w[fits]
            out[pending[fits]] = np.stack([rows[:, 3 + 4 * t] * (1.0 - h), rows[:, 4 + 4 * t] * (1.0 - w), h, w], -1)
            pending = pending[~fits]
        return out

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        mask = box_mask(params, images.shape[-1])
        fill = torch.tensor(self.value, dtype=torch.uint8, device=images.device).view(-1, 1, 1)
        return torch.where(mask, fill, images)

    def _kwargs(self) -> dict[str, Any]:
        return {"p": self.p, "scale": list(self.scale), "ratio": list(self.ratio), "value": self.value}


NO_MIX, MIXUP, CUTMIX = 0, 1, 2


def draw_partners(u: np.ndarray, samples: np.ndarray, num_samples: int, pool: np.ndarray | None) -> np.ndarray:
    """Partner of each record of ``samples`` from one uniform each: uniform over the other samples of the
    dataset, or over the other members of ``pool`` (sorted sample indices) when given; the sample itself when
    there is no other."""
    samples = np.asarray(samples, dtype=np.int64)
    if pool is None:
        if num_samples < 2:
            return samples.copy()
        return (samples + 1 + np.minimum(as_int(u * (num_samples - 1)), num_samples - 2)) % num_samples
    pool = np.asarray(pool, dtype=np.int64)
    own = np.searchsorted(pool, samples)
    contains = (own < len(pool)) & (pool[np.minimum(own, len(pool) - 1)] == samples)
    count = len(pool) - contains
    pick = np.minimum(as_int(u * count), count - 1)
    pick = np.where(contains & (pick >= own), pick + 1, pick)
    return np.where(count < 1, samples, pool[np.clip(pick, 0, len(pool) - 1)])


class Mix(Mixer):
    """MixUp or CutMix with a partner sample, for every record with probability ``p``.

    Both alphas positive: CutMix with probability ``switch_prob``, else MixUp (timm's switching; the DR
    paper's "MixUp + CutMix" with probabilities 0.5, 0.5); one alpha zero: only the other. The partner is
    another sample drawn uniformly from the record's keyed RNG (from the block's partner pool when the context
    has one); in the pipeline it goes through the same ops as the record before this one, with its own stored
    parameters, then the two are mixed.

    Parameters: ``partner`` (integer sample index, -1 = not mixed), ``mode`` (0 none, 1 MixUp, 2 CutMix),
    ``lam`` (fraction of the record's own image: the MixUp weight, or 1 - the CutMix box area), and the
    CutMix box ``top``, ``left``, ``height``, ``width`` in fractions of the output side (rounded to pixels
    as in :class:`RandomErasing`; zeros for MixUp). The pipeline stores the partner's parameters of the ops
    before this one after these, as ``partner.<op>.<param>``.
    """

    name = "mix"
    param_names = ("partner", "mode", "lam", "top", "left", "height", "width")
    param_codecs: tuple[Codec, ...] = (IntCodec.spanning(-1, None), IntCodec.spanning(0, 2)) + (FRACTION_255,) * 5

    def __init__(self, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0, p: float = 1.0,
                 switch_prob: float = 0.5) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha == cutmix_alpha == 0:
            raise AugmentationError(
                f"{self.name} needs mixup_alpha >= 0 and cutmix_alpha >= 0, not both 0; got {mixup_alpha}, {cutmix_alpha}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.p = check_probability(self.name, "p", p)
        self.switch_prob = check_probability(self.name, "switch_prob", switch_prob)

    def unmixed(self, count: int = 1) -> np.ndarray:
        return np.tile(np.array([-1.0, NO_MIX, 1.0, 0.0, 0.0, 0.0, 0.0]), (count, 1))

    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        if context.samples is None or context.num_samples is None:
            raise AugmentationError(f"{self.name} draws partner samples: its context needs samples and num_samples")
        out = self.unmixed(len(u))
        mixed = np.flatnonzero(u[:, 0] < self.p)
        u = u[mixed]
        out[mixed, 0] = draw_partners(u[:, 1], context.samples[mixed], context.num_samples, context.partner_pool)
        cutmix = (self.cutmix_alpha > 0) & ((self.mixup_alpha == 0) | (u[:, 2] < self.switch_prob))
        rows, cut_u = mixed[cutmix], u[cutmix]
        cut = np.sqrt(1.0 - beta_batch(cut_u[:, 8:], self.cutmix_alpha)) if len(rows) else np.empty(0)
        top, bottom = np.maximum(cut_u[:, 3] - cut / 2, 0.0), np.minimum(cut_u[:, 3] + cut / 2, 1.0)
        left, right = np.maximum(cut_u[:, 4] - cut / 2, 0.0), np.minimum(cut_u[:, 4] + cut / 2, 1.0)
        h, w = bottom - top, right - left
        out[rows, 1:] = np.stack([np.full(len(rows), CUTMIX), 1.0 - h * w, top, left, h, w], axis=-1)
        rows, mix_u = mixed[~cutmix], u[~cutmix]
        if len(rows):
            out[rows, 1], out[rows, 2] = MIXUP, beta_batch(mix_u[:, 8:], self.mixup_alpha)
        return out

    def sample_mix(self, u: np.ndarray, sample: int, num_samples: int, pool: np.ndarray | None = None) -> np.ndarray:
        """Parameters of one record of sample ``sample`` of ``num_samples`` (:meth:`sample_batch` on one row)."""
        context = SampleContext(np.zeros(1, np.int64), np.zeros(1, np.int64), samples=np.array([sample]),
                                num_samples=num_samples, partner_pool=pool)
        return self.sample_batch(np.asarray(u, dtype=np.float64)[None], context)[0]

    def apply_mixed(self, images: torch.Tensor, partners: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Mix uint8 ``images[r]`` with ``partners[r]`` by ``params[r]`` (every record here is mixed): MixUp in
        fixed point (``blend`` with weight ``fixed(lam)``), CutMix by the output box. Off the CPU every record
        is computed both ways and selected, with no host sync."""
        mode = torch.round(params[:, 1])
        mixup, cutmix = mode == MIXUP, mode == CUTMIX
        rows = selected_rows(mixup)
        if rows is None:
            blended = blend(images, partners, fixed(params[:, 2]))
            cut = box_mask(params[:, 3:7], images.shape[-1]) & cutmix.view(-1, 1, 1, 1)
            return torch.where(mixup.view(-1, 1, 1, 1), blended, torch.where(cut, partners, images))
        out = images.clone()
        if len(rows):
            out[rows] = blend(images[rows], partners[rows], fixed(params[rows, 2]))
        rows = selected_rows(cutmix)
        assert rows is not None  # the CPU
        if len(rows):
            cut = box_mask(params[rows, 3:7], images.shape[-1])
            out[rows] = torch.where(cut, partners[rows], images[rows])
        return out

    def _kwargs(self) -> dict[str, Any]:
        return {"mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha, "p": self.p,
                "switch_prob": self.switch_prob}


class MixUp(Mix):
    """MixUp only (see :class:`Mix`); ``alpha`` is the Beta parameter of the weight."""

    name = "mixup"

    def __init__(self, alpha: float = 0.2, p: float = 1.0) -> None:
        super().__init__(mixup_alpha=alpha, cutmix_alpha=0.0, p=p)

    def _kwargs(self) -> dict[str, Any]:
        return {"alpha": self.mixup_alpha, "p": self.p}


class CutMix(Mix):
    """CutMix only (see :class:`Mix`); ``alpha`` is the Beta parameter of the kept area."""

    name = "cutmix"

    def __init__(self, alpha: float = 1.0, p: float = 1.0) -> None:
        super().__init__(mixup_alpha=0.0, cutmix_alpha=alpha, p=p)

    def _kwargs(self) -> dict[str, Any]:
        return {"alpha": self.cutmix_alpha, "p": self.p}
