"""RandAugment and AugMix on uint8 batches with a different op and magnitude per record.

The op set and magnitude tables are torchvision's (``transforms.v2.RandAugment``); the pixel arithmetic is
integer or fixed point (format_spec.md 4.5.3), so every device replays the same bytes. Everything that depends
on an op's magnitude (affine coefficients in 16.16 fixed point, blend weights, posterize masks, solarize
thresholds) is tabulated once on the host per magnitude bin and gathered on the device; records are sorted by
op id once per step (one host sync for the group sizes), and each op runs once on its contiguous group.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..codecs import FRACTION_255, Codec, IntCodec
from ..errors import AugmentationError
from .base import (FRACTION_BITS, ONE, AugmentOp, SampleContext, as_int, blend, check_probability, fixed,
                   fixed_host, libm, normal_batch, round_fixed)

# Op ids, stored as parameters: never renumber, only append.
OP_NAMES = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
            "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = frozenset({"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                    "contrast", "sharpness"})
NO_MAGNITUDE = frozenset({"identity", "autocontrast", "equalize"})
OP_IDS = {name: index for index, name in enumerate(OP_NAMES)}
_SIGNED_IDS = np.array(sorted(OP_IDS[name] for name in SIGNED))
_NO_MAGNITUDE_IDS = np.array(sorted(OP_IDS[name] for name in NO_MAGNITUDE))
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
GREY_WEIGHTS = (19595, 38470, 7471)
"""Grey level ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``: ITU-R 601 luma in 16-bit fixed point (sums to 2^16)."""


# -- host tables: everything a magnitude bin decides, computed once per (bins, side) ------------------------

def _signed_fraction(bin_: int, num_bins: int) -> tuple[float, float]:
    """``(f, s)`` of a signed bin: ``f = |b| / (Bn - 1)`` and the sign ``s`` (binary64)."""
    return abs(bin_) / max(num_bins - 1, 1), (-1.0 if bin_ < 0 else 1.0)


def inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float],
                   shear: tuple[float, float]) -> list[float]:
    """The inverse affine matrix ``(m0, ..., m5)`` (scale 1) of format_spec.md 4.5.3, torchvision's convention:
    it maps output coordinates relative to the image centre to input coordinates; angles in degrees."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] = m[2] + cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] = m[5] + cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def _geometric_matrix(op: str, bin_: int, num_bins: int, height: int, width: int) -> list[float]:
    fraction, sign = _signed_fraction(bin_, num_bins)
    value = sign * fraction
    corner = (-0.5 * width, -0.5 * height)
    if op == "shear_x":
        return inverse_affine(corner, 0.0, (0.0, 0.0), (math.degrees(math.atan(value * 0.3)), 0.0))
    if op == "shear_y":
        return inverse_affine(corner, 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(value * 0.3))))
    if op == "translate_x":
        return inverse_affine((0.0, 0.0), 0.0, (float(int(value * (150.0 / 331.0 * width))), 0.0), (0.0, 0.0))
    if op == "translate_y":
        return inverse_affine((0.0, 0.0), 0.0, (0.0, float(int(value * (150.0 / 331.0 * height)))), (0.0, 0.0))
    return inverse_affine((0.0, 0.0), -(value * 30.0), (0.0, 0.0), (0.0, 0.0))  # rotate counter-clockwise


def affine_coefficients(matrix: list[float], height: int, width: int) -> tuple[int, ...]:
    """16.16 fixed-point ``(A, B, C, D, E, F)`` of an inverse matrix at ``height`` x ``width``: output pixel
    (row ``y``, column ``x``) reads source column ``(A x + B y + C + 2^15) >> 16`` and row
    ``(D x + E y + F + 2^15) >> 16`` (format_spec.md 4.5.3)."""
    m0, m1, m2, m3, m4, m5 = matrix
    x0, y0 = 0.5 - width / 2, 0.5 - height / 2
    c = m0 * x0 + m1 * y0 + m2 + (width / 2 - 0.5)
    f = m3 * x0 + m4 * y0 + m5 + (height / 2 - 0.5)
    return tuple(fixed_host(v) for v in (m0, m1, c, m3, m4, f))


@functools.lru_cache(maxsize=64)
def _affine_table(num_bins: int, height: int, width: int) -> np.ndarray:
    """int64 ``[5, 2 Bn - 1, 6]``: the coefficients of every geometric op (ids 1-5) at every signed bin."""
    bins = range(-(num_bins - 1), num_bins)
    return np.array([[affine_coefficients(_geometric_matrix(op, b, num_bins, height, width), height, width)
                      for b in bins] for op in GEOMETRIC], dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _bin_table(num_bins: int) -> np.ndarray:
    """int64 ``[3, 2 Bn - 1]`` per signed bin: the blend weight ``fixed(1 + (s f) 0.9)``, the posterize mask and
    the solarize threshold ``ceil(float32((1 - f) 255))``."""
    rows = []
    for b in range(-(num_bins - 1), num_bins):
        fraction, sign = _signed_fraction(b, num_bins)
        bits = min(max(round(8.0 - abs(b) / ((num_bins - 1) / 4.0)), 0), 8)
        threshold = math.ceil(float(np.float32((1.0 - fraction) * 255.0)))
        rows.append((fixed_host(1.0 + sign * fraction * 0.9), (255 << (8 - bits)) & 255, threshold))
    return np.array(rows, dtype=np.int64).T.copy()


_DEVICE_TABLES: dict[tuple[str, tuple[int, ...], str], torch.Tensor] = {}


def _on_device(name: str, table: Callable[..., np.ndarray], key: tuple[int, ...], device: torch.device,
               ) -> torch.Tensor:
    """A host table, copied once to ``device``."""
    cache_key = (name, key, str(device))
    if cache_key not in _DEVICE_TABLES:
        if len(_DEVICE_TABLES) > 256:
            _DEVICE_TABLES.clear()
        _DEVICE_TABLES[cache_key] = torch.from_numpy(table(*key)).to(device)
    return _DEVICE_TABLES[cache_key]


# -- the ops, on a group of records -------------------------------------------------------------------------

def affine(images: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour affine warp of uint8 ``[n, C, H, W]`` by int64 ``[n, 6]`` 16.16 coefficients (see
    :func:`affine_coefficients`), filling with 0 where the source pixel lies outside the image."""
    n, channels, height, width = images.shape
    device = images.device
    xs = torch.arange(width, device=device, dtype=torch.int64).view(1, 1, width)
    ys = torch.arange(height, device=device, dtype=torch.int64).view(1, height, 1)
    k = coefficients.view(n, 6, 1, 1)
    half = ONE // 2
    columns = (k[:, 0] * xs + k[:, 1] * ys + k[:, 2] + half) >> FRACTION_BITS
    rows = (k[:, 3] * xs + k[:, 4] * ys + k[:, 5] + half) >> FRACTION_BITS
    inside = (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
    index = (rows.clamp(0, height - 1) * width + columns.clamp(0, width - 1)).view(n, 1, height * width)
    warped = images.reshape(n, channels, height * width).gather(2, index.expand(n, channels, height * width))
    return torch.where(inside.view(n, 1, height, width), warped.view(n, channels, height, width),
                       torch.zeros((), dtype=torch.uint8, device=device))


def grey(images: torch.Tensor) -> torch.Tensor:
    """int32 ``[n, 1, H, W]`` grey level of RGB uint8 ``[n, 3, H, W]`` (:data:`GREY_WEIGHTS`)."""
    x = images.to(torch.int32)
    r, g, b = GREY_WEIGHTS
    return (x[:, 0:1] * r + x[:, 1:2] * g + x[:, 2:3] * b + ONE // 2) >> FRACTION_BITS


def mean_grey(images: torch.Tensor) -> torch.Tensor:
    """int32 ``[n, 1, 1, 1]``: the grey levels' mean per image, rounded half up (``(2 sum + p) // (2 p)``)."""
    pixels = images.shape[-1] * images.shape[-2]
    total = grey(images).to(torch.int64).sum(dim=(-3, -2, -1), keepdim=True)
    return ((2 * total + pixels) // (2 * pixels)).to(torch.int32)


def smooth(images: torch.Tensor) -> torch.Tensor:
    """int32 ``[n, C, H, W]``: pixels off the one-pixel border replaced by their 3 x 3 neighbourhood weighted
    ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13``, rounded to nearest (``(s + 6) // 13``; 13 is odd, no ties)."""
    x = images.to(torch.int32)
    height, width = x.shape[-2:]
    if height <= 2 or width <= 2:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    out[..., 1:-1, 1:-1] = (box + 4 * x[..., 1:-1, 1:-1] + 6) // 13
    return out


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Per image and channel, ``(x - lo) * 255 // (hi - lo)`` with ``lo``, ``hi`` its extremes; unchanged
    where ``hi = lo``."""
    x = images.to(torch.int32)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    stretched = torch.div((x - lo) * 255, span.clamp(min=1), rounding_mode="floor")
    return torch.where(span > 0, stretched, x).to(torch.uint8)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL's / torchvision's histogram equalization per image and channel, in integers (format_spec.md 4.5.3)."""
    n, channels, height, width = images.shape
    flat = images.reshape(n * channels, height * width).to(torch.int64)
    counts = torch.zeros((n * channels, 256), dtype=torch.int64, device=images.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    cumulative = counts.cumsum(1)
    present = torch.arange(256, device=images.device).expand_as(counts).masked_fill(counts == 0, -1)
    top_count = counts.gather(1, present.amax(1, keepdim=True))
    step = (height * width - top_count) // 255
    before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=1)
    lut = ((before + step // 2) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=images.device))
    return lut.gather(1, flat).to(torch.uint8).view(n, channels, height, width)


def _bins(magnitudes: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Table rows of signed magnitude bins: int64 ``b + Bn - 1``."""
    return torch.round(magnitudes).to(torch.int64).clamp(-(num_bins - 1), num_bins - 1) + (num_bins - 1)


def apply_op(images: torch.Tensor, op_id: int, magnitudes: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Apply op ``op_id`` to every record of a uint8 ``[n, C, H, W]`` batch; ``magnitudes[r]`` is record r's
    signed magnitude bin in ``[-(num_bins - 1), num_bins - 1]``."""
    op = OP_NAMES[op_id]
    if op == "identity":
        return images
    rows = _bins(magnitudes.to(images.device), num_bins)
    if op in GEOMETRIC:
        table = _on_device("affine", _affine_table, (num_bins, *images.shape[-2:]), images.device)
        return affine(images, table[GEOMETRIC.index(op)].index_select(0, rows))
    if op in ("brightness", "color", "contrast", "sharpness", "posterize", "solarize"):
        per_bin = _on_device("bins", _bin_table, (num_bins,), images.device)
        if op == "posterize":
            return images & per_bin[1].index_select(0, rows).to(torch.uint8).view(-1, 1, 1, 1)
        if op == "solarize":
            threshold = per_bin[2].index_select(0, rows).view(-1, 1, 1, 1)
            return torch.where(images.to(torch.int64) >= threshold, 255 - images, images)
        return blend(images, _degenerate(images, op), per_bin[0].index_select(0, rows))
    if op == "autocontrast":
        return autocontrast(images)
    if op == "equalize":
        return equalize(images)
    raise AssertionError(op)


def _degenerate(images: torch.Tensor, op: str) -> torch.Tensor:
    if op == "brightness":
        return torch.zeros((), dtype=torch.int32, device=images.device)
    if op == "color":
        return grey(images)
    if op == "contrast":
        return mean_grey(images)
    return smooth(images)


def apply_grouped(images: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor, num_bins: int,
                  ) -> torch.Tensor:
    """Apply op ``op_ids[r]`` with magnitude ``magnitudes[r]`` to record r.

    Records are sorted by op id on the device; the group sizes are the one host sync. The geometric ops
    (ids 1-5) are one warp over their group, every other op one call over its group.
    """
    ids = torch.round(op_ids).to(torch.int64)
    counts = (ids.view(1, -1) == torch.arange(len(OP_NAMES), device=ids.device).view(-1, 1)).sum(1).tolist()
    if sum(counts) != len(ids):
        bad = ids[(ids < 0) | (ids >= len(OP_NAMES))][0]
        raise AugmentationError(f"augmentation op id {int(bad)} is not one of 0..{len(OP_NAMES) - 1}: "
                                "the stored parameters are damaged or from a newer version")
    if counts[0] == len(ids):
        return images
    order = torch.argsort(ids, stable=True)
    out = images.clone()
    bounds = np.cumsum([0, *counts]).tolist()
    geometric = (bounds[1], bounds[6])
    if geometric[1] > geometric[0]:
        rows = order[geometric[0]:geometric[1]]
        table = _on_device("affine", _affine_table, (num_bins, *images.shape[-2:]), images.device)
        flat = table.view(-1, 6)
        index = (ids.index_select(0, rows) - 1) * (2 * num_bins - 1) + _bins(magnitudes.index_select(0, rows),
                                                                           num_bins)
        out.index_copy_(0, rows, affine(images.index_select(0, rows), flat.index_select(0, index)))
    for op_id in range(6, len(OP_NAMES)):
        if counts[op_id]:
            rows = order[bounds[op_id]:bounds[op_id + 1]]
            out.index_copy_(0, rows, apply_op(images.index_select(0, rows), op_id, magnitudes.index_select(0, rows),
                                              num_bins))
    return out


def draw_ops(u: np.ndarray, ops: np.ndarray, magnitudes: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(op id, signed magnitude bin) ``(n, 2)`` of ``n`` records from five uniforms each, ``u`` ``(n, 5)``:
    ``u[0]`` picks the op uniformly from ``ops``, ``magnitudes(u[:, 1:4])`` gives the bins, and ``u[4] < 0.5``
    negates a signed op's bin. Ops without a magnitude get bin 0."""
    op_ids = ops[np.minimum(as_int(u[:, 0] * len(ops)), len(ops) - 1)]
    bins = magnitudes(u[:, 1:4])
    signed = np.isin(op_ids, _SIGNED_IDS) & (u[:, 4] < 0.5)
    bins = np.where(np.isin(op_ids, _NO_MAGNITUDE_IDS), 0, np.where(signed, -bins, bins))
    return np.stack([op_ids, bins], axis=-1).astype(np.float64)


class RandAugment(AugmentOp):
    """RandAugment with torchvision's op set (14 ops including identity) and magnitude tables.

    ``num_ops`` ops are drawn uniformly, each applied with probability ``p`` (else identity; 1.0 in the DR
    paper), at magnitude bin ``magnitude`` of ``num_magnitude_bins``; ``magnitude_std > 0`` draws the bin
    from a normal around ``magnitude`` (timm's ``mstd``) clipped to the bins. Signed ops take either sign
    with probability 1/2. Geometric ops use nearest interpolation and fill 0, as torchvision.

    Parameters, per op ``i`` in ``0..num_ops-1``:
    ``op{i}`` (integer op id in ``0..13``, see ``OP_NAMES``; 0 = identity) and
    ``magnitude{i}`` (integer signed bin in ``[-(num_magnitude_bins-1), num_magnitude_bins-1]``; 0 for ops
    without magnitude). Translations are a fraction of the output side, so they replay at any resolution.
    """

    name = "rand_augment"

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, p: float = 1.0,
                 magnitude_std: float = 0.5) -> None:
        if not 1 <= int(num_ops) <= 10:
            raise AugmentationError(f"rand_augment num_ops must be between 1 and 10, got {num_ops}")
        if int(num_magnitude_bins) < 2:
            raise AugmentationError(f"rand_augment num_magnitude_bins must be at least 2, got {num_magnitude_bins}")
        if not 0 <= int(magnitude) < int(num_magnitude_bins):
            raise AugmentationError(
                f"rand_augment magnitude must be a bin in [0, {int(num_magnitude_bins) - 1}], got {magnitude}")
        if not magnitude_std >= 0:
            raise AugmentationError(f"rand_augment magnitude_std must be >= 0, got {magnitude_std}")
        self.num_ops = int(num_ops)
        self.magnitude = int(magnitude)
        self.num_magnitude_bins = int(num_magnitude_bins)
        self.p = check_probability(self.name, "p", p)
        self.magnitude_std = float(magnitude_std)

    @property
    def param_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(name for i in range(self.num_ops) for name in (f"op{i}", f"magnitude{i}"))

    @property
    def param_codecs(self) -> tuple[Codec, ...]:
        top = self.num_magnitude_bins - 1
        return (IntCodec.spanning(0, len(OP_NAMES) - 1), IntCodec.spanning(-top, top)) * self.num_ops

    def _bins(self, u: np.ndarray) -> np.ndarray:
        """Magnitude bins from uniforms ``(n, 3)``: ``magnitude``, or with ``magnitude_std`` a rounded normal
        draw around it (``u[:, 0]``, ``u[:, 1]``), clipped to the bins."""
        if self.magnitude_std == 0:
            return np.full(len(u), self.magnitude, dtype=np.int64)
        value = self.magnitude + self.magnitude_std * normal_batch(u[:, 0], u[:, 1])
        return np.clip(np.rint(value), 0, self.num_magnitude_bins - 1).astype(np.int64)

    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        out = np.zeros((len(u), 2 * self.num_ops), dtype=np.float64)
        all_ops = np.arange(len(OP_NAMES))
        for i in range(self.num_ops):
            applied = u[:, 5 * self.num_ops + i] < self.p
            out[applied, 2 * i:2 * i + 2] = draw_ops(u[applied, 5 * i:5 * i + 5], all_ops, self._bins)
        return out

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_ops):
            images = apply_grouped(images, params[:, 2 * i], params[:, 2 * i + 1], self.num_magnitude_bins)
        return images

    def _kwargs(self) -> dict[str, Any]:
        return {"num_ops": self.num_ops, "magnitude": self.magnitude, "num_magnitude_bins": self.num_magnitude_bins,
                "p": self.p, "magnitude_std": self.magnitude_std}


class AugMix(AugmentOp):
    """AugMix as torchvision's ``AugMix`` (all ops): ``width`` chains of 1..``depth`` ops mixed with Dirichlet
    weights, then blended with the input by a Beta weight. Magnitude bins are uniform in ``[0, severity)`` of
    10 bins, signs random. Only ``alpha = 1`` is supported: its Beta and Dirichlet draws are exact functions
    of a few uniforms (normalized exponentials), other alphas would need a rejection sampler per weight.

    Parameters: ``weight0`` (fraction of the input image), ``weight1..weight{width}`` (fractions of each chain;
    all weights sum to 1), and per chain ``c`` and step ``d``: ``op{c}_{d}`` (op id as in RandAugment, 0 = step
    skipped) and ``magnitude{c}_{d}`` (signed bin in ``[-9, 9]``). 22 parameters at the default width 3, depth 3.
    """

    name = "augmix"
    _NUM_BINS = 10
    _OPS = np.array([OP_IDS[name] for name in OP_NAMES if name != "identity"])

    def __init__(self, severity: int = 3, width: int = 3, depth: int = -1, alpha: float = 1.0) -> None:
        if not 1 <= int(severity) <= 10:
            raise AugmentationError(f"augmix severity must be between 1 and 10, got {severity}")
        if not 1 <= int(width) <= 3:  # 3 chains use 53 of a record's 64 uniforms; a fourth would not fit
            raise AugmentationError(f"augmix width must be between 1 and 3, got {width}")
        if int(depth) == 0 or not -1 <= int(depth) <= 3:
            raise AugmentationError(f"augmix depth must be 1, 2, 3 or -1 (random 1..3), got {depth}")
        if float(alpha) != 1.0:
            raise AugmentationError(f"augmix supports alpha=1.0 only (got {alpha}); see the AugMix docstring")
        self.severity, self.width, self.depth, self.alpha = int(severity), int(width), int(depth), 1.0

    @property
    def param_names(self) -> tuple[str, ...]:  # type: ignore[override]
        weights = tuple(f"weight{i}" for i in range(self.width + 1))
        steps = tuple(name for c in range(self.width) for d in range(3)
                      for name in (f"op{c}_{d}", f"magnitude{c}_{d}"))
        return weights + steps

    @property
    def param_codecs(self) -> tuple[Codec, ...]:
        step = (IntCodec.spanning(0, len(OP_NAMES) - 1), IntCodec.spanning(-(self._NUM_BINS - 1), self._NUM_BINS - 1))
        return (FRACTION_255,) * (self.width + 1) + step * (3 * self.width)

    def _bins(self, u: np.ndarray) -> np.ndarray:
        return np.minimum(as_int(u[:, 0] * self.severity), self.severity - 1)

    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        width = self.width
        exps = -libm(math.log1p, -u[:, :width + 2].clip(max=1 - 2**-53))
        keep = exps[:, 0] / (exps[:, 0] + exps[:, 1])  # Beta(1, 1) as a ratio of exponentials
        chains = exps[:, 2:2 + width] / exps[:, 2:2 + width].sum(axis=1, keepdims=True) * (1.0 - keep[:, None])
        steps = np.zeros((len(u), width, 3, 2), dtype=np.float64)
        for c in range(width):
            base = width + 2 + 16 * c
            depth = (np.full(len(u), self.depth) if self.depth > 0
                     else 1 + np.minimum(as_int(u[:, base] * 3), 2))
            for d in range(3):
                rows = depth > d
                steps[rows, c, d] = draw_ops(u[rows, base + 1 + 5 * d:base + 6 + 5 * d], self._OPS, self._bins)
        return np.concatenate([keep[:, None], chains, steps.reshape(len(u), -1)], axis=1)

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        weights = fixed(params[:, :self.width + 1]).view(-1, self.width + 1, 1, 1, 1)
        mix = images.to(torch.int32) * weights[:, 0]
        first = self.width + 1
        for c in range(self.width):
            chain = images
            for d in range(3):
                column = first + 2 * (3 * c + d)
                chain = apply_grouped(chain, params[:, column], params[:, column + 1], self._NUM_BINS)
            mix += chain.to(torch.int32) * weights[:, 1 + c]
        return round_fixed(mix)

    def _kwargs(self) -> dict[str, Any]:
        return {"severity": self.severity, "width": self.width, "depth": self.depth, "alpha": self.alpha}
