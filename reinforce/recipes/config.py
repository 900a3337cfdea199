"""What a user asks of a training run (:class:`TrainConfig`, also the ``reinforce train`` options) and the three
recipes' defaults (:data:`RECIPES`). :func:`reinforce.recipes.settings.resolve` turns the two into the run's
settings."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal

RecipeName = Literal["usi", "plain", "adaptive"]
PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class RecipeDefaults:
    """What a recipe decides when the config leaves it open (``None``), and what only a recipe decides
    (``optimizer``, ``schedule``, ``sam``)."""

    fine_tune: bool
    epochs: int
    optimizer: Literal["adamw", "sgd"]
    lr: float | None
    """None: estimated (``lr_search``)."""
    weight_decay: float
    schedule: Literal["onecycle", "plateau"]
    warmup_epochs: float
    ema: bool
    test_crop: float
    lr_search: Literal["none", "range", "tpe"]
    sam: bool


USI = RecipeDefaults(fine_tune=False, epochs=300, optimizer="adamw", lr=2e-3, weight_decay=2e-2, schedule="onecycle",
                     warmup_epochs=5, ema=True, test_crop=0.95, lr_search="none", sam=False)
"""Paper 002, Table 1: AdamW 2e-3 / 2e-2, one-cycle, EMA, test crop 0.95 (and KD at tau 1, alpha 5)."""

RECIPES: dict[str, RecipeDefaults] = {
    "usi": USI,
    # The baseline is USI's scheme without its soft targets, as in the paper's own alpha_kd = 0 ablation (Table
    # 6): a comparison with usi then measures the store and nothing else.
    "plain": USI,
    # Paper 000, sections 3-4 (SGD + SAM, wd 5e-4, no bias decay, 5 warmup epochs, ReduceLROnPlateauV2, 200 max).
    "adaptive": RecipeDefaults(fine_tune=True, epochs=200, optimizer="sgd", lr=None, weight_decay=5e-4,
                               schedule="plateau", warmup_epochs=5, ema=False, test_crop=1.0, lr_search="range",
                               sam=True),
}


def shown(value: Any) -> str:
    """A default as the help prints it: ``5``, ``0.95``, ``2e-3``."""
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def option(default: Any = dataclasses.MISSING, *, help: str | None = None, flag: str | None = None,
           group: str | None = None, factory: Any = None, **argparse_options: Any) -> Any:
    """A :class:`TrainConfig` field and its ``reinforce train`` option: ``flag`` (default ``--field-name``; ``""``
    for a positional argument), ``help`` (``{default}`` shows the default), ``group`` (an argument group's
    title) and further ``argparse`` keywords (``metavar``, ``type``, ``action``)."""
    metadata = {"cli": {"flag": flag, "help": help, "group": group, **argparse_options}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def pair(text: str) -> tuple[float, float]:
    """``"LOW,HIGH"`` -> two floats."""
    low, high = (float(part) for part in text.split(","))
    return low, high


def triple(text: str) -> tuple[float, float, float]:
    """``"R,G,B"`` -> three floats."""
    values = tuple(float(part) for part in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("give three comma-separated numbers, e.g. 0.5,0.5,0.5")
    return values  # type: ignore[return-value]


ADAPTIVE = RECIPES["adaptive"]


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """Everything that decides a training run. ``None`` means "the recipe's default" (see :data:`RECIPES`).

    ``train_source`` and ``val_source`` are ImageFolder directories (or, from Python, map-style datasets
    returning ``(image, label)``); ``store`` is the reinforced store of ``train_source`` (required by ``usi``
    unless online ``teachers`` are given; optional for ``adaptive``; refused by ``plain``). The fields are the
    ``reinforce train`` options, in their order (:mod:`reinforce.recipes.cli`).
    """

    train_source: Any = option(flag="", help="ImageFolder directory of the training images (the store's source)")
    store: str | None = option(None, help="reinforced store of TRAIN_SOURCE (offline soft targets)")
    val_source: Any = option(None, flag="--val", metavar="VAL",
                             help="ImageFolder directory of validation images (same class folders)")
    model: str = option(metavar="ARCH[=WEIGHTS]",
                        help="timm architecture of the student, with optional local weights to start from")
    recipe: RecipeName = option("usi", help="usi: CE + KD from --store or online --teacher (paper 002); adaptive: "
                                            "fine-tuning with an estimated LR, plateau decays and early stop (paper "
                                            "000); plain: hard labels, the baseline (default {default})")
    out: str = option(help="run directory (config, metrics, weights, checkpoint)")
    resume: bool = option(False, help="continue the run in --out from its checkpoint")
    fine_tune: bool | None = option(
        None, help="start from --model's weights with a new classifier for these classes (adaptive: always)")
    """Start from ``model``'s weights with a new classifier when their class count differs (default: adaptive only)."""
    teachers: list[str] = option(factory=list, flag="--teacher", metavar="ARCH=WEIGHTS",
                                 help="online teacher run every step on the student's augmentation (usi online; "
                                      "repeat)")
    """Online teachers ``ARCH=WEIGHTS``: run every step on the student's own augmentation (USI's way)."""
    teacher_weights: list[str] = option(factory=list, metavar="ARCH=WEIGHTS",
                                        help="the store's teachers, only to report their accuracy on --val (repeat)")
    """The store's teachers as ``ARCH=WEIGHTS``, only to report their held-out accuracy on ``val_source``."""
    allow_empty_classes: bool = option(False, help="keep a TRAIN_SOURCE class folder without images as a class "
                                                   "without samples")
    """Keep a training class folder without images as a class without samples (a store's source is checked
    against the store instead)."""
    baseline: str | None = option(None, metavar="PLAIN_RUN_DIR",
                                  help="a finished --recipe plain run: the teachers' margin over its best top-1 is "
                                       "checked before training (default: against this run's own student, after it)")
    """A finished plain run's directory: the margin check compares the teachers with its best top-1."""
    epochs: int | None = option(None, help="epochs (maximum for adaptive); default: the recipe's")
    batch_size: int = option(64, help="per process (default {default})")
    lr: float | None = option(None, help=f"peak LR (usi/plain default {shown(USI.lr)}; adaptive: estimated)")
    weight_decay: float | None = option(None)
    warmup_epochs: float | None = option(None)
    image_size: int | None = option(None, help="training resolution (default: the store's, else 224)")
    decode: Literal["exact", "fast", "gpu"] = option(
        "exact", help="with --store: 'fast' decodes JPEGs at reduced scale where the stored crop allows (faster on "
                      "large images; pixels differ slightly, targets do not); 'gpu' has the workers only read the "
                      "files and decodes JPEGs batched on the training device (nvjpeg on CUDA), the whole replay "
                      "then running there (pixels differ by the decoder's arithmetic, targets do not)")
    """How the store's JPEG sources are decoded (``ReinforcedDataset(decode=...)``): exact replay, reduced-scale,
    or on the device."""
    mean: tuple[float, float, float] | None = option(None, type=triple,
                                                     help="input normalization mean (default: the model's)")
    std: tuple[float, float, float] | None = option(None, type=triple,
                                                    help="input normalization std (default: the model's)")
    alpha_kd: float = option(5.0, group="distillation", help="weight of the KL term next to CE (default {default})")
    kd_only: bool = option(False, group="distillation",
                           help="KL to the teacher only, no hard-label CE (alpha = inf)")
    temperature: float = option(1.0, group="distillation")
    kd_mode: Literal["join", "replace"] = option(
        "join", group="distillation", help="adaptive with --store: soft targets join the CE (default) or replace it")
    """adaptive with a store: the stored soft targets join the hard-label CE (CE + alpha KL) or replace it."""
    mixup: float = option(0.0, group="distillation", help="MixUp alpha (0: off; a mixing store mixes itself)")
    cutmix: float = option(0.0, group="distillation", help="CutMix alpha (0: off)")
    ema: bool | None = option(None, flag="--no-ema", action="store_false", group="distillation", help="no model EMA")
    ema_decay: float | None = option(None, group="distillation", help="default: adapted to the run's length")
    test_crop: float | None = option(None, group="distillation",
                                     help=f"validation center-crop ratio (usi/plain {shown(USI.test_crop)})")
    lr_search: Literal["none", "range", "tpe"] | None = option(
        None, group="adaptive", help=f"adaptive default: {ADAPTIVE.lr_search}")
    lr_range: tuple[float, float] = option((1e-3, 1e-2), group="adaptive", type=pair, metavar="LOW,HIGH")
    range_steps: int = option(100, group="adaptive", help="steps of the LR range test")
    """Steps of the LR range test (fast.ai's default 100; they may span several epochs of a small dataset)."""
    tpe_trials: int = option(15, group="adaptive")
    trial_epochs: int = option(6, group="adaptive")
    patience: int = option(5, group="adaptive")
    decay_factor: float = option(0.1, group="adaptive", help="LR multiplier of each plateau decay")
    min_lr_ratio: float = option(1e-3, group="adaptive",
                                 help="the LR floor, as a fraction of the initial LR; the early stop waits for it "
                                      "({default}: three decays of 0.1; raise it for short runs)")
    sam_rho: float = option(0.05, group="adaptive")
    sampler: Literal["fixed", "multiscale"] = option(
        "fixed", group="sampling", help="multiscale: a resolution and batch size per step (paper 003)")
    curriculum: Literal["none", "easy", "hard"] = option(
        "none", group="sampling", help="draw each epoch's stored records from an entropy window (paper 001, C.4)")
    seed: int = option(0)
    workers: int | None = option(None, help="DataLoader workers per process (default: from the machine, the cores "
                                            "per process less one, at most 8)")
    """DataLoader workers per process; ``None``: :func:`~reinforce.recipes.distributed.default_workers`."""
    replay: Literal["auto", "workers", "device"] = option(
        "auto", help="with --store: where the stored augmentation after the crop (flip, RandAugment, erasing, "
                     "stored mixing) runs: 'device', batched on the training device, the workers only reading, "
                     "decoding and cropping; 'workers', per sample in the loader; auto: device on CUDA (default "
                     "{default}); the batches are the same")
    """Where a store's ops after the crop run (``ReinforcedDataset(output="crops")`` + ``replay_crops`` on the
    device, or the dataset's full replay in the workers); ``"auto"``: the device on CUDA, the workers elsewhere."""
    device: str = option("auto", help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default "
                                      "{default})")
    channels_last: bool = option(False, help="channels-last memory format for the student (faster convolutions "
                                             "on GPUs with bf16)")
    """Student (and online teachers) in the channels-last memory format: faster convolutions on GPUs with mixed
    precision; the same computation."""
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", help="forward passes in bf16 autocast, or fp32; auto: bf16 on a CUDA device that supports it, else "
                     "fp32 (default {default})")
    """Student (and online teacher) forward passes: ``"bf16"`` under ``torch.autocast`` (weights, optimizer and
    loss stay fp32); ``"auto"``: bf16 on a CUDA device that supports it, fp32 elsewhere."""
    threads: int | None = option(None, help="torch CPU threads")
    progress: bool = option(True, flag="--no-progress", action="store_false", help="no progress bar")

    @classmethod
    def from_mapping(cls, values: Any) -> TrainConfig:
        """The config of the entries of ``values`` named like its fields (e.g. ``vars()`` of parsed arguments)."""
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values})
