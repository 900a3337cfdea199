"""Conformance vectors: a tiny store per augmentation preset, its decoded bytes and replayed pixels.

``python tests/conformance/make_vectors.py`` rebuilds every case and rewrites ``vectors.json`` next to this
file; ``tests/test_conformance.py`` rebuilds them and asserts equality with the committed file. Regenerate
only for an intended format change (and then raise the format version, ``format_spec.md`` section 9).

What makes the vectors portable (the same on any CPU, thread count and torch version):

* The source images are computed with integer numpy arithmetic and written as PNG (lossless), so their
  pixels, sizes and fingerprints are exact. One file is not an image: the build skips it.
* The teacher (:class:`RankTeacher`) recovers the integer pixels, scores the 10 classes by exact integer
  sums over a 5 x 2 grid of the image, and outputs ``log`` of a fixed table of distinct integer weights
  that sum to 1000, assigned by rank. Its softmax is then ``weight / 1000`` up to float rounding (~1e-7),
  far from the rounding boundaries of the stored probabilities (multiples of 1/1000) and of the 63 entropy
  levels, and the top-k order is that of distinct integers. A real network's logits would depend on the
  BLAS kernels, the thread count and the torch version; this teacher's stored bytes depend only on the
  replayed pixels, which are themselves asserted bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from PIL import Image

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors.json"

IMAGE_SIZE = 32
REPLAY_SIZES = (32, 45)
NUM_CLASSES = 10
SETTINGS = dict(num_augmentations=4, top_k=3, seed=2024, batch_size=5, block_size=8, class_vocabulary=4,
                prob_scale=1000, cpu_threads=1, on_bad_image="skip")
# Shapes of the source images (height, width): a mix of aspect ratios, sizes below and above the output side.
SHAPES = ((37, 53), (48, 64), (29, 29), (80, 45), (33, 40), (64, 32), (41, 41), (27, 70), (56, 50), (35, 36),
          (90, 60))
BROKEN_NAME = "c1/img_99.png"
"""A file with an image extension that is not an image: the build records it as skipped."""
BROKEN_INDEX = 3
"""Its index in the source (ImageFolder order: c0/img_00, c0/img_10, c1/img_01, c1/img_99, c2/img_02, ...)."""
REPLAYED = ((0, 0), (2, 3), (5, 1), (7, 2), (9, 0), (11, 3))
"""(sample, slot) of the records whose decoded values and replayed pixels are kept."""

# Probability tables (distinct integers summing to 1000), one chosen per image by its pixel sum.
WEIGHT_TABLES = ((300, 200, 150, 110, 80, 60, 40, 30, 20, 10),
                 (410, 190, 120, 90, 70, 50, 30, 20, 15, 5),
                 (220, 180, 150, 130, 110, 80, 60, 40, 20, 10))


class RankTeacher(torch.nn.Module):
    """A deterministic 10-class teacher whose probabilities are exact-enough functions of integer pixel sums
    (see the module docstring). Expects inputs normalized with mean 0 and std 1 (``uint8 / 255``)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = torch.nn.Parameter(torch.tensor(WEIGHT_TABLES, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x * 255.0).round().to(torch.int64)
        weighted = pixels[:, 0] + 2 * pixels[:, 1] + 3 * pixels[:, 2]
        size_h, size_w = weighted.shape[-2:]
        rows = torch.arange(size_h) * 5 // size_h
        cols = torch.arange(size_w) * 2 // size_w
        cell = (rows[:, None] * 2 + cols[None, :]).to(weighted.device)
        scores = torch.zeros(len(x), NUM_CLASSES, dtype=torch.int64, device=x.device)
        scores.index_add_(1, cell.flatten(), weighted.flatten(1))
        order = torch.argsort(-scores, dim=1, stable=True)  # classes by descending score, ties by class
        ranks = torch.argsort(order, dim=1)
        table = self.tables[weighted.sum(dim=(1, 2)) % len(WEIGHT_TABLES)]
        return torch.log(torch.gather(table, 1, ranks))


def roi_align_config() -> dict[str, Any]:
    """The ``rrc`` preset with the roi_align resampler (an augmentation config file's content)."""
    return {"ops": [{"name": "random_resized_crop", "resample": "roi_align"}, {"name": "horizontal_flip", "p": 0.5}]}


def case_names() -> list[str]:
    from reinforce_loaders.augment import PRESETS

    return sorted(PRESETS) + ["rrc/roi_align"]


def source_image(number: int, height: int, width: int) -> np.ndarray:
    """A structured RGB uint8 ``(height, width, 3)`` image: a digit (nearest upscale), a gradient, a texture."""
    from sklearn.datasets import load_digits

    digit = load_digits().images[number].astype(np.int64) * 15  # 8 x 8, values 0..240
    y = np.arange(height)[:, None]
    x = np.arange(width)[None, :]
    red = digit[(y * 8) // height, (x * 8) // width]
    green = np.broadcast_to((x * 255) // max(width - 1, 1), (height, width))
    blue = ((x + 2 * y) * 37 + number * 11) % 256
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def write_source(root: Path) -> Path:
    """ImageFolder with the teacher's ten classes: the images of :data:`SHAPES` (class ``number % 10``) and one
    broken file."""
    for number, (height, width) in enumerate(SHAPES):
        path = root / f"c{number % NUM_CLASSES}" / f"img_{number:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source_image(number, height, width)).save(path)
    (root / BROKEN_NAME).write_bytes(b"not an image")
    return root


def build_case(name: str, source: Path, workdir: Path) -> Path:
    """Build the store of case ``name`` (a preset, or ``rrc/roi_align``) under ``workdir``; returns its path."""
    from reinforce.build import BuildConfig, run_build
    from reinforce.build.teachers import Ensemble, TeacherMember

    augment = name
    if name == "rrc/roi_align":
        config = workdir / "rrc_roi_align.json"
        config.write_text(json.dumps(roi_align_config()))
        augment = str(config)
    out = workdir / (name.replace("/", "_").replace("+", "_").replace("*", "x") + ".zarr")
    member = TeacherMember("rank_teacher", RankTeacher(), IMAGE_SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    threads = torch.get_num_threads()
    try:
        run_build(BuildConfig(source=str(source), out=str(out), augment=augment, image_size=IMAGE_SIZE, **SETTINGS),
                  ensemble=Ensemble([member]), progress=False)
    finally:
        torch.set_num_threads(threads)  # the build sets the process-wide thread count
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_digest(array: np.ndarray) -> dict[str, Any]:
    """dtype, shape and sha256 of an array's values as little-endian C-order bytes."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.str, "shape": list(array.shape), "sha256": sha256(array.tobytes())}


def case_vectors(source: Path, store: Path) -> dict[str, Any]:
    """The vectors of one built store: header settings, array digests, decoded records, replayed pixels."""
    from reinforce_loaders import ReinforcedDataset
    from reinforce_loaders import format as fmt

    group = zarr.open_group(str(store), mode="r")
    header = fmt.read_header(group)
    arrays = {name: array_digest(np.asarray(group[name][:]))
              for name in header.array_names if name != fmt.BLOCKS_DONE}
    decoded = fmt.read_all_records(group, header)
    dataset = ReinforcedDataset(source, store, transform=lambda image: image, target="sparse")
    records, pixels = [], {}
    for sample, slot in REPLAYED:
        records.append({"sample": sample, "slot": slot,
                        "indices": decoded.indices[sample, slot].tolist(),
                        "probs": [float(p) for p in decoded.probs[sample, slot]],
                        "params": [float(p) for p in decoded.params[sample, slot]],
                        "entropy": float(decoded.entropy[sample, slot])})
        for size in REPLAY_SIZES:
            image, _ = dataset.replay(sample, slot, size)
            assert image.dtype == torch.uint8 and image.shape == (3, size, size)
            pixels[f"{sample},{slot}@{size}"] = sha256(image.contiguous().numpy().tobytes())
    return {"header": header.settings(), "skipped": header.skipped_indices.tolist(), "arrays": arrays,
            "records": records, "pixels": pixels}


def compute_all(workdir: Path, names: list[str] | None = None) -> dict[str, Any]:
    source = write_source(workdir / "source")
    return {name: case_vectors(source, build_case(name, source, workdir)) for name in (names or case_names())}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vectors = compute_all(Path(tmp))
    document = {"about": "Conformance vectors of format_spec.md; regenerate with tests/conformance/make_vectors.py",
                "torch": torch.__version__, "cases": vectors}
    VECTORS.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(vectors)} cases to {VECTORS}")


if __name__ == "__main__":
    main()
