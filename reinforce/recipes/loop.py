"""The training loop shared by the three recipes: steps (mix, online teacher, forward, backward, SAM, schedule,
EMA) and epochs (validation, plateau schedule, checkpoint), with progress bars and step-boundary interrupts.
Its parts come from :mod:`~reinforce.recipes.factories`; checkpoints from :mod:`~reinforce.recipes.checkpoint`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from reinforce_loaders.collate import Crop, Encoded

from ..build.teachers import Ensemble
from ..evaluation import ensemble_probs
from ..progress import bar_options
from .checkpoint import Checkpointer, Progress
from .data import TrainingData, collate_samples
from .distributed import World, all_sum, barrier, broadcast
from .errors import TrainingDiverged
from .factories import autocast_dtype, make_parts
from .interrupts import StepBoundaryInterrupts
from .models import Student
from .run import RunDirectory
from .sam import frozen_norm_statistics
from .schedules import ReduceLROnPlateauV2
from .settings import Settings
from .validation import Validator

StepHook = Callable[["Trainer", int, int], None]
"""Called after every step with the loop, the epoch and the steps done in it."""

READ_EVERY = 50
"""Steps between two reads of the losses from the device (the progress bar, the running loss, the divergence
check): a step itself never waits for the device."""
PREFETCH_BATCHES = 4
"""Batches each DataLoader worker prepares ahead."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every loop of a run shares: its processes, device, data and online teachers (on the device)."""

    world: World
    device: torch.device
    data: TrainingData
    ensemble: Ensemble | None = None


class Trainer:
    """One student trained for ``epochs`` from ``lr`` by the recipe of ``settings`` (completed, except ``lr`` and
    ``ema_decay`` for the LR search's probes). ``checkpoints``: where epochs are written (None for a probe)."""

    def __init__(self, settings: Settings, setup: Setup, student: Student, *, lr: float, epochs: int,
                 checkpoints: Checkpointer | None = None, log: Callable[[str], None] = print,
                 on_step: StepHook | None = None) -> None:
        self.settings, self.setup = settings, setup
        self.world, self.device = setup.world, setup.device
        self.train_set = setup.data.train_set
        self.lr, self.epochs = lr, epochs
        self.checkpoints, self.log, self.on_step = checkpoints, log, on_step
        self.autocast_dtype = autocast_dtype(settings.precision, self.device)
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model = student.module.to(self.device, memory_format=self.memory_format)
        self.mean = torch.tensor(settings.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(settings.std, device=self.device).view(1, 3, 1, 1) * 255
        self.net = torch.nn.parallel.DistributedDataParallel(self.model) if self.world.distributed else self.model
        self.parts = make_parts(settings, self.model, setup.data, self.world, lr=lr, epochs=epochs)
        self.progress = Progress()
        self.validator = None if setup.data.val_set is None else Validator(
            setup.data.val_set, workers=settings.workers, device=self.device, mean=self.mean, std=self.std,
            autocast=self.autocast)
        self._train_loader: torch.utils.data.DataLoader | None = None
        self._epoch_seconds = 0.0
        self._epoch_images = 0
        self.read_every = READ_EVERY
        self._losses = torch.zeros(self.read_every, device=self.device)
        self._pending: list[tuple[int, str]] = []
        """The steps whose loss is in ``_losses`` but not yet in ``progress``: (images, where)."""

    def begin(self, run: RunDirectory, student: str) -> None:
        """Start the run (``student`` names the model in the log), or continue it from its checkpoint."""
        settings, world = self.settings, self.world
        if settings.resume:
            self.progress = self.checkpoints.restore(self.model, self.parts)
            if world.is_main:
                run.truncate_metrics(self.progress.epoch)
            self.log(f"resumed at epoch {self.progress.epoch} step {self.progress.step_in_epoch}")
        elif world.is_main:
            self.log(f"{settings.recipe}: {student} on {len(self.train_set)} images, {self.setup.data.num_classes} "
                     f"classes, {settings.epochs} epochs of {len(self.parts.sampler)} steps x {world.size} x "
                     f"{settings.batch_size}, lr {self.lr:.3g}, on {self.device}"
                     f"{' (bf16 autocast)' if self.autocast_dtype is not None else ''}")

    def close(self) -> None:
        """Stop this loop's loader workers now: persistent workers otherwise live until the loop is garbage
        collected, and an LR search makes one loop per probe."""
        loaders = [self._train_loader, self.validator.loader if self.validator is not None else None]
        for loader in loaders:
            iterator = getattr(loader, "_iterator", None)
            if hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            if loader is not None:
                loader._iterator = None
        self._train_loader = None

    # --- steps ---------------------------------------------------------------------------------------------
    def loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        """The training loader positioned at (epoch, start step); one loader, so workers persist."""
        sampler = self.parts.sampler
        self.train_set.set_epoch(epoch)  # shared memory: reaches persistent workers
        sampler.set_epoch(epoch)  # the batch sampler runs in this process
        sampler.set_start(start)
        if self._train_loader is None:
            workers = self.settings.workers
            # An explicit generator keeps the DataLoader from drawing on the global RNG (resume equality).
            self._train_loader = torch.utils.data.DataLoader(
                self.train_set, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                prefetch_factor=PREFETCH_BATCHES if workers > 0 else None, pin_memory=self.device.type == "cuda",
                collate_fn=collate_samples, generator=torch.Generator().manual_seed(self.settings.seed))
        return self._train_loader

    def prepare(self, batch: Any, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Finish a store's replay from crops (``replay="device"``), mix (optional, keyed by the global ``step``),
        ask the online teacher (optional), normalize. Copies are asynchronous (the batch is pinned on CUDA)."""
        images, labels, soft = batch
        if isinstance(images, (Crop, Encoded)):
            images = self.train_set.finish(images, self.device)
        x = images.to(self.device, non_blocking=True).float()
        labels = labels.to(self.device, non_blocking=True)
        soft = soft.to(self.device, non_blocking=True)
        if self.parts.mixing is not None:
            x, labels, soft = self._mix(x, labels, soft, step)
        if self.setup.ensemble is not None:
            with self.autocast():
                soft = ensemble_probs(self.setup.ensemble, x).float()  # the teacher sees the student's (mixed) pixels
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format), labels, soft

    def _mix(self, x: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor,
             step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch mixed with its reverse; labels become mixed one-hot vectors, soft targets mix alike."""
        one_hot = F.one_hot(labels, self.setup.data.num_classes).float()
        if not soft.numel():
            x, mixed_labels = self.parts.mixing(x, one_hot, step)
            return x, mixed_labels, soft
        x, (mixed_labels, mixed_soft) = self.parts.mixing(x, (one_hot, soft), step)
        return x, mixed_labels, mixed_soft

    def optimize(self, x: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor,
                 where: str | None = None) -> torch.Tensor:
        """One optimizer step (two forward/backward passes with SAM); returns the loss, detached, on the device.
        With ``where``, a non-finite loss raises :class:`TrainingDiverged` before the step (a host sync); without,
        the caller checks it later (:meth:`_read_losses`)."""
        optimizer, sam, loss_fn = self.parts.optimizer, self.parts.sam, self.parts.loss_fn
        self.net.train()
        loss = loss_fn(self.forward(x), labels, soft)
        if where is not None:
            self._check_finite(loss, where)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sam is not None:
            sam.perturb()
            optimizer.zero_grad(set_to_none=True)
            with frozen_norm_statistics(self.net):
                loss_fn(self.forward(x), labels, soft).backward()
            sam.step()
        else:
            optimizer.step()
        return loss.detach()

    def autocast(self) -> torch.autocast:
        """Mixed precision for forward passes (a no-op context at fp32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits in fp32 (the loss is computed in fp32 whatever the forward precision)."""
        with self.autocast():
            return self.net(x).float()

    def _check_finite(self, loss: torch.Tensor, where: str) -> None:
        bad = 0.0 if torch.isfinite(loss) else 1.0
        if self.world.distributed:  # every rank must stop together, or DDP hangs
            bad = all_sum([bad], self.world)[0]
        if bad:
            raise TrainingDiverged(self._divergence_message(float(loss.detach()), where))

    def _divergence_message(self, value: float, where: str) -> str:
        kept = self.checkpoints.kept() if self.checkpoints is not None else "no checkpoint had been written yet"
        lowers = [f"--lr (now {self.current_lr():.3g})"]
        if self.parts.loss_fn.use_ce and self.setup.ensemble is None and self.settings.store:
            lowers.append(f"--alpha-kd (now {self.settings.alpha_kd:g})")
        if self.settings.sam:
            lowers.append(f"--sam-rho (now {self.settings.sam_rho:g})")
        return (f"the loss became {value} at {where}: training stopped; {kept}. Lower {' or '.join(lowers)}, or "
                "raise --warmup-epochs")

    def train_step(self, batch: Any, lr: float) -> float:
        """A step at a fixed ``lr`` (times each group's ``lr_scale``), for the LR range test; its loss averaged over
        the ranks, so that every rank's range test sees the same curve, stops at the same step and chooses the
        same LR."""
        for group in self.parts.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        x, labels, soft = self.prepare(batch, self.progress.global_step)
        self.progress.global_step += 1
        try:
            loss = float(self.optimize(x, labels, soft, f"range-test step {self.progress.global_step}"))
        except TrainingDiverged:  # raised on every rank together (_check_finite)
            return math.inf
        return all_sum([loss], self.world)[0] / self.world.size

    def batches_forever(self, epoch: int = 0) -> Iterator[Any]:
        """Training batches of ``epoch``, ``epoch + 1``, ... without end."""
        while True:
            yield from self.loader(epoch, 0)
            epoch += 1

    def current_lr(self) -> float:
        group = self.parts.optimizer.param_groups[0]
        return float(group["lr"]) / group.get("lr_scale", 1.0)

    # --- epochs --------------------------------------------------------------------------------------------
    def fit(self, report: Callable[[float, int], bool] | None = None) -> None:
        """Train from the current position to the end (or an early stop, or a trial ``report`` prunes)."""
        while self.progress.epoch < self.epochs and not self.progress.stopped_early:
            self.train_epoch()
            row = self.end_epoch()
            if report is not None and report(row.get("best_top1") or 0.0, row["epoch"]):
                return

    def train_epoch(self) -> None:
        epoch, start = self.progress.epoch, self.progress.step_in_epoch
        self.parts.sampler.set_epoch(epoch)
        began = time.perf_counter()
        bar = self._progress_bar(len(self.parts.sampler), start, epoch)
        interrupts = StepBoundaryInterrupts(enabled=not self.world.distributed)
        try:
            with interrupts:
                self._epoch_images = self._train_steps(epoch, start, bar, interrupts)
        except KeyboardInterrupt:
            self._interrupted(epoch, interrupts.mid_step)
            raise
        finally:
            if bar is not None:
                bar.close()
        self._epoch_seconds = time.perf_counter() - began

    def _interrupted(self, epoch: int, mid_step: bool) -> None:
        if self.checkpoints is None or not self.world.is_main:
            return
        self._read_losses(together=False)  # the other ranks are not reading now
        step = self.progress.step_in_epoch
        if mid_step:
            self.log(f"interrupted twice, inside epoch {epoch} step {step}: no checkpoint of that half-done step is "
                     f"written; --resume continues from the last one, {self.checkpoints.path}")
            return
        self.checkpoints.save(self.model, self.parts, self.progress, self.lr)
        self.log(f"interrupted at epoch {epoch} step {step}: checkpoint written to {self.checkpoints.path}; "
                 "continue with --resume")

    def _train_steps(self, epoch: int, start: int, bar: Any, interrupts: StepBoundaryInterrupts) -> int:
        """The steps of ``epoch`` from step ``start``; returns the images trained on."""
        images = 0
        progress, parts = self.progress, self.parts
        for batch in self.loader(epoch, start):
            with interrupts.step():
                x, labels, soft = self.prepare(batch, progress.global_step)
                loss = self.optimize(x, labels, soft)
                self._losses[len(self._pending)] = loss  # a copy on the device: no wait for the step to finish
                self._pending.append((len(labels), f"epoch {epoch} step {progress.step_in_epoch}"))
                if self.settings.schedule == "onecycle":
                    parts.schedule.step()
                if parts.ema is not None:
                    parts.ema.update(self.model, step=progress.global_step)
                images += len(labels)
                progress.step_in_epoch += 1
                progress.global_step += 1
                if len(self._pending) == self.read_every:
                    self._read_losses(bar)
            if bar is not None:
                bar.update(1)  # draws the bar, postfix included, at most once per interval
            if self.on_step is not None:
                self.on_step(self, epoch, progress.step_in_epoch)
        self._read_losses(bar)
        return images

    def _read_losses(self, bar: Any = None, together: bool = True) -> None:
        """Add the losses of the steps since the last read to the epoch's running loss, in step order (one host
        sync); raise :class:`TrainingDiverged` naming the first step whose loss was not finite (on every rank
        together, unless not ``together``). Its weights were stepped since, but no checkpoint is written before
        this read."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        losses = self._losses[:len(pending)].tolist()
        bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
        if bad is not None:
            value, where = losses[bad], pending[bad][1]
        else:
            value, where = math.nan, f"another process's step, at most {pending[-1][1]}"
        stop = bad is not None
        if self.world.distributed and together:  # every rank must stop together, or DDP hangs
            stop = bool(all_sum([float(stop)], self.world)[0])
        if stop:
            raise TrainingDiverged(self._divergence_message(value, where))
        progress = self.progress
        for (count, _), value in zip(pending, losses):
            progress.loss_sum += value * count
            progress.loss_count += count
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{self.current_lr():.3g}", refresh=False)

    def _progress_bar(self, steps: int, start: int, epoch: int) -> Any:
        if not (self.settings.progress and self.world.is_main and self.checkpoints is not None):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                    **bar_options())

    def end_epoch(self) -> dict[str, Any]:
        """Close the epoch: its metrics row (validated on the main rank), the plateau schedule, the checkpoint."""
        progress = self.progress
        epoch = progress.epoch
        loss_sum, count, images = all_sum([progress.loss_sum, float(progress.loss_count), float(self._epoch_images)],
                                          self.world)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(count, 1), "lr": self.current_lr(),
                               "epoch_seconds": self._epoch_seconds,
                               "images_per_s": images / max(self._epoch_seconds, 1e-9)}
        scores = broadcast(self._validate() if self.world.is_main else None, self.world)
        row.update(scores)
        top1 = max((scores[k] for k in ("val_top1", "ema_top1") if scores.get(k) is not None), default=None)
        improved = top1 is not None and (progress.best_top1 is None or top1 > progress.best_top1)
        if improved:
            progress.best_top1, progress.best_epoch = top1, epoch
        row["best_top1"] = progress.best_top1
        schedule = self.parts.schedule
        if isinstance(schedule, ReduceLROnPlateauV2):
            schedule.step(row["train_loss"], top1 if top1 is not None else -row["train_loss"])
            progress.stopped_early = schedule.should_stop and epoch + 1 < self.epochs
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        progress.loss_sum, progress.loss_count = 0.0, 0
        if self.checkpoints is not None and self.world.is_main:
            self.checkpoints.save_epoch(row, self.model, self.parts, progress, self.lr, improved)
        barrier(self.world)
        if self.world.is_main:
            self.log(format_row(row, self.epochs))
        return row

    def _validate(self) -> dict[str, Any]:
        if self.validator is None:
            return {}
        ema = self.parts.ema
        return self.validator.scores(self.model, ema.module if ema is not None else None)


def format_row(row: dict[str, Any], epochs: int) -> str:
    """An epoch's log line."""
    parts = [f"epoch {row['epoch'] + 1}/{epochs}", f"loss {row['train_loss']:.4f}"]
    for key in ("val_top1", "val_top5", "val_ece", "ema_top1"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.2f}")
    parts += [f"lr {row['lr']:.3g}", f"{row['images_per_s']:.0f} img/s"]
    return "  ".join(parts)
