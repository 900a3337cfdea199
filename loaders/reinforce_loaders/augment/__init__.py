"""Parametrized augmentations: each op samples its parameters once, then replays them on tensors.

The builder samples and stores the parameters of every (sample, slot) record and applies them to many
records at once on its device (:meth:`AugmentPipeline.apply_batch`); the student replays one record with
:meth:`AugmentPipeline.apply`, which is the same code on a batch of one. Parameters are resolution
independent (fractions of the source or output, small integers), so one store serves students at any
resolution. Modules: ``base`` (op base classes), ``geometric`` (crops, flip), ``color`` (RandAugment,
AugMix), ``mixing`` (RandomErasing, MixUp/CutMix), ``pipeline`` (pipeline, presets, configs).
"""

from .base import AugmentOp, ParamSpec, SourceOp
from .color import OP_NAMES, AugMix, RandAugment
from .geometric import CenterCrop, HorizontalFlip, RandomCrop, RandomResizedCrop, crop_resize
from .mixing import CutMix, Mix, MixUp, RandomErasing
from .pipeline import OPS, PARTNER_STREAM_OFFSET, PRESETS, AugmentPipeline, make_pipeline

__all__ = [
    "AugmentOp", "ParamSpec", "SourceOp", "OP_NAMES", "AugMix", "RandAugment", "CenterCrop", "HorizontalFlip",
    "RandomCrop", "RandomResizedCrop", "crop_resize", "CutMix", "Mix", "MixUp", "RandomErasing", "OPS",
    "PARTNER_STREAM_OFFSET", "PRESETS", "AugmentPipeline", "make_pipeline",
]
