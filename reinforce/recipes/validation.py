"""Each epoch's validation of a run: the student's top-1, top-5 and calibration error, and its EMA's top-1."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..evaluation import EvalSamples, evaluate

VAL_BATCH_SIZE = 256


class Validator:
    """Scores models on a validation set through one loader, kept (its workers persist) across epochs."""

    def __init__(self, val_set: EvalSamples, *, workers: int, device: torch.device, mean: torch.Tensor,
                 std: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.mean, self.std, self.autocast = mean, std, autocast
        self.loader = torch.utils.data.DataLoader(val_set, batch_size=VAL_BATCH_SIZE, num_workers=workers,
                                                  persistent_workers=workers > 0, pin_memory=device.type == "cuda")

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, ema_model: torch.nn.Module | None) -> dict[str, Any]:
        """``val_top1``, ``val_top5``, ``val_ece`` of ``model`` and ``ema_top1`` of ``ema_model`` (when given)."""
        with self.autocast():
            scores = {f"val_{key}": value for key, value in evaluate(model, self.loader, self.mean, self.std).items()}
            if ema_model is not None:
                scores["ema_top1"] = evaluate(ema_model, self.loader, self.mean, self.std)["top1"]
        return scores
