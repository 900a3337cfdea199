"""The build pipeline: source images -> augmented records -> ensemble top-k -> store blocks.

:class:`BlockProcessor` turns one block of samples into a :class:`~reinforce.writer.BlockResult` and is plain
Python, usable by any scheduler. :func:`run_build` drives it over every pending block, in this process or on
Ray workers (see :mod:`reinforce.engine`); every worker writes its blocks straight to the store.

The bytes of a block do not depend on where or when it is computed: records are sampled from keyed RNG
streams, each block is cut into the same micro-batches (``batch_size`` records, in (sample, slot) order)
wherever it runs, and everything else that changes the teacher's arithmetic (precision, memory format,
compilation, device type) is recorded in the header's ``compute`` settings, which a resumed build must match.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from reinforce_loaders import format as fmt
from reinforce_loaders import rng
from reinforce_loaders.augment import AugmentPipeline, make_pipeline
from reinforce_loaders.errors import ReinforceError, SourceError
from reinforce_loaders.source import ImageSource, fingerprint, open_source
from tqdm.auto import tqdm

from . import __version__
from .teachers import Ensemble, create_ensemble
from .writer import BlockResult, StoreWriter, store_bytes

Precision = Literal["auto", "fp32", "bf16", "fp16"]
BadImagePolicy = Literal["fail", "skip"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class BuildError(ReinforceError):
    """A build cannot go on: a block failed for good, the device ran out of memory, or the engine is misconfigured."""


@dataclasses.dataclass
class BuildConfig:
    """Settings of ``reinforce build`` (see the CLI for their meaning).

    ``workers`` and ``ray_address`` choose the engine: neither runs every block in this process; ``workers=N``
    starts a local Ray instance with N block workers; ``ray_address`` joins a running Ray cluster (``"auto"``
    or ``HOST:PORT``) with ``workers`` workers, by default as many as its CPUs (or GPUs with ``device=cuda``)
    allow.
    """

    source: str
    out: str
    teachers: Sequence[str] = ()
    augment: str = "rrc"
    image_size: int = 224
    num_augmentations: int = 8
    top_k: int = 5
    seed: int = 0
    batch_size: int = 256
    block_size: int | None = None  # None: format.recommended_block_size(num_augmentations)
    class_vocabulary: int | None = None  # None: format.default_class_vocabulary_size(...)
    prob_scale: int = fmt.DEFAULT_PROB_SCALE
    device: str = "cpu"
    decode_threads: int = 4
    teacher_input_size: int | None = None
    teacher_mean: Sequence[float] | None = None
    teacher_std: Sequence[float] | None = None
    precision: Precision = "auto"
    channels_last: bool = True
    compile: bool = False
    on_bad_image: BadImagePolicy = "fail"
    workers: int | None = None
    ray_address: str | None = None
    cpu_threads: int | None = None
    max_retries: int = 2

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def resolved_precision(self) -> str:
        """``auto`` is bf16 on CUDA (fp16 where this machine's GPU lacks bf16) and fp32 elsewhere."""
        if self.precision != "auto":
            return self.precision
        if self.device_type != "cuda":
            return "fp32"
        return "fp16" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"

    @property
    def resolved_cpu_threads(self) -> int:
        """Torch threads of every worker, and the CPUs a Ray worker reserves.

        On the CPU the thread count changes the teachers' bytes, so every worker uses the same one, recorded in
        the store (default: this machine's cores, at most 8). On a GPU it does not, and a worker needs one CPU.
        """
        if self.cpu_threads is not None:
            return self.cpu_threads
        return min(os.cpu_count() or 1, 8) if self.device_type == "cpu" else 1

    def compute_settings(self) -> dict[str, Any]:
        """The settings beyond the header's own fields that change the stored bytes."""
        settings = {"batch_size": self.batch_size, "precision": self.resolved_precision,
                    "channels_last": self.channels_last, "compile": self.compile, "device_type": self.device_type}
        if self.device_type == "cpu":
            settings["cpu_threads"] = self.resolved_cpu_threads
        return settings

    @property
    def uses_ray(self) -> bool:
        return self.ray_address is not None or (self.workers or 0) > 0


@dataclasses.dataclass(frozen=True)
class SkippedSample:
    """A sample whose source image could not be read (``--on-bad-image skip``)."""

    index: int
    path: str
    reason: str = ""


@dataclasses.dataclass
class BlockStats:
    """What one finished block reports back to the driver."""

    block: int
    images: int
    skipped: list[SkippedSample]
    seconds: float
    worker: str = ""


@dataclasses.dataclass
class BuildSummary:
    images: int
    records: int
    blocks_written: int
    seconds: float
    store_bytes: int
    store_records: int
    skipped: list[SkippedSample] = dataclasses.field(default_factory=list)
    engine: str = "in-process"
    retries: int = 0

    @property
    def bytes_per_record(self) -> float:
        """Bytes on disk of the whole store per (sample, slot) record it holds."""
        return self.store_bytes / max(self.store_records, 1)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    def __str__(self) -> str:
        rate = self.images_per_second
        text = (f"images {self.images}  records {self.records}  store {self.store_bytes:,} bytes "
                f"({self.bytes_per_record:.1f} bytes/record)  {rate:.3g} images/s, "
                f"{rate * self.records / max(self.images, 1):.1f} records/s over {self.blocks_written} blocks "
                f"in {self.seconds:.1f} s ({self.engine}")
        text += f", {self.retries} block retries)" if self.retries else ")"
        if self.skipped:
            text += f"\nskipped {len(self.skipped)} unreadable images (listed in the store header):"
            text += "".join(f"\n  sample {s.index}: {s.path}{f'  ({s.reason})' if s.reason else ''}"
                            for s in self.skipped)
        return text


@dataclasses.dataclass
class LoadedBlock:
    """Decoded images of a block; ``images[i]`` is None for a skipped sample."""

    start: int
    images: list[torch.Tensor | None]
    labels: np.ndarray
    fingerprints: np.ndarray
    skipped: list[SkippedSample]
    partner_pool: np.ndarray | None = None
    """Samples the block's records may mix with (mixing pipelines), see ``rng.partner_pool``."""
    partners: dict[int, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    """Decoded pool images outside the block (None: unreadable, skipped)."""


class BlockProcessor:
    """Computes the records of a block of samples: decode once, augment every slot, run the ensemble.

    :meth:`load` (decoding, thread pool) and :meth:`compute` (augmentation and teachers on ``device``) are
    separate so a caller can decode the next block while this one computes; :meth:`process` does both.
    """

    def __init__(self, source: ImageSource, pipeline: AugmentPipeline, ensemble: Ensemble, *,
                 num_augmentations: int, top_k: int, seed: int, batch_size: int, device: str = "cpu",
                 decode_threads: int = 4, precision: str = "fp32", channels_last: bool = True,
                 compile: bool = False, on_bad_image: BadImagePolicy = "fail", cpu_threads: int | None = None,
                 partner_pool_size: int | None = None) -> None:
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)  # process-wide: CPU results depend on it
        if precision not in ("fp32", *_DTYPES):
            raise BuildError(f"unknown --precision {precision!r}: use fp32, bf16 or fp16")
        self.source = source
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.ensemble = prepare_ensemble(ensemble, self.device, channels_last=channels_last, compile=compile)
        self.num_augmentations = num_augmentations
        self.top_k = top_k
        self.seed = seed
        self.batch_size = batch_size
        self.precision = precision
        self.channels_last = channels_last
        self.on_bad_image = on_bad_image
        # Mixing partners of a block come from a pool of this many samples (None: the whole dataset).
        self.partner_pool_size = partner_pool_size
        self.param_codec = fmt.ParamCodec.for_pipeline(pipeline)
        self._pool = ThreadPoolExecutor(max_workers=max(decode_threads, 1), thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, start: int, stop: int) -> BlockResult:
        return self.compute(self.load(start, stop))

    def load(self, start: int, stop: int) -> LoadedBlock:
        """Decode samples ``[start, stop)`` in the thread pool; unreadable ones fail or are skipped."""
        outcomes = list(self._pool.map(self._load_one, range(start, stop)))
        skipped = [outcome for outcome in outcomes if isinstance(outcome, SkippedSample)]
        images = [None if isinstance(outcome, SkippedSample) else outcome[0] for outcome in outcomes]
        labels = np.array([self._label_of(start + i) if image is None else outcomes[i][1]
                           for i, image in enumerate(images)], dtype=np.int64)
        fingerprints = np.array([0 if image is None else outcomes[i][2] for i, image in enumerate(images)],
                                dtype=np.uint64)
        pool, partners = None, {}
        if self.pipeline.mixes and self.partner_pool_size is not None:
            pool = rng.partner_pool(self.seed, start, len(self.source), self.partner_pool_size)
            outside = [int(p) for p in pool if not start <= p < stop]
            partners = dict(zip(outside, self._pool.map(self._load_partner, outside), strict=True))
        return LoadedBlock(start=start, images=images, labels=labels, fingerprints=fingerprints, skipped=skipped,
                           partner_pool=pool, partners=partners)

    def _load_partner(self, index: int) -> torch.Tensor | None:
        """A mixing partner's image; None if it cannot be read and bad images are skipped."""
        try:
            return self.source.load(index)[0]
        except SourceError as error:
            if self.on_bad_image != "skip":
                raise SourceError(f"mixing partner: {error} (or pass --on-bad-image skip to leave the records "
                                  "that mix with it unmixed)") from error
            return None

    def _load_one(self, index: int) -> tuple[torch.Tensor, int, int] | SkippedSample:
        try:
            image, label = self.source.load(index)
            return image, label, fingerprint(image)
        except SourceError as error:
            if self.on_bad_image != "skip":
                raise SourceError(f"{error} (or pass --on-bad-image skip to record it as skipped)") from error
            return SkippedSample(index=index, path=self.source.name_of(index), reason=str(error.__cause__ or error))

    def _label_of(self, index: int) -> int:
        targets = self.source.targets
        return int(targets[index]) if targets is not None else -1

    def compute(self, loaded: LoadedBlock) -> BlockResult:
        """Augment every slot of every readable sample and keep the ensemble's top-k of each record."""
        n, a, k = len(loaded.images), self.num_augmentations, self.top_k
        present = [i for i, image in enumerate(loaded.images) if image is not None]
        sizes = np.array([image.shape[1:] if image is not None else fmt.SKIPPED_IMAGE_SIZE
                          for image in loaded.images], dtype=np.int64).reshape(n, 2)
        device_images = {i: loaded.images[i].to(self.device, non_blocking=True) for i in present}
        partner = self._partner_loader(loaded, device_images)
        params = np.zeros((n, a, self.pipeline.num_params), dtype=np.float64)
        for i in present:
            params[i] = self.pipeline.sample_slots(self.seed, loaded.start + i, a, sizes[i, 0], sizes[i, 1],
                                                   num_samples=len(self.source),
                                                   partner_size=lambda p: _size_or_none(partner(p)),
                                                   partner_pool=loaded.partner_pool)
        # The teacher sees the parameters as the store will hold them, so the student replays the same image.
        # (A skipped sample's zeros become whatever the encoding stores for them; its (0, 0) size flags it.)
        params = self.param_codec.quantize(params, sizes[:, :1], sizes[:, 1:])
        top_indices = np.zeros((n, a, k), dtype=np.int64)
        top_probs = np.zeros((n, a, k), dtype=np.float32)
        entropy = np.zeros((n, a), dtype=np.float32)
        records = [(i, j) for i in present for j in range(a)]
        if records:
            rows, cols = np.array(records).T
            for first in range(0, len(records), self.batch_size):
                r, c = rows[first:first + self.batch_size], cols[first:first + self.batch_size]
                partners = self.pipeline.partner_indices(params[r, c])
                partner_images = None if partners is None else [partner(p) if p >= 0 else None for p in partners]
                values, classes, entropy[r, c] = self._teacher_top_k(
                    [device_images[i] for i in r], params[r, c], partner_images)
                top_indices[r, c], top_probs[r, c] = classes, values
        return BlockResult(
            start=loaded.start,
            labels=loaded.labels,
            fingerprints=loaded.fingerprints,
            image_sizes=sizes,
            aug_params=params,
            topk_indices=top_indices,
            topk_probs=top_probs,
            teacher_entropy=entropy,
        )

    def _partner_loader(self, loaded: LoadedBlock, device_images: dict[int, torch.Tensor]):
        """Source image ``p`` on the device, for mixing ops: the block's own images, others decoded once per block.

        A partner that cannot be read fails the build, or with ``on_bad_image="skip"`` is None: the records
        that drew it are left unmixed (whether an image can be read does not depend on the block or worker).
        """
        cache: dict[int, torch.Tensor | None] = {loaded.start + i: image for i, image in device_images.items()}
        cache.update({loaded.start + i: None for i, image in enumerate(loaded.images) if image is None})
        cache.update({index: None if image is None else image.to(self.device, non_blocking=True)
                      for index, image in loaded.partners.items()})

        def partner(index: int) -> torch.Tensor | None:
            index = int(index)
            if index not in cache:  # only without a pool: partners are then drawn from the whole dataset
                image = self._load_partner(index)
                cache[index] = None if image is None else image.to(self.device, non_blocking=True)
            return cache[index]

        return partner

    @torch.inference_mode()
    def _teacher_top_k(self, images: list[torch.Tensor], params: np.ndarray,
                       partner_images: list[torch.Tensor | None] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k probabilities and classes, and the entropy (nats) of the mean distribution, of each record."""
        by_size = {}
        for size in self.ensemble.input_sizes:
            batch = self.pipeline.apply_batch(images, params, size, partner_images=partner_images)
            by_size[size] = batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch
        try:
            with torch.autocast(self.device.type, dtype=_DTYPES.get(self.precision, torch.float32),
                                enabled=self.precision in _DTYPES):
                probs = self.ensemble.probs(by_size).float()
        except torch.OutOfMemoryError as error:
            raise BuildError(
                f"the {self.device} device ran out of memory on a micro-batch of {len(images)} records: "
                f"try --batch-size {max(len(images) // 2, 1)} (on a new --out: a store's micro-batch size is fixed "
                f"when it is created)"
            ) from error
        entropy = torch.special.entr(probs).sum(-1)
        values, classes = top_k_stable(probs, self.top_k)
        return values.cpu().numpy(), classes.cpu().numpy(), entropy.cpu().numpy()


def prepare_ensemble(ensemble: Ensemble, device: torch.device, *, channels_last: bool, compile: bool) -> Ensemble:
    """Move the members to ``device`` (channels_last if asked) and optionally ``torch.compile`` them."""
    ensemble.to(device)
    for member in ensemble.members:
        if channels_last:
            member.module.to(memory_format=torch.channels_last)
        if compile and not getattr(member, "_compiled", False):
            member.module = torch.compile(member.module)
            member._compiled = True
    return ensemble


def top_k_stable(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by descending probability, ties broken by lower class index (``torch.topk`` gives no such order)."""
    values, classes = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[..., :k], classes[..., :k]


def versions() -> dict[str, str]:
    """Versions of everything that touches the stored bytes."""
    import numpy
    import timm

    found = {"reinforce": __version__, "torch": torch.__version__, "timm": timm.__version__,
             "zarr": zarr.__version__, "numpy": numpy.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["cudnn"] = str(torch.backends.cudnn.version())
    return found


def _size_or_none(image: torch.Tensor | None) -> tuple[int, int] | None:
    return None if image is None else (int(image.shape[1]), int(image.shape[2]))


def make_header(config: BuildConfig, source: ImageSource, pipeline: AugmentPipeline, ensemble: Ensemble,
                num_classes: int) -> fmt.StoreHeader:
    return fmt.StoreHeader(
        num_samples=len(source), num_classes=num_classes, top_k=config.top_k,
        num_augmentations=config.num_augmentations, seed=config.seed, block_size=config.block_size,
        augmentation=pipeline.config(), teachers=ensemble.describe(), class_names=source.classes,
        compute=config.compute_settings(), prob_scale=config.prob_scale,
        class_vocabulary_size=(fmt.default_class_vocabulary_size(num_classes, config.num_augmentations,
                                                                 config.top_k) if config.class_vocabulary is None
                               else min(config.class_vocabulary, num_classes)),
        provenance={
            "tool": f"reinforce {__version__}", "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "device": config.device, "torch": torch.__version__, "zarr": zarr.__version__,
            "python": platform.python_version(), "versions": versions(), "batch_size": config.batch_size,
            "teacher_files": [spec for spec in config.teachers],
        },
    )


def probe_num_classes(ensemble: Ensemble) -> int:
    """Number of classes the ensemble predicts, from one forward pass on a blank image (on the CPU)."""
    ensemble.to("cpu")
    images = {size: torch.zeros(1, 3, size, size, dtype=torch.uint8) for size in ensemble.input_sizes}
    return int(ensemble.probs(images).shape[-1])


def check_config(config: BuildConfig) -> None:
    if (config.top_k < 1 or config.num_augmentations < 1 or config.batch_size < 1
            or config.block_size is not None and config.block_size < 1):
        raise BuildError("--top-k, --num-augmentations, --batch-size and --block-size must all be at least 1")
    if config.class_vocabulary is not None and config.class_vocabulary < 0:
        raise BuildError(f"--class-vocabulary must be 0 (none) or more, got {config.class_vocabulary}")
    if not 500 < config.prob_scale < 65535:
        raise BuildError(f"--prob-scale must be in (500, 65535) so probabilities keep an error below 1e-3, "
                         f"got {config.prob_scale}")
    if config.on_bad_image not in ("fail", "skip"):
        raise BuildError(f"--on-bad-image must be fail or skip, got {config.on_bad_image!r}")
    if config.precision not in ("auto", "fp32", *_DTYPES):
        raise BuildError(f"--precision must be auto, fp32, bf16 or fp16, got {config.precision!r}")
    if config.workers is not None and config.workers < 0 or config.max_retries < 0:
        raise BuildError("--workers and --max-retries must not be negative")
    if config.cpu_threads is not None and config.cpu_threads < 1:
        raise BuildError("--cpu-threads must be at least 1")
    if config.device_type == "cuda" and not config.uses_ray and not torch.cuda.is_available():
        raise BuildError(f"--device {config.device} was asked for but CUDA is not available: use --device cpu")


def absolute(config: BuildConfig) -> BuildConfig:
    """The config with local paths made absolute, so workers with another working directory find them."""
    def teacher(spec: str) -> str:
        arch, sep, weights = spec.partition("=")
        return f"{arch}={os.path.abspath(weights)}" if sep and weights else spec

    source = os.path.abspath(config.source) if isinstance(config.source, (str, os.PathLike)) else config.source
    block_size = config.block_size or fmt.recommended_block_size(config.num_augmentations)
    return dataclasses.replace(config, source=source, out=os.path.abspath(config.out),
                               teachers=[teacher(spec) for spec in config.teachers], block_size=block_size)


def make_processor(config: BuildConfig, ensemble: Ensemble, source: ImageSource | None = None) -> BlockProcessor:
    """The :class:`BlockProcessor` a worker runs for ``config``."""
    return BlockProcessor(
        open_source(source if source is not None else config.source), make_pipeline(config.augment, config.image_size),
        ensemble, num_augmentations=config.num_augmentations, top_k=config.top_k, seed=config.seed,
        batch_size=config.batch_size, device=config.device, decode_threads=config.decode_threads,
        precision=config.resolved_precision, channels_last=config.channels_last, compile=config.compile,
        on_bad_image=config.on_bad_image, cpu_threads=config.resolved_cpu_threads,
        partner_pool_size=config.block_size)


def make_ensemble(config: BuildConfig) -> Ensemble:
    return create_ensemble(config.teachers, input_size=config.teacher_input_size, mean=config.teacher_mean,
                           std=config.teacher_std)


class BlockRunner:
    """Runs blocks with one processor and writes each straight to the store, marking it done.

    Up to two blocks may run at once from different threads: decoding and writing overlap, the device part
    (augmentation and teachers) takes turns.
    """

    def __init__(self, processor: BlockProcessor, writer: StoreWriter, name: str = "") -> None:
        self.processor = processor
        self.writer = writer
        self.name = name
        self._device_lock = threading.Lock()

    def run(self, block: int) -> BlockStats:
        began = time.perf_counter()
        start, stop = self.writer.header.block_range(block)
        loaded = self.processor.load(start, stop)
        with self._device_lock:
            result = self.processor.compute(loaded)
        self.writer.write_block(block, result)
        return BlockStats(block=block, images=stop - start, skipped=loaded.skipped,
                          seconds=time.perf_counter() - began, worker=self.name)


def skipped_in_store(writer: StoreWriter, source: ImageSource) -> list[SkippedSample]:
    """Every sample the store marks as skipped (``image_sizes`` of (0, 0)), with its source path."""
    sizes = np.asarray(writer.group[fmt.IMAGE_SIZES][:])
    indices = np.flatnonzero((sizes == np.array(fmt.SKIPPED_IMAGE_SIZE)).all(axis=1))
    return [SkippedSample(index=int(i), path=source.name_of(int(i))) for i in indices]


def run_build(config: BuildConfig, ensemble: Ensemble | None = None, progress: bool = True) -> BuildSummary:
    """Build (or resume) the store ``config.out``. ``ensemble`` overrides ``config.teachers``.

    Blocks already marked done are kept; the others are computed by the engine ``config`` chooses and
    written by whichever worker computed them. The store is marked complete only once every block is done.
    """
    from .engine import make_engine

    check_config(config)
    config = absolute(config)
    source = open_source(config.source)
    pipeline = make_pipeline(config.augment, config.image_size)
    if ensemble is None:
        ensemble = make_ensemble(config)
    num_classes = probe_num_classes(ensemble)
    if config.top_k > num_classes:
        raise BuildError(f"--top-k {config.top_k} exceeds the {num_classes} classes the teachers predict")
    header = make_header(config, source, pipeline, ensemble, num_classes)
    writer = StoreWriter.create_or_resume(config.out, header, pipeline.num_params)
    pending = writer.pending_blocks()
    total = int(sum(np.subtract(*reversed(writer.header.block_range(b))) for b in pending))
    a = config.num_augmentations
    skipped: list[SkippedSample] = []
    began = time.perf_counter()
    engine = make_engine(config, writer, ensemble, source, pipeline.num_params)
    with engine, tqdm(total=total, unit="img", disable=not progress, desc="reinforce build",
                      dynamic_ncols=True) as bar:
        for stats in engine.run(pending):
            skipped.extend(stats.skipped)
            bar.update(stats.images)
            rate = bar.format_dict.get("rate") or 0.0
            bar.set_postfix_str(f"{rate * a:.1f} rec/s, block {stats.block} by {stats.worker}"
                                + (f", {len(skipped)} skipped" if skipped else ""))
    seconds = time.perf_counter() - began
    by_index = {s.index: s for s in skipped}
    all_skipped = [by_index.get(s.index, s) for s in skipped_in_store(writer, source)]
    if all_skipped:
        provenance = {**writer.header.provenance,
                      "skipped": [{"index": s.index, "path": s.path} for s in all_skipped]}
        writer.header = dataclasses.replace(writer.header, provenance=provenance)
    writer.finalize()
    return BuildSummary(images=total, records=total * a, blocks_written=len(pending), seconds=seconds,
                        store_bytes=store_bytes(Path(config.out)), store_records=header.num_samples * a,
                        skipped=all_skipped, engine=engine.description, retries=engine.retries)

