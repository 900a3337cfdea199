"""``reinforce demo``: the whole dataset-reinforcement path on real data, on a laptop CPU.

1. Materialize scikit-learn's handwritten digits (1,797 real 8x8 scans) as an ImageFolder at 32x32.
2. Train a small teacher ensemble (timm resnet10t and resnet14t) and keep its weights as .safetensors.
3. ``reinforce build`` a store from the training split with the ``rrc`` preset.
4. Train the same student twice for the same number of steps: hard labels with the same kind of
   augmentation (torchvision RandomResizedCrop + flip), and the reinforced store (stored augmentation,
   teacher soft labels). Print both test accuracies, and a summary table.

Every training is a ``reinforce.recipes.train`` run (teachers and the plain student: ``plain``; the student on the
store: ``usi`` with KL alone), in whole epochs.

With CUDA available, the teachers, the build and the students run on the GPU (the trainings' processes are
then spawned, not forked); on a CPU the demo is as described here. Worker processes end with the demo, even a
killed one (:func:`reinforce.lifetime.exit_with_parent`).

Every piece of work runs with one torch thread. The independent trainings of a stage (the two teachers, the two
students) run side by side in ``jobs`` worker processes, so two free cores are used, while a busy machine
only shares its cores out: nothing spins waiting for a thread the scheduler has parked, and the CPU time
stays the same under load. Each stage prints a line with the elapsed time and shows a progress bar per job.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import ImageSource
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .build import BuildConfig, run_build
from .evaluation import EvalSamples, evaluate
from .recipes import TrainConfig, train
from .lifetime import exit_with_parent
from .recipes.run import LAST_EMA

IMAGE_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
TEACHERS = ("resnet10t", "resnet14t")
STUDENT = "test_efficientnet"
BATCH_SIZE = 64
TEACHER_EPOCHS = 15  # the most the ~300 CPU-second budget allows (the demo measured 280-283 s on 2 cores)
STUDENT_STEPS = 600  # 29 epochs: the KL-only student needs them (at 16 epochs it fell 4 points below plain on a seed)
NUM_AUGMENTATIONS = 16  # each stored augmentation is replayed about twice in the students' 29 epochs
RUN_OPTIONS: dict[str, Any] = {"lr": 5e-3, "warmup_epochs": 1}
"""Options of every training (teachers and both students alike), over the recipe's: the usi/plain defaults
(peak 2e-3 after 5 warmup epochs) are sized for runs of hundreds of epochs; at 29 epochs they left the plain
student 0.4-1.1 points lower on each of three seeds (benchmarks/RESULTS.md, "Demo"). At this budget the
teachers are only about a point above the student, and the store's student matches the plain one (0 to +0.44
points over three seeds) rather than beating it clearly."""
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


def demo_device() -> str:
    """Where the demo's teachers, build and students run: the GPU when CUDA is available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- the trainings: module-level functions, so worker processes can run them --------------------------------

def _epochs_for(steps: int, train_dir: Path) -> int:
    """Whole epochs of at least ``steps`` steps of :data:`BATCH_SIZE` (the recipes drop an epoch's last partial
    batch)."""
    return max(1, math.ceil(steps / (len(ImageSource.from_folder(train_dir)) // BATCH_SIZE)))


def _train_run(train_dir: Path, out: Path, steps: int, report: Report, **settings: Any) -> Path:
    """``reinforce.recipes.train`` for the epochs of ``steps`` (fresh in ``out``), reporting each step; the path of
    its last weights (the model EMA's: the recipes' default)."""
    shutil.rmtree(out, ignore_errors=True)
    device = demo_device()
    # On the CPU every job is one thread in one process (see the module docstring): no loader workers.
    config = TrainConfig(train_source=str(train_dir), out=str(out), epochs=_epochs_for(steps, train_dir),
                         batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, mean=MEAN, std=STD, progress=False,
                         device=device, workers=0 if device == "cpu" else None, **{**RUN_OPTIONS, **settings})
    train(config, log=lambda line: None, on_step=lambda trainer, epoch, step: report(1))
    return out / LAST_EMA


def _test_accuracy(arch: str, weights: Path, test_dir: Path) -> float:
    """Top-1 (a fraction) of ``arch`` with ``weights`` on the test images."""
    import timm

    model = timm.create_model(arch, num_classes=10)
    model.load_state_dict(load_file(str(weights)))
    batches = torch.utils.data.DataLoader(EvalSamples(test_dir, IMAGE_SIZE, crop=1.0), batch_size=256)
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) * 255 for values in (MEAN, STD))
    return evaluate(model, batches, mean, std)["top1"] / 100


def teacher_job(arch: str, number: int, train_dir: Path, test_dir: Path, weights: Path, steps: int, seed: int,
                report: Report) -> float:
    """Train teacher ``arch`` by the plain recipe; save its weights (with their input size, mean and std) to
    ``weights``; its test accuracy."""
    last = _train_run(train_dir, weights.with_suffix(".run"), steps, report, model=arch, recipe="plain",
                      seed=seed + number)
    shutil.copyfile(last, weights)
    return _test_accuracy(arch, weights, test_dir)


def plain_student_job(train_dir: Path, test_dir: Path, steps: int, seed: int, report: Report) -> float:
    """The student by the plain recipe (hard labels, RandomResizedCrop + flip); its test accuracy."""
    last = _train_run(train_dir, train_dir.parent.parent / "student-plain.run", steps, report, model=STUDENT,
                      recipe="plain", seed=seed + 10)
    return _test_accuracy(STUDENT, last, test_dir)


def reinforced_student_job(train_dir: Path, test_dir: Path, store: Path, steps: int, seed: int,
                           report: Report, decode: str = "exact") -> float:
    """The student by the usi recipe on the store with KL alone (the DR paper's loss): stored augmentation
    replayed, stored soft label; its test accuracy. ``decode``: the store's decode mode
    (benchmarks/fast_decode_accuracy.py compares the two)."""
    last = _train_run(train_dir, store.with_name(f"student-reinforced-{decode}.run"), steps, report, model=STUDENT,
                      recipe="usi", store=str(store), kd_only=True, decode=decode, seed=seed + 10)
    return _test_accuracy(STUDENT, last, test_dir)


# --- running jobs side by side with progress bars ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    """One training: ``function(*args, report)`` with ``total`` steps to report."""

    label: str
    total: int
    function: Callable[..., Any]
    args: tuple[Any, ...]


_progress_queue: Any = None  # a worker process's queue to the parent: (job index, steps)


def _start_worker(progress_queue: Any, parent: int) -> None:
    global _progress_queue
    exit_with_parent(parent)  # a killed demo must not leave its trainings running
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
            # A forked child cannot use CUDA once the parent has (the demo's build runs in the parent).
            context = multiprocessing.get_context("spawn" if torch.cuda.is_available() else None)
            self._queue = context.Queue()
            # Its processes are started by the thread that submits, this one: see exit_with_parent's death signal.
            self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                             initargs=(self._queue, os.getpid()))

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
    many digits of each class); ``student_steps`` is rounded up to whole epochs.
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
        batch_size=256, block_size=BUILD_BLOCK_SIZE, cpu_threads=1, decode_threads=1, device=demo_device(),
    )
    summary, build_cpu = _timed(lambda: run_build(config, report=lambda text: None))  # the summary is logged here
    log(f"      {summary} ({build_cpu:.0f} s CPU)")

    student_steps = _epochs_for(student_steps, train_dir) * (num_train // BATCH_SIZE)  # whole epochs
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
