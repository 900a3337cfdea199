"""The names, dtypes, constants and limits of format_spec.md: what every other module of the store uses."""

from __future__ import annotations

import numpy as np

FORMAT_NAME = "reinforce-store"
FORMAT_VERSION = (2, 0)
"""(major, minor). Readers reject another major version and accept any minor version of their major."""

ATTRS_KEY = "reinforce"
"""The group attribute holding the :class:`~reinforce_loaders.store.header.StoreHeader` as JSON."""

# Array names, one place.
LABELS = "labels"
FINGERPRINTS = "fingerprints"
IMAGE_SIZES = "image_sizes"
RECORDS = "records"
BLOCKS_DONE = "blocks_done"
CLASS_VOCABULARY = "class_vocabulary"
PARAM_DIGESTS = "param_digests"

PER_SAMPLE_ARRAYS = (LABELS, FINGERPRINTS, IMAGE_SIZES)
PER_RECORD_ARRAYS = (RECORDS,)
ALL_ARRAYS = PER_SAMPLE_ARRAYS + (CLASS_VOCABULARY,) + PER_RECORD_ARRAYS + (PARAM_DIGESTS, BLOCKS_DONE)
"""Every array a store may hold; :attr:`StoreHeader.array_names` lists those a given store holds."""

LABEL_DTYPE = np.dtype("<i4")
FINGERPRINT_DTYPE = np.dtype("<u8")
IMAGE_SIZE_DTYPE = np.dtype("<u4")
BLOCK_DONE_DTYPE = np.dtype("u1")
PARAM_DIGEST_DTYPE = np.dtype("<u8")

PARAM_STORAGE = ("columns", "derived")
"""How a store keeps augmentation parameters: ``columns`` in every record (format 1.0), or ``derived``: not
stored, a reader re-derives them from the keyed RNG and checks them against ``param_digests`` (format 1.1)."""

SKIPPED_IMAGE_SIZE = (0, 0)
"""``image_sizes`` of a sample whose image could not be read and was skipped (``--on-bad-image skip``);
its fingerprint and records are zeros, and the header's ``provenance["skipped"]`` lists it with its path."""

# Fill values a reader can tell from real data: a chunk that is missing reads as these.
LABEL_FILL = -1
RECORD_FILL_U16 = 0xFFFF

DEFAULT_PROB_SCALE = 1000
"""Probabilities are quantized to ``q = round(p * prob_scale)`` (absolute error at most ``0.5 / prob_scale``,
5e-4 at 1000) and stored as ``q[0]`` then the drops ``q[r-1] - q[r]``, small numbers for the flat tail."""
DEFAULT_CLASS_VOCABULARY = 32
"""Classes per sample in ``class_vocabulary`` by default (:func:`default_class_vocabulary_size`)."""
ENTROPY_LEVELS = 63
"""Teacher entropy is stored as ``round(H / ln(num_classes) * ENTROPY_LEVELS)``."""

ZSTD_LEVEL = 9
"""zstd level of the blosc codec of ``records``; readers need not know it."""

MAX_SAMPLES = 1 << 34
"""Limits a reader enforces before it allocates anything a header implies (format_spec.md, "Limits")."""
MAX_CLASSES = 1 << 24
MAX_TOP_K = 1024
MAX_AUGMENTATIONS = 1 << 16
MAX_BLOCK_SIZE = 1 << 20
MAX_IMAGE_SIDE = 8192
MAX_BLOCKS = 1 << 20
"""``ceil(num_samples / block_size)``: per-block metadata a reader walks (``blocks_done``, the epoch table)."""
MAX_BLOCK_RECORD_BYTES = 1 << 30
"""Bytes of one block's records (a ``records`` shard, ``B * A * W_s * itemsize``), read whole by ``verify``."""
MAX_CHUNK_BYTES = 1 << 28
"""Bytes of one decoded chunk of any array (the most any single decompression may produce)."""


def record_dtype(num_classes: int, class_vocabulary_size: int = 0) -> np.dtype:
    """Element type of ``records`` and ``class_vocabulary``: uint16 when every stored index value fits
    (``num_classes + class_vocabulary_size <= 65,535``), else uint32."""
    return np.dtype("<u2") if num_classes + class_vocabulary_size <= RECORD_FILL_U16 else np.dtype("<u4")


def default_class_vocabulary_size(num_classes: int, num_augmentations: int, top_k: int) -> int:
    """:data:`DEFAULT_CLASS_VOCABULARY` when a store has more than twice as many classes and each sample stores
    at least 16 indices per vocabulary entry (``A * K >= 16 V``), else 0 (none).

    Measured (benchmarks/RESULTS.md): at ``A * K = 4000`` the vocabulary cuts ImageNet+ records from 29.4 to
    22.8 bytes; at ``A * K = 160`` it costs 1.2 bytes/record for rrc. The threshold between is a choice.
    """
    size = DEFAULT_CLASS_VOCABULARY
    return size if num_classes > 2 * size and num_augmentations * top_k >= 16 * size else 0


def recommended_block_size(num_augmentations: int, bytes_per_record: int = 20) -> int:
    """Smallest power of two in [256, 4096] samples per block whose one-slot chunk is at least 8x the block's
    shard index (``16 A + 4`` bytes), keeping an epoch's index overhead near 1/8 of the records read."""
    wanted = 8 * (16 * num_augmentations + 4) / bytes_per_record
    size = 256
    while size < wanted and size < 4096:
        size *= 2
    return size
