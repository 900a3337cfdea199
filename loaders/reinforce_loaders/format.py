"""Single source of truth for the layout of a reinforced store (normative text: ``format_spec.md``).

The builder (``reinforce``) writes with these names, dtypes, codecs and attributes and the readers in this
package read with them; nothing about the layout is written down anywhere else in code.

Layout in one paragraph: every (sample, slot) record is one row of ``W`` unsigned integers in the array
``records`` of shape ``(num_samples, num_augmentations, W)``: top-k class indices (as positions in the
sample's ``class_vocabulary`` when they are in it), quantized top-k probabilities, encoded augmentation
parameters (one typed codec per parameter, :mod:`reinforce_loaders.codecs`; omitted when the store derives them,
``param_storage = "derived"``) and the quantized teacher entropy. Records are chunked one
slot of one block of samples per chunk, and sharded one block (all slots) per shard, so a build worker owns
whole shards and a reader fetches an epoch (one slot per sample, :func:`~reinforce_loaders.rng.slot_for_epoch`)
with one chunk per block.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, TransposeCodec, ZstdCodec
from zarr.core.array import AsyncArray
from zarr.core.sync import sync as zarr_sync

from . import rng
from .codecs import ParamLayout
from .errors import IncompleteStoreError, ReinforceError, StoreFormatError

FORMAT_NAME = "reinforce-store"
FORMAT_VERSION = (1, 1)
"""(major, minor). Readers reject another major version and accept any minor version of their major."""

ATTRS_KEY = "reinforce"
"""The group attribute holding the :class:`StoreHeader` as JSON."""

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


def class_vocabulary(indices: np.ndarray, size: int, fill: int) -> np.ndarray:
    """Per-sample class vocabulary ``(n, size)`` of top-k ``indices`` ``(n, A, K)``: each sample's classes by
    descending number of occurrences among its ``A * K`` indices, ties by ascending class, padded with
    ``fill`` when the sample has fewer than ``size`` distinct classes."""
    indices = np.asarray(indices, dtype=np.int64)
    out = np.full((indices.shape[0], size), fill, dtype=np.int64)
    for sample, classes in enumerate(indices.reshape(len(indices), -1)):
        values, counts = np.unique(classes, return_counts=True)
        ranked = values[np.lexsort((values, -counts))][:size]
        out[sample, :len(ranked)] = ranked
    return out


def recommended_block_size(num_augmentations: int, bytes_per_record: int = 20) -> int:
    """Smallest power of two in [256, 4096] samples per block whose one-slot chunk is at least 8x the block's
    shard index (``16 A + 4`` bytes), keeping an epoch's index overhead near 1/8 of the records read."""
    wanted = 8 * (16 * num_augmentations + 4) / bytes_per_record
    size = 256
    while size < wanted and size < 4096:
        size *= 2
    return size


# ----------------------------------------------------------------------------------------------------------
# Augmentation parameter encodings: one typed codec per parameter, declared by the ops (codecs.py)
# ----------------------------------------------------------------------------------------------------------

ParamCodec = ParamLayout
"""Earlier name of :class:`~reinforce_loaders.codecs.ParamLayout`."""


def pipeline_param_encodings(pipeline: Any) -> list[dict[str, Any]]:
    """``[{"param": "op.name", **codec}, ...]`` for every parameter of an ``AugmentPipeline``, in order: the
    header's ``param_encodings``."""
    return pipeline.param_layout.to_json()


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """What a reader needs on every record, parsed once from a header (:attr:`StoreHeader.layout`)."""

    params: ParamLayout
    columns: dict[str, slice]
    """Column ranges of one ``records`` row: ``topk_indices``, ``topk_probs``, ``aug_params``, ``teacher_entropy``."""
    width: int
    """Columns of a decoded row (what :func:`read_block_slot` returns and :func:`decode_records` takes)."""
    stored_width: int
    """Columns of a row of the ``records`` array: ``width`` less the parameter columns when they are derived."""
    dtype: np.dtype
    fill: int
    prob_scale: np.float32
    entropy_levels: np.float32
    max_entropy: np.float32
    """``ln(num_classes)``: the entropy of stored level ``entropy_levels``."""

    @classmethod
    def of(cls, header: StoreHeader) -> StoreLayout:
        if header.param_encodings is None:
            raise StoreFormatError("the store header has no param_encodings: it was not written by a v1 writer")
        params = ParamLayout.from_json(header.param_encodings, header.augmentation["size"])
        k, p = header.top_k, params.columns
        columns = {"topk_indices": slice(0, k), "topk_probs": slice(k, 2 * k), "aug_params": slice(2 * k, 2 * k + p),
                   "teacher_entropy": slice(2 * k + p, 2 * k + p + 1)}
        dtype = record_dtype(header.num_classes, header.class_vocabulary_size)
        return cls(params=params, columns=columns, width=2 * k + p + 1,
                   stored_width=2 * k + 1 if header.derives_params else 2 * k + p + 1, dtype=dtype,
                   fill=int(np.iinfo(dtype).max), prob_scale=np.float32(header.prob_scale),
                   entropy_levels=np.float32(header.entropy_levels),
                   max_entropy=np.float32(math.log(header.num_classes)))


# ----------------------------------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------------------------------

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

_UNBOUNDED = (None, None)
HEADER_MEMBERS: dict[str, tuple[Any, Any, Any]] = {
    "num_samples": (int, 1, MAX_SAMPLES),
    "num_classes": (int, 1, MAX_CLASSES),
    "top_k": (int, 1, MAX_TOP_K),
    "num_augmentations": (int, 1, MAX_AUGMENTATIONS),
    "seed": (int, 0, (1 << 64) - 1),
    "block_size": (int, 1, MAX_BLOCK_SIZE),
    "augmentation": (dict, *_UNBOUNDED),
    "teachers": (list, *_UNBOUNDED),
    "class_names": ((list, type(None)), *_UNBOUNDED),
    "compute": (dict, *_UNBOUNDED),
    "fingerprint": (str, *_UNBOUNDED),
    "param_encodings": ((list, type(None)), *_UNBOUNDED),
    "prob_scale": (int, *_UNBOUNDED),
    "entropy_levels": (int, 1, RECORD_FILL_U16 - 1),
    "class_vocabulary_size": (int, 0, None),
    "param_storage": (str, *_UNBOUNDED),
    "provenance": (dict, *_UNBOUNDED),
    "complete": (bool, *_UNBOUNDED),
    "format_name": (str, *_UNBOUNDED),
    "format_version": (str, *_UNBOUNDED),
}
"""Type and inclusive range of every header member: checked once, when a header is made or read."""
REQUIRED_MEMBERS = ("format_name", "format_version", "num_samples", "num_classes", "top_k", "num_augmentations",
                    "seed", "block_size", "augmentation", "param_encodings", "teachers", "prob_scale",
                    "entropy_levels")
"""Members a stored header MUST have (format_spec.md section 2); the others take their defaults."""


def check_member(name: str, value: Any, kind: Any, low: Any = None, high: Any = None) -> None:
    """Raise :class:`StoreFormatError` naming header member ``name`` if ``value`` is not of ``kind`` (bools are
    not integers here) or lies outside ``[low, high]``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        wanted = " or ".join("null" if k is type(None) else {"dict": "object", "list": "array",
                                                              "str": "string", "int": "integer",
                                                              "bool": "boolean"}[k.__name__] for k in kinds)
        raise StoreFormatError(f"header member {name} must be {wanted}, got {_shown(value)}: the store is damaged "
                               "or was not written by a reinforce writer")
    if (low is not None and value < low) or (high is not None and value > high):
        raise StoreFormatError(f"header member {name}={_shown(value)} is outside [{low}, {high}]"
                               if high is not None else f"header member {name}={_shown(value)} must be >= {low}")


def _shown(value: Any) -> str:
    """A short, printable rendering of a header value (no control characters from a hostile store)."""
    text = repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass(frozen=True)
class StoreHeader:
    """Everything a reader needs to interpret a store, stored as the group attribute ``reinforce``.

    ``settings`` (all fields but ``provenance`` and ``complete``) decide the contents of the arrays;
    re-running a build on an existing store is only allowed when they are equal.
    """

    num_samples: int
    num_classes: int
    top_k: int
    num_augmentations: int
    seed: int
    block_size: int
    augmentation: dict[str, Any]
    teachers: list[dict[str, Any]]
    class_names: list[str] | None = None
    compute: dict[str, Any] = dataclasses.field(default_factory=dict)
    """How the teachers were run, as far as it changes the stored bytes (micro-batch size, precision, ...)."""
    fingerprint: str = "blake2b-64 of the decoded RGB uint8 CHW pixels, prefixed by the shape"
    param_encodings: list[dict[str, Any]] | None = None
    prob_scale: int = DEFAULT_PROB_SCALE
    entropy_levels: int = ENTROPY_LEVELS
    class_vocabulary_size: int = 0
    """``V``: top-k indices are stored as positions in a per-sample vocabulary of ``V`` classes (0: as is)."""
    param_storage: str = "columns"
    """``columns`` or ``derived`` (see :data:`PARAM_STORAGE`)."""
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    complete: bool = False
    format_name: str = FORMAT_NAME
    format_version: str = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"

    def __post_init__(self) -> None:
        for name, (kind, low, high) in HEADER_MEMBERS.items():
            check_member(name, getattr(self, name), kind, low, high)
        if self.top_k > self.num_classes:
            raise StoreFormatError(f"header member top_k={self.top_k} must not exceed num_classes={self.num_classes}")
        if not 500 < self.prob_scale < RECORD_FILL_U16:
            raise StoreFormatError(f"prob_scale={self.prob_scale} must be in (500, 65535) so probabilities keep "
                                   "an error below 1e-3")
        size = self.augmentation.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIDE:
            raise StoreFormatError(f"header member augmentation.size must be an integer in [1, {MAX_IMAGE_SIDE}], "
                                   f"got {size!r:.40}")
        if not isinstance(self.augmentation.get("ops"), list):
            raise StoreFormatError("header member augmentation.ops must be a list of op objects")
        if self.param_storage not in PARAM_STORAGE:
            raise StoreFormatError(f"param_storage={self.param_storage!r} must be one of {', '.join(PARAM_STORAGE)}; "
                                   "a newer writer may have made the store: upgrade reinforce-loaders")
        if not 0 <= self.class_vocabulary_size <= self.num_classes:
            raise StoreFormatError(f"class_vocabulary_size={self.class_vocabulary_size} must be between 0 and "
                                   f"num_classes={self.num_classes}")
        self._check_lists()
        if self.num_blocks > MAX_BLOCKS:
            raise StoreFormatError(f"header members num_samples={self.num_samples} and block_size={self.block_size} "
                                   f"make {self.num_blocks} blocks, over the limit of {MAX_BLOCKS}: the store is "
                                   "damaged or hostile (format_spec.md, section 2)")

    def _check_lists(self) -> None:
        """The members whose elements readers use: class names, teachers, and the skipped samples."""
        if self.class_names is not None and not all(isinstance(name, str) for name in self.class_names):
            raise StoreFormatError("header member class_names must be an array of strings or null")
        if not all(isinstance(teacher, dict) for teacher in self.teachers):
            raise StoreFormatError("header member teachers must be an array of objects")
        skipped = self.provenance.get("skipped", [])
        indices = [entry.get("index") if isinstance(entry, dict) else None
                   for entry in (skipped if isinstance(skipped, list) else [None])]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_samples for i in indices) \
                or indices != sorted(set(indices)):
            raise StoreFormatError(f"header member provenance.skipped must list objects with ascending, distinct "
                                   f"sample indices in [0, {self.num_samples}) (format_spec.md, section 3.7), got "
                                   f"{_shown(skipped)}")

    @property
    def num_blocks(self) -> int:
        return -(-self.num_samples // self.block_size)

    @functools.cached_property
    def layout(self) -> StoreLayout:
        """The record layout, parsed once per header object."""
        return StoreLayout.of(self)

    @property
    def dtype(self) -> np.dtype:
        """Element type of the ``records`` and ``class_vocabulary`` arrays."""
        return self.layout.dtype

    @property
    def fill_value(self) -> int:
        """Fill value of ``records`` and ``class_vocabulary`` (``max(T)``): never a valid stored value."""
        return self.layout.fill

    @property
    def array_names(self) -> tuple[str, ...]:
        """The arrays of this store, in :data:`ALL_ARRAYS` order."""
        optional = {CLASS_VOCABULARY: bool(self.class_vocabulary_size), PARAM_DIGESTS: self.derives_params}
        return tuple(name for name in ALL_ARRAYS if optional.get(name, True))

    @property
    def derives_params(self) -> bool:
        """Whether records hold no parameters: readers re-derive them (``param_storage == "derived"``)."""
        return self.param_storage == "derived"

    @functools.cached_property
    def pipeline(self) -> Any:
        """The store's :class:`~reinforce_loaders.augment.AugmentPipeline`, built once per header object."""
        from .augment import AugmentPipeline

        return AugmentPipeline.from_config(self.augmentation)

    @property
    def param_codec(self) -> ParamLayout:
        """The codecs of the augmentation parameters (``layout.params``)."""
        return self.layout.params

    @property
    def record_columns(self) -> dict[str, slice]:
        """Column ranges of one ``records`` row (``layout.columns``)."""
        return self.layout.columns

    @property
    def record_width(self) -> int:
        return self.layout.width

    @property
    def skipped_indices(self) -> np.ndarray:
        """Sorted indices of samples skipped at build time (unreadable images), from ``provenance["skipped"]``."""
        return np.array(sorted(int(entry["index"]) for entry in self.provenance.get("skipped", [])), dtype=np.int64)

    def block_range(self, block: int) -> tuple[int, int]:
        """Sample range ``[start, stop)`` covered by ``block``."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_samples)

    def settings(self) -> dict[str, Any]:
        """The fields that determine array contents (JSON-normalized, so stored and fresh headers compare)."""
        fields = dataclasses.asdict(self)
        for volatile in ("provenance", "complete", "format_version"):
            fields.pop(volatile)
        return json.loads(json.dumps(fields))

    def to_attrs(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreHeader:
        if ATTRS_KEY not in attrs:
            raise StoreFormatError(
                f"this is not a reinforce store: its root group has no '{ATTRS_KEY}' attribute; "
                "pass the directory written by `reinforce build --out`"
            )
        if not isinstance(attrs[ATTRS_KEY], Mapping):
            raise StoreFormatError(f"the store header ('{ATTRS_KEY}' attribute) must be an object")
        raw = dict(attrs[ATTRS_KEY])
        if raw.get("format_name") != FORMAT_NAME:
            raise StoreFormatError(
                f"unknown store format {_shown(raw.get('format_name'))}; expected {FORMAT_NAME!r}"
            )
        check_format_version(str(raw.get("format_version", "")))
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in REQUIRED_MEMBERS if name not in raw]
        if missing:
            raise StoreFormatError(f"the store header lacks {', '.join(missing)}: the store is damaged or was not "
                                   "written by a reinforce writer; rebuild it")
        # Unknown keys are minor-version additions: ignored by this reader.
        return cls(**{key: value for key, value in raw.items() if key in known})


def check_format_version(version: str) -> tuple[int, int]:
    """Parse ``"MAJOR.MINOR"``; raise if this reader cannot read that major version."""
    try:
        major, minor = (int(part) for part in version.split("."))
    except ValueError:
        raise StoreFormatError(f"store has a malformed format_version {_shown(version)}; expected 'MAJOR.MINOR'"
                               ) from None
    if major != FORMAT_VERSION[0]:
        supported = f"{FORMAT_VERSION[0]}.x"
        advice = (
            "upgrade reinforce-loaders (pip install -U reinforce-loaders)"
            if major > FORMAT_VERSION[0]
            else "rebuild the store with this version of reinforce"
        )
        raise StoreFormatError(
            f"store format version {version} is not supported by this reader (it reads {supported}): {advice}"
        )
    return major, minor


# ----------------------------------------------------------------------------------------------------------
# Arrays: creation (writer side) and reading (both sides)
# ----------------------------------------------------------------------------------------------------------

def array_specs(header: StoreHeader) -> dict[str, dict[str, Any]]:
    """``zarr.Group.create_array`` keyword arguments of every array of a store with this header."""
    n, a, b, w = header.num_samples, header.num_augmentations, header.block_size, header.layout.stored_width
    dtype = header.dtype
    per_sample = {"compressors": [ZstdCodec(level=3), Crc32cCodec()]}
    v = header.class_vocabulary_size
    vocabulary = dict(shape=(n, v), chunks=(b, v), dtype=dtype, fill_value=header.fill_value, **per_sample)
    specs = {
        LABELS: dict(shape=(n,), chunks=(b,), dtype=LABEL_DTYPE, fill_value=LABEL_FILL, **per_sample),
        FINGERPRINTS: dict(shape=(n,), chunks=(b,), dtype=FINGERPRINT_DTYPE, fill_value=0, **per_sample),
        IMAGE_SIZES: dict(shape=(n, 2), chunks=(b, 2), dtype=IMAGE_SIZE_DTYPE, fill_value=0, **per_sample),
        CLASS_VOCABULARY: vocabulary,
        RECORDS: dict(
            shape=(n, a, w), shards=(b, a, w), chunks=(b, 1, w), dtype=dtype, fill_value=header.fill_value,
            # Column-major inside a chunk (every column of the block contiguous), shuffled, zstd, checksum.
            # Measured (benchmarks/RESULTS.md): with a class vocabulary byte shuffling is smaller (ImageNet+
            # 22.65 vs 24.06 bytes/record); with plain class ids mostly bit shuffling (digits demo 11.9 vs 13.1).
            filters=[TransposeCodec(order=(2, 1, 0))], serializer=BytesCodec(endian="little"),
            compressors=[BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle=record_shuffle(header),
                                    typesize=dtype.itemsize),
                         Crc32cCodec()],
        ),
        PARAM_DIGESTS: dict(shape=(header.num_blocks, a), chunks=(1, a), dtype=PARAM_DIGEST_DTYPE, fill_value=0,
                            compressors=[Crc32cCodec()]),
        BLOCKS_DONE: dict(shape=(header.num_blocks,), chunks=(1,), dtype=BLOCK_DONE_DTYPE, fill_value=0,
                          compressors=[Crc32cCodec()]),
    }
    chosen = {name: specs[name] for name in header.array_names}
    _check_chunk_sizes(chosen)
    return chosen


def _check_chunk_sizes(specs: dict[str, dict[str, Any]]) -> None:
    """Refuse a header whose chunks or ``records`` shard would exceed the reader's limits (section 2)."""
    for name, spec in specs.items():
        for what, shape, limit in (("chunk", spec["chunks"], MAX_CHUNK_BYTES),
                                   ("shard", spec.get("shards"), MAX_BLOCK_RECORD_BYTES)):
            size = math.prod(shape) * np.dtype(spec["dtype"]).itemsize if shape is not None else 0
            if size > limit:
                raise StoreFormatError(
                    f"a {what} of array '{name}' would hold {size:,} bytes ({what} shape {shape}, from the header's "
                    f"block_size, num_augmentations, top_k or class_vocabulary_size), over the limit of {limit:,}: "
                    "the store is damaged or hostile, or use a smaller --block-size")


def record_shuffle(header: StoreHeader) -> str:
    """Blosc shuffle of ``records``: byte shuffle with a class vocabulary, bit shuffle without."""
    return "shuffle" if header.class_vocabulary_size else "bitshuffle"


def expected_file_count(header: StoreHeader) -> int:
    """Files of a complete store: one per array chunk/shard plus one ``zarr.json`` per node."""
    return header.num_blocks * len(header.array_names) + len(header.array_names) + 1


def open_store_group(store: Any, mode: str = "r", storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Open the root group of a store given as a path, an fsspec URL or a zarr store object.

    Reading uses the consolidated metadata in the root ``zarr.json`` when present, so opening a remote store
    costs one request.
    """
    if hasattr(store, "__fspath__"):
        store = str(store)
    where = store
    is_url = isinstance(store, str) and "://" in store and not store.startswith("file://")
    kwargs: dict[str, Any] = {"storage_options": storage_options} if is_url and storage_options else {}
    if isinstance(store, str) and store.startswith("file://"):
        store = store[len("file://"):]
    if is_url and store.startswith(("http://", "https://")):
        store = _http_store(store, read_only=mode == "r", storage_options=storage_options or {})
        kwargs = {}
    try:
        if mode == "r":
            try:
                return zarr.open_consolidated(store=store, mode="r", zarr_format=3, **kwargs)
            except ValueError:  # no consolidated metadata (a build in progress): read the nodes themselves
                pass
        return zarr.open_group(store=store, mode=mode, zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise StoreFormatError(
            f"no reinforce store at {where!s}: check the path or URL (it must be the directory written by "
            "`reinforce build --out`)"
        ) from None
    except (ValueError, TypeError, LookupError, AttributeError, ArithmeticError) as error:  # zarr parsing bad JSON
        raise StoreFormatError(f"the Zarr metadata (zarr.json) of the store at {where!s} is invalid "
                               f"({type(error).__name__}: {_shown(str(error))}): the store is damaged or was not "
                               "written by reinforce; re-download or rebuild it") from None


def _http_store(url: str, *, read_only: bool, storage_options: dict[str, Any]) -> Any:
    """A zarr store over HTTP(S) whose range reads stay correct on a server that ignores ``Range``.

    Such a server (``python -m http.server`` is one) answers a range request with the whole file and status
    200; fsspec would hand that to zarr as the range, which then fails its checksums. Here the asked-for bytes
    are cut out of the whole file instead, with a warning that every read now downloads whole shard files.
    """
    from zarr.storage import FsspecStore

    fs = _range_checking_http_filesystem()(asynchronous=True, **storage_options)
    return FsspecStore(fs=fs, path=url.rstrip("/"), read_only=read_only)


@functools.cache
def _range_checking_http_filesystem() -> type:
    """fsspec's HTTP filesystem, checking that a range request got a range (status 206) back.

    One class per process, made on first use (fsspec's HTTP support is optional), so fsspec's instance cache
    shares one filesystem, and one connection pool, between the stores opened with the same options.
    """
    import warnings
    import weakref

    from fsspec.implementations.http import HTTPFileSystem

    class RangeCheckingHTTPFileSystem(HTTPFileSystem):
        async def set_session(self):  # type: ignore[no-untyped-def]
            fresh = self._session is None
            session = await super().set_session()
            if fresh:  # fsspec closes only a synchronous instance's session; closed here at exit, quietly
                weakref.finalize(self, self.close_session, self.loop, session)
            return session

        async def _cat_file(self, url, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def]
            if (start is None and end is None) or start == end:
                return await super()._cat_file(url, start=start, end=end, **kwargs)
            options = {**self.kwargs, **kwargs}
            headers = {**options.pop("headers", {}), "Range": await self._process_limits(url, start, end)}
            session = await self.set_session()
            async with session.get(self.encode_url(url), headers=headers, **options) as response:
                data = await response.read()
                self._raise_not_found_for_status(response, url)
            if response.status == 206:
                return data
            if not getattr(self, "_warned_about_range", False):
                self._warned_about_range = True
                warnings.warn(
                    f"the web server of {url} ignores HTTP Range requests (it answered one with the whole file, "
                    "status 200, as `python -m http.server` does): reading on by downloading whole shard "
                    "files, up to num_augmentations times the bytes an epoch needs. Serve the store with a server "
                    "that supports Range requests (nginx, Apache, caddy, object storage) or copy it to a local "
                    "disk", RuntimeWarning, stacklevel=2)
            return data[start:end]

    return RangeCheckingHTTPFileSystem


def read_header(group: zarr.Group, *, require_complete: bool = True) -> StoreHeader:
    """Read and validate the header of an open store group."""
    header = StoreHeader.from_attrs(group.attrs.asdict())
    check_pipeline(header)
    if require_complete and not header.complete:
        raise IncompleteStoreError(
            f"the store's build has not finished ({_blocks_done_summary(group, header)}): "
            "re-run the same `reinforce build` command to resume it"
        )
    return header


def check_pipeline(header: StoreHeader) -> None:
    """Parse the header's augmentation pipeline and parameter codecs once (cached on the header), turning
    whatever a damaged or hostile ``augmentation`` or ``param_encodings`` raises into a StoreFormatError, and
    check that the codecs are those of the pipeline's parameters, in order."""
    try:
        pipeline, params = header.pipeline, header.layout.params
        names = list(params.names)
    except ReinforceError:
        raise
    except Exception as error:  # parsing hostile JSON: TypeError, ValueError, KeyError, AttributeError...
        raise StoreFormatError(f"the store header's augmentation or param_encodings cannot be used "
                               f"({type(error).__name__}: {_shown(str(error))}): the store is damaged or was not "
                               "written by a reinforce writer") from None
    if names != list(pipeline.param_names):
        raise StoreFormatError(f"the store header's param_encodings ({len(names)}) do not match the parameters of "
                               f"its augmentation pipeline ({pipeline.num_params}): the store is damaged")


def read_array(group: zarr.Group, name: str, selection: Any = slice(None), what: str = "") -> np.ndarray:
    """``group[name][selection]``, turning a damaged chunk (checksum, truncation) into a StoreFormatError."""
    try:
        array = _bounded_member(group, name)
    except KeyError:
        raise StoreFormatError(f"array '{name}' is missing from the store: the store is damaged; re-download "
                               "or rebuild it") from None
    try:
        return np.asarray(array[selection])
    except Exception as error:  # zarr reports damage as ValueError, RuntimeError or struct/codec errors
        _settle_sibling_reads()
        raise StoreFormatError(
            f"cannot read {what or 'data'} of array '{name}' ({type(error).__name__}: {error}): the store is "
            "damaged or truncated; re-download it, or run `reinforce verify` to find every damaged block"
        ) from error


def _settle_sibling_reads(timeout: float = 10.0) -> None:
    """Wait for the chunk reads that zarr started beside a chunk that failed.

    zarr gathers the chunks of one call without cancelling the others when one raises, so they keep running on
    its event loop after the error reached us; a process that then exits (``reinforce verify`` on a damaged
    store) destroys them half-way and prints "Task was destroyed but it is pending!" with their tracebacks
    under the clean error message.
    """
    async def settle() -> None:
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    try:
        zarr_sync(settle())
    except Exception:  # the error being reported matters more than a tidy exit
        pass


def check_store(group: zarr.Group, header: StoreHeader, *, last_block: bool = True) -> None:
    """Check what a reader must check before it reads a whole array or allocates anything per sample: every
    array of the header present with the shape, dtype, chunks, shards and fill value of :func:`array_specs`
    and only compressors whose output a reader bounds (:func:`bounded_array`); with ``last_block``, that the
    last block is written (``blocks_done`` and its chunks), so a store of metadata alone claiming many samples
    fails at once. Raises :class:`StoreFormatError` naming the array."""
    specs = array_specs(header)
    for name, spec in specs.items():
        try:
            array = group[name]
        except KeyError:
            raise StoreFormatError(f"array '{name}' is missing from the store: the store is damaged; re-download "
                                   "or rebuild it") from None
        if not isinstance(array, zarr.Array):
            raise StoreFormatError(f"'{name}' in the store is not an array: the store is damaged or hostile")
        found = (array.shape, np.dtype(array.dtype), array.chunks, array.shards)
        wanted = (spec["shape"], np.dtype(spec["dtype"]), spec["chunks"], spec.get("shards"))
        if found != wanted:
            raise StoreFormatError(
                f"array '{name}' has shape {found[0]}, dtype {found[1]}, chunks {found[2]} and shards {found[3]}, "
                f"but the header implies {wanted[0]}, {wanted[1]}, {wanted[2]} and {wanted[3]} (format_spec.md, "
                "section 3): the store is damaged or hostile; re-download or rebuild it")
        if array.fill_value != spec["fill_value"]:
            raise StoreFormatError(f"array '{name}' has fill value {_shown(np.asarray(array.fill_value).tolist())}, "
                                   f"format_spec.md section 3 requires {spec['fill_value']}: the store is damaged "
                                   "or hostile")
        bounded_array(array)  # refuses compressors whose output size it cannot check
    if last_block:
        _check_last_block(group, header)


def _check_last_block(group: zarr.Group, header: StoreHeader) -> None:
    block = header.num_blocks - 1
    start, stop = header.block_range(block)
    what = f"the last block ({block})"
    if int(read_array(group, BLOCKS_DONE, block, what=what)) != 1:
        raise StoreFormatError(f"{what} of the store is not written although the header says the build is "
                               "complete: the store is damaged or truncated; re-download or rebuild it")
    if (read_array(group, LABELS, slice(start, stop), what=what) < 0).any():
        raise StoreFormatError(f"the labels of {what} are missing from the store (chunk absent): the store is "
                               "damaged or truncated; re-download or rebuild it")
    rows = read_array(group, RECORDS, (slice(start, stop), 0), what=f"{what}, slot 0")
    check_rows_present(header, rows, f"{what}, slot 0")


def bounded_array(array: zarr.Array) -> zarr.Array:
    """``array`` read through compressors that refuse a chunk declaring a decoded size larger than its chunk
    (a decompression bomb: a 98 KB zstd frame may expand to 3 GiB, which zarr would allocate before noticing).

    zstd and blosc are bounded by the size their frame header declares; a frame without one, and any other
    compressor, is refused (StoreFormatError), as this reader cannot bound its output."""
    metadata = array.metadata
    bounded = dataclasses.replace(metadata, codecs=_bounded_codecs(metadata.codecs, array.path))
    return zarr.Array(AsyncArray(bounded, array.async_array.store_path, array.async_array.config))


_BOUNDED_MEMBERS: dict[int, dict[str, zarr.Array]] = {}


def _bounded_member(group: zarr.Group, name: str) -> zarr.Array:
    """:func:`bounded_array` of ``group[name]``, made once per open group."""
    arrays = _BOUNDED_MEMBERS.get(id(group))
    if arrays is None:
        arrays = _BOUNDED_MEMBERS[id(group)] = {}
        weakref.finalize(group, _BOUNDED_MEMBERS.pop, id(group), None)
    if name not in arrays:
        member = group[name]
        if not isinstance(member, zarr.Array):
            raise KeyError(name)
        arrays[name] = bounded_array(member)
    return arrays[name]


def _bounded_codecs(codecs: Sequence[Any], name: str) -> tuple[Any, ...]:
    out = []
    for codec in codecs:
        if isinstance(codec, ShardingCodec):
            codec = dataclasses.replace(codec, codecs=_bounded_codecs(codec.codecs, name),
                                        index_codecs=_bounded_codecs(codec.index_codecs, name))
        elif type(codec) in _BOUNDED_CODECS:
            codec = _BOUNDED_CODECS[type(codec)].from_dict(codec.to_dict())
        elif isinstance(codec, BytesBytesCodec) and not isinstance(codec, (Crc32cCodec, *_BOUNDED_CODECS.values())):
            raise StoreFormatError(f"array '{name}' uses the compressor {type(codec).__name__}, whose output this "
                                   "reader cannot bound: a reinforce store uses zstd or blosc (format_spec.md, "
                                   "section 3); the store is damaged or hostile")
        out.append(codec)
    return tuple(out)


def _check_declared_size(codec: str, declared: int | None, chunk_spec: Any) -> None:
    expected = math.prod(chunk_spec.shape) * chunk_spec.dtype.to_native_dtype().itemsize
    if declared is None:
        raise ValueError(f"a {codec} frame does not declare its decoded size, so its output cannot be bounded")
    if declared > expected:
        raise ValueError(f"a {codec} frame declares {declared:,} decoded bytes for a chunk of {expected:,} bytes "
                         "(a decompression bomb)")


def zstd_content_size(data: bytes | np.ndarray) -> int | None:
    """Decoded size a zstd frame declares in its header (RFC 8878, section 3.1.1), or None without one."""
    data = bytes(data[:18])
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = data[4]
    single_segment = descriptor >> 5 & 1
    start = 5 + (not single_segment) + (0, 1, 2, 4)[descriptor & 3]
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    if not width or len(data) < start + width:
        return None
    return int.from_bytes(data[start:start + width], "little") + (256 if width == 2 else 0)


def blosc_content_size(data: bytes | np.ndarray) -> int | None:
    """Decoded size a blosc (1.x) chunk declares in its 16-byte header, or None for a shorter input."""
    data = bytes(data[:16])
    return int.from_bytes(data[4:8], "little") if len(data) == 16 else None


class BoundedZstdCodec(ZstdCodec):
    """zarr's zstd codec, refusing a frame that declares more bytes than its chunk holds (see bounded_array)."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        _check_declared_size("zstd", zstd_content_size(chunk_bytes.as_numpy_array()), chunk_spec)
        return super()._decode_sync(chunk_bytes, chunk_spec)


class BoundedBloscCodec(BloscCodec):
    """zarr's blosc codec, refusing a chunk that declares more bytes than it holds (see bounded_array)."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        _check_declared_size("blosc", blosc_content_size(chunk_bytes.as_numpy_array()), chunk_spec)
        return super()._decode_sync(chunk_bytes, chunk_spec)


_BOUNDED_CODECS: dict[type, type] = {ZstdCodec: BoundedZstdCodec, BloscCodec: BoundedBloscCodec}


@dataclasses.dataclass
class DecodedRecords:
    """Records of some (sample, slot) pairs: ``indices``/``probs`` ``(..., K)``, ``params`` ``(..., P)``."""

    indices: np.ndarray
    probs: np.ndarray
    params: np.ndarray
    entropy: np.ndarray


def read_block_slot(group: zarr.Group, header: StoreHeader, block: int, slot: int,
                    image_sizes: np.ndarray | None = None) -> np.ndarray:
    """Decoded-layout ``records`` rows ``(block samples, W)`` of one slot of one block: one chunk, one zarr call.

    For a store with derived parameters the parameter columns are re-derived (``image_sizes``, the whole
    ``(N, 2)`` array, is then required) and checked against the block's digest.
    Raises :class:`StoreFormatError` if the chunk is damaged or missing (fill values), or if the derived
    parameters do not match the digest.
    """
    start, stop = header.block_range(block)
    rows = read_array(group, RECORDS, (slice(start, stop), slot), what=f"block {block} slot {slot}")
    check_rows_present(header, rows, f"block {block} slot {slot}")
    if not header.derives_params:
        return rows
    if image_sizes is None:
        raise ValueError("this store derives augmentation parameters: pass image_sizes (the store's whole "
                         "image_sizes array) to read its records")
    columns = derive_param_columns(header, block, slot, image_sizes)
    expected = int(read_array(group, PARAM_DIGESTS, (block, slot), what=f"block {block} slot {slot}"))
    check_param_digest(header, block, slot, columns, image_sizes, expected)
    return expand_rows(header, rows, columns)


def read_all_records(group: zarr.Group, header: StoreHeader | None = None) -> DecodedRecords:
    """Every record of a store decoded, ``(N, A, ...)``, read one shard per block (for tools and tests)."""
    header = header or read_header(group, require_complete=False)
    sizes = read_array(group, IMAGE_SIZES).astype(np.int64)
    blocks = []
    for block in range(header.num_blocks):
        rows = read_array(group, RECORDS, slice(*header.block_range(block)), what=f"block {block}")
        check_rows_present(header, rows, f"block {block}")
        if header.derives_params:
            digests = read_array(group, PARAM_DIGESTS, block, what=f"block {block}")
            slots = []
            for slot in range(header.num_augmentations):
                columns = derive_param_columns(header, block, slot, sizes)
                check_param_digest(header, block, slot, columns, sizes, int(digests[slot]))
                slots.append(expand_rows(header, rows[:, slot], columns))
            rows = np.stack(slots, axis=1)
        blocks.append(rows)
    rows = np.concatenate(blocks)
    vocabulary = read_vocabulary(group, header)
    return decode_records(header, rows, sizes[:, :1], sizes[:, 1:],
                          vocabulary=None if vocabulary is None else vocabulary[:, None, :],
                          present=(sizes != 0).any(axis=1)[:, None])


def read_vocabulary(group: zarr.Group, header: StoreHeader) -> np.ndarray | None:
    """The ``class_vocabulary`` array ``(N, V)``, or None for a store without one (``V = 0``)."""
    if not header.class_vocabulary_size:
        return None
    return read_array(group, CLASS_VOCABULARY)


def check_rows_present(header: StoreHeader, rows: np.ndarray, where: str) -> None:
    """Raise if any row holds the fill value (its chunk was never written or its file is missing)."""
    fill = header.fill_value
    top1 = rows[..., 0]
    if (top1 == fill).any():
        raise StoreFormatError(f"records of {where} are missing from the store (chunk absent): the store is "
                               "damaged or truncated; re-download it or rebuild it")


def decode_records(header: StoreHeader, rows: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                   codec: ParamLayout | None = None, vocabulary: np.ndarray | None = None,
                   where: str = "", present: np.ndarray | None = None) -> DecodedRecords:
    """Decode raw ``records`` rows ``(..., W)`` given the source ``heights``/``widths`` of their samples and,
    for a store with a class vocabulary, their samples' ``class_vocabulary`` rows (broadcast like the
    heights, with a trailing ``V`` axis: ``(n, 1, V)`` for rows ``(n, A, W)``, ``(V,)`` for one row).

    Every record is checked as it is decoded (:func:`check_records`), except where the mask ``present``
    (broadcast against ``(...)``) is False: skipped samples, whose records are zeros; ``where`` names the rows
    in the error."""
    layout = header.layout
    columns = layout.columns
    indices = decode_indices(header, rows[..., columns["topk_indices"]], vocabulary)
    quantized = quantized_probs(header, rows)
    entropy_levels = rows[..., columns["teacher_entropy"].start]
    if present is None:
        check_records(header, indices, quantized, entropy_levels, where)
    else:
        mask = np.broadcast_to(present, indices.shape[:-1])
        check_records(header, indices[mask], quantized[mask], entropy_levels[mask], where)
    return DecodedRecords(
        indices=indices,
        probs=quantized.astype(np.float32) / layout.prob_scale,
        params=(codec or layout.params).decode(rows[..., columns["aug_params"]], heights, widths),
        entropy=entropy_levels.astype(np.float32) / layout.entropy_levels * layout.max_entropy,
    )


TEACHER_ACCURACY = "teacher_accuracy"
"""``provenance`` member (optional): the teacher ensemble's top-1, in percent, on held-out images scored at build
time; ``TEACHER_ACCURACY_ON`` says which (``split`` name, ``images``, ``size`` px, center ``crop`` ratio)."""
TEACHER_ACCURACY_ON = "teacher_accuracy_on"


def recorded_teacher_accuracy(provenance: dict[str, Any]) -> tuple[float, str] | None:
    """(top-1 percent, what it was measured on) from a header's ``provenance``, if the build scored its teachers
    on held-out images (``reinforce build --val``); None otherwise."""
    top1 = provenance.get(TEACHER_ACCURACY)
    if not isinstance(top1, (int, float)) or isinstance(top1, bool) or not 0 <= top1 <= 100:
        return None
    on = provenance.get(TEACHER_ACCURACY_ON)
    on = on if isinstance(on, dict) else {}
    return float(top1), (f"{on.get('images', '?')} held-out images of {on.get('split', '?')!s} at "
                         f"{on.get('size', '?')} px, center crop {on.get('crop', '?')}, scored at build time")


def check_records(header: StoreHeader, indices: np.ndarray, quantized: np.ndarray, entropy_levels: np.ndarray,
                  where: str = "") -> None:
    """Raise :class:`StoreFormatError` unless every record holds distinct class indices below ``num_classes``,
    quantized probabilities in ``[0, prob_scale]`` summing to at most ``prob_scale`` (plus rounding), and an
    entropy level of at most ``entropy_levels``: what a damaged or hostile store could otherwise turn into
    wrong targets (format_spec.md, "Checks a reader makes")."""
    k = indices.shape[-1]
    if indices.ndim == 1:  # one record (a reader's per-sample path): plain Python is cheaper than numpy here
        classes, q = indices.tolist(), quantized.tolist()
        bad = not (len(set(classes)) == k and 0 <= min(classes) and max(classes) < header.num_classes
                   and q[0] <= header.prob_scale and q[-1] >= 0 and sum(q) <= header.prob_scale + (k + 1) // 2
                   and int(entropy_levels) <= header.entropy_levels)
        if bad:
            _invalid_record((), header, where)
        return
    bad = np.logical_or.reduce([mask for mask, _ in record_faults(header, indices, quantized, entropy_levels)])
    if bad.any():
        _invalid_record(tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else (), header, where)


def record_faults(header: StoreHeader, indices: np.ndarray, quantized: np.ndarray,
                  entropy_levels: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """The per-record rules of format_spec.md section 8 ("Checks a reader makes") over records ``(..., K)``:
    for each rule, the mask ``(...)`` of records that break it and what such a record has wrong. Readers
    (:func:`check_records`) refuse any; ``reinforce verify`` names the first record and its fault."""
    k = indices.shape[-1]
    ordered = np.sort(indices, axis=-1)
    return [
        ((ordered[..., 0] < 0) | (ordered[..., -1] >= header.num_classes),
         f"has a class index outside [0, {header.num_classes})"),
        ((ordered[..., :-1] == ordered[..., 1:]).any(axis=-1), "repeats a class index"),
        (quantized[..., 0] > header.prob_scale, "has a probability above 1"),
        # drops are unsigned, so the order is descending by construction; they can overshoot
        (quantized[..., -1] < 0, "has probability drops larger than its top-1 probability (negative probabilities)"),
        # each of the k rounded probabilities may be up to half a step high
        (quantized.sum(axis=-1) > header.prob_scale + (k + 1) // 2, "has top-k probabilities summing past 1"),
        (entropy_levels > header.entropy_levels, "has an entropy above log(num_classes)"),
    ]


def _invalid_record(position: tuple[int, ...], header: StoreHeader, where: str) -> None:
    raise StoreFormatError(
        f"record {position if position else ''} of {where or 'the store'} is invalid (class indices outside "
        f"[0, {header.num_classes}) or repeated, probabilities outside [0, 1] or summing past 1, or entropy "
        "out of range): the store is damaged or was not written by reinforce; run `reinforce verify`")


def decode_indices(header: StoreHeader, stored: np.ndarray, vocabulary: np.ndarray | None) -> np.ndarray:
    """Class indices (int64) of stored index columns ``(..., K)``: a value ``x < V`` is position ``x`` of the
    sample's vocabulary, any other value is the class ``x - V``."""
    stored = stored.astype(np.int64)
    size = header.class_vocabulary_size
    if not size:
        return stored
    in_vocabulary, looked_up = _vocabulary_lookup(header, stored, vocabulary)
    if (in_vocabulary & (looked_up >= header.num_classes)).any():
        raise StoreFormatError("a record refers to an empty or invalid class_vocabulary entry: the store is "
                               "damaged; re-download it, or run `reinforce verify` to find the damage")
    return np.where(in_vocabulary, looked_up, stored - size)


def invalid_vocabulary_references(header: StoreHeader, stored: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Mask ``(..., K)`` of stored index values that point at a padding or out-of-range vocabulary entry."""
    in_vocabulary, looked_up = _vocabulary_lookup(header, stored.astype(np.int64), vocabulary)
    return in_vocabulary & (looked_up >= header.num_classes)


def _vocabulary_lookup(header: StoreHeader, stored: np.ndarray,
                       vocabulary: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(stored value is a vocabulary position, the vocabulary entry it points at) for int64 ``stored``."""
    size = header.class_vocabulary_size
    if vocabulary is None:
        raise ValueError("this store stores class indices in per-sample vocabularies: pass the samples' "
                         "class_vocabulary rows (format.read_vocabulary)")
    vocabulary = np.asarray(vocabulary)
    positions = np.minimum(stored, size - 1)
    if vocabulary.ndim == 1:  # one sample's records (the reader's per-sample path)
        return stored < size, vocabulary[positions].astype(np.int64)
    table = np.broadcast_to(vocabulary.astype(np.int64), stored.shape[:-1] + (size,))
    return stored < size, np.take_along_axis(table, positions, axis=-1)


def encode_indices(header: StoreHeader, indices: np.ndarray, vocabulary: np.ndarray | None) -> np.ndarray:
    """Stored index columns of class ``indices`` ``(..., K)``: the inverse of :func:`decode_indices`; a class in
    the sample's vocabulary MUST be stored as its position."""
    size = header.class_vocabulary_size
    if not size:
        return indices
    if vocabulary is None:
        raise ValueError("a store with class_vocabulary_size > 0 needs the samples' vocabularies to encode indices")
    vocabulary = np.asarray(vocabulary, dtype=np.int64)
    # One sorted search over every vocabulary row at once: row r's entries and keys are offset by r * span.
    span = int(max(vocabulary.max(initial=0), indices.max(initial=0))) + 1
    rows = np.arange(vocabulary[..., 0].size).reshape(vocabulary.shape[:-1])
    order = np.argsort(vocabulary, axis=-1, kind="stable")
    entries = (np.take_along_axis(vocabulary, order, axis=-1) + rows[..., None] * span).ravel()
    keys = indices + np.broadcast_to(rows, indices.shape[:-1])[..., None] * span
    at = np.minimum(np.searchsorted(entries, keys), entries.size - 1)
    found = entries[at] == keys
    return np.where(found, order.ravel()[at], indices + size)


def quantized_probs(header: StoreHeader, rows: np.ndarray) -> np.ndarray:
    """Quantized probabilities ``q`` (int64, ``(..., K)``) of raw rows: ``q[0]`` minus the cumulative drops."""
    stored = rows[..., header.record_columns["topk_probs"]].astype(np.int64)
    drops = np.add.accumulate(stored[..., 1:], axis=-1)
    return np.concatenate([stored[..., :1], stored[..., :1] - drops], axis=-1)


def encode_records(header: StoreHeader, indices: np.ndarray, probs: np.ndarray, params: np.ndarray,
                   entropy: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                   codec: ParamLayout | None = None, vocabulary: np.ndarray | None = None) -> np.ndarray:
    """Raw ``records`` rows ``(..., W)`` from top-k ``indices``/``probs`` ``(..., K)``, float ``params``
    ``(..., P)`` and entropy in nats ``(...)``; ``heights``/``widths`` broadcast against ``(...)``, and the
    samples' ``vocabulary`` rows (see :func:`decode_records`) when the store has one."""
    codec = codec or header.param_codec
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= header.num_classes):
        raise StoreFormatError(f"top-k class index outside [0, {header.num_classes})")
    probs = np.asarray(probs, dtype=np.float64)
    if not np.isfinite(probs).all() or probs.min(initial=0) < 0 or probs.max(initial=0) > 1 + 1e-6:
        raise StoreFormatError("top-k probabilities must be finite and in [0, 1]")
    out = np.empty(indices.shape[:-1] + (header.record_width,), dtype=header.dtype)
    columns = header.record_columns
    out[..., columns["topk_indices"]] = encode_indices(header, indices.astype(np.int64), vocabulary)
    q = np.rint(np.clip(probs, 0, 1) * header.prob_scale).astype(np.int64)
    drops = -np.diff(q, axis=-1)
    if (drops < 0).any():
        raise StoreFormatError("top-k probabilities must be in descending order (sort them with their indices)")
    out[..., columns["topk_probs"].start] = q[..., 0]
    out[..., columns["topk_probs"].start + 1:columns["topk_probs"].stop] = drops
    out[..., columns["aug_params"]] = codec.encode(params, heights, widths)
    max_entropy = math.log(header.num_classes) if header.num_classes > 1 else 1.0
    normalized = np.clip(np.asarray(entropy, dtype=np.float64) / max_entropy, 0, 1)
    out[..., columns["teacher_entropy"].start] = np.rint(normalized * header.entropy_levels)
    return out


# ----------------------------------------------------------------------------------------------------------
# Derived parameters (param_storage "derived", format 1.1)
# ----------------------------------------------------------------------------------------------------------

def present_samples(image_sizes: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Samples of ``[start, stop)`` that were not skipped (their image size is not ``(0, 0)``)."""
    sizes = np.asarray(image_sizes[start:stop])
    return start + np.flatnonzero((sizes != 0).any(axis=1))


def derive_param_columns(header: StoreHeader, block: int, slot: int, image_sizes: np.ndarray) -> np.ndarray:
    """Encoded parameter columns ``(block samples, C)`` of one slot of one block, re-derived from the keyed RNG
    exactly as the build sampled them (skipped samples: zeros). ``image_sizes`` is the store's ``(N, 2)`` array:
    the sources' sizes, and the mixing partners' (a skipped partner leaves a record unmixed)."""
    pipeline = header.pipeline
    sizes = np.asarray(image_sizes, dtype=np.int64)
    start, stop = header.block_range(block)
    samples = present_samples(sizes, start, stop)
    out = np.zeros((stop - start, header.layout.params.columns), dtype=np.int64)
    if not len(samples):
        return out
    mixing = {}
    if pipeline.mixes:
        mixing = dict(num_samples=header.num_samples,
                      partner_size=lambda p: None if not sizes[p].any() else (int(sizes[p, 0]), int(sizes[p, 1])),
                      partner_pool=rng.partner_pool(header.seed, start, header.num_samples, header.block_size))
    params = pipeline.sample_records(header.seed, samples, slot, sizes[samples, 0], sizes[samples, 1], **mixing)
    out[samples - start] = header.layout.params.encode(params, sizes[samples, 0], sizes[samples, 1])
    return out


def param_digest(columns: np.ndarray) -> int:
    """blake2b-64 of parameter columns ``(n, C)`` as little-endian uint16, row by row (nonzero: 0 is the fill)."""
    data = np.ascontiguousarray(np.asarray(columns, dtype=np.int64).astype("<u2")).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


def block_param_digests(header: StoreHeader, columns: np.ndarray, image_sizes: np.ndarray, start: int) -> np.ndarray:
    """``param_digests`` row ``(A,)`` of a block starting at ``start`` from its parameter columns ``(n, A, C)``:
    one digest per slot over the block's samples that were not skipped."""
    present = present_samples(image_sizes, start, start + len(columns)) - start
    return np.array([param_digest(columns[present, slot]) for slot in range(columns.shape[1])],
                    dtype=PARAM_DIGEST_DTYPE)


def check_param_digest(header: StoreHeader, block: int, slot: int, columns: np.ndarray, image_sizes: np.ndarray,
                       expected: int) -> None:
    start, stop = header.block_range(block)
    present = present_samples(image_sizes, start, stop) - start
    if expected == 0:
        raise StoreFormatError(f"the parameter digest of block {block} slot {slot} is missing: the store is damaged "
                               "or truncated; re-download or rebuild it")
    if param_digest(columns[present]) != expected:
        raise StoreFormatError(
            f"the augmentation parameters re-derived for block {block} slot {slot} differ from those the store "
            "was built with: this machine's arithmetic differs from the builder's (format_spec.md, section 5) "
            "or the store is damaged. Use a store built with stored parameters (reinforce build without "
            "--derived-params), or run `reinforce verify` to locate the damage")


def stored_rows(header: StoreHeader, rows: np.ndarray) -> np.ndarray:
    """The ``records`` array's rows of decoded-layout ``rows``: without the parameter columns when derived."""
    if not header.derives_params:
        return rows
    return np.delete(rows, header.layout.columns["aug_params"], axis=-1)


def expand_rows(header: StoreHeader, rows: np.ndarray, param_columns: np.ndarray) -> np.ndarray:
    """Decoded-layout rows from stored rows of a derived-parameter store and their parameter columns."""
    params = header.layout.columns["aug_params"]
    out = np.empty(rows.shape[:-1] + (header.layout.width,), dtype=rows.dtype)
    out[..., :params.start] = rows[..., :params.start]
    out[..., params] = param_columns
    out[..., params.stop:] = rows[..., params.start:]
    return out


def _blocks_done_summary(group: zarr.Group, header: StoreHeader) -> str:
    if header.num_blocks > 1 << 16:  # not counted: one read per block of a header that may be hostile
        return f"the header claims {header.num_blocks} blocks"
    try:
        done = int(np.count_nonzero(group[BLOCKS_DONE][:]))
    except KeyError:
        done = 0
    return f"{done} of {header.num_blocks} blocks written"
