"""RandAugment and AugMix on uint8 batches with a different op and magnitude per record.

The op set and magnitude tables are torchvision's (``transforms.v2.RandAugment``); each op is written once
for a batch with per-record magnitudes (affine ops as one ``grid_sample`` with per-record matrices, colour ops
as per-record blends), and the per-record loop of torchvision is replaced by grouping records by op id.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

from ..codecs import FRACTION_255, Codec, IntCodec
from ..errors import AugmentationError
from .base import AugmentOp, SampleContext, as_int, blend, check_probability, libm, normal_batch, to_uint8

# Op ids, stored as parameters: never renumber, only append.
OP_NAMES = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
            "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = frozenset({"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                    "contrast", "sharpness"})
NO_MAGNITUDE = frozenset({"identity", "autocontrast", "equalize"})
OP_IDS = {name: index for index, name in enumerate(OP_NAMES)}
_SIGNED_IDS = np.array(sorted(OP_IDS[name] for name in SIGNED))
_NO_MAGNITUDE_IDS = np.array(sorted(OP_IDS[name] for name in NO_MAGNITUDE))


def _affine(images: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    """Nearest-neighbour affine warp of ``[N, C, H, W]`` uint8 images with per-record inverse matrices
    (torchvision's convention: pixel coordinates relative to the image centre), filling with 0."""
    n, _, height, width = images.shape
    theta = torch.tensor(matrices, dtype=torch.float32, device=images.device).view(n, 2, 3)
    xs = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, width, device=images.device)
    ys = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, height, device=images.device)
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, device=images.device)], dim=-1)
    # Same order of float operations as torchvision's affine, so ties of the nearest lookup round alike.
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], device=images.device)
    grid = base.view(1, height * width, 3).expand(n, -1, -1).bmm(rescaled).view(n, height, width, 2)
    warped = nnf.grid_sample(images.to(torch.float32), grid, mode="nearest", padding_mode="zeros",
                             align_corners=False)
    return warped.round_().to(torch.uint8)


def _magnitude(op: str, fraction: float, sign: float, size: int) -> float:
    """torchvision's RandAugment magnitude of ``op`` at ``fraction`` of its range, signed."""
    top = {"shear_x": 0.3, "shear_y": 0.3, "translate_x": 150.0 / 331.0 * size, "translate_y": 150.0 / 331.0 * size,
           "rotate": 30.0}.get(op, 0.9)
    return sign * fraction * top


def _geometric(images: torch.Tensor, op: str, fractions: list[float], signs: list[float]) -> torch.Tensor:
    height, width = images.shape[-2:]
    matrices = []
    for fraction, sign in zip(fractions, signs):
        value = _magnitude(op, fraction, sign, width if op != "translate_y" else height)
        corner = [-0.5 * width, -0.5 * height]
        if op == "shear_x":
            m = _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0, [math.degrees(math.atan(value)), 0.0])
        elif op == "shear_y":
            m = _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0, [0.0, math.degrees(math.atan(value))])
        elif op == "translate_x":
            m = _get_inverse_affine_matrix([0.0, 0.0], 0.0, [float(int(value)), 0.0], 1.0, [0.0, 0.0])
        elif op == "translate_y":
            m = _get_inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, float(int(value))], 1.0, [0.0, 0.0])
        else:  # rotate: counter-clockwise by ``value`` degrees about the centre, as F.rotate
            m = _get_inverse_affine_matrix([0.0, 0.0], -value, [0.0, 0.0], 1.0, [0.0, 0.0])
        matrices.append(m)
    return _affine(images, matrices)


def apply_op(images: torch.Tensor, op_id: int, magnitudes: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Apply op ``op_id`` to every record of a uint8 ``[n, C, S, S]`` batch; ``magnitudes[r]`` is record r's
    signed magnitude bin in ``[-(num_bins - 1), num_bins - 1]``."""
    op = OP_NAMES[op_id]
    fraction = magnitudes.abs() / max(num_bins - 1, 1)
    sign = torch.where(magnitudes < 0, -1.0, 1.0).to(magnitudes.dtype)
    if op == "identity":
        return images
    if op in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        return _geometric(images, op, fraction.tolist(), sign.tolist())
    if op in ("brightness", "color", "contrast", "sharpness"):
        factor = 1.0 + sign * fraction * 0.9
        return blend(images, _degenerate(images, op), factor)
    if op == "posterize":
        bits = torch.round(8.0 - magnitudes.abs() / ((num_bins - 1) / 4.0)).to(torch.int64).clamp(0, 8)
        mask = ((255 << (8 - bits)) & 255).to(torch.uint8).view(-1, 1, 1, 1)
        return images & mask
    if op == "solarize":
        threshold = ((1.0 - fraction) * 255.0).to(torch.float32).view(-1, 1, 1, 1)
        return torch.where(images.to(torch.float32) >= threshold, 255 - images, images)
    if op == "autocontrast":
        return F.autocontrast(images)
    if op == "equalize":
        return F.equalize(images)
    raise AssertionError(op)


def _degenerate(images: torch.Tensor, op: str) -> torch.Tensor:
    if op == "brightness":
        return torch.zeros((), dtype=torch.float32, device=images.device)
    if op == "color":
        return F.rgb_to_grayscale(images, num_output_channels=3)
    if op == "contrast":
        gray = F.rgb_to_grayscale(images.to(torch.float32)).floor_()
        return gray.mean(dim=(-3, -2, -1), keepdim=True)
    return F.adjust_sharpness(images, 0.0)


def apply_grouped(images: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor, num_bins: int,
                  ) -> torch.Tensor:
    """Apply op ``op_ids[r]`` with magnitude ``magnitudes[r]`` to record r, one call per distinct op id."""
    out = images.clone()
    ids = op_ids.round().to(torch.int64)
    for op_id in torch.unique(ids).tolist():
        if op_id == 0:
            continue
        if not 0 < op_id < len(OP_NAMES):
            raise AugmentationError(f"augmentation op id {op_id} is not one of 0..{len(OP_NAMES) - 1}: "
                                    "the stored parameters are damaged or from a newer version")
        rows = torch.nonzero(ids == op_id).flatten()
        out[rows] = apply_op(images[rows], op_id, magnitudes[rows], num_bins)
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
        mix = images.to(torch.float32) * params[:, 0].to(torch.float32).view(-1, 1, 1, 1)
        first = self.width + 1
        for c in range(self.width):
            chain = images
            for d in range(3):
                column = first + 2 * (3 * c + d)
                chain = apply_grouped(chain, params[:, column], params[:, column + 1], self._NUM_BINS)
            mix += chain.to(torch.float32) * params[:, 1 + c].to(torch.float32).view(-1, 1, 1, 1)
        return to_uint8(mix)

    def _kwargs(self) -> dict[str, Any]:
        return {"severity": self.severity, "width": self.width, "depth": self.depth, "alpha": self.alpha}
