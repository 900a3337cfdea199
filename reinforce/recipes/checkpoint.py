"""Checkpoints and weights of a run, beside its :class:`~reinforce.recipes.run.RunDirectory`: what ``--resume``
needs (assembled from the loop's parts and position, and restored into them), and each epoch's weights."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from .distributed import World
from .errors import TrainError
from .factories import TrainingParts
from .run import BEST, CHECKPOINT, LAST, LAST_EMA, RunDirectory
from .settings import Settings

PLOT_INTERVAL_S = 30.0
"""curves.png is redrawn after an epoch at most this often (and after the last): a plot costs about a second,
more than a whole epoch of a small dataset."""


@dataclasses.dataclass
class Progress:
    """Where a loop stands and what it has seen: all of it is in the checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False


class Checkpointer:
    """Writes and reads one run's checkpoint and weights (on the main rank; the caller decides when)."""

    def __init__(self, run: RunDirectory, settings: Settings, world: World, device: torch.device) -> None:
        self.run, self.settings, self.world, self.device = run, settings, world, device
        self._plotted_at = -math.inf

    @property
    def path(self) -> str:
        return str(self.run.file(CHECKPOINT))

    def kept(self) -> str:
        """What a failed run leaves to resume from."""
        if self.run.has_checkpoint:
            return f"the last good checkpoint {self.path} is kept (resume with --resume)"
        return "no checkpoint had been written yet"

    def assemble(self, model: torch.nn.Module, parts: TrainingParts, progress: Progress, lr: float) -> dict[str, Any]:
        """Everything ``--resume`` needs: weights, optimizer, schedule, EMA, position, RNG."""
        return {
            "model": model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "schedule": parts.schedule.state_dict(), "ema": parts.ema.state_dict() if parts.ema is not None else {},
            **dataclasses.asdict(progress), "lr": lr, "world_size": self.world.size,
            "torch_rng": torch.get_rng_state(),
            # dropout and drop-path on a GPU draw from its own generator
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
        }

    def save(self, model: torch.nn.Module, parts: TrainingParts, progress: Progress, lr: float) -> None:
        self.run.save_checkpoint(self.assemble(model, parts, progress, lr))

    def restore(self, model: torch.nn.Module, parts: TrainingParts) -> Progress:
        """Load the run's checkpoint into ``model`` and ``parts`` (and the RNG); the position to continue from."""
        state = self.run.load_checkpoint()
        saved_world = int(state.get("world_size", self.world.size))
        if saved_world != self.world.size:
            raise TrainError(
                f"the checkpoint was written by a run of {saved_world} process(es) and this run has "
                f"{self.world.size}: the sample order, the position within the epoch and the length of the LR "
                f"schedule depend on the number of processes, so resume it with {saved_world} (torchrun "
                f"--nproc-per-node {saved_world}), or start a new run in another --out")
        model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.schedule.load_state_dict(state["schedule"])
        if parts.ema is not None:
            parts.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        return Progress(**{field.name: state[field.name] for field in dataclasses.fields(Progress)})

    def save_epoch(self, row: dict[str, Any], model: torch.nn.Module, parts: TrainingParts, progress: Progress,
                   lr: float, improved: bool) -> None:
        """An epoch's metrics line, last (and EMA) weights, best weights when ``improved``, checkpoint, and curves
        (:data:`PLOT_INTERVAL_S`)."""
        self.run.append_metrics(row)
        # input_size/mean/std as `reinforce build --teacher` reads them: a run's weights can teach a store.
        meta = {"epoch": row["epoch"], "arch": self.settings.arch, "input_size": self.settings.image_size,
                "mean": list(self.settings.mean), "std": list(self.settings.std)}
        self.run.save_weights(LAST, model.state_dict(), {**meta, "weights": "model"})
        if parts.ema is not None:
            self.run.save_weights(LAST_EMA, parts.ema.module.state_dict(), {**meta, "weights": "ema"})
        if improved:
            use_ema = row.get("ema_top1") is not None and row["ema_top1"] >= (row.get("val_top1") or 0)
            module = parts.ema.module if use_ema else model
            self.run.save_weights(BEST, module.state_dict(), {**meta, "weights": "ema" if use_ema else "model",
                                                              "top1": progress.best_top1})
        self.save(model, parts, progress, lr)
        last = progress.epoch >= self.settings.epochs or progress.stopped_early
        if last or time.monotonic() - self._plotted_at >= PLOT_INTERVAL_S:
            self.run.plot()
            self._plotted_at = time.monotonic()
