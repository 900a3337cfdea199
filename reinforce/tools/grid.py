"""``reinforce inspect --grid``: a picture of a few samples, each with several stored records replayed.

Each row is one source sample; each cell one stored slot replayed from the source image, captioned with the
teacher's top classes and probabilities as stored (class names when the store has them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from reinforce_loaders import ReinforcedDataset

CAPTION_LINES = 3
LINE_HEIGHT = 12
PAD = 6
LABEL_WIDTH = 96


def _keep_uint8(image: torch.Tensor) -> torch.Tensor:
    return image


def pick_samples(num_samples: int, count: int) -> list[int]:
    """``count`` sample indices spread evenly over the dataset (first and last included)."""
    return sorted({int(i) for i in np.linspace(0, num_samples - 1, min(count, num_samples)).round()})


def _class_text(names: list[str] | None, index: int) -> str:
    name = names[index] if names and index < len(names) else str(index)
    return name if len(name) <= 14 else name[:13] + "."


def _cell(image: torch.Tensor, size: int) -> Image.Image:
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    # Small stores (tests, digits) are upscaled with visible pixels rather than blurred.
    resample = Image.Resampling.NEAREST if picture.width < size else Image.Resampling.BILINEAR
    return picture.resize((size, size), resample)


def replay_grid(store: Any, source: Any, out: str | os.PathLike[str], *, samples: int = 4, records: int = 6,
                cell: int = 128, storage_options: dict[str, Any] | None = None) -> Path:
    """Write a PNG of ``samples`` rows x ``records`` stored slots replayed at ``cell`` pixels; returns its path."""
    dataset = ReinforcedDataset(source, store, target="sparse", transform=_keep_uint8, verify="lazy",
                                storage_options=storage_options)
    names = dataset.classes or getattr(dataset.source, "classes", None)
    rows = pick_samples(dataset.header.num_samples, samples)
    rows = [index for index in rows if index not in set(dataset.header.skipped_indices.tolist())]
    slots = list(range(min(records, dataset.header.num_augmentations)))
    font = ImageFont.load_default()
    row_height = cell + CAPTION_LINES * LINE_HEIGHT + 2 * PAD
    canvas = Image.new("RGB", (LABEL_WIDTH + len(slots) * (cell + PAD) + PAD, len(rows) * row_height + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for row, index in enumerate(rows):
        top = PAD + row * row_height
        label = int(dataset.source.targets[index]) if dataset.source.targets is not None else -1
        draw.text((PAD, top), f"sample {index}", fill="black", font=font)
        draw.text((PAD, top + LINE_HEIGHT), f"label {_class_text(names, label) if label >= 0 else '?'}",
                  fill="black", font=font)
        for column, slot in enumerate(slots):
            image, (indices, probs) = dataset.replay(index, slot)
            left = LABEL_WIDTH + column * (cell + PAD)
            canvas.paste(_cell(image, cell), (left, top))
            for line, (klass, prob) in enumerate(zip(indices[:CAPTION_LINES].tolist(),
                                                     probs[:CAPTION_LINES].tolist())):
                draw.text((left, top + cell + 2 + line * LINE_HEIGHT), f"{_class_text(names, klass)}: {prob:.2f}",
                          fill="black", font=font)
    out = Path(out)
    canvas.save(out, format="PNG")
    return out
