"""Learning-rate schedules: one-cycle (torch's, per step) for usi/plain, ReduceLROnPlateauV2 for adaptive."""

from __future__ import annotations

import math
from typing import Any

import torch


def one_cycle(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int) -> Any:
    """torch's OneCycleLR (cosine annealing) whose rise lasts ``warmup_steps`` of ``total_steps`` (at most half)."""
    if total_steps < 3:
        from .errors import TrainError

        raise TrainError(f"the run has {total_steps} optimizer steps, too few for a one-cycle schedule (rise and "
                         "fall need 3): raise --epochs or lower --batch-size")
    max_lrs = [group["lr"] for group in optimizer.param_groups]
    # At most half the run rises; torch needs at least 2 steps of rise and 1 of fall.
    rise = min(max(min(warmup_steps, total_steps // 2), 2), total_steps - 1)
    pct_start = rise / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps,
                                               pct_start=pct_start, anneal_strategy="cos")


class ReduceLROnPlateauV2:
    """Paper 000's schedule: linear warmup, then decay on a plateau of the training loss, with two additions.

    - forced decay: if no decay has happened once ``forced_decay_at`` (75 %) of ``max_epochs`` have passed, the
      LR is decayed anyway (a noisy training loss may never look like a plateau);
    - early stop: once the LR has reached its floor (``base_lr * min_lr_ratio``) and the validation score has not
      improved for ``patience`` epochs trained at that floor, :attr:`should_stop` turns true.

    Call :meth:`step` once at the end of every epoch with that epoch's mean training loss and validation score
    (higher is better). The LR of each param group is ``lr * group.get("lr_scale", 1)``, so biases keep their
    x2 scale. Epoch ``e < warmup_epochs`` runs at ``base_lr * (e + 1) / warmup_epochs``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, *, max_epochs: int, warmup_epochs: int = 5,
                 patience: int = 5, factor: float = 0.1, min_lr_ratio: float = 1e-3, threshold: float = 1e-4,
                 forced_decay_at: float = 0.75) -> None:
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.max_epochs = int(max_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.patience = int(patience)
        self.factor = float(factor)
        self.min_lr = self.base_lr * float(min_lr_ratio)
        self.threshold = float(threshold)
        self.forced_decay_epoch = math.ceil(forced_decay_at * self.max_epochs)
        self.lr = self.base_lr
        self.epoch = 0
        self.best_loss = math.inf
        self.loss_bad_epochs = 0
        self.best_score = -math.inf
        self.score_bad_epochs = 0
        self.decays = 0
        self.should_stop = False
        self._apply(self.lr_for_epoch(0))

    def lr_for_epoch(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.base_lr * (epoch + 1) / self.warmup_epochs
        return self.lr

    def step(self, train_loss: float, val_score: float) -> None:
        """Record the end of epoch ``self.epoch`` and set the LR of the next one."""
        finished = self.epoch
        self.epoch += 1
        if val_score > self.best_score:
            self.best_score, self.score_bad_epochs = val_score, 0
        else:
            self.score_bad_epochs += 1
        if finished >= self.warmup_epochs - 1:  # the plateau test starts once the full LR has run an epoch
            self._plateau_step(train_loss)
        if self.epoch >= self.max_epochs or (self.lr <= self.min_lr and self.score_bad_epochs >= self.patience):
            self.should_stop = True
        self._apply(self.lr_for_epoch(self.epoch))

    def _plateau_step(self, train_loss: float) -> None:
        if train_loss < self.best_loss * (1 - self.threshold):
            self.best_loss, self.loss_bad_epochs = train_loss, 0
        else:
            self.loss_bad_epochs += 1
        if self.loss_bad_epochs > self.patience or (self.decays == 0 and self.epoch >= self.forced_decay_epoch):
            self._decay()

    def _decay(self) -> None:
        if self.lr <= self.min_lr:
            return
        decayed = self.lr * self.factor
        # Snap to the floor when within rounding of it (0.1 x 0.1 is not exactly 0.01 in floating point).
        self.lr = self.min_lr if decayed <= self.min_lr * (1 + 1e-9) else decayed
        if self.lr <= self.min_lr:  # the early-stop patience counts epochs trained at the floor
            self.score_bad_epochs = 0
        self.decays += 1
        self.loss_bad_epochs = 0
        self.best_loss = math.inf  # a new LR starts a new plateau search

    def _apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._apply(self.lr_for_epoch(self.epoch))

