"""The parts a training loop runs with, each built from the settings and the inputs it needs: optimizer (timm's
factory), SAM, batch sampler, LR schedule, model EMA (timm's), loss and batch mixing (the loader's
:class:`~reinforce_loaders.SoftTargetMixup`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from reinforce_loaders.collate import MixingStoreError, SoftTargetMixup

from .data import StoreSamples, TrainingData
from .distributed import World
from .errors import TrainError
from .losses import DistillationLoss
from .sam import SAM
from .samplers import FixedBatchSampler, VariableBatchSampler, multiscale_sizes
from .schedules import ReduceLROnPlateauV2, one_cycle
from .settings import Settings

EMA_RUN_FRACTION = 1 / 15
"""EMA time constant as a fraction of the run's steps: USI's 0.99996 at ~375k steps is 25k steps, 1/15 of it."""


@dataclasses.dataclass
class TrainingParts:
    """What a loop steps besides the model: built together by :func:`make_parts`."""

    optimizer: torch.optim.Optimizer
    sam: SAM | None
    sampler: FixedBatchSampler
    schedule: Any
    ema: Any
    loss_fn: DistillationLoss
    mixing: SoftTargetMixup | None


def make_parts(settings: Settings, model: torch.nn.Module, data: TrainingData, world: World, *, lr: float,
               epochs: int) -> TrainingParts:
    """The parts of a loop training ``model`` on ``data`` for ``epochs`` from ``lr``. ``settings.ema_decay``
    ``None`` adapts the decay to these epochs' steps."""
    optimizer = make_optimizer(settings, model, lr)
    sampler = make_sampler(settings, len(data.train_set), world)
    steps = total_steps(sampler, epochs)
    ema = None
    if settings.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=settings.ema_decay or adapted_ema_decay(steps))
    return TrainingParts(optimizer=optimizer, sam=SAM(optimizer, settings.sam_rho) if settings.sam else None,
                         sampler=sampler, schedule=make_schedule(settings, optimizer, lr=lr, epochs=epochs,
                                                                 steps=steps),
                         ema=ema, loss_fn=make_loss(settings, data), mixing=make_mixing(settings, data))


def make_optimizer(settings: Settings, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory. usi/plain: AdamW, no weight decay on biases and norms (timm's filter);
    adaptive: SGD with momentum, no bias decay, biases at twice the LR (``lr_scale``)."""
    from timm.optim import create_optimizer_v2

    if settings.optimizer == "adamw":
        return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=settings.weight_decay)
    return create_optimizer_v2(no_bias_decay_groups(model, settings.weight_decay), "momentum", lr=lr,
                               weight_decay=settings.weight_decay, momentum=0.9)


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


def make_sampler(settings: Settings, num_samples: int, world: World) -> FixedBatchSampler:
    """This rank's batches: fixed, or multi-scale (even batches when batches are mixed with their reverse)."""
    common = dict(seed=settings.seed, rank=world.rank, world_size=world.size)
    if settings.sampler == "multiscale":
        base = settings.image_size
        return VariableBatchSampler(num_samples, settings.batch_size, base, multiscale_sizes(base),
                                    multiple_of=2 if settings.mixes_batches else 1, **common)
    return FixedBatchSampler(num_samples, settings.batch_size, **common)


def total_steps(sampler: FixedBatchSampler, epochs: int) -> int:
    """Optimizer steps of ``epochs`` epochs (a multi-scale epoch's count depends on its draws)."""
    steps = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        steps += len(sampler)
    return steps


def adapted_ema_decay(steps: int) -> float:
    """The EMA decay whose time constant is :data:`EMA_RUN_FRACTION` of ``steps`` (at least 10 steps)."""
    return float(1 - 1 / max(10.0, EMA_RUN_FRACTION * steps))


def make_schedule(settings: Settings, optimizer: torch.optim.Optimizer, *, lr: float, epochs: int,
                  steps: int) -> Any:
    """adaptive: ReduceLROnPlateauV2, stepped per epoch; usi/plain: one-cycle over ``steps``, stepped per step."""
    if settings.schedule == "plateau":
        return ReduceLROnPlateauV2(optimizer, lr, max_epochs=epochs, warmup_epochs=int(settings.warmup_epochs),
                                   patience=settings.patience, factor=settings.decay_factor,
                                   min_lr_ratio=settings.min_lr_ratio)
    return one_cycle(optimizer, total_steps=steps, warmup_steps=int(round(settings.warmup_epochs * steps / epochs)))


def uses_hard_labels(settings: Settings, data: TrainingData) -> bool:
    """Whether the loss has a CE term on the hard labels: always without soft targets (no store, no online
    teachers); not with --kd-only, --kd-mode replace (adaptive), or a store of mixed records (their label is the
    teacher's target on the mixed image)."""
    if not settings.has_soft_targets:
        return True
    return not (settings.kd_only or data.mixes or (settings.recipe == "adaptive" and settings.kd_mode == "replace"))


def make_loss(settings: Settings, data: TrainingData) -> DistillationLoss:
    return DistillationLoss(settings.alpha_kd, settings.temperature, use_ce=uses_hard_labels(settings, data))


def make_mixing(settings: Settings, data: TrainingData) -> SoftTargetMixup | None:
    """The batch mixer of ``--mixup/--cutmix``, keyed by the run's seed and the step; refused on a store whose
    records are mixed already."""
    if not settings.mixes_batches:
        return None
    options = dict(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, seed=settings.seed)
    try:
        if isinstance(data.train_set, StoreSamples):
            return SoftTargetMixup.for_dataset(data.train_set.dataset, **options)
        return SoftTargetMixup(**options)
    except MixingStoreError:
        raise TrainError("--mixup/--cutmix: this store's records are mixed already (its preset stores MixUp/CutMix "
                         "with the teacher's target of each mixed image, and a mixing store mixes itself): drop "
                         "--mixup and --cutmix") from None
    except ValueError as error:
        raise TrainError(f"--mixup {settings.mixup:g} --cutmix {settings.cutmix:g}: {error}") from None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a run's forward passes, None for fp32 (``TrainConfig.precision``)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None
