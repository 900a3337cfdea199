"""Crops (the source ops) and flips.

A crop resamples a box of whole source pixels to the output side with a separable filter whose integer weights
are computed on the host (format_spec.md 4.5.1), like Pillow's fixed-point resampler; the products are summed
exactly in integers and rounded once, so every device replays the same bytes. ``resample`` chooses the filter:

* ``"antialias"`` (default): PIL's BILINEAR, a triangle filter whose support grows with the downscale factor;
* ``"roi_align"``: the weights of :func:`torchvision.ops.roi_align` (``aligned=True``, adaptive sampling grid),
  i.e. each output pixel averages ``ceil(box / size)`` bilinear samples per axis of its bin: an area filter
  when shrinking, bilinear interpolation when enlarging.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..codecs import FLAG, Codec, IntCodec, relative
from ..errors import AugmentationError
from .base import AugmentOp, SampleContext, SourceOp, as_int, check_probability, check_range, libm, selected_rows

_MAX_TRIES = 10


RESAMPLERS = ("roi_align", "antialias")
WEIGHT_BITS = 14
"""Resampling weights are integers in units of ``2^-14`` (each pass sums at most 255 x (2^14 + taps))."""


def _quantize(weights: np.ndarray) -> np.ndarray:
    """int32 ``floor(v * 2^14 + 1/2)`` of binary64 weights ``v`` (``v * 2^14`` is exact)."""
    return np.floor(weights * float(1 << WEIGHT_BITS) + 0.5).astype(np.int32)


@functools.lru_cache(maxsize=4096)
def antialias_taps(extent: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ``[size, K]`` source offsets into the box, int32 ``[size, K]`` weights) of PIL's BILINEAR filter
    from a box side of ``extent`` pixels to ``size`` (format_spec.md 4.5.1), binary64 as written there."""
    scale = extent / size
    spread = max(scale, 1.0)
    support = spread  # the triangle's radius, 1, times the spread
    centers = (np.arange(size) + 0.5) * scale
    first = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(centers + support + 0.5), extent).astype(np.int64)
    taps = int((last - first).max())
    weights = np.zeros((size, taps))
    for k in range(taps):
        t = (first + k - centers + 0.5) / spread
        weights[:, k] = np.where(first + k < last, np.maximum(0.0, 1.0 - np.abs(t)), 0.0)
    total = np.zeros(size)
    for k in range(taps):  # left to right
        total = total + weights[:, k]
    normalized = weights / np.where(total == 0.0, 1.0, total)[:, None]
    offsets = np.minimum(first[:, None] + np.arange(taps), extent - 1)
    return offsets, _quantize(normalized)


@functools.lru_cache(maxsize=4096)
def roi_align_taps(start: int, extent: int, limit: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ``[size, K]`` source indices, int32 ``[size, K]`` weights) of roi_align along one axis: the box
    ``[start, start + extent)`` of an axis of ``limit`` pixels to ``size`` bins (format_spec.md 4.5.1)."""
    grid = -(-extent // size)
    bin_size = extent / size
    weights: dict[tuple[int, int], float] = {}
    for i in range(size):
        for g in range(grid):
            y = (start - 0.5) + i * bin_size + (g + 0.5) * bin_size / grid
            if y < -1.0 or y > limit:
                continue
            y = max(y, 0.0)
            low = math.floor(y)
            if low >= limit - 1:
                low = high = limit - 1
                y = float(low)
            else:
                high = low + 1
            upper = y - low
            weights[i, low] = weights.get((i, low), 0.0) + (1.0 - upper) / grid
            weights[i, high] = weights.get((i, high), 0.0) + upper / grid
    taps = max([sum(1 for (row, _) in weights if row == i) for i in range(size)] + [1])
    index = np.zeros((size, taps), dtype=np.int64)
    values = np.zeros((size, taps))
    filled = [0] * size
    for (i, source), weight in sorted(weights.items()):
        index[i, filled[i]], values[i, filled[i]] = source, weight
        filled[i] += 1
    return index, _quantize(values)


def _box_taps(box: Sequence[int], shape: Sequence[int], size: int, resample: str,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Absolute source (rows, row weights, columns, column weights) of a clamped box."""
    top, left, height, width = box
    if resample == "antialias":
        rows, row_weights = antialias_taps(height, size)
        columns, column_weights = antialias_taps(width, size)
        return rows + top, row_weights, columns + left, column_weights
    rows, row_weights = roi_align_taps(top, height, shape[0], size)
    columns, column_weights = roi_align_taps(left, width, shape[1], size)
    return rows, row_weights, columns, column_weights


def clamp_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """The box ``(top, left, height, width)`` rounded to whole pixels and clipped to the image."""
    top, left = min(int(round(box[0])), height - 1), min(int(round(box[1])), width - 1)
    h, w = min(max(int(round(box[2])), 1), height - top), min(max(int(round(box[3])), 1), width - left)
    return max(top, 0), max(left, 0), h, w


def _pass(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One exact resampling pass along dim 1 of ``values`` (whole rows, contiguous copies):
    ``sum_k weights[i, k] * values[:, index[i, k]]`` in ``dtype``, taps added one at a time."""
    accumulated = None
    for k in range(index.shape[1]):
        term = values.index_select(1, index[:, k]).to(dtype).mul_(weights[:, k].view(-1, 1))
        accumulated = term if accumulated is None else accumulated.add_(term)
    assert accumulated is not None
    return accumulated


def resample_box(image: torch.Tensor, box: Sequence[float], size: int, resample: str = "antialias",
                 ) -> torch.Tensor:
    """The source box ``(top, left, height, width)`` of uint8 ``[C, H, W]`` ``image`` (clamped by
    :func:`clamp_box`) resampled to uint8 ``[C, size, size]`` with integer weights (format_spec.md 4.5.1).

    The sum of products is exact and rounded once (``clip((acc + 2^27) >> 28, 0, 255)``), so the order of
    the passes does not change a byte: the vertical pass runs first, on whole rows in int32 (at most
    255 x (2^14 + taps)), then the horizontal one on the transposed result in int64.
    """
    height, width = image.shape[-2:]
    top, left, h, w = clamp_box(box, height, width)
    if resample == "antialias" and h == size and w == size:
        return image[:, top:top + h, left:left + w].clone()
    rows, row_weights, columns, column_weights = _box_taps((top, left, h, w), (height, width), size, resample)
    first, last = int(columns.min()), int(columns.max()) + 1
    device = image.device
    vertical = _pass(image[:, :, first:last], torch.from_numpy(rows).to(device),
                     torch.from_numpy(row_weights).to(device), torch.int32)
    both = _pass(vertical.transpose(1, 2), torch.from_numpy(columns - first).to(device),
                 torch.from_numpy(column_weights.astype(np.int64)).to(device), torch.int64)
    out = ((both + (1 << (2 * WEIGHT_BITS - 1))) >> (2 * WEIGHT_BITS)).clamp_(0, 255).to(torch.uint8)
    return out.transpose(1, 2).contiguous()


def resized_crop(image: torch.Tensor, box: Sequence[float], size: int) -> torch.Tensor:
    """The ``antialias`` resample of the source box ``(top, left, height, width)`` of ``image``
    (:func:`resample_box`)."""
    return resample_box(image, box, size, "antialias")


def crop_resize(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int, resample: str = "antialias",
                ) -> torch.Tensor:
    """Resample box ``boxes[r]`` = ``(top, left, height, width)`` (source pixels of ``images[r]``) of each uint8
    ``[C, H, W]`` image to uint8 ``[N, C, size, size]`` (:func:`resample_box`, one record at a time: the taps
    are host integers, so the boxes come to the host once)."""
    boxes_list = boxes.tolist()
    if all(tuple(image.shape[-2:]) == (size, size) and clamp_box(box, size, size) == (0, 0, size, size)
           for image, box in zip(images, boxes_list)):
        return torch.stack(list(images))  # crops already at the output size (replay_crops): one copy
    return torch.stack([resample_box(image, box, size, resample) for image, box in zip(images, boxes_list)])


def _check_resample(op: str, resample: str) -> str:
    if resample not in RESAMPLERS:
        raise AugmentationError(f"{op} resample must be one of {', '.join(RESAMPLERS)}, got {resample!r}")
    return resample


def source_box_codecs(op: str) -> tuple[Codec, ...]:
    """Codecs of a ``(top, left, height, width)`` box in source pixels: levels of the source's height/width."""
    return (relative("source_height"), relative("source_width"), relative("source_height", start=f"{op}.top"),
            relative("source_width", start=f"{op}.left"))


def partner_box_codecs(op: AugmentOp) -> tuple[Codec, ...]:
    """Codecs of a mixing partner's crop parameters: exact integers, since the levels would be relative to the
    record's own source, not the partner's."""
    return (IntCodec(),) * len(op.param_names)


def _boxes(top: np.ndarray, left: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.stack([top, left, h, w], axis=-1).astype(np.float64)


class RandomResizedCrop(SourceOp):
    """Crop a random area and aspect ratio of the source and resize it to the output side (RRC).

    Sampling follows torchvision's ``RandomResizedCrop``: up to ten tries at an area fraction uniform in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, on whole source pixels; then a central crop.

    Parameters (integer source pixels, so the box replays at any output size): ``top``, ``left`` (box corner,
    >= 0), ``height``, ``width`` (box size, >= 1; ``top + height <= H``, ``left + width <= W``).
    """

    name = "random_resized_crop"
    param_names = ("top", "left", "height", "width")

    def __init__(self, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 resample: str = "antialias") -> None:
        self.scale = check_range(self.name, "scale", scale, 0.0, 1.0)
        self.ratio = check_range(self.name, "ratio", ratio)
        self.resample = _check_resample(self.name, resample)

    @property
    def param_codecs(self) -> tuple[Codec, ...]:
        return source_box_codecs(self.name)

    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        heights, widths = context.heights, context.widths
        area = (heights * widths).astype(np.float64)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        out = np.empty((len(u), 4))
        pending = np.arange(len(u))
        for t in range(_MAX_TRIES):  # rows still looking for a box that fits
            if not pending.size:
                break
            rows, height, width = u[pending], heights[pending], widths[pending]
            target_area = area[pending] * (self.scale[0] + rows[:, 2 * t] * (self.scale[1] - self.scale[0]))
            aspect = libm(math.exp, log_lo + rows[:, 2 * t + 1] * (log_hi - log_lo))
            w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
            h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
            fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
            height, width, h, w, rows = height[fits], width[fits], h[fits], w[fits], rows[fits]
            top = np.minimum(as_int(rows[:, 2 * _MAX_TRIES + 2 * t] * (height - h + 1)), height - h)
            left = np.minimum(as_int(rows[:, 2 * _MAX_TRIES + 2 * t + 1] * (width - w + 1)), width - w)
            out[pending[fits]] = _boxes(top, left, h, w)
            pending = pending[~fits]
        for row in pending:
            out[row] = _central_crop(int(heights[row]), int(widths[row]), self.ratio)
        return out

    def apply_sources(self, images: Sequence[torch.Tensor], params: torch.Tensor, size: int) -> torch.Tensor:
        return crop_resize(images, params, size, self.resample)

    def _kwargs(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "ratio": list(self.ratio), "resample": self.resample}


def _central_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback box: the whole image, cut to the nearest aspect ratio in ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, min(height, int(round(width / ratio[0]))))
    elif in_ratio > ratio[1]:
        h, w = height, max(1, min(width, int(round(height * ratio[1]))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomCrop(SourceOp):
    """CropFlip's crop: resize the shorter side to ``size / crop_fraction``, then crop ``size`` x ``size``
    at a random position.

    Implemented as one resample of the equivalent source box: a square of side
    ``crop_fraction * min(H, W)`` source pixels at a random whole-pixel position.

    Parameters (integer source pixels): ``top``, ``left``, ``height``, ``width``.
    """

    name = "random_crop"
    param_names = ("top", "left", "height", "width")

    def __init__(self, crop_fraction: float = 0.875, resample: str = "antialias") -> None:
        self.crop_fraction = check_probability(self.name, "crop_fraction", crop_fraction)
        self.resample = _check_resample(self.name, resample)
        if self.crop_fraction == 0:
            raise AugmentationError("random_crop crop_fraction must be > 0")

    @property
    def param_codecs(self) -> tuple[Codec, ...]:
        return source_box_codecs(self.name)

    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        heights, widths = context.heights, context.widths
        side = np.maximum(1, np.rint(self.crop_fraction * np.minimum(heights, widths)).astype(np.int64))
        top = np.minimum(as_int(u[:, 0] * (heights - side + 1)), heights - side)
        left = np.minimum(as_int(u[:, 1] * (widths - side + 1)), widths - side)
        return _boxes(top, left, side, side)

    def apply_sources(self, images: Sequence[torch.Tensor], params: torch.Tensor, size: int) -> torch.Tensor:
        return crop_resize(images, params, size, self.resample)

    def _kwargs(self) -> dict[str, Any]:
        return {"crop_fraction": self.crop_fraction, "resample": self.resample}


class CenterCrop(SourceOp):
    """Evaluation-style crop: the central square of side ``crop_fraction * min(H, W)``. No parameters."""

    name = "center_crop"
    param_names = ()
    param_codecs: tuple[Codec, ...] = ()

    def __init__(self, crop_fraction: float = 0.875, resample: str = "antialias") -> None:
        self.crop_fraction = check_probability(self.name, "crop_fraction", crop_fraction)
        self.resample = _check_resample(self.name, resample)
        if self.crop_fraction == 0:
            raise AugmentationError("center_crop crop_fraction must be > 0")

    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        return np.empty((len(u), 0), dtype=np.float64)

    def apply_sources(self, images: Sequence[torch.Tensor], params: torch.Tensor, size: int) -> torch.Tensor:
        boxes = []
        for image in images:
            height, width = image.shape[-2:]
            side = max(1, int(round(self.crop_fraction * min(height, width))))
            boxes.append(((height - side) // 2, (width - side) // 2, side, side))
        return crop_resize(images, torch.tensor(boxes, dtype=torch.float64, device=images[0].device), size,
                           self.resample)

    def _kwargs(self) -> dict[str, Any]:
        return {"crop_fraction": self.crop_fraction, "resample": self.resample}


class HorizontalFlip(AugmentOp):
    """Mirror left-right with probability ``p``. Parameter: ``flip`` (0 or 1)."""

    name = "horizontal_flip"
    param_names = ("flip",)
    param_codecs: tuple[Codec, ...] = (FLAG,)

    def __init__(self, p: float = 0.5) -> None:
        self.p = check_probability(self.name, "p", p)

    def sample_batch(self, u: np.ndarray, context: SampleContext) -> np.ndarray:
        return (u[:, :1] < self.p).astype(np.float64)

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        flip = params[:, 0] >= 0.5
        rows = selected_rows(flip)
        if rows is None:
            return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        if not len(rows):
            return images
        out = images.clone()
        out[rows] = images[rows].flip(-1)
        return out

    def _kwargs(self) -> dict[str, Any]:
        return {"p": self.p}

