"""Training settings, the three recipes' defaults, and the checks that make ``--resume`` safe."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from reinforce_loaders.errors import ReinforceError

RecipeName = Literal["usi", "adaptive", "plain"]


class TrainError(ReinforceError):
    """Training cannot start or continue; the message says what to change."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run. ``None`` means "the recipe's default" (see :data:`RECIPES`).

    ``train_source`` and ``val_source`` are ImageFolder directories (or, from Python, map-style datasets
    returning ``(image, label)``); ``store`` is the reinforced store of ``train_source`` (required by ``usi``
    unless online ``teachers`` are given; optional for ``adaptive``; refused by ``plain``).
    """

    train_source: Any
    out: str
    model: str
    recipe: RecipeName = "usi"
    store: str | None = None
    val_source: Any = None
    teachers: list[str] = dataclasses.field(default_factory=list)
    """Online teachers ``ARCH=WEIGHTS``: run every step on the student's own augmentation (USI's way)."""
    allow_empty_classes: bool = False
    """Keep a training class folder without images as a class without samples (a store's source is checked
    against the store instead)."""
    baseline: str | None = None
    """A finished plain run's directory: the margin check compares the teachers with its best top-1."""
    teacher_weights: list[str] = dataclasses.field(default_factory=list)
    """The store's teachers as ``ARCH=WEIGHTS``, only to report their held-out accuracy on ``val_source``."""
    fine_tune: bool | None = None
    """Start from ``model``'s weights with a new classifier when their class count differs (default: adaptive only)."""
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    image_size: int | None = None
    decode: Literal["exact", "fast"] = "exact"
    """How the store's JPEG sources are decoded (``ReinforcedDataset(decode=...)``): exact replay, or reduced-scale."""
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    alpha_kd: float = 5.0
    kd_only: bool = False
    temperature: float = 1.0
    kd_mode: Literal["join", "replace"] = "join"
    """adaptive with a store: the stored soft targets join the hard-label CE (CE + alpha KL) or replace it."""
    mixup: float = 0.0
    cutmix: float = 0.0
    ema: bool | None = None
    ema_decay: float | None = None
    test_crop: float | None = None
    lr_search: Literal["none", "range", "tpe"] | None = None
    lr_range: tuple[float, float] = (1e-3, 1e-2)
    range_steps: int = 100
    """Steps of the LR range test (fast.ai's default 100; they may span several epochs of a small dataset)."""
    tpe_trials: int = 15
    trial_epochs: int = 6
    patience: int = 5
    decay_factor: float = 0.1
    min_lr_ratio: float = 1e-3
    sam_rho: float = 0.05
    sampler: Literal["fixed", "multiscale"] = "fixed"
    curriculum: Literal["none", "easy", "hard"] = "none"
    seed: int = 0
    workers: int = 0
    device: str = "auto"  # "auto": CUDA when this machine has it, else the CPU; or "cpu", "cuda", "cuda:N"
    channels_last: bool = False
    """Student (and online teachers) in the channels-last memory format: faster convolutions on GPUs with mixed
    precision; the same computation."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Student (and online teacher) forward passes: ``"bf16"`` under ``torch.autocast`` (weights, optimizer and
    loss stay fp32); ``"auto"``: bf16 on a CUDA device that supports it, fp32 elsewhere."""
    threads: int | None = None
    progress: bool = True
    resume: bool = False


RECIPES: dict[str, dict[str, Any]] = {
    # Paper 002, Table 1 (AdamW 2e-3 / 2e-2, one-cycle, KD tau 1 alpha 5, test crop 0.95, EMA).
    "usi": dict(fine_tune=False, epochs=300, optimizer="adamw", lr=2e-3, weight_decay=2e-2, schedule="onecycle",
                warmup_epochs=5, ema=True, test_crop=0.95, lr_search="none", sam=False),
    # The baseline: the same optimizer and schedule on hard labels, torchvision RandomResizedCrop + flip.
    "plain": dict(fine_tune=False, epochs=300, optimizer="adamw", lr=2e-3, weight_decay=2e-2, schedule="onecycle",
                  warmup_epochs=5, ema=True, test_crop=0.95, lr_search="none", sam=False),
    # Paper 000, sections 3-4 (SGD + SAM, wd 5e-4, no bias decay, 5 warmup epochs, ReduceLROnPlateauV2, 200 max).
    "adaptive": dict(fine_tune=True, epochs=200, optimizer="sgd", lr=None, weight_decay=5e-4, schedule="plateau",
                     warmup_epochs=5, ema=False, test_crop=1.0, lr_search="range", sam=True),
}

PRECISIONS = ("auto", "fp32", "bf16")

# May differ between a run and its --resume: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = frozenset({"out", "workers", "device", "channels_last", "threads", "progress", "resume",
                               "baseline"})


def resolve(config: TrainConfig) -> dict[str, Any]:
    """The run's settings with every recipe default filled in: what ``config.json`` records."""
    if config.recipe not in RECIPES:
        raise TrainError(f"unknown recipe {config.recipe!r}: use one of {', '.join(RECIPES)}")
    defaults = RECIPES[config.recipe]
    resolved = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    for key, value in defaults.items():
        if resolved.get(key) is None:
            resolved[key] = value
    for key in ("train_source", "val_source"):
        value = resolved[key]
        resolved[key] = value if value is None or isinstance(value, str) else f"<{type(value).__name__}>"
    for key in ("mean", "std", "lr_range"):
        if resolved[key] is not None:
            resolved[key] = [float(v) for v in resolved[key]]
    check_settings(resolved)
    return resolved


def check_settings(settings: dict[str, Any]) -> None:
    """Refuse combinations that cannot train, naming the flag to change."""
    recipe = settings["recipe"]
    if recipe == "plain" and (settings["store"] or settings["teachers"]):
        raise TrainError("--recipe plain trains on hard labels only: drop --store/--teacher, or use --recipe usi")
    if recipe == "usi" and not settings["store"] and not settings["teachers"]:
        raise TrainError("--recipe usi needs soft targets: pass --store STORE (offline) or --teacher ARCH=WEIGHTS "
                         "(online)")
    if settings["store"] and settings["teachers"]:
        raise TrainError("pass either --store (offline soft targets) or --teacher (online), not both")
    if settings["precision"] not in PRECISIONS:
        raise TrainError(f"--precision {settings['precision']}: use one of {', '.join(PRECISIONS)}")
    if settings["kd_only"] and not (settings["store"] or settings["teachers"]):
        raise TrainError("--kd-only needs soft targets: pass --store or --teacher")
    if settings["epochs"] < 1 or settings["batch_size"] < 1:
        raise TrainError("--epochs and --batch-size must be at least 1")
    if (settings["mixup"] > 0 or settings["cutmix"] > 0) and settings["batch_size"] % 2:
        raise TrainError(f"--mixup/--cutmix mix each batch with itself reversed, which needs an even batch: "
                         f"--batch-size {settings['batch_size']} is odd; pass {settings['batch_size'] + 1}")
    if settings.get("decode", "exact") != "exact" and not settings["store"]:
        raise TrainError("--decode fast changes how a store's JPEG sources are replayed: pass --store, or drop it")
    if settings["curriculum"] != "none" and not settings["store"]:
        raise TrainError("--curriculum orders a store's records by teacher entropy: pass --store")
    low, high = settings["lr_range"]
    if not 0 < low < high:
        raise TrainError(f"--lr-range {low},{high} must be two increasing positive numbers")
    for flag, key in (("--decay-factor", "decay_factor"), ("--min-lr-ratio", "min_lr_ratio")):
        if not 0 < settings[key] < 1:
            raise TrainError(f"{flag} {settings[key]} must lie strictly between 0 and 1")


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a run's ``config.json`` and this invocation (ignoring where/how it runs)."""
    keys = sorted(set(saved) | set(current))
    return [key for key in keys if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)]
