"""``reinforce import fkd``: FKD's per-image soft-label files (szq0214/FKD) as a reinforce store.

Released layout, as described publicly (see the project's field notes): one ``torch.save`` file per training
image, mirroring the ImageFolder (``DIR/CLASS/IMAGE_STEM.tar``), holding every stored crop (500 by default) with
its RandomResizedCrop box, its horizontal-flip flag and its soft label: the top-k probabilities followed by their
class ids, both as floats (float16 when the release was saved in half precision). A file holds either a list of
per-crop ``(coords, flip, soft_label)`` or the three per-crop lists ``(coords, flips, soft_labels)``. ``coords``
are the box as fractions of the source image: ``(top / H, left / W, height / H, width / W)``.

Mapping: the box becomes ``random_resized_crop`` top, left, height, width in source pixels (rounded to whole
pixels, stored exactly), the flag ``horizontal_flip.flip``. Half-precision ids are exact only up to 2048, so a
float16 release of more classes is refused. Files are pickles: read only with ``--trust-pickle``, through
:mod:`.safe_unpickle`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reinforce_loaders.augment import AugmentPipeline, HorizontalFlip, RandomResizedCrop
from reinforce_loaders.source import ImageSource

from . import ImportFailure, ImportPlan, SampleRecords, import_header, released_content, sort_topk
from .safe_unpickle import load_pickle

WHAT = "FKD soft-label files (.tar)"
FLOAT16_EXACT_IDS = 2048
REPLAY_FIDELITY = ("approximate: imported from FKD, whose crop boxes are fractions of the source image (rounded "
                   "here to whole pixels) and whose teacher saw crops resized with PIL; this store replays them "
                   "with torchvision tensor ops")


def _as_array(value: Any) -> np.ndarray:
    return value.float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)


def _is_half(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float16


def crops_of(content: Any, file: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(coords (N, 4), flips (N,), soft labels (N, 2K), stored in float16)`` of a file in either layout."""
    if not isinstance(content, (list, tuple)) or not content:
        raise ImportFailure(f"{file} does not hold a list of crops")
    per_list = len(content) == 3 and isinstance(content[1], (list, tuple, torch.Tensor)) and len(content[1]) > 0 \
        and np.ndim(_as_array(content[1][0])) == 0
    triples = list(zip(*content)) if per_list else list(content)
    try:
        coords = np.stack([_as_array(crop[0]).reshape(4) for crop in triples])
        flips = np.array([bool(_as_array(crop[1])) for crop in triples])
        labels = np.stack([_as_array(crop[2]).reshape(-1) for crop in triples])
    except (TypeError, ValueError, IndexError) as error:
        raise ImportFailure(f"{file}: a crop is not (coords[4], flip, soft label[2k]) ({error})") from None
    if labels.shape[1] % 2:
        raise ImportFailure(f"{file}: a soft label has {labels.shape[1]} values; expected k probabilities then k ids")
    return coords, flips, labels, any(_is_half(crop[2]) for crop in triples)


def boxes_in_pixels(coords: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fractional ``(top, left, height, width)`` boxes -> whole source pixels, kept inside the image."""
    scale = np.array([height, width, height, width], dtype=np.float64)
    box = np.rint(coords * scale)
    box[:, 2] = np.clip(box[:, 2], 1, height)
    box[:, 3] = np.clip(box[:, 3], 1, width)
    box[:, 0] = np.clip(box[:, 0], 0, height - box[:, 2])
    box[:, 1] = np.clip(box[:, 1], 0, width - box[:, 3])
    return box


def read_sample(file: str, index: int, height: int, width: int, *, num_classes: int,
                trust_pickle: bool) -> SampleRecords:
    """Records of one FKD file (see :data:`~reinforce.importers.SampleReader`)."""
    coords, flips, labels, half = crops_of(load_pickle(file, trust_pickle=trust_pickle, what=WHAT), file)
    if half and num_classes > FLOAT16_EXACT_IDS:
        raise ImportFailure(f"{file} stores class ids in float16, exact only up to {FLOAT16_EXACT_IDS}, and the "
                            f"teacher has {num_classes} classes: ids are corrupted; import a float32 release")
    k = labels.shape[1] // 2
    ids = labels[:, k:]
    if not np.array_equal(ids, np.rint(ids)):
        raise ImportFailure(f"{file}: class ids {ids[0].tolist()} are not whole numbers")
    indices, probs = sort_topk(labels[:, :k], np.rint(ids).astype(np.int64))
    params = np.concatenate([boxes_in_pixels(coords, height, width), flips[:, None].astype(np.float64)], axis=1)
    return SampleRecords(params, indices, probs)


def fkd_files(root: Path, source: ImageSource, data: str | os.PathLike[str]) -> list[str]:
    """The release file of each source image: ``root/CLASS/STEM.tar`` (or ``root/CLASS/NAME.tar``); refuses a
    release with files for images the source does not have (made from another, larger dataset)."""
    files = []
    for index in range(len(source)):
        relative = Path(os.path.relpath(source.name_of(index), data))
        candidates = [root / relative.with_suffix(".tar"), root / relative.parent / (relative.name + ".tar")]
        found = next((str(path) for path in candidates if path.is_file()), None)
        if found is None:
            raise ImportFailure(f"no FKD file for source image {relative} (looked for {candidates[0]}); finish "
                                "downloading the release, then run the same command again")
        files.append(found)
    extra = sorted(set(map(str, root.rglob("*.tar"))) - set(files))
    if extra:
        raise ImportFailure(f"{extra[0]} is the file of no source image: the release has "
                            f"{len(files) + len(extra)} files, the source {len(source)} images; it was made from "
                            "another dataset: pass the --data it was made from")
    return files


def plan_import(root: Path, data: str | os.PathLike[str], *, trust_pickle: bool, image_size: int = 224,
                num_classes: int | None = None, block_size: int | None = None) -> ImportPlan:
    """Everything :func:`~reinforce.importers.convert` needs to import the FKD release in ``root``."""
    source = ImageSource.from_folder(data)
    files = fkd_files(root, source, data)
    with released_content(files[0]):
        coords, _, labels, _ = crops_of(load_pickle(files[0], trust_pickle=trust_pickle, what=WHAT), files[0])
    pipeline = AugmentPipeline([RandomResizedCrop(), HorizontalFlip(0.5)], image_size)
    header = import_header(source, pipeline, records=len(coords), top_k=labels.shape[1] // 2,
                           num_classes=num_classes, block_size=block_size, teacher="FKD soft-label teacher",
                           provenance={"imported_from": "szq0214/FKD", "import_source": str(root),
                                       "replay_fidelity": REPLAY_FIDELITY})
    reader = functools.partial(read_sample, num_classes=header.num_classes, trust_pickle=trust_pickle)
    return ImportPlan(header=header, source=source, files=files, reader=reader)


__all__: Sequence[str] = ("plan_import", "read_sample", "crops_of", "boxes_in_pixels")
