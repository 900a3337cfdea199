"""The run directory: what a person (or ``--resume``) finds after training.

    config.json        the resolved settings (every recipe default, the image size, normalization, LR and EMA
                       decay filled in)
    metrics.jsonl      one JSON line per epoch
    checkpoint.pt      everything ``--resume`` needs (weights, optimizer, schedule, EMA, RNG, position)
    best.safetensors   weights of the best validation top-1 so far; last.safetensors: of the last epoch
    curves.png         loss, accuracy and LR per epoch (when matplotlib is installed: the ``train`` extra)
    summary.json       final numbers, the teacher report and any warning

Files are written to a temporary name and renamed, so an interrupted write never replaces a good file.
The checkpoint is a ``torch.save`` file of tensors and plain values, read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import TrainError
from .settings import Settings, changed_fields

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"
LAST = "last.safetensors"
LAST_EMA = "last_ema.safetensors"
PLOT = "curves.png"
SUMMARY = "summary.json"


class RunDirectory:
    """The files of one run under ``path`` (module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def has_checkpoint(self) -> bool:
        return self.file(CHECKPOINT).is_file()

    def open(self, resume: bool) -> None:
        """Create the directory of a new run (refusing one that holds files), or check that ``--resume`` has a
        checkpoint to continue from."""
        if resume:
            if not self.has_checkpoint:
                raise TrainError(f"--resume: {self.file(CHECKPOINT)} does not exist; start without --resume")
            return
        if self.path.exists() and any(self.path.iterdir()):
            hint = " (it holds a checkpoint: add --resume to continue it)" if self.has_checkpoint else ""
            raise TrainError(f"run directory {self.path} is not empty{hint}: pass a new --out")
        self.path.mkdir(parents=True, exist_ok=True)

    def record(self, settings: Settings) -> None:
        """Write a new run's resolved settings to ``config.json``."""
        self.write_json(CONFIG, settings.to_json())

    def check_unchanged(self, settings: Settings) -> None:
        """``--resume``: refuse settings that differ from the recorded ones, naming the first."""
        saved = json.loads(self.file(CONFIG).read_text())
        changed = changed_fields(saved, settings)
        if changed:
            first = changed[0]
            more = f" (and {len(changed) - 1} more: {changed[1:]})" if len(changed) > 1 else ""
            raise TrainError(f"--resume with a changed recipe: {first} was {saved.get(first)!r}, now "
                             f"{settings.to_json().get(first)!r}{more}. Resume with the same settings, or train "
                             "into a new --out directory")

    def write_json(self, name: str, value: Any) -> None:
        self._replace(name, lambda tmp: tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n"))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.file(METRICS), "a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not self.file(METRICS).is_file():
            return []
        return [json.loads(line) for line in self.file(METRICS).read_text().splitlines() if line.strip()]

    def truncate_metrics(self, epochs: int) -> None:
        """Keep the lines of the first ``epochs`` epochs (a resumed run rewrites what followed its checkpoint)."""
        kept = [row for row in self.metrics() if row["epoch"] < epochs]
        self._replace(METRICS, lambda tmp: tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n"
                                                                   for r in kept)))

    def save_weights(self, name: str, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
        text = {key: json.dumps(value) for key, value in metadata.items()}
        self._replace(name, lambda tmp: save_file(tensors, str(tmp), metadata=text))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self._replace(CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> dict[str, Any]:
        return torch.load(self.file(CHECKPOINT), map_location="cpu", weights_only=True)

    def plot(self) -> bool:
        """Draw ``curves.png``; False when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        rows = self.metrics()
        if not rows:
            return False
        epochs = [row["epoch"] + 1 for row in rows]
        figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(epochs, [row["train_loss"] for row in rows])
        axes[0].set_title("train loss")
        for key in ("val_top1", "val_top5", "ema_top1"):
            values = [row.get(key) for row in rows]
            if any(v is not None for v in values):
                axes[1].plot(epochs, values, label=key)
        axes[1].set_title("validation accuracy" if axes[1].lines else "validation accuracy (no --val)")
        if axes[1].lines:
            axes[1].legend()
        axes[2].plot(epochs, [row["lr"] for row in rows])
        axes[2].set_yscale("log")
        axes[2].set_title("learning rate")
        for axis in axes:
            axis.set_xlabel("epoch")
        figure.tight_layout()
        self._replace(PLOT, lambda tmp: figure.savefig(tmp, format="png", dpi=90))
        plt.close(figure)
        return True

    def _replace(self, name: str, write) -> None:
        target = self.file(name)
        tmp = target.with_name(f".{target.name}.tmp")
        write(tmp)
        os.replace(tmp, target)
