"""RandomErasing, and MixUp / CutMix with a partner sample drawn from the record's keyed RNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import AugmentationError
from .base import (FRACTION, AugmentOp, ParamSpec, SourceOp, beta_sample, box_mask, check_probability, check_range,
                   to_uint8)

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
    param_specs: tuple[ParamSpec, ...] = (FRACTION,) * 4

    def __init__(self, p: float = 0.25, scale: Sequence[float] = (0.02, 0.33), ratio: Sequence[float] = (0.3, 3.3),
                 value: int | Sequence[int] = 0) -> None:
        self.p = check_probability(self.name, "p", p)
        self.scale = check_range(self.name, "scale", scale, 0.0, 1.0)
        self.ratio = check_range(self.name, "ratio", ratio)
        values = [value] if isinstance(value, (int, float)) else list(value)
        if len(values) not in (1, 3) or not all(0 <= v <= 255 and float(v).is_integer() for v in values):
            raise AugmentationError(f"random_erasing value must be one or three integers in 0..255, got {value!r}")
        self.value = [int(v) for v in values] if len(values) == 3 else int(values[0])

    def sample(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        if u[0] >= self.p:
            return np.zeros(4)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for t in range(_MAX_TRIES):
            area = self.scale[0] + u[1 + 4 * t] * (self.scale[1] - self.scale[0])
            aspect = math.exp(log_lo + u[2 + 4 * t] * (log_hi - log_lo))
            h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if h < 1.0 and w < 1.0:
                return np.array([u[3 + 4 * t] * (1.0 - h), u[4 + 4 * t] * (1.0 - w), h, w])
        return np.zeros(4)

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        mask = box_mask(params, images.shape[-1])
        fill = torch.tensor(self.value, dtype=torch.uint8, device=images.device).view(-1, 1, 1)
        return torch.where(mask, fill, images)

    def _kwargs(self) -> dict[str, Any]:
        return {"p": self.p, "scale": list(self.scale), "ratio": list(self.ratio), "value": self.value}


NO_MIX, MIXUP, CUTMIX = 0, 1, 2


class Mix(AugmentOp):
    """MixUp or CutMix with a partner sample, for every record with probability ``p``.

    Both alphas positive: CutMix with probability ``switch_prob``, else MixUp (timm's switching; the DR
    paper's "MixUp + CutMix" with probabilities 0.5, 0.5); one alpha zero: only the other. The partner is
    another sample drawn uniformly from the record's keyed RNG; in the pipeline it goes through the same ops
    as the record before this one, with its own stored parameters (``partner.*``), then the two are mixed.

    Parameters: ``partner`` (integer sample index, -1 = not mixed), ``mode`` (0 none, 1 MixUp, 2 CutMix),
    ``lam`` (fraction of the record's own image: the MixUp weight, or 1 - the CutMix box area), and the
    CutMix box ``top``, ``left``, ``height``, ``width`` in fractions of the output side (rounded to pixels
    as in :class:`RandomErasing`; zeros for MixUp); then, once a pipeline binds the ops before this one,
    the partner's parameters of those ops, ``partner.<op>.<param>`` (same meaning and encodings).
    """

    name = "mix"
    OWN_PARAMS = ("partner", "mode", "lam", "top", "left", "height", "width")
    _OWN_SPECS: tuple[ParamSpec, ...] = (ParamSpec(-1, None, True), ParamSpec(0, 2, True)) + (FRACTION,) * 5
    _partner_ops: tuple[AugmentOp, ...] = ()

    def bind_partner_ops(self, ops: Sequence[AugmentOp]) -> None:
        """The ops the partner goes through (those before this one); their parameters follow ours."""
        self._partner_ops = tuple(ops)

    @property
    def param_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.OWN_PARAMS + tuple(f"partner.{op.name}.{name}" for op in self._partner_ops
                                       for name in op.param_names)

    @property
    def param_specs(self) -> tuple[ParamSpec, ...]:  # type: ignore[override]
        return self._OWN_SPECS + tuple(spec for op in self._partner_ops for spec in op.param_specs)

    @property
    def param_encoding(self) -> dict[str, Any]:
        """The partner ops' declared store encodings, under the partner's parameter names."""
        from ..format import KNOWN_PARAM_ENCODINGS, ParamEncoding

        out = {}
        for op in self._partner_ops:
            declared = getattr(op, "param_encoding", None) or {}
            for name in op.param_names:
                encoding = declared.get(name) or KNOWN_PARAM_ENCODINGS.get(f"{op.name}.{name}")
                if isinstance(op, SourceOp):
                    # The store's crop encodings are relative to the record's own source; the partner's box is
                    # in the partner's pixels, so it is stored exactly as an integer instead.
                    encoding = ParamEncoding(kind="int", offset=0, width=1)
                if encoding is not None:
                    out[f"partner.{op.name}.{name}"] = encoding
        return out

    def __init__(self, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0, p: float = 1.0,
                 switch_prob: float = 0.5) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha == cutmix_alpha == 0:
            raise AugmentationError(
                f"{self.name} needs mixup_alpha >= 0 and cutmix_alpha >= 0, not both 0; got {mixup_alpha}, {cutmix_alpha}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.p = check_probability(self.name, "p", p)
        self.switch_prob = check_probability(self.name, "switch_prob", switch_prob)

    def sample(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        raise AugmentationError("mixing ops are sampled by the pipeline (they need the sample index)")

    @staticmethod
    def unmixed() -> np.ndarray:
        """Own parameters of a record that is not mixed."""
        return np.array([-1.0, NO_MIX, 1.0, 0.0, 0.0, 0.0, 0.0])

    def sample_mix(self, u: np.ndarray, sample: int, num_samples: int, pool: np.ndarray | None = None) -> np.ndarray:
        """Parameters of one record of sample ``sample`` of ``num_samples``. The partner is uniform over the
        other samples, or over the other members of ``pool`` (sorted sample indices) when given."""
        if u[0] >= self.p:
            return self.unmixed()
        if pool is None:
            partner = ((sample + 1 + min(int(u[1] * (num_samples - 1)), num_samples - 2)) % num_samples
                       if num_samples > 1 else sample)
        else:
            own = int(np.searchsorted(pool, sample))
            contains = own < len(pool) and int(pool[own]) == sample
            count = len(pool) - contains
            if count < 1:
                partner = sample
            else:
                pick = min(int(u[1] * count), count - 1)
                partner = int(pool[pick + 1 if contains and pick >= own else pick])
        if self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or u[2] < self.switch_prob):
            lam = beta_sample(u[8:], self.cutmix_alpha)
            cut = math.sqrt(1.0 - lam)
            top, bottom = max(u[3] - cut / 2, 0.0), min(u[3] + cut / 2, 1.0)
            left, right = max(u[4] - cut / 2, 0.0), min(u[4] + cut / 2, 1.0)
            h, w = bottom - top, right - left
            return np.array([partner, CUTMIX, 1.0 - h * w, top, left, h, w])
        lam = beta_sample(u[8:], self.mixup_alpha)
        return np.array([partner, MIXUP, lam, 0.0, 0.0, 0.0, 0.0])

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise AugmentationError("mixing ops are applied by the pipeline (they need the partner image)")

    def mix(self, images: torch.Tensor, partners: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Mix uint8 ``images[r]`` with ``partners[r]`` by ``params[r]`` (every record here is mixed)."""
        mode = params[:, 1].round()
        out = images.clone()
        rows = torch.nonzero(mode == MIXUP).flatten()
        if len(rows):
            lam = params[rows, 2].to(torch.float32).view(-1, 1, 1, 1)
            out[rows] = to_uint8(images[rows].to(torch.float32) * lam + partners[rows].to(torch.float32) * (1.0 - lam))
        rows = torch.nonzero(mode == CUTMIX).flatten()
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
