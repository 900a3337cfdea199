"""Soft targets from stored sparse top-k teacher probabilities."""

from __future__ import annotations

from typing import Literal

import torch

RemainingMass = Literal["renormalize", "spread"]


def dense_target(indices: torch.Tensor, probs: torch.Tensor, num_classes: int,
                 remaining_mass: RemainingMass = "renormalize") -> torch.Tensor:
    """Dense ``[..., num_classes]`` distribution from top-k ``indices`` and ``probs`` (``[..., k]``).

    ``renormalize`` scales the top-k probabilities to sum to one (a record whose stored probabilities all
    rounded to 0, possible only for a flat teacher over more than about 2 x ``prob_scale`` classes, gets its k
    classes in equal parts rather than no target at all); ``spread`` keeps them and spreads the mass the
    teacher gave the other classes evenly over those classes.
    """
    probs = probs.to(torch.float32)
    k = probs.shape[-1]
    if remaining_mass == "renormalize":
        dense = torch.zeros(*probs.shape[:-1], num_classes, dtype=torch.float32)
        total = probs.sum(-1, keepdim=True)
        kept = torch.where(total > 0, probs / total.clamp_min(1e-12), torch.full_like(probs, 1.0 / k))
        return dense.scatter_(-1, indices.long(), kept)
    if remaining_mass == "spread":
        rest = (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0)
        fill = rest / (num_classes - k) if num_classes > k else torch.zeros_like(rest)
        dense = fill.expand(*probs.shape[:-1], num_classes).clone()
        return dense.scatter_(-1, indices.long(), probs)
    raise ValueError(f"remaining_mass must be 'renormalize' or 'spread', got {remaining_mass!r}")
