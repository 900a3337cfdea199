"""Crops (the source ops) and flips.

By default (``resample="antialias"``) a crop takes whole source pixels and resizes each record with
torchvision's antialiased bilinear ``resized_crop`` (its fast uint8 path on the CPU): the student's loader
then costs about what a standard torchvision loader costs, and the build loops over records for the crop.

``resample="roi_align"`` resamples the box with :func:`torchvision.ops.roi_align` (``aligned=True``, adaptive
sampling grid): each output pixel averages ``ceil(box / size)`` x ``ceil(box / size)`` bilinear samples of its
bin, i.e. an area filter when shrinking and bilinear interpolation when enlarging. ``roi_align`` takes a
different box per record, so many crops of many images resize in one call on any device (a faster build on a
GPU), at about twice the student's per-sample cost on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from ..codecs import FLAG, Codec, IntCodec, relative
from ..errors import AugmentationError
from .base import AugmentOp, SampleContext, SourceOp, as_int, check_probability, check_range, libm

_MAX_TRIES = 10


RESAMPLERS = ("roi_align", "antialias")


def crop_resize(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int, resample: str = "antialias",
                ) -> torch.Tensor:
    """Resample box ``boxes[r]`` = ``(top, left, height, width)`` (source pixels of ``images[r]``) of each uint8
    ``[C, H, W]`` image to uint8 ``[N, C, size, size]``.

    Records that share an image tensor (the build passes the same tensor for every slot of a sample) are
    resampled from one float copy of it, and images of one shape share one ``roi_align`` call.
    """
    if resample == "antialias":
        return _resized_crops(images, boxes, size)
    device = images[0].device
    channels = images[0].shape[0]
    out = torch.empty((len(images), channels, size, size), dtype=torch.uint8, device=device)
    unique: dict[int, int] = {}
    sources: list[torch.Tensor] = []
    owner = []
    for image in images:
        key = id(image)
        if key not in unique:
            unique[key] = len(sources)
            sources.append(image)
        owner.append(unique[key])
    owner_t = torch.tensor(owner, dtype=torch.int64)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for position, image in enumerate(sources):
        by_shape.setdefault(tuple(image.shape[-2:]), []).append(position)
    boxes = boxes.to(torch.float64)
    for members in by_shape.values():
        batch = torch.stack([sources[m] for m in members]).to(torch.float32)
        local = torch.full((len(sources),), -1, dtype=torch.int64)
        local[torch.tensor(members)] = torch.arange(len(members))
        records = torch.nonzero(local[owner_t] >= 0).flatten()
        b = boxes[records.to(boxes.device)]
        rois = torch.stack([local[owner_t[records]].to(boxes.device, torch.float64),
                            b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], dim=1).to(torch.float32)
        resized = roi_align(batch, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                            aligned=True)
        out[records.to(device)] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _resized_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Per record: whole-pixel crop of the box, antialiased bilinear resize (torchvision) to ``size``."""
    return torch.stack([resized_crop(image, box, size) for image, box in zip(images, boxes.tolist())])


def resized_crop(image: torch.Tensor, box: Sequence[float], size: int) -> torch.Tensor:
    """The source box ``(top, left, height, width)`` of ``image``, rounded to whole pixels and clipped to the
    image, resized to ``size`` x ``size`` with torchvision's antialiased bilinear filter."""
    height, width = image.shape[-2:]
    top, left = min(int(round(box[0])), height - 1), min(int(round(box[1])), width - 1)
    h, w = min(max(int(round(box[2])), 1), height - top), min(max(int(round(box[3])), 1), width - left)
    return F.resized_crop(image, top, left, h, w, [size, size], antialias=True)


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
        rows = torch.nonzero(params[:, 0] >= 0.5).flatten()
        if not len(rows):
            return images
        out = images.clone()
        out[rows] = images[rows].flip(-1)
        return out

    def _kwargs(self) -> dict[str, Any]:
        return {"p": self.p}

