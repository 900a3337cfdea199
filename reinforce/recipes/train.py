"""The training loop shared by the three recipes, and :func:`train`, the entry point behind ``reinforce train``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..progress import bar_options
from .config import TrainConfig, TrainError, resolve
from .data import AugmentedSamples, EvalSamples, StoreSamples, check_classes, sample_seed
from .distill import TeacherReport, baseline_top1, ensemble_probs, teacher_report
from .distributed import World, all_sum, barrier, broadcast, device_for, init_world, resolve_device, shutdown
from .lr_finder import range_test, tpe_search
from .losses import DistillationLoss, SoftMixing
from .models import Student, check_module_classes, create_student
from .run import BEST, LAST, SUMMARY, RunDirectory
from .samplers import (EntropyCurriculum, FixedBatchSampler, VariableBatchSampler, multiscale_sizes,
                       stored_entropies)
from .sam import SAM, frozen_norm_statistics
from .schedules import ReduceLROnPlateauV2, one_cycle

EMA_RUN_FRACTION = 1 / 15
"""EMA time constant as a fraction of the run's steps: USI's 0.99996 at ~375k steps is 25k steps, 1/15 of it."""

StepHook = Callable[["Trainer", int, int], None]


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite."""


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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a run's forward passes, None for fp32 (``TrainConfig.precision``)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def stores_mixed_records(train_set: Any) -> bool:
    """Whether ``train_set`` serves a store whose preset mixed its records (MixUp/CutMix are then the store's)."""
    return bool(getattr(train_set, "mixes", False))


def uses_hard_labels(settings: dict[str, Any], train_set: Any) -> bool:
    """Whether the loss has a CE term on the hard labels: always without soft targets (no store, no online
    teachers); not with --kd-only, --kd-mode replace (adaptive), or a store of mixed records (their label is the
    teacher's target on the mixed image)."""
    if not (settings["store"] or settings["teachers"]):
        return True
    return not (settings["kd_only"] or stores_mixed_records(train_set)
                or (settings["recipe"] == "adaptive" and settings["kd_mode"] == "replace"))


class StepBoundaryInterrupts:
    """Ctrl-C (SIGINT) during a training step takes effect when the step has ended, so the checkpoint written on
    an interrupt holds a whole number of steps and ``--resume`` continues exactly: the step's random draws,
    optimizer update, LR step and EMA update are all in it or all out. Between steps it takes effect at once; a
    second Ctrl-C inside a step stops at once (:attr:`mid_step`, and no checkpoint is written of that step).

    Only in the main thread of a single-process run: under ``torchrun`` the ranks would have to agree on the
    step to stop after, and a rank that had already left would leave the others waiting in DDP's all-reduce.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.in_step = False
        self.requested = False
        self.mid_step = False
        self._previous: Any = None

    def __enter__(self) -> StepBoundaryInterrupts:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:  # None: a handler not installed from Python; Python's own is the closest
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Context of one step: an interrupt inside it is raised (as KeyboardInterrupt) at its end."""
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
        if self.requested:
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: Any) -> None:
        if self.in_step and not self.requested:
            self.requested = True
            return
        self.mid_step = self.in_step
        raise KeyboardInterrupt


class Trainer:
    """One student, its optimizer, schedule and EMA, and the data it trains on; epochs and steps of one recipe."""

    def __init__(self, settings: dict[str, Any], *, world: World, device: torch.device, train_set: Any,
                 val_set: Any, student: Student, num_classes: int, lr: float, epochs: int,
                 ensemble: Any = None, run: RunDirectory | None = None, log: Callable[[str], None] = print,
                 on_step: StepHook | None = None) -> None:
        self.settings = settings
        self.world, self.device = world, device
        self.train_set, self.val_set = train_set, val_set
        self.num_classes = num_classes
        self.lr, self.epochs = lr, epochs
        self.ensemble = ensemble.to(device) if ensemble is not None else None
        self.autocast_dtype = autocast_dtype(settings["precision"], device)
        self.memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
        if self.ensemble is not None:
            for member in self.ensemble.members:
                member.module.to(memory_format=self.memory_format)
        self.run, self.log, self.on_step = run, log, on_step
        self.model = student.module.to(device, memory_format=self.memory_format)
        self.mean = torch.tensor(student.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(student.std, device=device).view(1, 3, 1, 1) * 255
        self.net = (torch.nn.parallel.DistributedDataParallel(self.model) if world.distributed else self.model)
        self.optimizer = make_optimizer(settings, self.model, lr)
        self.sam = SAM(self.optimizer, settings["sam_rho"]) if settings["sam"] else None
        self.sampler = make_sampler(settings, len(train_set), world)
        self.schedule = self._make_schedule()
        self.ema = self._make_ema()
        self.loss_fn = DistillationLoss(settings["alpha_kd"], settings["temperature"],
                                        use_ce=uses_hard_labels(settings, train_set))
        wants_mixing = settings["mixup"] > 0 or settings["cutmix"] > 0
        self.mixing = (SoftMixing(settings["mixup"], settings["cutmix"], num_classes)
                       if wants_mixing and not stores_mixed_records(train_set) else None)
        self._train_loader: torch.utils.data.DataLoader | None = None
        self._val_loader: torch.utils.data.DataLoader | None = None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.best_top1: float | None = None
        self.best_epoch: int | None = None
        self.stopped_early = False

    # --- construction -------------------------------------------------------------------------------------
    def steps_in_epoch(self, epoch: int) -> int:
        self.sampler.set_epoch(epoch)
        return len(self.sampler)

    def _make_schedule(self) -> Any:
        if self.settings["schedule"] == "plateau":
            return ReduceLROnPlateauV2(self.optimizer, self.lr, max_epochs=self.epochs,
                                       warmup_epochs=int(self.settings["warmup_epochs"]),
                                       patience=self.settings["patience"], factor=self.settings["decay_factor"],
                                       min_lr_ratio=self.settings["min_lr_ratio"])
        total = sum(self.steps_in_epoch(epoch) for epoch in range(self.epochs))
        warmup = int(round(self.settings["warmup_epochs"] * total / self.epochs))
        return one_cycle(self.optimizer, total_steps=total, warmup_steps=warmup)

    def _make_ema(self) -> Any:
        if not self.settings["ema"]:
            return None
        from timm.utils import ModelEmaV3

        decay = self.settings["ema_decay"]
        if decay is None:
            total = sum(self.steps_in_epoch(epoch) for epoch in range(self.epochs))
            decay = 1 - 1 / max(10.0, EMA_RUN_FRACTION * total)
        self.ema_decay = float(decay)
        return ModelEmaV3(self.model, decay=self.ema_decay)

    # --- steps ---------------------------------------------------------------------------------------------
    def loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        """The training loader positioned at (epoch, start step); one loader, so workers persist."""
        self.train_set.set_epoch(epoch)  # shared memory: reaches persistent workers
        self.sampler.set_epoch(epoch)  # the batch sampler runs in this process
        self.sampler.set_start(start)
        if self._train_loader is None:
            workers = self.settings["workers"]
            # An explicit generator keeps the DataLoader from drawing on the global RNG (resume equality).
            self._train_loader = torch.utils.data.DataLoader(
                self.train_set, batch_sampler=self.sampler, num_workers=workers, persistent_workers=workers > 0,
                pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(self.settings["seed"]))
        return self._train_loader

    def prepare(self, batch: Any, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mix (optional), ask the online teacher (optional), normalize."""
        images, labels, soft = batch
        x = images.to(self.device, non_blocking=True).float()
        labels = labels.to(self.device)
        soft = soft.to(self.device)
        if self.mixing is not None:
            np.random.seed(sample_seed(self.settings["seed"], epoch, step, purpose=2) % 2 ** 32)  # timm uses np
            x, labels, soft = self.mixing(x, labels, soft)
        if self.ensemble is not None:
            with self.autocast():
                soft = ensemble_probs(self.ensemble, x).float()  # the teacher sees the student's (mixed) pixels
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format), labels, soft

    def optimize(self, x: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor, where: str) -> float:
        """One optimizer step (two forward/backward passes with SAM); returns the loss."""
        self.net.train()
        loss = self.loss_fn(self.forward(x), labels, soft)
        self._check_finite(loss, where)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sam is not None:
            self.sam.perturb()
            self.optimizer.zero_grad(set_to_none=True)
            with frozen_norm_statistics(self.net):
                self.loss_fn(self.forward(x), labels, soft).backward()
            self.sam.step()
        else:
            self.optimizer.step()
        return float(loss.detach())

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
        if self.run is not None and self.run.has_checkpoint:
            kept = f"the last good checkpoint {self.run.file('checkpoint.pt')} is kept (resume with --resume)"
        else:
            kept = "no checkpoint had been written yet"
        lowers = [f"--lr (now {self.current_lr():.3g})"]
        if self.loss_fn.use_ce and self.ensemble is None and self.settings["store"]:
            lowers.append(f"--alpha-kd (now {self.settings['alpha_kd']:g})")
        if self.settings["sam"]:
            lowers.append(f"--sam-rho (now {self.settings['sam_rho']:g})")
        return (f"the loss became {value} at {where}: training stopped; {kept}. Lower {' or '.join(lowers)}, or "
                "raise --warmup-epochs")

    def train_step(self, batch: Any, lr: float) -> float:
        """A step at a fixed ``lr`` (times each group's ``lr_scale``), for the LR range test; its loss averaged over
        the ranks, so that every rank's range test sees the same curve, stops at the same step and chooses the
        same LR."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        x, labels, soft = self.prepare(batch, 0, self.global_step)
        self.global_step += 1
        try:
            loss = self.optimize(x, labels, soft, f"range-test step {self.global_step}")
        except TrainingDiverged:  # raised on every rank together (_check_finite)
            return math.inf
        return all_sum([loss], self.world)[0] / self.world.size

    def batches_forever(self, epoch: int = 0) -> Iterator[Any]:
        """Training batches of ``epoch``, ``epoch + 1``, ... without end."""
        while True:
            yield from self.loader(epoch, 0)
            epoch += 1

    def current_lr(self) -> float:
        group = self.optimizer.param_groups[0]
        return float(group["lr"]) / group.get("lr_scale", 1.0)

    # --- epochs --------------------------------------------------------------------------------------------
    def fit(self, report: Callable[[float, int], bool] | None = None) -> None:
        """Train from ``self.epoch``/``self.step_in_epoch`` to the end (or an early stop, or a pruned trial)."""
        while self.epoch < self.epochs and not self.stopped_early:
            self.train_epoch()
            row = self.end_epoch()
            if report is not None and report(row.get("best_top1") or 0.0, row["epoch"]):
                return

    def train_epoch(self) -> None:
        epoch, start = self.epoch, self.step_in_epoch
        steps = self.steps_in_epoch(epoch)
        began = time.perf_counter()
        bar = self._progress(steps, start, epoch)
        interrupts = StepBoundaryInterrupts(enabled=not self.world.distributed)
        try:
            with interrupts:
                images = self._train_steps(epoch, start, bar, interrupts)
        except KeyboardInterrupt:
            if self.run is not None and self.world.is_main:
                if interrupts.mid_step:
                    self.log(f"interrupted twice, inside epoch {epoch} step {self.step_in_epoch}: no checkpoint "
                             "of that half-done step is written; --resume continues from the last one, "
                             f"{self.run.file('checkpoint.pt')}")
                else:
                    self.save_checkpoint()
                    self.log(f"interrupted at epoch {epoch} step {self.step_in_epoch}: checkpoint written to "
                             f"{self.run.file('checkpoint.pt')}; continue with --resume")
            raise
        finally:
            if bar is not None:
                bar.close()
        self.epoch_seconds = time.perf_counter() - began
        self.epoch_images = images

    def _train_steps(self, epoch: int, start: int, bar: Any, interrupts: StepBoundaryInterrupts) -> int:
        """The steps of ``epoch`` from step ``start``; returns the images trained on."""
        images = 0
        for batch in self.loader(epoch, start):
            with interrupts.step():
                x, labels, soft = self.prepare(batch, epoch, self.step_in_epoch)
                loss = self.optimize(x, labels, soft, f"epoch {epoch} step {self.step_in_epoch}")
                if self.settings["schedule"] == "onecycle":
                    self.schedule.step()
                if self.ema is not None:
                    self.ema.update(self.model, step=self.global_step)
                self.loss_sum += loss * len(labels)
                self.loss_count += len(labels)
                images += len(labels)
                self.step_in_epoch += 1
                self.global_step += 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.current_lr():.3g}", refresh=False)
                bar.update(1)  # draws the bar, postfix included, at most once per interval
            if self.on_step is not None:
                self.on_step(self, epoch, self.step_in_epoch)
        return images

    def _progress(self, steps: int, start: int, epoch: int) -> Any:
        if not (self.settings["progress"] and self.world.is_main and self.run is not None):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                    **bar_options())

    def end_epoch(self) -> dict[str, Any]:
        epoch = self.epoch
        loss_sum, count, images = all_sum([self.loss_sum, float(self.loss_count), float(self.epoch_images)],
                                          self.world)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(count, 1), "lr": self.current_lr(),
                               "epoch_seconds": self.epoch_seconds,
                               "images_per_s": images / max(self.epoch_seconds, 1e-9)}
        scores = self.evaluate_all() if self.world.is_main else None
        scores = broadcast(scores, self.world)
        row.update(scores)
        top1 = max((scores[k] for k in ("val_top1", "ema_top1") if scores.get(k) is not None), default=None)
        improved = top1 is not None and (self.best_top1 is None or top1 > self.best_top1)
        if improved:
            self.best_top1, self.best_epoch = top1, epoch
        row["best_top1"] = self.best_top1
        if isinstance(self.schedule, ReduceLROnPlateauV2):
            self.schedule.step(row["train_loss"], top1 if top1 is not None else -row["train_loss"])
            self.stopped_early = self.schedule.should_stop and epoch + 1 < self.epochs
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self.loss_sum, self.loss_count = 0.0, 0
        if self.run is not None and self.world.is_main:
            self._write_epoch(row, improved, scores)
        barrier(self.world)
        if self.world.is_main:
            self.log(_format_row(row, self.epochs))
        return row

    def _write_epoch(self, row: dict[str, Any], improved: bool, scores: dict[str, Any]) -> None:
        run = self.run
        run.append_metrics(row)
        # input_size/mean/std as `reinforce build --teacher` reads them: a run's weights can teach a store.
        meta = {"epoch": row["epoch"], "arch": self.settings["model"].partition("=")[0],
                "input_size": self.settings["image_size"], "mean": (self.mean.flatten() / 255).tolist(),
                "std": (self.std.flatten() / 255).tolist()}
        run.save_weights(LAST, self.model.state_dict(), {**meta, "weights": "model"})
        if self.ema is not None:
            run.save_weights("last_ema.safetensors", self.ema.module.state_dict(), {**meta, "weights": "ema"})
        if improved:
            use_ema = scores.get("ema_top1") is not None and scores["ema_top1"] >= (scores.get("val_top1") or 0)
            module = self.ema.module if use_ema else self.model
            run.save_weights(BEST, module.state_dict(), {**meta, "weights": "ema" if use_ema else "model",
                                                         "top1": self.best_top1})
        self.save_checkpoint()
        run.plot()

    @torch.no_grad()
    def evaluate_all(self) -> dict[str, Any]:
        if self.val_set is None:
            return {}
        with self.autocast():
            scores = {f"val_{k}": v for k, v in evaluate(self.model, self.val_batches(), self.mean, self.std).items()}
            if self.ema is not None:
                scores["ema_top1"] = evaluate(self.ema.module, self.val_batches(), self.mean, self.std)["top1"]
        return scores

    def val_batches(self) -> Any:
        if self._val_loader is None:
            workers = self.settings["workers"]
            self._val_loader = torch.utils.data.DataLoader(self.val_set, batch_size=256, num_workers=workers,
                                                           persistent_workers=workers > 0,
                                                           pin_memory=self.device.type == "cuda")
        return self._val_loader

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else {},
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "loss_sum": self.loss_sum, "loss_count": self.loss_count, "lr": self.lr,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch, "stopped_early": self.stopped_early,
            "world_size": self.world.size, "torch_rng": torch.get_rng_state(),
            # dropout and drop-path on a GPU draw from its own generator
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_world = int(state.get("world_size", self.world.size))
        if saved_world != self.world.size:
            raise TrainError(
                f"the checkpoint was written by a run of {saved_world} process(es) and this run has "
                f"{self.world.size}: the sample order, the position within the epoch and the length of the LR "
                f"schedule depend on the number of processes, so resume it with {saved_world} (torchrun "
                f"--nproc-per-node {saved_world}), or start a new run in another --out")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for key in ("epoch", "step_in_epoch", "global_step", "loss_sum", "loss_count", "best_top1", "best_epoch",
                    "stopped_early"):
            setattr(self, key, state[key])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def save_checkpoint(self) -> None:
        self.run.save_checkpoint(self.state_dict())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Any, mean: torch.Tensor, std: torch.Tensor,
             bins: int = 15) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and expected calibration error (percent, ``bins`` confidence bins)."""
    model.eval()
    device = mean.device
    correct1 = correct5 = total = 0
    confidences, hits = [], []
    for images, labels in batches:
        x = (images.to(device).float() - mean) / std
        labels = labels.to(device)
        probs = torch.softmax(model(x).float(), dim=-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(-1).sum())
        total += len(labels)
        confidences.append(probs.max(-1).values.cpu())
        hits.append((top[:, 0] == labels).float().cpu())
    confidence, hit = torch.cat(confidences), torch.cat(hits)
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += float(inside.float().mean() * (confidence[inside].mean() - hit[inside].mean()).abs())
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1), "ece": 100.0 * ece}


def make_optimizer(settings: dict[str, Any], model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory. usi/plain: AdamW, no weight decay on biases and norms (timm's filter);
    adaptive: SGD with momentum, no bias decay, biases at twice the LR (``lr_scale``)."""
    from timm.optim import create_optimizer_v2

    if settings["optimizer"] == "adamw":
        return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=settings["weight_decay"])
    return create_optimizer_v2(no_bias_decay_groups(model, settings["weight_decay"]), "momentum", lr=lr,
                               weight_decay=settings["weight_decay"], momentum=0.9)


def no_bias_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weights with decay; biases without decay at LR x2; other 1-D parameters (norms) without decay."""
    decay, biases, norms = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias"):
            biases.append(param)
        elif param.ndim <= 1:
            norms.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": biases, "weight_decay": 0.0, "lr_scale": 2.0},
              {"params": norms, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def make_sampler(settings: dict[str, Any], num_samples: int, world: World) -> FixedBatchSampler:
    common = dict(seed=settings["seed"], rank=world.rank, world_size=world.size)
    if settings["sampler"] == "multiscale":
        base = settings["image_size"]
        mixing = settings["mixup"] > 0 or settings["cutmix"] > 0
        return VariableBatchSampler(num_samples, settings["batch_size"], base, multiscale_sizes(base),
                                    multiple_of=2 if mixing else 1, **common)
    return FixedBatchSampler(num_samples, settings["batch_size"], **common)


def _format_row(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch'] + 1}/{epochs}", f"loss {row['train_loss']:.4f}"]
    for key in ("val_top1", "val_top5", "val_ece", "ema_top1"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.2f}")
    parts += [f"lr {row['lr']:.3g}", f"{row['images_per_s']:.0f} img/s"]
    return "  ".join(parts)


# --- the entry point -------------------------------------------------------------------------------------------

def train(config: TrainConfig, *, model: torch.nn.Module | None = None, log: Callable[[str], None] = print,
          on_step: StepHook | None = None) -> RunResult:
    """Train a student by one recipe into ``config.out`` (see :class:`TrainConfig`); ``model`` may replace the
    timm model named by ``config.model`` (it must predict the store's classes).

    Works under ``torchrun`` (DDP: gloo on CPU; on CUDA, NCCL for gradients and gloo for the CPU-side
    collectives). Ctrl-C writes a resumable checkpoint; ``resume=True`` continues it exactly.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    config = dataclasses.replace(config, device=resolve_device(config.device))
    world = init_world(config.device)
    try:
        return _train(config, world, model, log if world.is_main else (lambda _: None), on_step)
    finally:
        shutdown(world)


def _train(config: TrainConfig, world: World, model: torch.nn.Module | None, log: Callable[[str], None],
           on_step: StepHook | None) -> RunResult:
    settings = resolve(config)
    reference = baseline_top1(config.baseline) if config.baseline else None  # refused now, not after training
    device = device_for(config.device, world)
    run = RunDirectory(config.out)
    if world.is_main:
        run.prepare(settings, config.resume)
    barrier(world)
    train_set, num_classes, classes = make_train_set(config, settings)
    settings["image_size"] = settings["image_size"] or train_set.resolution
    student = _student(config, settings, num_classes, model)
    for note in student.notes:
        log(note)
    val_set = None
    if config.val_source is not None:
        val_set = EvalSamples(config.val_source, settings["image_size"], settings["test_crop"])
        check_classes(classes, val_set.classes, num_classes)
    if config.curriculum != "none":
        train_set.slot_policy = EntropyCurriculum(
            stored_entropies(train_set.dataset, train_set.dataset.header.block_size), config.curriculum,
            settings["epochs"], settings["seed"])
    ensemble = None
    if config.teachers:
        from ..build.teachers import create_ensemble

        ensemble = create_ensemble(config.teachers)
    report = _teacher_report(config, settings, train_set, val_set, world, ensemble, device)
    log(report.describe())
    kd_only = not uses_hard_labels(settings, train_set)
    kd_only_flag = ("a store of mixed records" if stores_mixed_records(train_set) and not config.kd_only else
                    "--kd-mode replace" if settings["recipe"] == "adaptive" else "--kd-only")
    warnings, notes = [], []
    if reference is not None:  # a plain student's top-1 is known before training: say now what it implies
        warning = report.warning(reference, kd_only, baseline=True, kd_only_flag=kd_only_flag)
        advice = report.suggestion(reference, not kd_only, kd_only_flag) if config.store or ensemble else None
        if warning:
            warnings.append(warning)
            log(f"WARNING: {warning}")
        if advice:
            notes.append(advice)
            log(f"note: {advice}")
    # Every rank must train at rank 0's LR: the estimate is made from the ranks' averaged losses, so they agree,
    # but DDP averages gradients, not learning rates, and a disagreement would never show as an error.
    lr = broadcast(_initial_lr(config, settings, world, train_set, val_set, student, num_classes, ensemble, log,
                               run), world)
    trainer = Trainer(settings, world=world, device=device, train_set=train_set, val_set=val_set, student=student,
                      num_classes=num_classes, lr=lr, epochs=settings["epochs"], ensemble=ensemble, run=run,
                      log=log, on_step=on_step)
    if config.resume:
        trainer.load_state_dict(run.load_checkpoint())
        if world.is_main:
            run.truncate_metrics(trainer.epoch)
        log(f"resumed at epoch {trainer.epoch} step {trainer.step_in_epoch}")
    elif world.is_main:
        log(f"{settings['recipe']}: {student.name} on {len(train_set)} images, {num_classes} classes, "
            f"{settings['epochs']} epochs of {len(trainer.sampler)} steps x {world.size} x {settings['batch_size']}, "
            f"lr {lr:.3g}, on {device}{' (bf16 autocast)' if trainer.autocast_dtype is not None else ''}")
    trainer.fit()
    rows = run.metrics() if world.is_main else []
    last = rows[-1] if rows else {}
    last_top1 = max((last.get(k) for k in ("val_top1", "ema_top1") if last.get(k) is not None), default=None)
    if reference is None:  # this run's own student is the only reference
        warning = report.warning(trainer.best_top1, kd_only, kd_only_flag=kd_only_flag)
        if warning:
            warnings.append(warning)
            log(f"WARNING: {warning}")
    result = RunResult(out=str(run.path), epochs_run=trainer.epoch, best_top1=trainer.best_top1,
                       best_epoch=trainer.best_epoch, last_top1=last_top1, lr=lr,
                       stopped_early=trainer.stopped_early, teacher=dataclasses.asdict(report), warnings=warnings,
                       notes=notes)
    if world.is_main:
        run.write_json(SUMMARY, dataclasses.asdict(result))
        log(f"done: best top-1 {_pct(result.best_top1)} at epoch {_epoch(result.best_epoch)}, {result.epochs_run} "
            f"epochs{' (early stop)' if result.stopped_early else ''}; {run.path}")
    return result


def make_train_set(config: TrainConfig, settings: dict[str, Any]) -> tuple[Any, int, list[str] | None]:
    if config.store:
        data = StoreSamples(config.train_source, config.store, resolution=config.image_size, decode=config.decode)
        return data, data.num_classes, data.classes
    data = AugmentedSamples(config.train_source, config.image_size or 224, settings["seed"],
                            allow_empty_classes=config.allow_empty_classes)
    return data, data.num_classes, data.classes


def _student(config: TrainConfig, settings: dict[str, Any], num_classes: int,
             model: torch.nn.Module | None) -> Student:
    if model is not None:
        check_module_classes(model, num_classes, settings["image_size"])
        mean = tuple(config.mean or (0.485, 0.456, 0.406))
        std = tuple(config.std or (0.229, 0.224, 0.225))
        return Student(module=model, name=type(model).__name__, mean=mean, std=std, input_size=None, notes=[])
    torch.manual_seed(settings["seed"])
    return create_student(config.model, num_classes, fine_tune=settings["fine_tune"], mean=config.mean,
                          std=config.std)


def _teacher_report(config: TrainConfig, settings: dict[str, Any], train_set: Any, val_set: Any,
                    world: World, ensemble: Any, device: torch.device) -> TeacherReport:
    if not world.is_main:
        return broadcast(None, world)
    header = train_set.dataset.header if config.store else None
    specs = config.teacher_weights or config.teachers

    def val_batches_at(size: int) -> Any:
        at_size = val_set if size == settings["image_size"] else EvalSamples(config.val_source, size,
                                                                             settings["test_crop"])
        return torch.utils.data.DataLoader(at_size, batch_size=256, num_workers=settings["workers"],
                                           pin_memory=device.type == "cuda")

    if not config.store and not specs:
        report = TeacherReport(None, "unknown", "no teachers in this recipe")
    else:
        online = ensemble if not config.teacher_weights else None  # specs are config.teachers: built already
        report = teacher_report(header, train_set if config.store else None, specs,
                                val_batches_at if val_set is not None else None, built=online, device=device)
    return broadcast(report, world)


def _initial_lr(config: TrainConfig, settings: dict[str, Any], world: World, train_set: Any, val_set: Any,
                student: Student, num_classes: int, ensemble: Any, log: Callable[[str], None],
                run: RunDirectory) -> float:
    """The recipe's LR, or (adaptive without --lr) the range test's or TPE's estimate, on copies of the student."""
    if settings["lr"] is not None:
        return float(settings["lr"])
    if config.resume:
        return float(run.load_checkpoint()["lr"])
    search = settings["lr_search"]
    low, high = settings["lr_range"]

    def trainer(lr: float, epochs: int) -> Trainer:
        copy_student = dataclasses.replace(student, module=copy.deepcopy(student.module))
        quiet = {**settings, "progress": False}
        return Trainer(quiet, world=world, device=device_for(config.device, world), train_set=train_set,
                       val_set=val_set, student=copy_student, num_classes=num_classes, lr=lr, epochs=epochs,
                       ensemble=ensemble, run=None, log=lambda _: None)

    if search == "range":
        probe = trainer(low, 1)
        for batch in probe.loader(0, 0):  # one epoch at a small LR first (paper 000), then the ramp
            probe.train_step(batch, low)
        # The ramp starts at epoch 1: epoch 0's batches (same images, same augmentations) were just trained on,
        # and their lower loss would read as a descent at the ramp's smallest LRs.
        found = range_test(probe.train_step, probe.batches_forever(1), start_lr=low / 1000, end_lr=high * 100,
                           num_steps=settings["range_steps"])
        lr = float(np.clip(found.chosen, low, high))  # the estimate stays inside --lr-range
        log(f"LR range test ({len(found.lrs)} steps after one epoch at {low:g}): steepest descent at "
            f"{found.chosen:.3g}, using {lr:.3g}{' (clipped to --lr-range)' if lr != found.chosen else ''}")
        return lr
    if search == "tpe":
        if val_set is None:
            raise TrainError("--lr-search tpe scores trials on the validation set: pass --val")

        def objective(lr: float, report: Callable[[float, int], bool]) -> float:
            trial = trainer(lr, settings["trial_epochs"])
            trial.fit(report=report)
            return trial.best_top1 or 0.0

        lr, history = tpe_search(objective, low, high, trials=settings["tpe_trials"], seed=settings["seed"])
        log(f"TPE over [{low:g}, {high:g}]: {len(history)} trials ({sum(h['pruned'] for h in history):.0f} pruned), "
            f"best lr {lr:.3g}")
        return lr
    raise TrainError("--recipe adaptive without --lr needs --lr-search range or tpe")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def _epoch(value: int | None) -> str:
    return "n/a" if value is None else str(value + 1)

