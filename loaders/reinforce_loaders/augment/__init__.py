"""Parametrized augmentations: each op samples its parameters once, then replays them on tensors.

The builder samples and stores the parameters of every (sample, slot) record and applies them to many
records at once on its device (:meth:`AugmentPipeline.apply_batch`); the student replays one record with
:meth:`AugmentPipeline.apply`, which is the same code on a batch of one. Parameters are resolution
independent (source-pixel boxes, fractions of the output, small integers), so one store serves students at any
resolution. Each op declares how its parameters are stored (``reinforce_loaders.codecs``). Modules: ``base``
(op base classes, sampling helpers), ``geometric`` (crops, flip), ``color`` (RandAugment,
AugMix), ``mixing`` (RandomErasing, MixUp/CutMix), ``pipeline`` (pipeline, presets, configs).
"""

from .base import AugmentOp, Mixer, SampleContext, SourceOp
from .color import OP_NAMES, AugMix, RandAugment
from .geometric import CenterCrop, HorizontalFlip, RandomCrop, RandomResizedCrop, crop_resize
from .mixing import CutMix, Mix, MixUp, RandomErasing
from .pipeline import OPS, PARTNER_STREAM_OFFSET, PRESETS, AugmentPipeline, make_pipeline

__all__ = [
    "AugmentOp", "Mixer", "SampleContext", "SourceOp", "OP_NAMES", "AugMix", "RandAugment", "CenterCrop", "HorizontalFlip",
    "RandomCrop", "RandomResizedCrop", "crop_resize", "CutMix", "Mix", "MixUp", "RandomErasing", "OPS",
    "PARTNER_STREAM_OFFSET", "PRESETS", "AugmentPipeline", "make_pipeline",
]
