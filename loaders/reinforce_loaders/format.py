"""Single source of truth for the layout of a reinforced store (normative text: ``format_spec.md``).

The builder (``reinforce``) writes with these names, dtypes, codecs and attributes and the readers in this
package read with them; nothing about the layout is written down anywhere else in code.
This module is the face users import (``from reinforce_loaders import format as fmt``); the code lives in
:mod:`reinforce_loaders.store`, one module per concern.

Layout in one paragraph: every (sample, slot) record is one row of ``W`` unsigned integers in the array
``records`` of shape ``(num_samples, num_augmentations, W)``: top-k class indices (as positions in the
sample's ``class_vocabulary`` when they are in it), quantized top-k probabilities, encoded augmentation
parameters (one typed codec per parameter, :mod:`reinforce_loaders.codecs`; omitted when the store derives them,
``param_storage = "derived"``) and the quantized teacher entropy. Records are chunked one
slot of one block of samples per chunk, and sharded one block (all slots) per shard, so a build worker owns
whole shards and a reader fetches an epoch (one slot per sample, :func:`~reinforce_loaders.rng.slot_for_epoch`)
with one chunk per block.
"""

from .errors import IncompleteStoreError, ReinforceError, StoreFormatError
from .store.arrays import (check_store, open_store_group, read_all_records, read_array, read_block_slot,
                           read_header, read_vocabulary)
from .store.bounded import (BoundedBloscCodec, BoundedZstdCodec, blosc_content_size, bounded_array,
                            zstd_content_size)
from .store.derived import (block_param_digests, check_param_digest, derive_param_columns, expand_rows,
                            param_digest, present_samples, stored_rows)
from .store.header import (HEADER_MEMBERS, REQUIRED_MEMBERS, StoreHeader, StoreLayout, TEACHER_ACCURACY,
                           TEACHER_ACCURACY_ON, array_specs, check_format_version, check_member, check_pipeline,
                           expected_file_count, pipeline_param_encodings, record_shuffle,
                           recorded_teacher_accuracy)
from .store.records import (DecodedRecords, check_records, check_rows_present, class_vocabulary, decode_indices,
                            decode_records, encode_indices, encode_records, invalid_vocabulary_references,
                            quantized_probs, record_faults)
from .store.spec import (ALL_ARRAYS, ATTRS_KEY, BLOCKS_DONE, BLOCK_DONE_DTYPE, CLASS_VOCABULARY,
                         DEFAULT_CLASS_VOCABULARY, DEFAULT_PROB_SCALE, ENTROPY_LEVELS, FINGERPRINTS,
                         FINGERPRINT_DTYPE, FORMAT_NAME, FORMAT_VERSION, IMAGE_SIZES, IMAGE_SIZE_DTYPE, LABELS,
                         LABEL_DTYPE, LABEL_FILL, MAX_AUGMENTATIONS, MAX_BLOCKS, MAX_BLOCK_RECORD_BYTES,
                         MAX_BLOCK_SIZE, MAX_CHUNK_BYTES, MAX_CLASSES, MAX_IMAGE_SIDE, MAX_SAMPLES, MAX_TOP_K,
                         PARAM_DIGESTS, PARAM_DIGEST_DTYPE, PARAM_STORAGE, PER_RECORD_ARRAYS, PER_SAMPLE_ARRAYS,
                         RECORDS, RECORD_FILL_U16, SKIPPED_IMAGE_SIZE, ZSTD_LEVEL, default_class_vocabulary_size,
                         recommended_block_size, record_dtype)

__all__ = [
    "IncompleteStoreError", "ReinforceError", "StoreFormatError", "FORMAT_NAME", "FORMAT_VERSION", "ATTRS_KEY",
    "LABELS", "FINGERPRINTS", "IMAGE_SIZES", "RECORDS", "BLOCKS_DONE", "CLASS_VOCABULARY", "PARAM_DIGESTS",
    "PER_SAMPLE_ARRAYS", "PER_RECORD_ARRAYS", "ALL_ARRAYS", "LABEL_DTYPE", "FINGERPRINT_DTYPE", "IMAGE_SIZE_DTYPE",
    "BLOCK_DONE_DTYPE", "PARAM_DIGEST_DTYPE", "PARAM_STORAGE", "SKIPPED_IMAGE_SIZE", "LABEL_FILL",
    "RECORD_FILL_U16", "DEFAULT_PROB_SCALE", "DEFAULT_CLASS_VOCABULARY", "ENTROPY_LEVELS", "ZSTD_LEVEL",
    "MAX_SAMPLES", "MAX_CLASSES", "MAX_TOP_K", "MAX_AUGMENTATIONS", "MAX_BLOCK_SIZE", "MAX_IMAGE_SIDE",
    "MAX_BLOCKS", "MAX_BLOCK_RECORD_BYTES", "MAX_CHUNK_BYTES", "record_dtype", "default_class_vocabulary_size",
    "recommended_block_size", "pipeline_param_encodings", "StoreLayout", "HEADER_MEMBERS", "REQUIRED_MEMBERS",
    "check_member", "StoreHeader", "check_format_version", "check_pipeline", "array_specs", "record_shuffle",
    "expected_file_count", "TEACHER_ACCURACY", "TEACHER_ACCURACY_ON", "recorded_teacher_accuracy", "DecodedRecords",
    "class_vocabulary", "check_rows_present", "decode_records", "check_records", "record_faults", "decode_indices",
    "invalid_vocabulary_references", "encode_indices", "quantized_probs", "encode_records", "present_samples",
    "derive_param_columns", "param_digest", "block_param_digests", "check_param_digest", "stored_rows",
    "expand_rows", "bounded_array", "zstd_content_size", "blosc_content_size", "BoundedZstdCodec",
    "BoundedBloscCodec", "open_store_group", "read_header", "read_array", "check_store", "read_block_slot",
    "read_all_records", "read_vocabulary",
]
