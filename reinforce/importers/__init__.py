"""``reinforce import``: convert stores released in other formats into reinforce stores.

Each importer (:mod:`.ml_dr`, :mod:`.fkd`) turns one released file per source sample into that sample's
records: augmentation parameters of this project's ops, top-k class indices and probabilities. The shared driver
here decodes the source images (for sizes and fingerprints), converts blocks of samples in parallel processes
(joblib) and writes them with :class:`~reinforce.build.writer.StoreWriter`, so an interrupted import resumes where it
stopped and the result does not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from reinforce_loaders import format as fmt
from reinforce_loaders.augment import AugmentPipeline
from reinforce_loaders.codecs import IntCodec, LinearCodec
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import ImageSource, decode_image, fingerprint
from tqdm import tqdm

from .. import __version__
from ..progress import bar_options
from ..build.writer import BlockResult, StoreWriter
from ..lifetime import exit_with_parent


class ImportFailure(ReinforceError):
    """A released file cannot be converted: missing, malformed, or using something this importer cannot map."""


UNEXPECTED_CONTENT = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RuntimeError,
                      ArithmeticError, MemoryError)
"""What Python raises when an importer meets content of another shape than a release's (a string where a number
belongs, a list one item short, a structure too large for memory): each becomes an :class:`ImportFailure`."""


@contextlib.contextmanager
def released_content(file: str) -> Iterator[None]:
    """Turn an error of unexpected content while reading ``file`` into an :class:`ImportFailure` naming it."""
    try:
        yield
    except ReinforceError:
        raise
    except UNEXPECTED_CONTENT as error:
        detail = str(error).splitlines()[0][:160] if str(error) else ""
        raise ImportFailure(f"{file} does not hold what a release file holds ({type(error).__name__}"
                            f"{': ' + detail if detail else ''}): the file is damaged or of another kind") from None


@dataclasses.dataclass(frozen=True)
class SampleRecords:
    """One sample's records: parameters ``(A, P)`` in pipeline order, top-k ``indices``/``probs`` ``(A, K)``
    sorted by descending probability (ties: lower class first)."""

    params: np.ndarray
    indices: np.ndarray
    probs: np.ndarray


SampleReader = Callable[[str, int, int, int], SampleRecords]
"""``reader(file, sample index, source height, source width)``; must be picklable (a module-level function
or a ``functools.partial`` of one), as blocks are converted in other processes."""


@dataclasses.dataclass
class ImportPlan:
    header: fmt.StoreHeader
    source: ImageSource
    files: list[str]
    """The released file of each sample, in sample order."""
    reader: SampleReader


@dataclasses.dataclass
class ImportSummary:
    out: str
    samples: int
    blocks_written: int
    seconds: float
    files_per_second: float

    def __str__(self) -> str:
        return (f"imported {self.samples} samples into {self.out}: {self.blocks_written} blocks written in "
                f"{self.seconds:.1f} s ({self.files_per_second:.1f} files/s)")


def sort_topk(values: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``(ids, values)`` in descending value order, ties by ascending class id (releases keep them
    unordered)."""
    values = np.asarray(values, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    order = np.lexsort((ids, -values), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)


def completed_entropy(probs: np.ndarray, num_classes: int) -> np.ndarray:
    """Entropy (nats) of a distribution known only by its top-k ``probs`` ``(..., K)``: the remaining mass is
    spread evenly over the other classes (the largest entropy the top-k allows)."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0, 1)
    known = -(probs * np.log(np.where(probs > 0, probs, 1))).sum(-1)
    rest = np.clip(1 - probs.sum(-1), 0, 1)
    others = max(num_classes - probs.shape[-1], 1)
    return known - rest * np.log(np.where(rest > 0, rest / others, 1))


def _convert_block(header: fmt.StoreHeader, block: int, paths: Sequence[str], labels: Sequence[int],
                   files: Sequence[str], reader: SampleReader, parent: int) -> tuple[int, BlockResult]:
    # joblib (loky) may start its worker processes from its own threads: no death signal, the polling alone.
    exit_with_parent(parent, death_signal=False)
    start, _ = header.block_range(block)
    codec = header.layout.params
    columns: dict[str, list[Any]] = {"sizes": [], "fingerprints": [], "params": [], "indices": [], "probs": []}
    for offset, (path, file) in enumerate(zip(paths, files)):
        image = decode_image(path)
        height, width = int(image.shape[1]), int(image.shape[2])
        with released_content(file):
            records = reader(file, start + offset, height, width)
            finite = np.isfinite(np.asarray(records.params, dtype=np.float64)).all() and np.isfinite(
                np.asarray(records.probs, dtype=np.float64)).all()
        if not finite:
            raise ImportFailure(f"{file} holds a parameter or probability that is not a finite number")
        if records.params.shape[0] != header.num_augmentations or records.indices.shape != (
                header.num_augmentations, header.top_k):
            raise ImportFailure(f"{file} holds {records.params.shape[0]} records of top-{records.indices.shape[-1]}, "
                                f"the other files {header.num_augmentations} of top-{header.top_k}")
        if records.indices.max(initial=0) >= header.num_classes or records.indices.min(initial=0) < 0:
            raise ImportFailure(f"{file} has a class id outside [0, {header.num_classes}): pass --num-classes")
        columns["sizes"].append((height, width))
        columns["fingerprints"].append(fingerprint(image))
        columns["params"].append(codec.quantize(records.params, height, width))
        columns["indices"].append(records.indices)
        columns["probs"].append(records.probs)
    probs = np.clip(np.stack(columns["probs"]), 0, 1)
    return block, BlockResult(
        start=start, labels=np.asarray(labels), fingerprints=np.asarray(columns["fingerprints"], dtype=np.uint64),
        image_sizes=np.asarray(columns["sizes"]), aug_params=np.stack(columns["params"]),
        topk_indices=np.stack(columns["indices"]), topk_probs=probs,
        teacher_entropy=completed_entropy(probs, header.num_classes))


def convert(plan: ImportPlan, out: str | os.PathLike[str], *, workers: int = 1, progress: bool = True,
            ) -> ImportSummary:
    """Write (or resume) the store ``out`` from the released files of ``plan``, blocks in parallel."""
    began = time.perf_counter()
    header = plan.header
    writer = StoreWriter.create_or_resume(out, header, len(header.param_encodings or []))
    pending = writer.pending_blocks()
    paths = [plan.source.name_of(i) for i in range(len(plan.source))]
    labels = list(plan.source.targets or [])
    tasks = []
    for block in pending:
        start, stop = header.block_range(block)
        tasks.append(delayed(_convert_block)(header, block, paths[start:stop], labels[start:stop],
                                             plan.files[start:stop], plan.reader, os.getpid()))
    samples = sum(header.block_range(b)[1] - header.block_range(b)[0] for b in pending)
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    with tqdm(total=samples, unit="file", disable=not progress, desc="reinforce import",
              **bar_options()) as bar:
        try:
            for block, result in Parallel(n_jobs=max(1, workers), return_as="generator_unordered")(tasks):
                writer.write_block(block, result)
                bar.update(len(result.labels))
        except TerminatedWorkerError as error:  # a worker killed (out of memory, a signal) mid-block
            cause = str(error).split("The exit codes of the workers are", 1)[-1].strip(" .{}\n")[:80]
            raise ImportFailure(f"a conversion process died ({cause or 'no exit code'}); the blocks written are "
                                "kept: run the same command again with --workers 1 to find the file") from None
    writer.finalize()
    seconds = time.perf_counter() - began
    return ImportSummary(out=str(out), samples=header.num_samples, blocks_written=len(pending), seconds=seconds,
                         files_per_second=samples / max(seconds, 1e-9))


ENTROPY_NOTE = ("estimated: the release keeps only the top-k, so the entropy spreads the remaining probability "
                "evenly over the other classes (an upper bound)")


def import_header(source: ImageSource, pipeline: AugmentPipeline, *, records: int, top_k: int,
                  num_classes: int | None, block_size: int | None, teacher: str,
                  provenance: dict[str, Any]) -> fmt.StoreHeader:
    """Header of a store imported from a release: exact integer crop boxes, the release's teacher named (its
    weights are not part of the release), and where the data came from in ``provenance``."""
    classes = num_classes or len(source.classes or [])
    return fmt.StoreHeader(
        num_samples=len(source), num_classes=classes, top_k=top_k, num_augmentations=records, seed=0,
        block_size=block_size or fmt.recommended_block_size(records), augmentation=pipeline.config(),
        teachers=[{"name": teacher, "input_size": pipeline.size, "mean": [0.485, 0.456, 0.406],
                   "std": [0.229, 0.224, 0.225], "weights_sha256": "unknown"}],
        class_names=source.classes, param_encodings=exact_encodings(pipeline),
        class_vocabulary_size=fmt.default_class_vocabulary_size(classes, records, top_k),
        provenance={"tool": f"reinforce {__version__}", "created": datetime.datetime.now(datetime.UTC).isoformat(),
                    "teacher_entropy": ENTROPY_NOTE, "seed": "not used: the parameters come from the release",
                    **provenance})


def exact_encodings(pipeline: AugmentPipeline) -> list[dict[str, Any]]:
    """The pipeline's parameter encodings with crop boxes as exact integers (the default relative codec would
    move a released box by up to side/510 pixels) and erasing boxes on the output pixel grid."""
    out = []
    for item in fmt.pipeline_param_encodings(pipeline):
        op = item["param"].split(".")[0]
        if op in ("random_resized_crop", "random_crop"):
            item = {"param": item["param"], **IntCodec(offset=0, width=1).to_dict()}
        elif op == "random_erasing":
            item = {"param": item["param"], **LinearCodec(lo=0.0, hi=1.0, levels=pipeline.size).to_dict()}
        out.append(item)
    return out


def released_files(root: Path, suffix: str, count: int, key: Callable[[Path], int | None]) -> list[str]:
    """The released file of each of ``count`` samples under ``root`` (``key`` maps a file to its sample index);
    refuses missing or duplicated samples, naming the first, and a file for a sample the source does not have
    (the release was made from another, larger dataset, whose images would not be these)."""
    found: dict[int, str] = {}
    for path in sorted(root.rglob(f"*{suffix}")):
        index = key(path)
        if index is None:
            continue
        if index >= count:
            raise ImportFailure(f"{path} is the file of sample {index}, but the source has {count} images: the "
                                f"release was made from another dataset of at least {index + 1} images; pass the "
                                "--data it was made from")
        if index in found:
            raise ImportFailure(f"two files for sample {index}: {found[index]} and {path}")
        found[index] = str(path)
    missing = [index for index in range(count) if index not in found]
    if missing:
        raise ImportFailure(f"{len(missing)} of {count} samples have no file in {root} (first: sample {missing[0]}); "
                            "finish downloading the release, then run the same command again")
    return [found[index] for index in range(count)]


def run_import(args: argparse.Namespace) -> ImportSummary:
    """``reinforce import FORMAT DIR --data SOURCE --out STORE`` (see the command's help)."""
    if args.format == "ml-dr":
        from .ml_dr import plan_import
    else:
        from .fkd import plan_import
    plan = plan_import(Path(args.dir), args.data, trust_pickle=args.trust_pickle, image_size=args.image_size,
                       num_classes=args.num_classes, block_size=args.block_size)
    return convert(plan, args.out, workers=args.workers, progress=not args.no_progress)


__all__ = ["ImportFailure", "ImportPlan", "ImportSummary", "SampleRecords", "completed_entropy", "convert",
           "exact_encodings", "import_header", "released_content", "released_files", "run_import", "sort_topk"]
