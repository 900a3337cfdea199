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
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as nnf

from ..codecs import FLAG, Codec, IntCodec, relative
from ..errors import AugmentationError
from .base import AugmentOp, SampleContext, SourceOp, as_int, check_probability, check_range, libm, selected_rows

_MAX_TRIES = 10


RESAMPLERS = ("roi_align", "antialias")
WEIGHT_BITS = 14
"""Resampling weights are integers in units of ``2^-14`` (each pass sums at most 255 x (2^14 + taps))."""
_ROUND_SHIFT = 2 * WEIGHT_BITS  # out = (acc + 2^27) >> 28


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


class _Taps(NamedTuple):
    """The taps along one axis of a box: every source index a nonzero weight reads lies in ``[lo, hi)``;
    ``index`` (int64 ``[size, K]``) is relative to ``lo`` and lies in ``[0, hi - lo)`` (rows are padded with
    weight 0); ``weights`` int32 ``[size, K]``, also as binary32 and as binary64 times ``2^-28`` (the CPU's
    passes); ``total`` the largest sum of a row's weights."""

    lo: int
    hi: int
    index: torch.Tensor
    weights: torch.Tensor
    binary32: torch.Tensor
    scaled: torch.Tensor
    total: int


@functools.lru_cache(maxsize=4096)
def _cached_taps(resample: str, start: int, extent: int, limit: int, size: int) -> _Taps:
    if resample == "antialias":
        index, weights = antialias_taps(extent, size)
        index = index + start
    else:
        index, weights = roi_align_taps(start, extent, limit, size)
    read = index[weights != 0]
    if not read.size:
        read = index
    lo, hi = int(read.min()), int(read.max()) + 1
    return _Taps(lo, hi, torch.from_numpy(np.clip(index - lo, 0, hi - lo - 1)), torch.from_numpy(weights),
                 torch.from_numpy(weights.astype(np.float32)),
                 torch.from_numpy(np.ldexp(weights.astype(np.float64), -_ROUND_SHIFT)), int(weights.sum(1).max()))


def _axis_taps(resample: str, start: int, extent: int, limit: int, size: int) -> _Taps:
    """The taps of the box ``[start, start + extent)`` of an axis of ``limit`` pixels (format_spec.md 4.5.1)."""
    if resample == "antialias":  # the same taps wherever the box lies
        taps = _cached_taps(resample, 0, extent, 0, size)
        return taps._replace(lo=taps.lo + start, hi=taps.hi + start)
    return _cached_taps(resample, start, extent, limit, size)


def clamp_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """The box ``(top, left, height, width)`` rounded to whole pixels and clipped to the image."""
    top, left = min(int(round(box[0])), height - 1), min(int(round(box[1])), width - 1)
    h, w = min(max(int(round(box[2])), 1), height - top), min(max(int(round(box[3])), 1), width - left)
    return max(top, 0), max(left, 0), h, w


# Why the sums below are exact: every weight and pixel is a nonnegative integer, so a partial sum never exceeds
# the full one. A quantized weight is at most v * 2^14 + 1/2 and an axis' binary64 weights sum to at most 1, so
# a row of K weights sums to at most 2^14 + K/2: the first pass stays below 255 * (2^14 + K/2) < 2^24 for
# K < 98,000 taps (exact in binary32 and int32), the second below 255 * (2^14 + K/2)^2 < 2^53 (exact in
# binary64 and int64). _plan checks both bounds on every crop's actual weights.


def _plan(image: torch.Tensor, box: Sequence[float], size: int, resample: str) -> tuple[_Taps, _Taps]:
    """The row and column taps of ``box`` clamped to ``image``, their sums' bounds checked."""
    height, width = image.shape[-2:]
    top, left, h, w = clamp_box(box, height, width)
    rows, columns = _axis_taps(resample, top, h, height, size), _axis_taps(resample, left, w, width, size)
    if 255 * rows.total >= 1 << 24 or 255 * rows.total * columns.total >= 1 << 53:
        raise AugmentationError(f"crop of {h} x {w} pixels to {size}: too many taps for exact sums")
    return rows, columns


def _resample_cpu(image: torch.Tensor, rows: _Taps, columns: _Taps, size: int) -> torch.Tensor:
    """One crop on the CPU as two passes of weighted sums of whole rows (``embedding_bag``): the vertical pass
    on the box's rows in binary32, then the horizontal one on the rows of its transpose (the box's columns) in
    binary64, both exact by the bounds above. The second pass's weights carry the final ``2^-28`` (a power of
    two: still exact), so ``acc / 2^28 + 1/2`` truncates to the rounded pixel. The channels go with the rows
    (contiguous ``[C, H, W]``) or with the columns (``[H, W, C]`` memory, as decoded JPEGs come): no copy
    reorders them. Each intermediate is freed before the next is made: a low heap peak lets glibc keep its
    pages rather than return them and fault them in again on every crop (that costs more than the arithmetic)."""
    channels, height, width = image.shape[0], rows.hi - rows.lo, columns.hi - columns.lo
    interleaved = image.stride(0) == 1 and channels > 1
    box = image[:, rows.lo:rows.hi, columns.lo:columns.hi]
    lanes = torch.arange(channels).view(-1, 1, 1)
    if interleaved:  # pass 1 rows y of (x, c); pass 2 rows (x, c) of i, one bag per (c, j)
        region = torch.empty((height, width, channels), dtype=torch.float32).copy_(box.permute(1, 2, 0))
        region = region.view(height, width * channels)
        first = (rows.index, rows.binary32)
        second = ((columns.index * channels + lanes).view(channels * size, -1), columns.scaled.repeat(channels, 1))
    else:  # pass 1 rows (c, y) of x, one bag per (c, i); pass 2 rows x of (c, i)
        region = torch.empty((channels, height, width), dtype=torch.float32).copy_(box).view(-1, width)
        first = ((rows.index + lanes * height).view(channels * size, -1), rows.binary32.repeat(channels, 1))
        second = (columns.index, columns.scaled)
    vertical = nnf.embedding_bag(first[0], region, mode="sum", per_sample_weights=first[1])
    del region
    table = torch.empty(vertical.shape[::-1], dtype=torch.float64).copy_(vertical.t())
    del vertical
    both = nnf.embedding_bag(second[0], table, mode="sum", per_sample_weights=second[1])
    del table
    both = both.add_(0.5).clamp_(max=255.0)  # >= 1/2 (nonnegative sums); [C * S_j, S_i] or [S_j, C * S_i]
    out = torch.empty((channels, size, size), dtype=torch.uint8)  # the cast truncates: floor
    if interleaved:
        out.transpose(1, 2).copy_(both.view(channels, size, size))
    else:
        out.permute(2, 0, 1).copy_(both.view(size, channels, size))
    return out


def resample_box(image: torch.Tensor, box: Sequence[float], size: int, resample: str = "antialias",
                 ) -> torch.Tensor:
    """The source box ``(top, left, height, width)`` of uint8 ``[C, H, W]`` ``image`` (clamped by
    :func:`clamp_box`) resampled to uint8 ``[C, size, size]`` with integer weights (format_spec.md 4.5.1).

    The sum of products is exact and rounded once (``clip((acc + 2^27) >> 28, 0, 255)``), so neither the order
    of the passes nor the number type of the sums changes a byte.
    """
    if image.device.type != "cpu":
        return _resample_batch([image], [box], size, resample)[0]
    top, left, h, w = box = clamp_box(box, *image.shape[-2:])
    if resample == "antialias" and h == size and w == size:
        return image[:, top:top + h, left:left + w].clone(memory_format=torch.contiguous_format)
    return _resample_cpu(image, *_plan(image, box, size, resample), size)


def _stacked(taps: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[N, S, K]`` stack of ``[S, K_r]`` taps on ``device``, padded with zeros (relative index 0, weight 0)."""
    count = max(t.shape[1] for t in taps)
    return torch.stack([nnf.pad(t, (0, count - t.shape[1])) for t in taps]).to(device)


def _resample_batch(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[float]], size: int, resample: str,
                    budget: int = 1 << 24) -> torch.Tensor:
    """Every crop at once in integers, with no per-record work on the device (:func:`crop_resize` off the CPU).

    The distinct sources are concatenated into one flat buffer; the vertical pass gathers, tap by tap, the
    widest box's width of pixels from where each (record, channel, output row)'s tap row starts in its box
    (``unfold`` windows of the buffer + ``index_select``) and sums in int32; the horizontal pass gathers that
    sum's columns and sums in int64 (bounds above). Records go in chunks whose intermediates hold about
    ``budget`` elements each.
    """
    device, channels = images[0].device, images[0].shape[0]
    slots: dict[int, int] = {}
    sources: list[torch.Tensor] = []
    for image in images:
        if slots.setdefault(id(image), len(sources)) == len(sources):
            sources.append(image)
    starts = np.cumsum([0] + [image.numel() for image in sources])
    plans = [_plan(image, box, size, resample) for image, box in zip(images, boxes)]
    span = max(columns.hi - columns.lo for _, columns in plans)
    flat = torch.cat([image.reshape(-1) for image in sources] + [images[0].new_zeros(span)])
    windows = flat.unfold(0, span, 1)  # a view: the span pixels from every offset

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device)

    shapes = np.array([(image.shape[-2] * image.shape[-1], image.shape[-1]) for image in images], dtype=np.int64)
    corners = np.array([starts[slots[id(image)]] + rows.lo * image.shape[-1] + columns.lo
                        for image, (rows, columns) in zip(images, plans)], dtype=np.int64)
    row_index = _stacked([rows.index for rows, _ in plans], device)
    row_weights = _stacked([rows.weights for rows, _ in plans], device)
    column_index = _stacked([columns.index for _, columns in plans], device)
    column_weights = _stacked([columns.weights for _, columns in plans], device).long()
    plane, width = on_device(shapes).view(-1, 2, 1, 1).unbind(1)
    channel = torch.arange(channels, device=device).view(1, -1, 1, 1)
    offsets = (on_device(corners).view(-1, 1, 1, 1) + channel * plane.unsqueeze(1)
               + (row_index * width).unsqueeze(1))  # [N, C, S, K1]: where each tap's window starts
    step = max(1, budget // (channels * size * max(span, size)))
    out = []
    for first in range(0, len(images), step):
        chunk = slice(first, first + step)
        count, taps = len(offsets[chunk]), offsets.shape[-1]
        starts_k = offsets[chunk].permute(3, 0, 1, 2).reshape(taps, -1)  # [K1, n * C * S]
        weights_k = row_weights[chunk].unsqueeze(1).expand(-1, channels, -1, -1).permute(3, 0, 1, 2)
        weights_k = weights_k.reshape(taps, -1, 1)
        vertical = torch.zeros((starts_k.shape[1], span), dtype=torch.int32, device=device)
        for k in range(taps):
            vertical += windows.index_select(0, starts_k[k]) * weights_k[k]
        vertical = vertical.view(count, channels * size, span)
        both = torch.zeros((count, channels * size, size), dtype=torch.int64, device=device)
        for k in range(column_index.shape[-1]):
            gathered = vertical.gather(2, column_index[chunk, None, :, k].expand(-1, channels * size, -1))
            both += gathered * column_weights[chunk, None, :, k]
        out.append(((both + (1 << (_ROUND_SHIFT - 1))) >> _ROUND_SHIFT).clamp_(0, 255).to(torch.uint8)
                   .view(count, channels, size, size))
    return out[0] if len(out) == 1 else torch.cat(out)


def resized_crop(image: torch.Tensor, box: Sequence[float], size: int) -> torch.Tensor:
    """The ``antialias`` resample of the source box ``(top, left, height, width)`` of ``image``
    (:func:`resample_box`)."""
    return resample_box(image, box, size, "antialias")


def crop_resize(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int, resample: str = "antialias",
                ) -> torch.Tensor:
    """Resample box ``boxes[r]`` = ``(top, left, height, width)`` (source pixels of ``images[r]``) of each uint8
    ``[C, H, W]`` image to uint8 ``[N, C, size, size]`` (:func:`resample_box`): on the CPU one record at a
    time, elsewhere all at once (:func:`_resample_batch`). The taps are host integers, so the boxes come to the
    host once."""
    boxes_list = boxes.tolist()
    if all(tuple(image.shape[-2:]) == (size, size) and clamp_box(box, size, size) == (0, 0, size, size)
           for image, box in zip(images, boxes_list)):
        return torch.stack(list(images))  # crops already at the output size (replay_crops): one copy
    if images[0].device.type != "cpu":
        return _resample_batch(images, boxes_list, size, resample)
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

