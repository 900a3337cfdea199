"""``reinforce demo``: the whole dataset-reinforcement path on real data, on a laptop CPU.

1. Materialize scikit-learn's handwritten digits (1,797 real 8x8 scans) as an ImageFolder at 32x32.
2. Train a small teacher ensemble (timm resnet10t and resnet14t) and save it as .safetensors.
3. ``reinforce build`` a store from the training split with the ``rrc`` preset.
4. Train the same student twice for the same number of steps: hard labels with the same kind of
   augmentation (torchvision RandomResizedCrop + flip), and the reinforced store (stored augmentation,
   teacher soft labels). Print both test accuracies, and a summary table.

Every piece of work runs with one torch thread. The independent trainings of a stage (the two teachers, the two
students) run side by side in ``jobs`` worker processes, so two free cores are used, while a busy machine
only shares its cores out: nothing spins waiting for a thread the scheduler has parked, and the CPU time
stays the same under load. Each stage prints a line with the elapsed time and shows a progress bar per job.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import queue
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import ImageSource
from safetensors.torch import save_file
from torchvision.transforms import v2
from tqdm.auto import tqdm

from .build import BuildConfig, run_build
from .training import accuracy, hard_label_loss, soft_target_loss, train

IMAGE_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
TEACHERS = ("resnet10t", "resnet14t")
STUDENT = "test_efficientnet"
BATCH_SIZE = 64
TEACHER_EPOCHS = 25
STUDENT_STEPS = 600
NUM_AUGMENTATIONS = 32
TOP_K = 5
BUILD_BLOCK_SIZE = 64  # small blocks: the build's progress bar moves every few seconds
STAGES = 4

Report = Callable[[int], None]
"""Called with the number of training steps just done."""


def materialize_digits(root: str | os.PathLike[str], *, size: int = IMAGE_SIZE, test_fraction: float = 0.25,
                       seed: int = 0, per_class: int | None = None) -> tuple[Path, Path]:
    """Write scikit-learn's digits as ``root/train/D/*.png`` and ``root/test/D/*.png`` (stratified split).

    ``per_class`` keeps only that many images of each class (for small tests).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    targets = digits.target
    order = np.arange(len(targets))
    if per_class is not None:
        order = np.concatenate([np.flatnonzero(targets == c)[:per_class] for c in range(10)])
    train_idx, test_idx = train_test_split(order, test_size=test_fraction, random_state=seed,
                                           stratify=targets[order])
    root = Path(root)
    for split, indices in (("train", train_idx), ("test", test_idx)):
        for index in sorted(indices):
            folder = root / split / str(targets[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index], mode="L").resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{index:04d}.png")
    return root / "train", root / "test"


def default_jobs() -> int:
    """Worker processes for the demo's trainings: 2 (a stage has two independent ones), 1 on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(2, cores))


# --- the trainings: module-level functions, so worker processes can run them --------------------------------

def _load_all(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    source = ImageSource.from_folder(folder)
    loaded = [source.load(i) for i in range(len(source))]
    return torch.stack([image for image, _ in loaded]), torch.tensor([label for _, label in loaded])


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _augmented_batches(images: torch.Tensor, labels: torch.Tensor, augment: v2.Transform, seed: int):
    def batches(epoch: int):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            chunk = order[first:first + BATCH_SIZE]
            yield _normalize(torch.stack([augment(images[i]) for i in chunk])), labels[chunk]
    return batches


def _plain_batches(images: torch.Tensor, labels: torch.Tensor):
    for first in range(0, len(images), 256):
        yield _normalize(images[first:first + 256]), labels[first:first + 256]


def _timm(arch: str, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=10)


def _reporting(batches: Callable[[int], Iterator[Any]], report: Report) -> Callable[[int], Iterator[Any]]:
    """``batches`` that report one step each time training asks for the next batch (the last step is
    reported by the caller once training returns)."""
    def epoch(number: int) -> Iterator[Any]:
        first = number == 0
        for batch in batches(number):
            if not first:
                report(1)
            first = False
            yield batch
    return epoch


def _train_counted(model: torch.nn.Module, batches: Callable[[int], Iterator[Any]], steps: int,
                   loss: Callable[..., torch.Tensor], report: Report, **options: Any) -> torch.nn.Module:
    model = train(model, _reporting(batches, report), steps, loss, **options)
    report(1)
    return model


def teacher_job(arch: str, number: int, train_dir: Path, test_dir: Path, weights: Path, steps: int, seed: int,
                report: Report) -> float:
    """Train teacher ``arch`` on hard labels with RandomResizedCrop; save it to ``weights``; its test accuracy."""
    images, labels = _load_all(train_dir)
    augment = v2.RandomResizedCrop(IMAGE_SIZE, scale=(0.25, 1.0), antialias=True)
    model = _train_counted(_timm(arch, seed + number), _augmented_batches(images, labels, augment, seed + number),
                           steps, hard_label_loss, report)
    save_file(model.state_dict(), str(weights), metadata={
        "input_size": json.dumps(IMAGE_SIZE), "mean": json.dumps(MEAN), "std": json.dumps(STD)})
    return accuracy(model, _plain_batches(*_load_all(test_dir)))


def plain_student_job(train_dir: Path, test_dir: Path, steps: int, seed: int, report: Report) -> float:
    """The student on hard labels with torchvision RandomResizedCrop + flip; its test accuracy."""
    images, labels = _load_all(train_dir)
    augment = v2.Compose([v2.RandomResizedCrop(IMAGE_SIZE, antialias=True), v2.RandomHorizontalFlip()])
    model = _train_counted(_timm(STUDENT, seed + 10), _augmented_batches(images, labels, augment, seed + 10),
                           steps, hard_label_loss, report)
    return accuracy(model, _plain_batches(*_load_all(test_dir)))


def reinforced_student_job(train_dir: Path, test_dir: Path, store: Path, steps: int, seed: int,
                           report: Report, decode: str = "exact") -> float:
    """The student on the store: stored augmentation replayed, KL to the stored soft label; its test accuracy.
    ``decode``: the dataset's decode mode (benchmarks/fast_decode_accuracy.py compares the two)."""
    dataset = ReinforcedDataset(train_dir, store, decode=decode, transform=lambda image: _normalize(image[None])[0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed + 10))
    model = _train_counted(_timm(STUDENT, seed + 10), lambda epoch: iter(loader), steps, soft_target_loss, report,
                           on_epoch=dataset.set_epoch)
    return accuracy(model, _plain_batches(*_load_all(test_dir)))


# --- running jobs side by side with progress bars ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    """One training: ``function(*args, report)`` with ``total`` steps to report."""

    label: str
    total: int
    function: Callable[..., Any]
    args: tuple[Any, ...]


_progress_queue: Any = None  # a worker process's queue to the parent: (job index, steps)


def _start_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    torch.set_num_threads(1)


def _run_in_worker(index: int, function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, float]:
    return _timed(function, *args, lambda steps: _progress_queue.put((index, steps)))


def _timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``function(*args)`` and the CPU seconds this process spent on it."""
    began = time.process_time()
    return function(*args), time.process_time() - began


class JobRunner:
    """Runs a stage's jobs in ``workers`` processes of one torch thread each (in this process when 1), with a
    progress bar per job."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.cpu_seconds: list[float] = []
        """CPU seconds of each job of the last :meth:`run`."""
        self._pool: ProcessPoolExecutor | None = None
        self._queue: Any = None
        if workers > 1:
            context = multiprocessing.get_context()
            self._queue = context.Queue()
            self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                             initargs=(self._queue,))

    def __enter__(self) -> JobRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        bars = [tqdm(total=job.total, desc=job.label, unit="step", dynamic_ncols=True,
                     mininterval=2.0) for job in jobs]
        try:
            if self._pool is None:
                done = [_timed(job.function, *job.args, bar.update) for job, bar in zip(jobs, bars)]
            else:
                futures = [self._pool.submit(_run_in_worker, index, job.function, job.args)
                           for index, job in enumerate(jobs)]
                self._follow(futures, bars)
                done = [future.result() for future in futures]
            self.cpu_seconds = [seconds for _, seconds in done]
            return [result for result, _ in done]
        finally:
            for bar in bars:
                bar.close()

    def _follow(self, futures: list[Future], bars: list[tqdm]) -> None:
        """Move the bars as workers report, until every job has finished (or one failed)."""
        while True:
            try:
                index, steps = self._queue.get(timeout=0.5)
                bars[index].update(steps)
            except queue.Empty:
                if all(future.done() for future in futures):
                    break
                if any(future.done() and future.exception() is not None for future in futures):
                    break


# --- the demo -------------------------------------------------------------------------------------------------

class _Clock:
    """Elapsed wall time, and CPU time of this process and its finished workers."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self._cpu = self._cpu_now()

    @staticmethod
    def _cpu_now() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.began

    @property
    def cpu(self) -> float:
        return self._cpu_now() - self._cpu


def _store_bytes(store: Path) -> int:
    return sum(file.stat().st_size for file in store.rglob("*") if file.is_file())


def run_demo(workdir: str | None = None, seed: int = 0, log: Callable[[str], None] | None = None, *,
             jobs: int | None = None, teacher_epochs: int = TEACHER_EPOCHS,
             student_steps: int = STUDENT_STEPS, num_augmentations: int = NUM_AUGMENTATIONS,
             per_class: int | None = None, teachers: tuple[str, ...] = TEACHERS) -> dict[str, float]:
    """Run the demo; returns the test accuracies (``teacher_<n>_<arch>``, ``plain``, ``reinforced``) and the
    store's ``store_bytes`` and ``bytes_per_record``.

    ``jobs``: worker processes for the trainings (default :func:`default_jobs`; the results do not depend on it).
    Progress bars go to stderr. The other keyword arguments shrink the demo for tests (``per_class`` keeps that
    many digits of each class).
    """
    log = log or functools.partial(print, flush=True)  # flushed: the bars on stderr are, and a pipe would hold these
    if jobs is not None and jobs < 1:
        raise ReinforceError(f"--jobs must be at least 1, got {jobs}")
    clock = _Clock()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the build, and any job run here: see the module docstring
    try:
        with tempfile.TemporaryDirectory(prefix="reinforce-demo-") as scratch, \
                JobRunner(jobs or default_jobs()) as runner:
            root = Path(workdir) if workdir else Path(scratch)
            root.mkdir(parents=True, exist_ok=True)
            results = _stages(root, seed, log, runner, clock, teacher_epochs=teacher_epochs,
                              student_steps=student_steps, num_augmentations=num_augmentations,
                              per_class=per_class, teachers=teachers)
        log(f"demo finished in {clock.wall:.0f} s wall, {clock.cpu:.0f} s CPU ({runner.workers} worker "
            f"process{'es' if runner.workers > 1 else ''}, one torch thread each)")
        return results
    finally:
        torch.set_num_threads(threads)


def _stages(root: Path, seed: int, log: Callable[[str], None], runner: JobRunner, clock: _Clock, *,
            teacher_epochs: int, student_steps: int, num_augmentations: int,
            per_class: int | None, teachers: tuple[str, ...]) -> dict[str, float]:
    def stage(number: int, text: str) -> None:
        log(f"[{number}/{STAGES}] {clock.wall:5.0f} s  {text}")

    stage(1, "writing scikit-learn's digits as PNG files")
    train_dir, test_dir = materialize_digits(root / "digits", seed=seed, per_class=per_class)
    num_train = len(ImageSource.from_folder(train_dir))
    num_test = len(ImageSource.from_folder(test_dir))
    log(f"      {num_train} train / {num_test} test images at {IMAGE_SIZE}x{IMAGE_SIZE} in {train_dir.parent}")

    steps = teacher_epochs * (num_train // BATCH_SIZE)
    stage(2, f"training {len(teachers)} teachers, {steps} steps of {BATCH_SIZE} each")
    weights = [root / f"teacher_{number}_{arch}.safetensors" for number, arch in enumerate(teachers)]
    accuracies = runner.run([
        Job(f"teacher {arch}", steps, teacher_job, (arch, number, train_dir, test_dir, weights[number], steps, seed))
        for number, arch in enumerate(teachers)])
    results = {f"teacher_{number}_{arch}": acc for (number, arch), acc in zip(enumerate(teachers), accuracies)}
    for arch, acc, cpu in zip(teachers, accuracies, runner.cpu_seconds):
        log(f"      teacher {arch}: test accuracy {acc:.4f} ({cpu:.0f} s CPU)")

    store = root / "digits-train.reinforce.zarr"
    stage(3, f"reinforce build: {num_augmentations} augmentations per image through the ensemble, top-{TOP_K} kept")
    config = BuildConfig(
        source=str(train_dir), out=str(store), teachers=[f"{arch}={path}" for arch, path in zip(teachers, weights)],
        augment="rrc", image_size=IMAGE_SIZE, num_augmentations=num_augmentations, top_k=TOP_K, seed=seed,
        batch_size=256, block_size=BUILD_BLOCK_SIZE, cpu_threads=1, decode_threads=1,
    )
    summary, build_cpu = _timed(lambda: run_build(config, report=lambda text: None))  # the summary is logged here
    log(f"      {summary} ({build_cpu:.0f} s CPU)")

    stage(4, f"training student {STUDENT} twice, {student_steps} steps of {BATCH_SIZE}: plain labels and the store")
    results["plain"], results["reinforced"] = runner.run([
        Job("student, plain labels", student_steps, plain_student_job,
            (train_dir, test_dir, student_steps, seed)),
        Job("student, reinforced store", student_steps, reinforced_student_job,
            (train_dir, test_dir, store, student_steps, seed)),
    ])
    log(f"      students trained ({' and '.join(f'{cpu:.0f}' for cpu in runner.cpu_seconds)} s CPU)")
    results["store_bytes"] = float(_store_bytes(store))
    results["bytes_per_record"] = results["store_bytes"] / (num_train * num_augmentations)
    log(_summary_table(results, teachers, steps, student_steps, num_train * num_augmentations))
    return results


def _summary_table(results: dict[str, float], teachers: Sequence[str], teacher_steps: int, student_steps: int,
                   records: int) -> str:
    rows = [(f"teacher {arch} ({teacher_steps} steps)", f"{results[f'teacher_{n}_{arch}']:.4f}")
            for n, arch in enumerate(teachers)]
    rows += [(f"student {STUDENT}, plain labels + RRC/flip ({student_steps} steps)", f"{results['plain']:.4f}"),
             (f"student {STUDENT}, reinforced store ({student_steps} steps)", f"{results['reinforced']:.4f}")]
    width = max(len(name) for name, _ in rows)
    lines = ["", f"{'':<{width}}  test accuracy"] + [f"{name:<{width}}  {value:>13}" for name, value in rows]
    lines.append(f"store: {results['store_bytes']:,.0f} bytes (every file) for {records:,} records = "
                 f"{results['bytes_per_record']:.2f} bytes/record")
    return "\n".join(lines)
