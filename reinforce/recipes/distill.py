"""How strong the store's (or the online) teachers are, and whether that is enough to distill from.

A store helps a student only when its teachers are clearly better than the student: on a real dataset a
KL-only student gained 1.1 points over plain labels with teachers 5-7 points better, and lost 0.9 points with
teachers about 4 points better. So every run reports the teachers' accuracy, and warns when the margin is small.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reinforce_loaders import format as fmt

from ..build.teachers import Ensemble, create_ensemble, parse_teacher_spec
from ..evaluation import held_out_top1
from .errors import TrainError

CLEAR_MARGIN = 5.0
"""Points of top-1 by which the teachers should beat the student for distillation to be safe."""

STRONG_MARGIN = 7.0
"""Points of top-1 above a plain student from which KL alone beat the CE + KD mix in the project's benchmarks
(benchmarks/RESULTS.md, "Recipes": digits at 7.2 points, elpv at 8.4)."""


@dataclasses.dataclass
class TeacherReport:
    """The teachers' top-1 (percent) and where it comes from."""

    top1: float | None
    kind: str  # "held-out" | "store" | "train-agreement" | "unknown"
    detail: str

    def describe(self) -> str:
        if self.top1 is None:
            return f"teacher accuracy unknown ({self.detail})"
        return f"teacher top-1 {self.top1:.2f} % ({self.kind}: {self.detail})"

    def warning(self, student_top1: float | None, kd_only: bool, baseline: bool = False,
                kd_only_flag: str = "--kd-only") -> str | None:
        """A warning when the teachers are not clearly stronger than the student, else None.

        ``student_top1`` is a plain-trained student's top-1 when ``baseline`` (the reference the margin is meant
        for), else this run's own student, trained with the teachers: it approaches them when distillation
        works, so the warning then also says how to check against a plain run. ``kd_only``: the loss has no CE
        term (``kd_only_flag`` is the option that asked for that).
        """
        if self.top1 is None or student_top1 is None:
            return None
        margin = self.top1 - student_top1
        if margin >= CLEAR_MARGIN:
            return None
        advice = (f"{kd_only_flag} is risky here: keep the CE + KD mix (the default)" if kd_only else
                  "keep the CE + KD mix (the default) and compare with --recipe plain")
        estimate = (" (the estimate from train records is optimistic: the teachers may have seen these images)"
                    if self.kind == "train-agreement" else "")
        student = ("the plain-trained student of --baseline" if baseline else
                   "this run's student, trained with them; a plain-trained student is the fair reference: "
                   "pass --baseline PLAIN_RUN_DIR to measure the margin against one")
        return (f"the teachers ({self.top1:.2f} % {self.kind}{estimate}) are only {margin:+.2f} points better than "
                f"{student} ({student_top1:.2f} %). Distilling from a teacher less than {CLEAR_MARGIN:.0f} points "
                f"better than a plain student can cost accuracy (a KL-only student lost 0.9 points at a 4-point "
                f"margin); {advice}, or build the store with stronger teachers")


    def suggestion(self, plain_top1: float | None, uses_ce: bool, kd_only_flag: str) -> str | None:
        """Advice to try KL alone when the teachers are far above a plain-trained student (``plain_top1``, from
        --baseline) and the run mixes CE into the loss, else None."""
        if not uses_ce or self.top1 is None or plain_top1 is None or self.kind == "train-agreement":
            return None
        margin = self.top1 - plain_top1
        if margin < STRONG_MARGIN:
            return None
        return (f"the teachers ({self.top1:.2f} % {self.kind}) are {margin:+.2f} points better than the plain student "
                f"of --baseline ({plain_top1:.2f} %): at margins of {STRONG_MARGIN:.0f} points and more, KL alone "
                f"({kd_only_flag}) beat the CE + KD mix in the project's benchmarks (+0.9 points on digits at 7.2, "
                "+0.8 on elpv at 8.4); a run with it is worth comparing")


def baseline_top1(run_dir: str) -> float:
    """The best validation top-1 (percent) recorded in a finished run's ``summary.json``."""
    path = Path(run_dir) / "summary.json"
    try:
        value = json.loads(path.read_text()).get("best_top1")
    except (OSError, ValueError) as error:
        raise TrainError(f"--baseline {run_dir}: cannot read {path} ({error}); pass the directory of a finished "
                         "`reinforce train --recipe plain` run") from error
    if not isinstance(value, (int, float)):
        raise TrainError(f"--baseline {run_dir}: {path} records no best_top1 (a run without --val?); pass a "
                         "finished plain run validated on the same --val")
    return float(value)


def teachers_to_evaluate(specs: list[str], header: Any) -> tuple[list[str], str]:
    """The teacher specs to evaluate on the validation set: the user's, else the store's recorded files that
    still exist here with the recorded weights."""
    if specs:
        return specs, "weights passed with --teacher-weights"
    recorded = (getattr(header, "provenance", None) or {}).get("teacher_files") or []
    present = [spec for spec in recorded if (parse_teacher_spec(spec)[1] or "") and
               Path(parse_teacher_spec(spec)[1]).is_file()]
    if recorded and len(present) == len(recorded):
        return present, "teacher files recorded in the store"
    return [], ""


def check_same_teachers(ensemble: Ensemble, header: Any) -> str | None:
    """None when ``ensemble``'s weights are the store's teachers (by SHA-256), else a note saying they differ."""
    stored = sorted(t.get("weights_sha256", "") for t in header.teachers)
    given = sorted(member.weights_sha256 for member in ensemble.members)
    return None if stored == given else "these weights are not the store's teachers (SHA-256 differs)"


def train_agreement_top1(store_samples, max_samples: int = 1000) -> tuple[float, int]:
    """Percent of stored records (this epoch's slot, up to ``max_samples`` spread over the set) whose top-1 is
    the label. Reads the records only: no image is decoded."""
    dataset = store_samples.dataset
    count = len(store_samples)
    positions = np.unique(np.linspace(0, count - 1, min(count, max_samples)).astype(int))
    agree = 0
    for position in positions:
        index = dataset.store_index(int(position))
        _, classes, probs = dataset.record(index, dataset.slot(index))
        agree += int(classes[int(np.argmax(probs))] == store_samples.labels[index])
    return 100.0 * agree / len(positions), len(positions)


def teacher_report(header: Any, store_samples, teacher_specs: list[str],
                   val_batches_at: Callable[[int], Iterable] | None, built: Ensemble | None = None,
                   device: torch.device | str | None = None) -> TeacherReport:
    """Held-out accuracy when teacher weights are known and there is a validation set (``val_batches_at(size)``:
    its batches at a resolution), evaluated on ``device`` (default: where the ensemble is); the store's recorded
    accuracy if it has one; else the top-1 agreement of stored records with the training labels. ``built``: the
    ensemble of ``teacher_specs`` when the caller has already built it (online teachers), so that the weights are
    not loaded twice."""
    specs, origin = teachers_to_evaluate(teacher_specs, header)
    if specs and val_batches_at is not None:
        ensemble = built if built is not None and specs == teacher_specs else create_ensemble(specs)
        if device is not None:
            ensemble.to(device)
        note = check_same_teachers(ensemble, header) if header is not None else None
        top1, size = held_out_top1(ensemble, val_batches_at)
        detail = f"on --val at {size} px, {origin}" + (f"; {note}" if note else "")
        return TeacherReport(top1, "held-out", detail)
    recorded = fmt.recorded_teacher_accuracy(getattr(header, "provenance", None) or {})
    if recorded is not None:
        return TeacherReport(recorded[0], "store", f"recorded in the store header: {recorded[1]}")
    if store_samples is None:
        return TeacherReport(None, "unknown", "no store, no teacher weights")
    top1, used = train_agreement_top1(store_samples)
    return TeacherReport(top1, "train-agreement",
                         f"stored top-1 equals the label on {used} training records; pass --teacher-weights "
                         "and --val for a held-out figure")
