"""reinforce_loaders: read reinforced datasets on the student side.

Replays the stored augmentation of every sample and returns the stored teacher soft label, with nothing
heavier than torch, torchvision, numpy, zarr and pillow.
"""

from .augment import AugmentOp, AugmentPipeline, HorizontalFlip, RandomResizedCrop, make_pipeline, PRESETS
from .dataset import ReinforcedDataset
from .errors import (AugmentationError, IncompleteStoreError, ReinforceError, SourceError, SourceMismatchError,
                     StoreFormatError)
from .format import FORMAT_VERSION, StoreHeader, open_store_group, read_header
from .source import ImageSource, decode_image, fingerprint, open_source
from .targets import dense_target

__version__ = "0.1.0"

__all__ = [
    "AugmentOp", "AugmentPipeline", "HorizontalFlip", "RandomResizedCrop", "make_pipeline", "PRESETS",
    "ReinforcedDataset", "AugmentationError", "IncompleteStoreError", "ReinforceError", "SourceError",
    "SourceMismatchError", "StoreFormatError", "FORMAT_VERSION", "StoreHeader", "open_store_group", "read_header",
    "ImageSource", "decode_image", "fingerprint", "open_source", "dense_target",
]
