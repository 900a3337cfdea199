"""Sharpness-Aware Minimization (Foret et al. 2021) around any optimizer; timm 1.0 has none.

A SAM step is two forward/backward passes: the first gradient moves the weights to the worst point within an
L2 ball of radius ``rho`` (:meth:`SAM.perturb`); the gradient there updates the original weights
(:meth:`SAM.step`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


@contextlib.contextmanager
def frozen_norm_statistics(module: torch.nn.Module) -> Iterator[None]:
    """Batch norms still normalize with the batch's statistics, but keep their running ones (SAM's second pass
    runs at the perturbed weights, whose activation statistics are not the model's)."""
    saved = []
    for layer in module.modules():
        if isinstance(layer, _BATCH_NORMS) and layer.track_running_stats:
            tracked = None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone()
            saved.append((layer, layer.momentum, tracked))
            layer.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for layer, momentum, tracked in saved:
            layer.momentum = momentum
            if tracked is not None:
                layer.num_batches_tracked.copy_(tracked)


class SAM:
    """Wraps ``optimizer``; call :meth:`perturb` after the first backward and :meth:`step` after the second."""

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float = 0.05) -> None:
        if rho <= 0:
            raise ValueError(f"SAM rho must be positive, got {rho}")
        self.optimizer = optimizer
        self.rho = float(rho)
        self._offsets: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @torch.no_grad()
    def perturb(self) -> None:
        """w <- w + rho * g / ||g|| (the norm over every parameter with a gradient)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = self.rho / (norm + 1e-12)
        self._offsets = []
        for p in params:
            offset = p.grad * scale
            p.add_(offset)
            self._offsets.append((p, offset))

    @torch.no_grad()
    def step(self) -> None:
        """Restore the weights and apply the wrapped optimizer with the gradient taken at the perturbed point."""
        for p, offset in self._offsets:
            p.sub_(offset)
        self._offsets = []
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
