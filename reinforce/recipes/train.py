""":func:`train`, the entry point behind ``reinforce train``: settings, data, student, pre-flight, the loop, the
summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .checkpoint import Checkpointer
from .config import TrainConfig
from .data import open_data
from .distill import baseline_top1
from .distributed import World, barrier, broadcast, device_for, init_world, shutdown
from .factories import adapted_ema_decay, make_sampler, total_steps
from .loop import Setup, StepHook, Trainer
from .models import make_student
from .preflight import TeacherCheck, initial_lr, measure_teachers
from .run import SUMMARY, RunDirectory
from .settings import Settings, resolve


@dataclasses.dataclass
class RunResult:
    """What a finished run reports (also in ``summary.json``)."""

    out: str
    epochs_run: int
    best_top1: float | None
    best_epoch: int | None
    last_top1: float | None
    lr: float
    stopped_early: bool
    teacher: dict[str, Any]
    warnings: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)


def train(config: TrainConfig, *, model: torch.nn.Module | None = None, log: Callable[[str], None] = print,
          on_step: StepHook | None = None) -> RunResult:
    """Train a student by one recipe into ``config.out`` (see :class:`TrainConfig`); ``model`` may replace the
    timm model named by ``config.model`` (it must predict the store's classes). ``on_step(trainer, epoch, step)``
    is called after every training step.

    Works under ``torchrun`` (DDP: gloo on CPU; on CUDA, NCCL for gradients and gloo for the CPU-side
    collectives). Ctrl-C writes a resumable checkpoint; ``resume=True`` continues it exactly.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    settings = resolve(config)
    world = init_world(settings.device)
    try:
        return _train(settings, world, model, log if world.is_main else (lambda _: None), on_step)
    finally:
        shutdown(world)


def _train(settings: Settings, world: World, model: torch.nn.Module | None, log: Callable[[str], None],
           on_step: StepHook | None) -> RunResult:
    reference = baseline_top1(settings.baseline) if settings.baseline else None  # refused now, not after training
    run = RunDirectory(settings.out)
    if world.is_main:
        run.open(settings.resume)
    barrier(world)
    data, settings = open_data(settings)
    student = make_student(settings, data.num_classes, model)
    settings = settings.complete(mean=tuple(float(v) for v in student.mean), std=tuple(float(v) for v in student.std))
    for note in student.notes:
        log(note)
    device = device_for(settings.device, world)
    setup = Setup(world, device, data, _online_teachers(settings, device))
    check = TeacherCheck.of(settings, setup, measure_teachers(settings, setup), reference)
    log(check.report.describe())
    check.before_training(settings.has_soft_targets, log)
    # Every rank must train at rank 0's LR: the estimate is made from the ranks' averaged losses, so they agree,
    # but DDP averages gradients, not learning rates, and a disagreement would never show as an error.
    settings = _with_run_length(settings.complete(lr=broadcast(initial_lr(settings, setup, student, run, log), world)),
                                len(data.train_set), world)
    if world.is_main and settings.resume:
        run.check_unchanged(settings)
    elif world.is_main:
        run.record(settings)
    trainer = Trainer(settings, setup, student, lr=settings.lr, epochs=settings.epochs,
                      checkpoints=Checkpointer(run, settings, world, setup.device), log=log, on_step=on_step)
    trainer.begin(run, student.name)
    try:
        trainer.fit()
    finally:
        trainer.close()
    check.after_training(trainer.progress.best_top1, log)
    return _finish(trainer, run, check, log)


def _online_teachers(settings: Settings, device: torch.device) -> Any:
    """The online ensemble of ``--teacher`` (on the run's device, in its memory format), or None."""
    if not settings.teachers:
        return None
    from ..build.teachers import create_ensemble

    ensemble = create_ensemble(list(settings.teachers)).to(device)
    if settings.channels_last:
        for member in ensemble.members:
            member.module.to(memory_format=torch.channels_last)
    return ensemble


def _with_run_length(settings: Settings, num_samples: int, world: World) -> Settings:
    """``settings`` with the EMA decay adapted to the run's steps, unless given (or no EMA)."""
    if not settings.ema or settings.ema_decay is not None:
        return settings
    return settings.complete(ema_decay=adapted_ema_decay(total_steps(make_sampler(settings, num_samples, world),
                                                                     settings.epochs)))


def _finish(trainer: Trainer, run: RunDirectory, check: TeacherCheck, log: Callable[[str], None]) -> RunResult:
    rows = run.metrics() if trainer.world.is_main else []
    last = rows[-1] if rows else {}
    progress = trainer.progress
    result = RunResult(out=str(run.path), epochs_run=progress.epoch, best_top1=progress.best_top1,
                       best_epoch=progress.best_epoch,
                       last_top1=max((last.get(k) for k in ("val_top1", "ema_top1") if last.get(k) is not None),
                                     default=None),
                       lr=trainer.lr, stopped_early=progress.stopped_early, teacher=dataclasses.asdict(check.report),
                       warnings=check.warnings, notes=check.notes)
    if trainer.world.is_main:
        run.write_json(SUMMARY, dataclasses.asdict(result))
        log(f"done: best top-1 {_pct(result.best_top1)} at epoch {_epoch(result.best_epoch)}, {result.epochs_run} "
            f"epochs{' (early stop)' if result.stopped_early else ''}; {run.path}")
    return result


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def _epoch(value: int | None) -> str:
    return "n/a" if value is None else str(value + 1)
