"""The adaptive recipe's initial LR estimation (paper 000, section 3) on hand-checked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from reinforce.recipes import TrainConfig, Trainer, TrainError, train
from reinforce.recipes.lr_finder import range_test, steepest_point


RAMP = [1e-6 * 10 ** (i / 10) for i in range(61)]
"""A geometric ramp from 1e-6 to 1 in steps of 10^0.1; RAMP[30] is 1e-3."""


def test_steepest_point_of_a_symmetric_descent_is_its_centre():
    # 2 - tanh((i - 30) / 6) falls fastest at i = 30, symmetrically; a centred fit finds exactly that point.
    losses = [2 - math.tanh((i - 30) / 6) for i in range(61)]
    chosen, smoothed = steepest_point(RAMP, losses)
    assert chosen == RAMP[30]
    assert len(smoothed) == 61


def test_steepest_point_skips_the_start_and_stops_at_the_minimum():
    # A parabola with its minimum at i = 40: a quadratic fit gives the exact slope 2 (i - 40) / 1000, most
    # negative at the first point searched (i = 6, after skipping 10 % of 61); the rise after i = 40 is ignored.
    losses = [(i - 40) ** 2 / 1000 for i in range(61)]
    chosen, smoothed = steepest_point(RAMP, losses)
    assert chosen == RAMP[6]
    assert smoothed == pytest.approx(losses, abs=1e-12)
    # A steeper descent after the minimum (the loss recovering from a blow-up) is not chosen either.
    recovering = losses[:50] + [losses[49] - 0.05 * k for k in range(11)]
    assert steepest_point(RAMP, recovering)[0] < RAMP[40]


def test_noisy_early_losses_do_not_hold_the_steepest_point():
    # Per-batch noise (sd 0.3) on a loss that falls by 0.8 around 3e-3. A bias-corrected running average weights
    # the first few losses most, so its steepest slope fell among the ramp's first points (1e-6 .. 1e-5 here).
    rng = np.random.default_rng(0)
    lrs = [1e-6 * 1e6 ** (i / 99) for i in range(100)]
    clean = [1.5 - 0.8 / (1 + math.exp(-(math.log10(lr) - math.log10(3e-3)) / 0.3)) for lr in lrs]
    noisy = (np.asarray(clean) + 0.3 * rng.standard_normal(100)).tolist()
    steps = iter(noisy)
    found = range_test(lambda batch, lr: next(steps), iter(range(100)), start_lr=1e-6, end_lr=1.0, num_steps=100)
    assert found.losses == noisy and found.lrs == pytest.approx(lrs)
    assert 1e-3 <= found.chosen <= 1e-2


def test_range_test_stops_when_the_running_loss_explodes():
    # smoothing 0.5: ten losses of 1 average to 1; a loss of 100 makes the bias-corrected average
    # (0.5 (1 - 0.5^10) + 50) / (1 - 0.5^11) = 50.5 > 4 x 1, so the ramp stops after that 11th step.
    losses = [1.0] * 10 + [100.0] * 10
    calls = []

    def step(batch, lr):
        calls.append(lr)
        return losses[batch]

    found = range_test(step, iter(range(20)), start_lr=1e-4, end_lr=1.0, num_steps=20, smoothing=0.5)
    assert len(calls) == len(found.lrs) == 11
    assert found.lrs[0] == 1e-4 and found.lrs[-1] == pytest.approx(1e-4 * 1e4 ** (10 / 19))


def test_too_few_points_is_a_clear_error():
    with pytest.raises(TrainError, match="raise --range-steps, or give --lr"):
        range_test(lambda batch, lr: 1.0, iter(range(10)), num_steps=4)
    diverging = iter([1.0, 1.0, float("nan")])
    with pytest.raises(TrainError, match="2 usable points"):
        range_test(lambda batch, lr: next(diverging), iter(range(10)), num_steps=10)


def test_the_ramp_does_not_replay_the_batches_of_the_epoch_at_the_small_lr(digits, store, tmp_path, monkeypatch):
    """The one epoch at the small LR trains on epoch 0's batches; the ramp must start on other batches (epoch 0
    replayed would measure the loss on what was just trained on, which reads as a descent at tiny LRs)."""
    torch.manual_seed(0)
    weights = tmp_path / "pretrained.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(weights))
    seen: list[tuple[float, bytes]] = []
    original = Trainer.train_step

    def recording_step(self, batch, lr):
        seen.append((lr, batch[0].numpy().tobytes()))
        return original(self, batch, lr)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    train(TrainConfig(train_source=str(digits[0]), store=str(store), model=f"test_resnet={weights}",
                      recipe="adaptive", epochs=1, batch_size=8, range_steps=12, out=str(tmp_path / "run"),
                      progress=False), log=lambda _: None)
    low = 1e-3  # the default --lr-range's low end: the small LR of the first epoch
    first_epoch = [data for lr, data in seen if lr == low]
    ramp = [data for lr, data in seen if lr != low]
    assert len(first_epoch) == 5 and len(ramp) == 12  # 45 images: 5 full batches of 8 an epoch
    assert not set(first_epoch) & set(ramp[:5])
