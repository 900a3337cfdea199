"""reinforce_loaders: read reinforced datasets on the student side.

Replays the stored augmentation of every sample and returns the stored teacher soft label, with nothing
heavier than torch, torchvision, numpy, zarr and pillow.
"""

from .augment import AugmentOp, AugmentPipeline, HorizontalFlip, RandomResizedCrop, make_pipeline, PRESETS
from .collate import Crop, Encoded, SoftTargetMixup, replay_crops, replay_encoded, soft_target_collate, to_device
from .dataset import ReinforcedDataset, ReplayTransformError
from .errors import (AugmentationError, IncompleteStoreError, ReinforceError, SourceError, SourceMismatchError,
                     StoreFormatError)
from .format import FORMAT_VERSION, StoreHeader, open_store_group, read_header
from .samplers import ReinforcedSampler, SamplerStateError
from .source import ImageSource, decode_image, fingerprint, open_source
from .targets import dense_target

__version__ = "0.2.0"

__all__ = [
    "AugmentOp", "AugmentPipeline", "HorizontalFlip", "RandomResizedCrop", "make_pipeline", "PRESETS",
    "ReinforcedDataset", "ReplayTransformError", "ReinforcedSampler", "SamplerStateError", "Crop", "Encoded",
    "SoftTargetMixup", "replay_crops", "replay_encoded", "soft_target_collate", "to_device", "AugmentationError", "IncompleteStoreError", "ReinforceError",
    "SourceError",
    "SourceMismatchError", "StoreFormatError", "FORMAT_VERSION", "StoreHeader", "open_store_group", "read_header",
    "ImageSource", "decode_image", "fingerprint", "open_source", "dense_target",
]
