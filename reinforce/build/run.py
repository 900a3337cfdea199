"""The build driver: source images -> augmented records -> ensemble top-k -> store blocks.

:func:`run_build` resolves a :class:`~reinforce.build.plan.BuildPlan` from the settings, the source and the
teachers, creates or resumes the store (the driver alone does), runs every pending block on the engine the
settings choose (:mod:`reinforce.build.engine`: in this process, or on Ray workers that write their blocks through
a :class:`~reinforce.build.writer.BlockSink`), and finalizes the store once every block is done. One block's work
is :class:`~reinforce.build.blocks.BlockRunner`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from reinforce_loaders import format as fmt
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import ImageSource, fingerprint
from tqdm.auto import tqdm

from .blocks import BlockProcessor, BlockRunner, BlockStats, LoadedBlock, SkippedSample, make_processor
from .engine import make_engine
from .plan import BuildConfig, BuildError, BuildPlan, open_build_source, resolve_plan
from ..progress import bar_options
from .teachers import Ensemble, create_ensemble
from .writer import StoreWriter, data_bytes, store_bytes, store_lock

__all__ = ["BlockProcessor", "BlockRunner", "BlockStats", "BuildConfig", "BuildError", "BuildPlan", "BuildSummary",
           "LoadedBlock", "SkippedSample", "make_ensemble", "make_processor", "resolve_plan", "run_build"]


@dataclasses.dataclass
class BuildSummary:
    """What a build did, and the store it leaves.

    ``images``/``records``/``blocks_written`` count this run's work (0 when the store was already complete);
    ``store_records`` is every record of the store (samples x augmentations). ``store_bytes`` counts every file
    of the store; ``data_bytes`` only the arrays' chunk and shard files, as ``reinforce inspect`` does.
    """

    images: int
    records: int
    blocks_written: int
    seconds: float
    store_bytes: int
    store_records: int
    skipped: list[SkippedSample] = dataclasses.field(default_factory=list)
    engine: str = "in-process"
    retries: int = 0
    data_bytes: int = 0
    already_complete: bool = False

    @property
    def bytes_per_record(self) -> float:
        """Bytes on disk of the whole store (data and metadata) per (sample, slot) record it holds."""
        return self.store_bytes / max(self.store_records, 1)

    @property
    def data_bytes_per_record(self) -> float:
        """Bytes of the arrays' data files per record: the figure ``reinforce inspect`` reports."""
        return self.data_bytes / max(self.store_records, 1)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    def _size_text(self) -> str:
        return (f"store {self.store_bytes:,} bytes on disk for {self.store_records} records: "
                f"{self.data_bytes_per_record:.2f} bytes/record in data files (as `reinforce inspect` counts), "
                f"{self.bytes_per_record:.2f} with metadata")

    def __str__(self) -> str:
        if self.already_complete:
            return f"already complete, nothing to do ({self._size_text()})"
        rate = self.images_per_second
        text = (f"images {self.images}  records {self.records}  {self._size_text()}\n"
                f"{rate:.3g} images/s, {rate * self.records / max(self.images, 1):.1f} records/s over "
                f"{self.blocks_written} blocks in {self.seconds:.1f} s ({self.engine}")
        text += f", {self.retries} block retries)" if self.retries else ")"
        if self.skipped:
            text += f"\nskipped {len(self.skipped)} unreadable images (listed in the store header):"
            text += "".join(f"\n  sample {s.index}: {s.path}{f'  ({s.reason})' if s.reason else ''}"
                            for s in self.skipped)
        return text


def make_ensemble(config: BuildConfig) -> Ensemble:
    return create_ensemble(config.teachers, input_size=config.teacher_input_size, mean=config.teacher_mean,
                           std=config.teacher_std)


VAL_CROP = 0.875
"""Center-crop ratio of the held-out images the teachers are scored on (``--val``): the usual ImageNet
evaluation (resize the short side to size / 0.875, crop size), timm's default ``crop_pct``."""


def open_val_set(config: BuildConfig, source: ImageSource, ensemble: Ensemble) -> Any:
    """``--val``'s images at the teachers' largest input size, refused up front (before any block is built) when
    its class folders are not the source's or the teachers predict another label space."""
    from ..evaluation import EvalSamples, check_classes

    num_classes = len(source.classes) if source.classes is not None else None
    if config.teacher_classes == "all" and ensemble.num_classes != num_classes:
        raise BuildError(f"--val scores the teachers against the dataset's labels, but they predict "
                         f"{ensemble.num_classes} classes (--teacher-classes all) and the dataset has "
                         f"{num_classes}: drop --val")
    val_set = EvalSamples(config.val_source, max(ensemble.input_sizes), VAL_CROP)
    try:
        check_classes(source.classes, val_set.classes, num_classes or ensemble.num_classes)
    except ReinforceError as error:
        raise BuildError(f"--val {config.val_source}: {error}") from None
    if not len(val_set):
        raise BuildError(f"--val {config.val_source} holds no images: pass the held-out split's directory")
    return val_set


def held_out_accuracy(ensemble: Ensemble, val_set: Any, device: str, val_source: str) -> dict[str, Any]:
    """The ensemble's top-1 on ``val_set`` (fp32, on ``device``): the header's ``provenance.teacher_accuracy``
    and what it was measured on (``teacher_accuracy_on``)."""
    from ..evaluation import held_out_top1

    ensemble.to(device)
    loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=min(4, os.cpu_count() or 1))
    top1, size = held_out_top1(ensemble, lambda _: loader)
    return {fmt.TEACHER_ACCURACY: round(top1, 4),
            fmt.TEACHER_ACCURACY_ON: {"split": Path(val_source).name, "images": len(val_set), "size": size,
                                      "crop": VAL_CROP}}


def skipped_in_store(writer: StoreWriter, source: ImageSource) -> list[SkippedSample]:
    """Every sample the store marks as skipped (``image_sizes`` of (0, 0)), with its source path."""
    sizes = np.asarray(writer.group[fmt.IMAGE_SIZES][:])
    indices = np.flatnonzero((sizes == np.array(fmt.SKIPPED_IMAGE_SIZE)).all(axis=1))
    return [SkippedSample(index=int(i), path=source.name_of(int(i))) for i in indices]


def run_build(config: BuildConfig, ensemble: Ensemble | None = None, progress: bool = True,
              report: Callable[[str], object] | None = None) -> BuildSummary:
    """Build (or resume) the store ``config.out``. ``ensemble`` overrides ``config.teachers``.

    Blocks already marked done are kept; the others are computed by the engine ``config`` chooses and
    written by whichever worker computed them. The store is marked complete only once every block is done.
    ``progress`` shows a bar counting images; the summary goes to ``report`` (default: printed when
    ``progress`` is on) and is returned.
    """
    config.validate()  # before the source is listed and the teachers loaded, which may take minutes
    source = open_build_source(config)
    if ensemble is None:
        ensemble = make_ensemble(config)
    plan = resolve_plan(config, source, ensemble)
    val_set = open_val_set(config, source, ensemble) if config.val_source else None
    if report is None and progress:
        report = print
    with store_lock(plan.config.out):
        summary = _build_locked(plan, ensemble, source, progress, val_set)
    if report is not None:
        report(f"{plan.config.out}: {summary}" if summary.already_complete else f"built {plan.config.out}: {summary}")
    return summary


def _build_locked(plan: BuildPlan, ensemble: Ensemble, source: ImageSource, progress: bool,
                  val_set: Any = None) -> BuildSummary:
    """Create or resume the store, run its pending blocks and finalize it (the caller holds the store lock)."""
    check_sample_count(plan, source)
    writer = StoreWriter.create_or_resume(plan.config.out, plan.header)
    plan = dataclasses.replace(plan, header=writer.header)
    if writer.header.complete:
        return _summary(plan, [], 0.0, [], engine="none", retries=0, already_complete=True)
    pending = writer.pending_blocks()
    total = sum(min(plan.block_size, plan.header.num_samples - block * plan.block_size) for block in pending)
    a = plan.header.num_augmentations
    skipped: list[SkippedSample] = []
    began = time.perf_counter()
    with make_engine(plan, writer, ensemble, source) as engine, tqdm(
            total=total, unit="img", disable=not progress, desc="reinforce build", dynamic_ncols=True,
            **bar_options()) as bar:
        records_heard = shown = 0  # since the last finished block: records reported, whole images shown

        def records_done(records: int) -> None:
            nonlocal records_heard, shown
            records_heard += records
            bar.update(records_heard // a - shown)
            shown = records_heard // a

        for stats in engine.run(pending, records_done):
            skipped.extend(stats.skipped)
            bar.update(stats.images - shown)  # the rest of the block (skipped images, a last partial image)
            records_heard = shown = 0
            rate = bar.format_dict.get("rate") or 0.0
            bar.set_postfix_str(f"{rate * a:.1f} rec/s, block {stats.block} by {stats.worker}"
                                + (f", {len(skipped)} skipped" if skipped else ""), refresh=False)
    seconds = time.perf_counter() - began
    by_index = {s.index: s for s in skipped}
    all_skipped = [by_index.get(s.index, s) for s in skipped_in_store(writer, source)]
    provenance = dict(writer.header.provenance)
    if all_skipped:
        provenance["skipped"] = [{"index": s.index, "path": s.path} for s in all_skipped]
    if val_set is not None:  # scored once every block is written; a crash here resumes to it
        device = plan.config.device  # a cluster's driver may have no GPU: it scores on its CPU then
        if plan.config.device_type == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        provenance.update(held_out_accuracy(ensemble, val_set, device, plan.config.val_source))
    writer.header = dataclasses.replace(writer.header, provenance=provenance)
    writer.finalize()
    return _summary(plan, pending, seconds, all_skipped, engine=engine.description, retries=engine.retries,
                    images=total)


def check_sample_count(plan: BuildPlan, source: ImageSource) -> None:
    """On resume, a source with another sample count than the store's is refused, naming where they part.

    Source and store are in the same sorted order, so the first sample whose fingerprint differs is where an
    image was added or removed; it is found by bisection over the samples already written (a few decodes).
    """
    path = Path(plan.config.out)
    if not (path / "zarr.json").is_file():
        return
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        header = fmt.StoreHeader.from_attrs(group.attrs.asdict())
        if header.num_samples == len(source):
            return
        written = np.repeat(np.asarray(group[fmt.BLOCKS_DONE][:]) > 0, header.block_size)[:header.num_samples]
        fingerprints = np.asarray(group[fmt.FINGERPRINTS][:])
    except Exception:  # noqa: BLE001 - not a readable store: create_or_resume says what is wrong with it
        return
    where = _first_difference(source, fingerprints, written & (fingerprints != 0))
    change = "fewer" if len(source) < header.num_samples else "more"
    raise BuildError(
        f"--out {path} was built from {header.num_samples} samples but {plan.config.source} has {len(source)} "
        f"({abs(header.num_samples - len(source))} {change}){where}: restore the source as it was to resume, "
        "or build a new --out")


def _first_difference(source: ImageSource, fingerprints: np.ndarray, known: np.ndarray) -> str:
    """Where source and store first differ, as text, by bisection over the samples whose fingerprint is known."""
    candidates = np.flatnonzero(known[:len(source)])
    if not len(candidates):
        return ""

    def same(index: int) -> bool:
        try:
            return fingerprint(source.load(index)[0]) == int(fingerprints[index])
        except Exception:  # noqa: BLE001 - an unreadable image differs too
            return False

    lo, hi = 0, len(candidates)  # candidates[:lo] agree, candidates[hi:] differ
    while lo < hi:
        middle = (lo + hi) // 2
        if same(int(candidates[middle])):
            lo = middle + 1
        else:
            hi = middle
    if lo == len(candidates):
        first = int(candidates[-1]) + 1
        return f"; samples 0..{first - 1} still match, so the change comes after {source.name_of(first - 1)}" \
            if first < len(source) else ""
    index = int(candidates[lo])
    before = f" (after {source.name_of(index - 1)})" if index > 0 else ""
    return (f"; they part at sample {index}: the source's {source.name_of(index)}{before} is not the image the "
            "store holds there, so an image around it was removed, added or replaced")


def _summary(plan: BuildPlan, pending: list[int], seconds: float, skipped: list[SkippedSample], *, engine: str,
             retries: int, images: int = 0, already_complete: bool = False) -> BuildSummary:
    a = plan.header.num_augmentations
    return BuildSummary(images=images, records=images * a, blocks_written=len(pending), seconds=seconds,
                        store_bytes=store_bytes(Path(plan.config.out)), data_bytes=data_bytes(Path(plan.config.out)),
                        store_records=plan.header.num_samples * a, skipped=skipped, engine=engine, retries=retries,
                        already_complete=already_complete)
