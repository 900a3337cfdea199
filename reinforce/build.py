"""The build pipeline: source images -> augmented records -> ensemble top-k -> store blocks.

:class:`BlockProcessor` turns one block of samples into a :class:`~reinforce.writer.BlockResult` and is plain
Python, usable by any scheduler. :func:`run_build` drives it over every pending block in this process.
The result does not depend on how blocks are scheduled: records are sampled from keyed RNG streams and
each block is cut into the same micro-batches wherever it runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from reinforce_loaders import format as fmt
from reinforce_loaders.augment import AugmentPipeline, make_pipeline
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import ImageSource, fingerprint, open_source
from tqdm.auto import tqdm

from . import __version__
from .teachers import Ensemble, create_ensemble
from .writer import BlockResult, StoreWriter, store_bytes


@dataclasses.dataclass
class BuildConfig:
    """Settings of ``reinforce build`` (see the CLI for their meaning)."""

    source: str
    out: str
    teachers: Sequence[str] = ()
    augment: str = "rrc"
    image_size: int = 224
    num_augmentations: int = 8
    top_k: int = 5
    seed: int = 0
    batch_size: int = 256
    block_size: int = 256
    device: str = "cpu"
    decode_threads: int = 4
    teacher_input_size: int | None = None
    teacher_mean: Sequence[float] | None = None
    teacher_std: Sequence[float] | None = None


@dataclasses.dataclass
class BuildSummary:
    images: int
    records: int
    blocks_written: int
    seconds: float
    store_bytes: int
    store_records: int

    @property
    def bytes_per_record(self) -> float:
        """Bytes on disk of the whole store per (sample, slot) record it holds."""
        return self.store_bytes / max(self.store_records, 1)

    def __str__(self) -> str:
        rate = self.images / self.seconds if self.seconds else float("nan")
        return (f"images {self.images}  records {self.records}  store {self.store_bytes:,} bytes "
                f"({self.bytes_per_record:.1f} bytes/record)  {rate:.1f} images/s, "
                f"{rate * self.records / max(self.images, 1):.1f} records/s over {self.blocks_written} blocks "
                f"in {self.seconds:.1f} s")


class BlockProcessor:
    """Computes the records of a block of samples: decode once, augment every slot, run the ensemble."""

    def __init__(self, source: ImageSource, pipeline: AugmentPipeline, ensemble: Ensemble, *,
                 num_augmentations: int, top_k: int, seed: int, batch_size: int, device: str = "cpu",
                 decode_threads: int = 4) -> None:
        self.source = source
        self.pipeline = pipeline
        self.ensemble = ensemble.to(device)
        self.num_augmentations = num_augmentations
        self.top_k = top_k
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.decode_threads = decode_threads
        self.param_codec = fmt.ParamCodec.for_pipeline(pipeline)

    def process(self, start: int, stop: int) -> BlockResult:
        indices = range(start, stop)
        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:
            loaded = list(pool.map(self.source.load, indices))
        images = [image for image, _ in loaded]
        n, a = len(images), self.num_augmentations
        partner = functools.lru_cache(maxsize=None)(lambda p: self.source.load(p)[0].to(self.device))
        params = np.stack([
            self.pipeline.sample_slots(self.seed, index, a, image.shape[1], image.shape[2],
                                       num_samples=len(self.source), partner_size=lambda p: partner(p).shape[1:])
            for index, image in zip(indices, images)
        ])
        # The teacher sees the parameters as the store will hold them, so the student replays the same image.
        sizes = np.array([image.shape[1:] for image in images], dtype=np.int64).reshape(n, 2)
        params = self.param_codec.quantize(params, sizes[:, :1], sizes[:, 1:])
        device_images = [image.to(self.device) for image in images]
        records = [(i, j) for i in range(n) for j in range(a)]
        top_indices = np.empty((n * a, self.top_k), dtype=np.int64)
        top_probs = np.empty((n * a, self.top_k), dtype=np.float32)
        entropy = np.empty(n * a, dtype=np.float32)
        for first in range(0, len(records), self.batch_size):
            batch = records[first:first + self.batch_size]
            batch_images = [device_images[i] for i, _ in batch]
            batch_params = np.stack([params[i, j] for i, j in batch])
            partners = self.pipeline.partner_indices(batch_params)
            partner_images = None if partners is None else [partner(p) if p >= 0 else None for p in partners]
            by_size = {size: self.pipeline.apply_batch(batch_images, batch_params, size, partner_images)
                       for size in self.ensemble.input_sizes}
            probs = self.ensemble.probs(by_size)
            entropy[first:first + len(batch)] = torch.special.entr(probs).sum(-1).cpu().numpy()
            values, classes = top_k_stable(probs, self.top_k)
            top_indices[first:first + len(batch)] = classes.cpu().numpy()
            top_probs[first:first + len(batch)] = values.cpu().numpy()
        return BlockResult(
            start=start,
            labels=np.array([label for _, label in loaded]),
            fingerprints=np.array([fingerprint(image) for image in images], dtype=np.uint64),
            image_sizes=sizes,
            aug_params=params,
            topk_indices=top_indices.reshape(n, a, self.top_k),
            topk_probs=top_probs.reshape(n, a, self.top_k),
            teacher_entropy=entropy.reshape(n, a),
        )


def top_k_stable(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by descending probability, ties broken by lower class index (``torch.topk`` gives no such order)."""
    values, classes = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[..., :k], classes[..., :k]


def make_header(config: BuildConfig, source: ImageSource, pipeline: AugmentPipeline, ensemble: Ensemble,
                num_classes: int) -> fmt.StoreHeader:
    return fmt.StoreHeader(
        num_samples=len(source), num_classes=num_classes, top_k=config.top_k,
        num_augmentations=config.num_augmentations, seed=config.seed, block_size=config.block_size,
        augmentation=pipeline.config(), teachers=ensemble.describe(), class_names=source.classes,
        provenance={
            "tool": f"reinforce {__version__}", "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "device": config.device, "torch": torch.__version__, "zarr": zarr.__version__,
            "python": platform.python_version(), "batch_size": config.batch_size,
            "teacher_files": [spec for spec in config.teachers],
        },
    )


def probe_num_classes(ensemble: Ensemble, device: str) -> int:
    """Number of classes the ensemble predicts, from one forward pass on a blank image."""
    ensemble.to(device)
    images = {size: torch.zeros(1, 3, size, size, dtype=torch.uint8) for size in ensemble.input_sizes}
    return int(ensemble.probs(images).shape[-1])


def run_build(config: BuildConfig, ensemble: Ensemble | None = None, progress: bool = True) -> BuildSummary:
    """Build (or resume) the store ``config.out`` in this process. ``ensemble`` overrides ``config.teachers``."""
    if config.top_k < 1 or config.num_augmentations < 1 or config.batch_size < 1 or config.block_size < 1:
        raise ReinforceError("--top-k, --num-augmentations, --batch-size and --block-size must all be at least 1")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ReinforceError(f"--device {config.device} was asked for but CUDA is not available: use --device cpu")
    source = open_source(config.source)
    pipeline = make_pipeline(config.augment, config.image_size)
    if ensemble is None:
        ensemble = create_ensemble(config.teachers, input_size=config.teacher_input_size,
                                   mean=config.teacher_mean, std=config.teacher_std)
    num_classes = probe_num_classes(ensemble, config.device)
    if config.top_k > num_classes:
        raise ReinforceError(f"--top-k {config.top_k} exceeds the {num_classes} classes the teachers predict")
    header = make_header(config, source, pipeline, ensemble, num_classes)
    writer = StoreWriter.create_or_resume(config.out, header, pipeline.num_params)
    processor = BlockProcessor(source, pipeline, ensemble, num_augmentations=config.num_augmentations,
                               top_k=config.top_k, seed=config.seed, batch_size=config.batch_size,
                               device=config.device, decode_threads=config.decode_threads)
    pending = writer.pending_blocks()
    images = sum(np.subtract(*reversed(header.block_range(b))) for b in pending)
    began = time.perf_counter()
    with tqdm(total=images, unit="img", disable=not progress, desc="reinforce build") as bar:
        for block in pending:
            start, stop = header.block_range(block)
            writer.write_block(block, processor.process(start, stop))
            bar.update(stop - start)
            bar.set_postfix(records=f"{bar.n * config.num_augmentations}")
    writer.finalize()
    return BuildSummary(images=int(images), records=int(images) * config.num_augmentations,
                        blocks_written=len(pending), seconds=time.perf_counter() - began,
                        store_bytes=store_bytes(Path(config.out)),
                        store_records=header.num_samples * config.num_augmentations)
