"""One block of a build: decode and sample on the CPU, run the teachers on the device, write the block.

:class:`BlockProcessor` turns a block of samples into a :class:`~reinforce.build.writer.BlockResult` and is plain
Python, usable by any scheduler; :class:`BlockRunner` is the one block routine every engine runs (load, device
part under a lock, write to a :class:`~reinforce.build.writer.BlockSink`).

The bytes of a block do not depend on where or when it is computed: records are sampled from keyed RNG
streams, each block is cut into the same micro-batches (``batch_size`` records, in (sample, slot) order)
wherever it runs, and everything else that changes the teacher's arithmetic (precision, memory format,
compilation, device type) is recorded in the header's ``compute`` settings, which a resumed build must match.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from reinforce_loaders import format as fmt
from reinforce_loaders import rng
from reinforce_loaders.errors import SourceError
from reinforce_loaders.source import ImageSource, fingerprint

from .plan import BuildError, BuildPlan, open_build_source
from .teachers import Ensemble
from .writer import BlockResult, BlockSink

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

RecordsDone = Callable[[int], None]
"""Called with the number of records of each micro-batch as the teachers finish it (progress)."""


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
class LoadedBlock:
    """A block ready for the device: decoded images and every record's sampled, quantized parameters.

    ``images[i]`` is None for a skipped sample (its ``sizes`` row is (0, 0) and its parameters are unused).
    """

    start: int
    images: list[torch.Tensor | None]
    labels: np.ndarray
    fingerprints: np.ndarray
    sizes: np.ndarray
    """(n, 2) height and width of each decoded image."""
    params: np.ndarray
    """(n, A, P) parameters as the store holds them (quantized): what the teacher sees and the student replays."""
    param_columns: np.ndarray
    """(n, A, C) the same parameters encoded for the store (the writer writes them as they are)."""
    skipped: list[SkippedSample]
    partners: dict[int, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    """Decoded mixing partners outside the block (None: unreadable, left unmixed)."""
    began: float = dataclasses.field(default_factory=time.perf_counter)


class BlockProcessor:
    """Computes the records of a block of samples: decode once, sample every slot, augment, run the ensemble.

    :meth:`load` (decoding in a thread pool, then sampling and quantizing every record's parameters: CPU only)
    and :meth:`compute` (augmentation and teachers on the plan's device) are separate so a caller can load
    the next block while this one computes; :meth:`process` does both.
    """

    def __init__(self, plan: BuildPlan, ensemble: Ensemble, source: ImageSource | None = None) -> None:
        torch.set_num_threads(plan.cpu_threads)  # process-wide: CPU results depend on it
        config = plan.config
        self.plan = plan
        self.source = source if source is not None else open_build_source(config)  # a Ray worker lists it itself
        self.pipeline = plan.pipeline()
        self.device = torch.device(config.device)
        self.ensemble = prepare_ensemble(ensemble, self.device, channels_last=config.channels_last,
                                         compile=config.compile)
        self.param_layout = plan.header.layout.params
        self._pool = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, start: int, stop: int) -> BlockResult:
        return self.compute(self.load(start, stop))

    def load(self, start: int, stop: int) -> LoadedBlock:
        """Decode samples ``[start, stop)`` (unreadable ones fail or are skipped), and mixing partners from the
        block's pool; then sample and quantize the parameters of every record."""
        began = time.perf_counter()
        outcomes = list(self._pool.map(self._load_one, range(start, stop)))
        skipped = [outcome for outcome in outcomes if isinstance(outcome, SkippedSample)]
        images = [None if isinstance(outcome, SkippedSample) else outcome[0] for outcome in outcomes]
        labels = np.array([self._label_of(start + i) if image is None else outcomes[i][1]
                           for i, image in enumerate(images)], dtype=np.int64)
        fingerprints = np.array([0 if image is None else outcomes[i][2] for i, image in enumerate(images)],
                                dtype=np.uint64)
        sizes = np.array([image.shape[1:] if image is not None else fmt.SKIPPED_IMAGE_SIZE for image in images],
                         dtype=np.int64).reshape(len(images), 2)
        pool, partners = None, {}
        if self.pipeline.mixes:
            pool = rng.partner_pool(self.plan.config.seed, start, len(self.source), self.plan.block_size)
            outside = [int(p) for p in pool if not start <= p < stop]
            partners = dict(zip(outside, self._pool.map(self._load_partner, outside), strict=True))
        params, columns = self._sample(start, images, sizes, pool, partners)
        return LoadedBlock(start=start, images=images, labels=labels, fingerprints=fingerprints, sizes=sizes,
                           params=params, param_columns=columns, skipped=skipped, partners=partners, began=began)

    def _sample(self, start: int, images: list[torch.Tensor | None], sizes: np.ndarray, pool: np.ndarray | None,
                partners: dict[int, torch.Tensor | None]) -> tuple[np.ndarray, np.ndarray]:
        """Parameters (n, A, P) of every record of the block as the store will hold them, and their encoded
        columns (n, A, C)."""
        n, a = len(images), self.plan.header.num_augmentations

        def partner_size(index: int) -> tuple[int, int] | None:
            index = int(index)
            image = images[index - start] if start <= index < start + n else partners[index]
            return None if image is None else (int(image.shape[1]), int(image.shape[2]))

        present = np.array([i for i, image in enumerate(images) if image is not None], dtype=np.int64)
        params = np.zeros((n, a, self.pipeline.num_params), dtype=np.float64)
        params[present] = self.pipeline.sample_block(
            self.plan.config.seed, start + present, a, sizes[present, 0], sizes[present, 1],
            num_samples=len(self.source), partner_size=partner_size, partner_pool=pool)
        # Encoded once, here; the teacher sees them decoded, as the student will replay them. (A skipped sample's
        # zeros become whatever the encoding stores for them; its (0, 0) size flags it.)
        columns = self.param_layout.encode(params, sizes[:, :1], sizes[:, 1:])
        return self.param_layout.decode(columns, sizes[:, :1], sizes[:, 1:]), columns

    def _load_partner(self, index: int) -> torch.Tensor | None:
        """A mixing partner's image; None if it cannot be read and bad images are skipped."""
        try:
            return self.source.load(index)[0]
        except SourceError as error:
            if self.plan.config.on_bad_image != "skip":
                raise SourceError(f"mixing partner: {error} (or pass --on-bad-image skip to leave the records "
                                  "that mix with it unmixed)") from error
            return None

    def _load_one(self, index: int) -> tuple[torch.Tensor, int, int] | SkippedSample:
        try:
            image, label = self.source.load(index)
            return image, label, fingerprint(image)
        except SourceError as error:
            if self.plan.config.on_bad_image != "skip":
                raise SourceError(f"{error} (or pass --on-bad-image skip to record it as skipped)") from error
            return SkippedSample(index=index, path=self.source.name_of(index), reason=str(error.__cause__ or error))

    def _label_of(self, index: int) -> int:
        targets = self.source.targets
        return int(targets[index]) if targets is not None else -1

    def compute(self, loaded: LoadedBlock, records_done: RecordsDone | None = None) -> BlockResult:
        """Augment every record of every readable sample and keep the ensemble's top-k of each."""
        n, a, k = len(loaded.images), self.plan.header.num_augmentations, self.plan.header.top_k
        present = [i for i, image in enumerate(loaded.images) if image is not None]
        on_device = {loaded.start + i: loaded.images[i].to(self.device, non_blocking=True) for i in present}
        partner = self._partner_images(loaded, on_device)
        top_indices = np.zeros((n, a, k), dtype=np.int64)
        top_probs = np.zeros((n, a, k), dtype=np.float32)
        entropy = np.zeros((n, a), dtype=np.float32)
        records = [(i, j) for i in present for j in range(a)]
        batch_size = self.plan.config.batch_size
        if records:
            rows, cols = np.array(records).T
            for first in range(0, len(records), batch_size):
                r, c = rows[first:first + batch_size], cols[first:first + batch_size]
                params = loaded.params[r, c]
                partners = self.pipeline.partner_indices(params)
                partner_images = None if partners is None else [partner(p) if p >= 0 else None for p in partners]
                values, classes, entropy[r, c] = self._teacher_top_k(
                    [on_device[loaded.start + i] for i in r], params, partner_images)
                top_indices[r, c], top_probs[r, c] = classes, values
                if records_done is not None:
                    records_done(len(r))
        return BlockResult(start=loaded.start, labels=loaded.labels, fingerprints=loaded.fingerprints,
                           image_sizes=loaded.sizes, aug_params=loaded.params, param_columns=loaded.param_columns,
                           topk_indices=top_indices, topk_probs=top_probs, teacher_entropy=entropy)

    def _partner_images(self, loaded: LoadedBlock,
                        on_device: dict[int, torch.Tensor]) -> Callable[[int], torch.Tensor | None]:
        """Source image ``p`` on the device for mixing ops: the block's own, others moved once per block.

        A partner that could not be read is None (``on_bad_image="skip"``): its records were sampled unmixed.
        """
        cache: dict[int, torch.Tensor | None] = dict(on_device)

        def partner(index: int) -> torch.Tensor | None:
            index = int(index)
            if index not in cache:
                image = loaded.partners.get(index)
                cache[index] = None if image is None else image.to(self.device, non_blocking=True)
            return cache[index]

        return partner

    @torch.inference_mode()
    def _teacher_top_k(self, images: list[torch.Tensor], params: np.ndarray,
                       partner_images: list[torch.Tensor | None] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k probabilities and classes, and the entropy (nats) of the mean distribution, of each record."""
        channels_last = self.plan.config.channels_last
        by_size = {}
        for size in self.ensemble.input_sizes:
            batch = self.pipeline.apply_batch(images, params, size, partner_images=partner_images)
            by_size[size] = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
        try:
            with torch.autocast(self.device.type, dtype=_DTYPES.get(self.plan.precision, torch.float32),
                                enabled=self.plan.precision in _DTYPES):
                probs = self.ensemble.probs(by_size).float()
        except torch.OutOfMemoryError as error:
            raise BuildError(
                f"the {self.device} device ran out of memory on a micro-batch of {len(images)} records: "
                f"try --batch-size {max(len(images) // 2, 1)} (on a new --out: a store's micro-batch size is fixed "
                f"when it is created)"
            ) from error
        entropy = torch.special.entr(probs).sum(-1)
        values, classes = top_k_stable(probs, self.plan.header.top_k)
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


def make_processor(plan: BuildPlan, ensemble: Ensemble, source: ImageSource | None = None) -> BlockProcessor:
    """The :class:`BlockProcessor` a worker runs for ``plan`` (``source``: already opened, else the plan's)."""
    return BlockProcessor(plan, ensemble, source)


class BlockRunner:
    """The block routine of every engine: load (CPU), compute (device, one block at a time), write.

    Loading and writing of up to two blocks may overlap from different threads; the device part takes turns.
    """

    def __init__(self, processor: BlockProcessor, sink: BlockSink, name: str = "") -> None:
        self.processor = processor
        self.sink = sink
        self.name = name
        self._device_lock = threading.Lock()

    def load(self, block: int) -> LoadedBlock:
        return self.processor.load(*self.sink.header.block_range(block))

    def finish(self, block: int, loaded: LoadedBlock, records_done: RecordsDone | None = None) -> BlockStats:
        """Run the device part of a loaded block, write it and mark it done."""
        with self._device_lock:
            result = self.processor.compute(loaded, records_done)
        self.sink.write_block(block, result)
        return BlockStats(block=block, images=len(loaded.images), skipped=loaded.skipped,
                          seconds=time.perf_counter() - loaded.began, worker=self.name)

    def run(self, block: int) -> BlockStats:
        return self.finish(block, self.load(block))
