"""A run's settings: the config with every recipe default filled in (:func:`resolve`), frozen and typed; the
checks that refuse what cannot train; and what ``--resume`` may change."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Literal

from .config import PRECISIONS, RECIPES, RecipeName, TrainConfig
from .distributed import default_workers, resolve_device
from .errors import TrainError

# May differ between a run and its --resume: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = frozenset({"out", "workers", "replay", "device", "channels_last", "threads", "progress", "resume",
                               "baseline"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a run does, resolved: :class:`~reinforce.recipes.config.TrainConfig`'s fields with the recipe's
    defaults filled in, plus what only the recipe decides (``optimizer``, ``schedule``, ``sam``).

    Five values are known only once the run has looked at its data, model and length; they are ``None`` until
    :meth:`complete` fills them in, and ``config.json`` is written from completed settings only: ``image_size``
    (the store's), ``mean`` and ``std`` (the student's), ``lr`` (adaptive: estimated) and ``ema_decay`` (adapted to
    the run's steps; ``None`` without EMA).
    """

    recipe: RecipeName
    train_source: Any
    store: str | None
    val_source: Any
    model: str
    out: str
    resume: bool
    fine_tune: bool
    teachers: tuple[str, ...]
    teacher_weights: tuple[str, ...]
    allow_empty_classes: bool
    baseline: str | None
    epochs: int
    batch_size: int
    lr: float | None
    weight_decay: float
    warmup_epochs: float
    image_size: int | None
    decode: Literal["exact", "fast", "gpu"]
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    alpha_kd: float
    kd_only: bool
    temperature: float
    kd_mode: Literal["join", "replace"]
    mixup: float
    cutmix: float
    ema: bool
    ema_decay: float | None
    test_crop: float
    lr_search: Literal["none", "range", "tpe"]
    lr_range: tuple[float, float]
    range_steps: int
    tpe_trials: int
    trial_epochs: int
    patience: int
    decay_factor: float
    min_lr_ratio: float
    sam_rho: float
    sampler: Literal["fixed", "multiscale"]
    curriculum: Literal["none", "easy", "hard"]
    seed: int
    workers: int
    replay: Literal["workers", "device"]
    device: str
    channels_last: bool
    precision: Literal["auto", "fp32", "bf16"]
    threads: int | None
    progress: bool
    optimizer: Literal["adamw", "sgd"]
    schedule: Literal["onecycle", "plateau"]
    sam: bool

    @property
    def has_soft_targets(self) -> bool:
        """A store or online teachers give every sample a teacher distribution."""
        return bool(self.store or self.teachers)

    @property
    def mixes_batches(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def arch(self) -> str:
        return self.model.partition("=")[0]

    @property
    def is_complete(self) -> bool:
        return None not in (self.image_size, self.mean, self.std, self.lr) and (self.ema_decay is not None
                                                                               or not self.ema)

    def complete(self, **values: Any) -> Settings:
        """These settings with late-resolved values filled in (see the class docstring)."""
        return dataclasses.replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        """What ``config.json`` records, from completed settings only: datasets passed from Python as
        ``<TypeName>``, tuples as lists."""
        if not self.is_complete:
            raise AssertionError("config.json records resolved settings only")
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("train_source", "val_source"):
                value = _describe(value)
            elif isinstance(value, tuple):
                value = [float(v) for v in value] if field.name in ("mean", "std", "lr_range") else list(value)
            values[field.name] = value
        return values


def _describe(source: Any) -> str | None:
    if source is None or isinstance(source, str):
        return source
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    return f"<{type(source).__name__}>"


def resolve(config: TrainConfig) -> Settings:
    """The run's settings: the recipe's defaults where ``config`` leaves them open, the device resolved, checked."""
    if config.recipe not in RECIPES:
        raise TrainError(f"unknown recipe {config.recipe!r}: use one of {', '.join(RECIPES)}")
    defaults = dataclasses.asdict(RECIPES[config.recipe])
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    for key, value in defaults.items():
        if values.get(key) is None:
            values[key] = value
    device = resolve_device(config.device)
    replay = config.replay
    if replay == "auto":
        replay = "device" if config.store and (device.startswith("cuda") or config.decode == "gpu") else "workers"
    values.update(teachers=tuple(config.teachers), teacher_weights=tuple(config.teacher_weights), device=device,
                  workers=default_workers() if config.workers is None else config.workers, replay=replay)
    for key in ("mean", "std", "lr_range"):
        if values[key] is not None:
            values[key] = tuple(float(v) for v in values[key])
    settings = Settings(**values)
    check_settings(settings)
    if settings.decode == "gpu" and not device.startswith("cuda"):
        warnings.warn(f"--decode gpu on {device}: each batch's JPEGs are decoded in the training process, on the "
                      "step's path (slower than --decode exact, where the workers decode); it is meant for CUDA",
                      stacklevel=2)
    return settings


def check_settings(settings: Settings) -> None:
    """Refuse combinations that cannot train, naming the flag to change."""
    if settings.recipe == "plain" and settings.has_soft_targets:
        raise TrainError("--recipe plain trains on hard labels only: drop --store/--teacher, or use --recipe usi")
    if settings.recipe == "usi" and not settings.has_soft_targets:
        raise TrainError("--recipe usi needs soft targets: pass --store STORE (offline) or --teacher ARCH=WEIGHTS "
                         "(online)")
    if settings.store and settings.teachers:
        raise TrainError("pass either --store (offline soft targets) or --teacher (online), not both")
    if settings.precision not in PRECISIONS:
        raise TrainError(f"--precision {settings.precision}: use one of {', '.join(PRECISIONS)}")
    if settings.kd_only and not settings.has_soft_targets:
        raise TrainError("--kd-only needs soft targets: pass --store or --teacher")
    if settings.epochs < 1 or settings.batch_size < 1:
        raise TrainError("--epochs and --batch-size must be at least 1")
    if settings.mixes_batches and settings.batch_size % 2:
        raise TrainError(f"--mixup/--cutmix mix each batch with itself reversed, which needs an even batch: "
                         f"--batch-size {settings.batch_size} is odd; pass {settings.batch_size + 1}")
    if settings.decode != "exact" and not settings.store:
        raise TrainError(f"--decode {settings.decode} changes how a store's JPEG sources are replayed: pass --store, "
                         "or drop it")
    if settings.decode == "gpu" and settings.replay == "workers":
        raise TrainError("--decode gpu decodes and replays on the training device: drop --replay workers (or use "
                         "--decode exact or fast)")
    if settings.workers < 0:
        raise TrainError(f"--workers {settings.workers}: give 0 (load in the training process) or more")
    if settings.replay not in ("workers", "device"):
        raise TrainError(f"--replay {settings.replay}: use auto, workers or device")
    if settings.replay == "device" and not settings.store:
        raise TrainError("--replay device replays a store's augmentation on the device: pass --store, or drop it")
    if settings.curriculum != "none" and not settings.store:
        raise TrainError("--curriculum orders a store's records by teacher entropy: pass --store")
    low, high = settings.lr_range
    if not 0 < low < high:
        raise TrainError(f"--lr-range {low},{high} must be two increasing positive numbers")
    for flag, value in (("--decay-factor", settings.decay_factor), ("--min-lr-ratio", settings.min_lr_ratio)):
        if not 0 < value < 1:
            raise TrainError(f"{flag} {value} must lie strictly between 0 and 1")


def changed_fields(saved: dict[str, Any], current: Settings) -> list[str]:
    """Settings that differ between a run's ``config.json`` and this invocation (ignoring where/how it runs)."""
    now = current.to_json()
    keys = sorted(set(saved) | set(now))
    return [key for key in keys if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key)]
