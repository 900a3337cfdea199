"""Losses: hard-label cross entropy, KL to a teacher distribution, and USI's mix of the two (paper 002, Eq. 2-4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy


def kd_kl(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 KL(p_t(tau) || p_s(tau)), batch mean (Eq. 4).

    ``teacher_probs`` are the teacher's probabilities at temperature 1 (what a store keeps); at another tau
    they are re-tempered as ``p^(1/tau)`` renormalized, which equals the softmax of the teacher logits over tau.
    The classes a store's top-k leaves at zero stay at zero (a floor under the log would hand them mass: 24 % of
    a top-5 target over 1,000 classes at tau 4).
    """
    if temperature != 1.0:
        tempered = teacher_probs.pow(1.0 / temperature)
        teacher_probs = tempered / tempered.sum(dim=-1, keepdim=True)
    log_student = F.log_softmax(logits / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature ** 2


def hard_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE on integer labels, or on mixed one-hot label vectors (timm's SoftTargetCrossEntropy)."""
    if labels.dim() == 2:
        return SoftTargetCrossEntropy()(logits, labels)
    return F.cross_entropy(logits, labels)


class DistillationLoss(torch.nn.Module):
    """``ce_weight * CE(student, label) + alpha_kd * KL(teacher || student)`` (USI Eq. 2).

    ``alpha_kd = inf`` (``--kd-only``) drops the CE term: the loss is the KL alone. Without teacher probabilities
    in the batch (``teacher_probs.numel() == 0``) the loss is the CE alone.
    """

    def __init__(self, alpha_kd: float = 5.0, temperature: float = 1.0, use_ce: bool = True) -> None:
        super().__init__()
        self.alpha_kd = alpha_kd
        self.temperature = temperature
        self.use_ce = use_ce and not math.isinf(alpha_kd)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        if teacher_probs.numel() == 0:
            return hard_ce(logits, labels)
        kd = kd_kl(logits, teacher_probs, self.temperature)
        if not self.use_ce:
            return kd
        return hard_ce(logits, labels) + self.alpha_kd * kd
