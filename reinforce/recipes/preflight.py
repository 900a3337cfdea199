"""Before the run trains: how strong its teachers are against the student (:class:`TeacherCheck`), and the initial
learning rate (the recipe's, the checkpoint's, or adaptive's estimate on copies of the student,
:func:`initial_lr`)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..evaluation import EvalSamples
from .distill import TeacherReport, teacher_report
from .distributed import broadcast
from .errors import TrainError
from .factories import uses_hard_labels
from .loop import Setup, Trainer
from .lr_finder import range_test, tpe_search
from .models import Student
from .run import RunDirectory
from .settings import Settings


def measure_teachers(settings: Settings, setup: Setup) -> TeacherReport:
    """The teachers' top-1, measured on the main rank and shared with the others (see :func:`teacher_report`)."""
    if not setup.world.is_main:
        return broadcast(None, setup.world)
    specs = list(settings.teacher_weights or settings.teachers)
    if not settings.store and not specs:
        return broadcast(TeacherReport(None, "unknown", "no teachers in this recipe"), setup.world)
    val_set = setup.data.val_set

    def val_batches_at(size: int) -> Any:
        at_size = val_set if size == settings.image_size else EvalSamples(settings.val_source, size,
                                                                          settings.test_crop)
        return torch.utils.data.DataLoader(at_size, batch_size=256, num_workers=settings.workers,
                                           pin_memory=setup.device.type == "cuda")

    store_samples = setup.data.train_set if settings.store else None
    online = setup.ensemble if not settings.teacher_weights else None  # built already from settings.teachers
    report = teacher_report(store_samples.dataset.header if store_samples else None, store_samples, specs,
                            val_batches_at if val_set is not None else None, built=online, device=setup.device)
    return broadcast(report, setup.world)


@dataclasses.dataclass
class TeacherCheck:
    """Whether the teachers are clearly stronger than a student, said before training when a plain run's top-1
    is known (``reference``, from ``--baseline``), else after it against this run's own student."""

    report: TeacherReport
    reference: float | None
    kd_only: bool
    """The loss has no CE term (``kd_only_flag`` says what dropped it)."""
    kd_only_flag: str
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, settings: Settings, setup: Setup, report: TeacherReport, reference: float | None) -> TeacherCheck:
        flag = ("a store of mixed records" if setup.data.mixes and not settings.kd_only else
                "--kd-mode replace" if settings.recipe == "adaptive" else "--kd-only")
        return cls(report, reference, not uses_hard_labels(settings, setup.data), flag)

    def before_training(self, has_teachers: bool, log: Callable[[str], None]) -> None:
        """With a plain run's top-1: warn of a small margin, or suggest KL alone at a large one."""
        if self.reference is None:
            return
        self._warn(self.report.warning(self.reference, self.kd_only, baseline=True, kd_only_flag=self.kd_only_flag),
                   log)
        advice = self.report.suggestion(self.reference, not self.kd_only, self.kd_only_flag) if has_teachers else None
        if advice:
            self.notes.append(advice)
            log(f"note: {advice}")

    def after_training(self, best_top1: float | None, log: Callable[[str], None]) -> None:
        """Without a plain run: this run's own student is the only reference."""
        if self.reference is None:
            self._warn(self.report.warning(best_top1, self.kd_only, kd_only_flag=self.kd_only_flag), log)

    def _warn(self, warning: str | None, log: Callable[[str], None]) -> None:
        if warning:
            self.warnings.append(warning)
            log(f"WARNING: {warning}")


def initial_lr(settings: Settings, setup: Setup, student: Student, run: RunDirectory,
               log: Callable[[str], None]) -> float:
    """The recipe's LR, the checkpoint's on ``--resume``, or (adaptive without --lr) the range test's or TPE's
    estimate, made on copies of the student."""
    if settings.lr is not None:
        return float(settings.lr)
    if settings.resume:
        return float(run.load_checkpoint()["lr"])
    if settings.lr_search == "range":
        return _range_test_lr(settings, setup, student, log)
    if settings.lr_search == "tpe":
        return _tpe_lr(settings, setup, student, log)
    raise TrainError("--recipe adaptive without --lr needs --lr-search range or tpe")


def _probe(settings: Settings, setup: Setup, student: Student, lr: float, epochs: int) -> Trainer:
    """A quiet loop on a copy of the student, writing nothing."""
    copied = dataclasses.replace(student, module=copy.deepcopy(student.module))
    return Trainer(settings.complete(progress=False), setup, copied, lr=lr, epochs=epochs, log=lambda _: None)


def _range_test_lr(settings: Settings, setup: Setup, student: Student, log: Callable[[str], None]) -> float:
    low, high = settings.lr_range
    probe = _probe(settings, setup, student, low, 1)
    for batch in probe.loader(0, 0):  # one epoch at a small LR first (paper 000), then the ramp
        probe.train_step(batch, low)
    # The ramp starts at epoch 1: epoch 0's batches (same images, same augmentations) were just trained on,
    # and their lower loss would read as a descent at the ramp's smallest LRs.
    found = range_test(probe.train_step, probe.batches_forever(1), start_lr=low / 1000, end_lr=high * 100,
                       num_steps=settings.range_steps)
    probe.close()
    lr = float(np.clip(found.chosen, low, high))  # the estimate stays inside --lr-range
    log(f"LR range test ({len(found.lrs)} steps after one epoch at {low:g}): steepest descent at "
        f"{found.chosen:.3g}, using {lr:.3g}{' (clipped to --lr-range)' if lr != found.chosen else ''}")
    return lr


def _tpe_lr(settings: Settings, setup: Setup, student: Student, log: Callable[[str], None]) -> float:
    if setup.data.val_set is None:
        raise TrainError("--lr-search tpe scores trials on the validation set: pass --val")
    low, high = settings.lr_range

    def objective(lr: float, report: Callable[[float, int], bool]) -> float:
        trial = _probe(settings, setup, student, lr, settings.trial_epochs)
        try:
            trial.fit(report=report)
        finally:
            trial.close()
        return trial.progress.best_top1 or 0.0

    lr, history = tpe_search(objective, low, high, trials=settings.tpe_trials, seed=settings.seed)
    log(f"TPE over [{low:g}, {high:g}]: {len(history)} trials ({sum(h['pruned'] for h in history):.0f} pruned), "
        f"best lr {lr:.3g}")
    return lr
