"""Minimal student training used by the demo: a fixed number of SGD steps, then top-1 accuracy."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)), batch mean: the DR paper's loss (temperature 1, no hard-label term)."""
    return F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="batchmean")


def hard_label_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def train(model: torch.nn.Module, batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
          steps: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, lr: float = 0.05,
          weight_decay: float = 5e-4, on_epoch: Callable[[int], None] | None = None) -> torch.nn.Module:
    """Train ``model`` for ``steps`` SGD steps with a cosine schedule. ``batches(epoch)`` yields one epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    step = 0
    for epoch in itertools.count():
        if on_epoch is not None:
            on_epoch(epoch)
        for images, targets in batches(epoch):
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                return model.eval()
    raise AssertionError("unreachable")


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy over labelled batches."""
    model.eval()
    correct = total = 0
    for images, labels in batches:
        correct += int((model(images).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / max(total, 1)
