"""``reinforce import ml-dr``: the DR paper's released stores (apple/ml-dr) as reinforce stores.

Released layout, as described publicly (see the project's field notes): ``config.pth.tar`` holds the
augmentation config (``image_augmentation``: ops with ``enable`` flags and arguments), ``num_samples`` (records
per image, not the dataset size), ``topk`` and ``compress``; ``{index}.pth.tar`` holds ``(index, [record, ...])``
with each record a dict ``{"params": ..., "prob": (values, ids)}``, written with ``torch.save`` (pickles: read
only with ``--trust-pickle``, through :mod:`.safe_unpickle`). ``prob`` is the sparse top-k in no particular order.
With ``compress: true`` ``params`` is a list with one entry per enabled op, in the fixed op order below; with
``compress: false`` a dict keyed by op name. An op's entry may be its own parameters or the pair (own,
partner); a partner (mixing) is refused.

Mapping onto this project's ops (pipeline order RRC, flip, RandAugment, RandomErasing):

* ``random_resized_crop`` ``(i, j, h, w)`` in source pixels -> ``random_resized_crop`` top, left, height,
  width, stored exactly (``int`` codec: the default relative codec would move the box by up to side/510 px);
* ``random_horizontal_flip`` bool -> ``horizontal_flip.flip``;
* ``rand_augment`` ``[(op, signed magnitude bin), ...]`` -> ``rand_augment`` op ids in torchvision's op order
  (an op may also be given by name) and signed bins of 31;
* ``random_erase`` ``(i, j, h, w)`` in output pixels or None -> ``random_erasing`` fractions of the output side,
  stored exactly (``linear`` codec with one level per output pixel).

The teacher saw PIL-resized crops and ml-dr's own RandAugment and erasing; a student replays the same
parameters with torchvision tensor ops, so the pixels differ slightly: the header's provenance says so
(``replay_fidelity``), and ``benchmarks/publish.py`` measures the difference.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reinforce_loaders.augment import AugmentPipeline, HorizontalFlip, RandAugment, RandomErasing, RandomResizedCrop
from reinforce_loaders.augment.color import OP_IDS, OP_NAMES
from reinforce_loaders.source import ImageSource

from . import ImportFailure, ImportPlan, SampleRecords, import_header, released_content, released_files, sort_topk
from .safe_unpickle import load_pickle

WHAT = "apple/ml-dr files ({index}.pth.tar, config.pth.tar)"
CONFIG_NAME = "config.pth.tar"
FILE_PATTERN = re.compile(r"^(\d+)\.pth\.tar$")
OP_ORDER = ("random_resized_crop", "random_horizontal_flip", "rand_augment", "random_erase")
"""ml-dr ops that carry parameters, in the order of a compressed record."""
WITHOUT_PARAMS = frozenset({"uint8", "to_tensor", "normalize"})
MIXING = frozenset({"mixup", "cutmix"})
REPLAY_FIDELITY = ("approximate: imported from apple/ml-dr, whose teacher saw crops resized with PIL (bilinear) "
                   "and its own RandAugment and RandomErasing; this store replays the same parameters (crop and "
                   "erasing boxes exact) with torchvision tensor ops, so replayed pixels differ slightly from what "
                   "the teacher saw (measured in benchmarks/RESULTS.md)")


@dataclasses.dataclass(frozen=True)
class MlDrConfig:
    """What the importer needs from ``config.pth.tar``."""

    ops: tuple[str, ...]
    """Enabled ml-dr ops with parameters, in :data:`OP_ORDER`."""
    arguments: Mapping[str, Mapping[str, Any]]
    records_per_image: int | None
    top_k: int | None
    compress: bool


def _config_section(raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ImportFailure(f"{CONFIG_NAME} holds a {type(raw).__name__}, not a config dict")
    section = raw.get("reinforce", raw)
    if not isinstance(section, Mapping) or not isinstance(section.get("image_augmentation"), Mapping):
        raise ImportFailure(f"{CONFIG_NAME} has no 'image_augmentation' section: is this an ml-dr release?")
    return section


def parse_config(raw: Any) -> MlDrConfig:
    """Validate the release config: known ops only, no mixing (whose partners this importer cannot map)."""
    section = _config_section(raw)
    enabled = {name: dict(args) for name, args in section["image_augmentation"].items()
               if isinstance(args, Mapping) and args.get("enable", True)}
    mixing = sorted(MIXING & set(enabled))
    if mixing:
        raise ImportFailure(f"the release mixes images ({', '.join(mixing)}); importing mixed records is not "
                            "supported (their partner's augmentation is kept in another form): import a release "
                            "without mixup/cutmix")
    unknown = sorted(set(enabled) - set(OP_ORDER) - WITHOUT_PARAMS)
    if unknown:
        raise ImportFailure(f"the release uses augmentations this importer cannot map: {', '.join(unknown)}")
    if "random_resized_crop" not in enabled:
        raise ImportFailure("the release has no random_resized_crop: this importer maps RRC-based releases only")
    def optional_int(key: str) -> int | None:
        return int(section[key]) if section.get(key) is not None else None

    return MlDrConfig(ops=tuple(op for op in OP_ORDER if op in enabled), arguments=enabled,
                      records_per_image=optional_int("num_samples"), top_k=optional_int("topk"),
                      compress=bool(section.get("compress", True)))


def make_pipeline(config: MlDrConfig, size: int, num_ops: int) -> AugmentPipeline:
    """This project's pipeline replaying the release's ops."""
    args = config.arguments
    rrc = args["random_resized_crop"]
    ops: list[Any] = [RandomResizedCrop(scale=rrc.get("scale", (0.08, 1.0)), ratio=rrc.get("ratio", (3 / 4, 4 / 3)))]
    if "random_horizontal_flip" in config.ops:
        ops.append(HorizontalFlip(p=float(args["random_horizontal_flip"].get("p", 0.5))))
    if "rand_augment" in config.ops:
        ops.append(RandAugment(num_ops=num_ops, p=float(args["rand_augment"].get("p", 1.0))))
    if "random_erase" in config.ops:
        ops.append(RandomErasing(p=float(args["random_erase"].get("p", 0.25))))
    return AugmentPipeline(ops, size)


# ----------------------------------------------------------------------------------------------------------
# One record
# ----------------------------------------------------------------------------------------------------------

def _is_pair(op: str, entry: Any) -> bool:
    """Whether an op entry is ``(own, partner)`` rather than the op's own parameters: own crop and erasing
    boxes are 4 numbers (or None), a flip a bool, RandAugment a list of (op, magnitude) pairs."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        return False
    first = entry[0]
    if op == "random_horizontal_flip" or first is None:
        return True
    if op == "rand_augment":
        return isinstance(first, (list, tuple)) and (not first or isinstance(first[0], (list, tuple)))
    return isinstance(first, (list, tuple))


def _own(op: str, entry: Any, file: str) -> Any:
    """An op's own parameters; refuses a record that carries a partner's."""
    if isinstance(entry, torch.Tensor):
        entry = entry.tolist()
    if _is_pair(op, entry):
        own, partner = entry
        if partner is not None:
            raise ImportFailure(f"{file}: a record of {op} carries a mixing partner's parameters, which this "
                                "importer does not map")
        return own
    return entry


def _numbers(value: Any, count: int, what: str) -> list[float]:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count:
        raise ImportFailure(f"{what} is {value!r:.80}, expected {count} numbers")
    return numbers


def _rand_augment_op(op: Any, what: str) -> int:
    if isinstance(op, str):
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower()
        if name not in OP_IDS:
            raise ImportFailure(f"{what}: unknown RandAugment op {op!r} (known: {', '.join(OP_NAMES)})")
        return OP_IDS[name]
    if not 0 <= int(op) < len(OP_NAMES):
        raise ImportFailure(f"{what}: RandAugment op id {op} outside 0..{len(OP_NAMES) - 1}")
    return int(op)


def record_params(op_entries: Mapping[str, Any], size: int, height: int, width: int, num_ops: int,
                  file: str) -> list[float]:
    """One record's parameters in pipeline order from its ml-dr op entries (own parameters)."""
    out: list[float] = []
    top, left, h, w = _numbers(op_entries["random_resized_crop"], 4, f"{file}: crop")
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
        raise ImportFailure(f"{file}: crop box {(top, left, h, w)} is outside the {height}x{width} source image: "
                            "the files do not belong to this --data")
    out += [top, left, h, w]
    if "random_horizontal_flip" in op_entries:
        out.append(1.0 if bool(op_entries["random_horizontal_flip"]) else 0.0)
    if "rand_augment" in op_entries:
        pairs = list(op_entries["rand_augment"])
        if len(pairs) != num_ops:
            raise ImportFailure(f"{file}: {len(pairs)} RandAugment ops in a record, other records have {num_ops}")
        for op, magnitude in pairs:
            out += [float(_rand_augment_op(op, file)), float(int(magnitude))]
    if "random_erase" in op_entries:
        box = op_entries["random_erase"]
        out += [0.0] * 4 if box is None else [v / size for v in _numbers(box, 4, f"{file}: erasing box")]
    return out


def _op_entries(params: Any, ops: Sequence[str], compress: bool, file: str) -> dict[str, Any]:
    if compress:
        if not isinstance(params, (list, tuple)) or len(params) != len(ops):
            raise ImportFailure(f"{file}: compressed params should list {len(ops)} ops ({', '.join(ops)})")
        entries = dict(zip(ops, params))
    else:
        if not isinstance(params, Mapping) or not set(ops) <= set(params):
            raise ImportFailure(f"{file}: params should be a dict with {', '.join(ops)}")
        entries = {op: params[op] for op in ops}
    return {op: _own(op, entry, file) for op, entry in entries.items()}


def read_sample(file: str, index: int, height: int, width: int, *, config: MlDrConfig, size: int, num_ops: int,
                trust_pickle: bool) -> SampleRecords:
    """Records of one ``{index}.pth.tar`` file (see :data:`~reinforce.importers.SampleReader`)."""
    content = load_pickle(file, trust_pickle=trust_pickle, what=WHAT)
    if not (isinstance(content, (list, tuple)) and len(content) == 2 and isinstance(content[1], (list, tuple))):
        raise ImportFailure(f"{file} does not hold (index, [record, ...])")
    stored_index, records = content
    if int(stored_index) != index:
        raise ImportFailure(f"{file} holds sample {int(stored_index)}, expected {index}")
    params, ids, values = [], [], []
    for record in records:
        if not isinstance(record, Mapping) or "params" not in record or "prob" not in record:
            raise ImportFailure(f"{file}: a record is not a dict with 'params' and 'prob'")
        entries = _op_entries(record["params"], config.ops, config.compress, file)
        params.append(record_params(entries, size, height, width, num_ops, file))
        record_values, record_ids = (np.asarray(part.float() if isinstance(part, torch.Tensor) else part)
                                     for part in record["prob"])
        values.append(record_values)
        ids.append(record_ids)
    indices, probs = sort_topk(np.stack(values), np.stack(ids))
    return SampleRecords(np.asarray(params, dtype=np.float64), indices, probs)


def _first_record_shape(file: str, config: MlDrConfig, trust_pickle: bool) -> tuple[int, int, int]:
    """(records per file, top-k, RandAugment ops per record) from the first sample's file."""
    _, records = load_pickle(file, trust_pickle=trust_pickle, what=WHAT)
    if not records:
        raise ImportFailure(f"{file} holds no records")
    first = records[0]
    entries = _op_entries(first["params"], config.ops, config.compress, file)
    num_ops = len(list(entries["rand_augment"])) if "rand_augment" in entries else 0
    return len(records), len(first["prob"][0]), num_ops


def plan_import(root: Path, data: str | os.PathLike[str], *, trust_pickle: bool, image_size: int = 224,
                num_classes: int | None = None, block_size: int | None = None) -> ImportPlan:
    """Everything :func:`~reinforce.importers.convert` needs to import the ml-dr release in ``root``."""
    with released_content(str(root / CONFIG_NAME)):
        config = parse_config(load_pickle(root / CONFIG_NAME, trust_pickle=trust_pickle, what=WHAT))
        size = int(config.arguments["random_resized_crop"].get("size", image_size))
    source = ImageSource.from_folder(data)
    files = released_files(root, ".pth.tar", len(source), _sample_index)
    with released_content(files[0]):
        records, top_k, num_ops = _first_record_shape(files[0], config, trust_pickle)
    if config.records_per_image not in (None, records) or config.top_k not in (None, top_k):
        raise ImportFailure(f"{files[0]} holds {records} records of top-{top_k}; {CONFIG_NAME} says "
                            f"{config.records_per_image} of top-{config.top_k}")
    with released_content(str(root / CONFIG_NAME)):
        pipeline = make_pipeline(config, size, num_ops or 2)
    header = import_header(source, pipeline, records=records, top_k=top_k, num_classes=num_classes,
                           block_size=block_size, teacher="apple/ml-dr teacher ensemble",
                           provenance={"imported_from": "apple/ml-dr", "import_source": str(root),
                                       "replay_fidelity": REPLAY_FIDELITY})
    reader = functools.partial(read_sample, config=config, size=size, num_ops=num_ops, trust_pickle=trust_pickle)
    return ImportPlan(header=header, source=source, files=files, reader=reader)


def _sample_index(path: Path) -> int | None:
    match = FILE_PATTERN.match(path.name)
    return int(match.group(1)) if match else None
