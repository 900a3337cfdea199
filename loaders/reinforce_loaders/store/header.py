"""The store header (the root attribute ``reinforce``, format_spec.md section 2): :class:`StoreHeader` and the
checks it makes of every member, the record layout it implies (:class:`StoreLayout`), the format version a
reader accepts, and the arrays it implies (:func:`array_specs`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from ..codecs import ParamLayout
from ..errors import ReinforceError, StoreFormatError
from .spec import (ALL_ARRAYS, ATTRS_KEY, BLOCK_DONE_DTYPE, BLOCKS_DONE, CLASS_VOCABULARY, DEFAULT_PROB_SCALE,
                   ENTROPY_LEVELS, FINGERPRINT_DTYPE, FINGERPRINTS, FORMAT_NAME, FORMAT_VERSION, IMAGE_SIZE_DTYPE,
                   IMAGE_SIZES, LABEL_DTYPE, LABEL_FILL, LABELS, MAX_AUGMENTATIONS, MAX_BLOCK_RECORD_BYTES,
                   MAX_BLOCK_SIZE, MAX_BLOCKS, MAX_CHUNK_BYTES, MAX_CLASSES, MAX_IMAGE_SIDE, MAX_SAMPLES, MAX_TOP_K,
                   PARAM_DIGEST_DTYPE, PARAM_DIGESTS, PARAM_STORAGE, RECORD_FILL_U16, RECORDS, ZSTD_LEVEL,
                   record_dtype)


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
        raise StoreFormatError(f"header member {name} must be {wanted}, got {shown(value)}: the store is damaged "
                               "or was not written by a reinforce writer")
    if (low is not None and value < low) or (high is not None and value > high):
        raise StoreFormatError(f"header member {name}={shown(value)} is outside [{low}, {high}]"
                               if high is not None else f"header member {name}={shown(value)} must be >= {low}")


def shown(value: Any) -> str:
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
        if self.class_names is not None and len(self.class_names) > self.num_classes:
            raise StoreFormatError(f"header member class_names lists {len(self.class_names):,} names, more than "
                                   f"num_classes={self.num_classes}: the store is damaged or hostile")
        if not all(isinstance(teacher, dict) for teacher in self.teachers):
            raise StoreFormatError("header member teachers must be an array of objects")
        skipped = self.provenance.get("skipped", [])
        indices = [entry.get("index") if isinstance(entry, dict) else None
                   for entry in (skipped if isinstance(skipped, list) else [None])]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_samples for i in indices) \
                or indices != sorted(set(indices)):
            raise StoreFormatError(f"header member provenance.skipped must list objects with ascending, distinct "
                                   f"sample indices in [0, {self.num_samples}) (format_spec.md, section 3.7), got "
                                   f"{shown(skipped)}")

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
        from ..augment import AugmentPipeline

        return AugmentPipeline.from_config(self.augmentation)

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
                f"unknown store format {shown(raw.get('format_name'))}; expected {FORMAT_NAME!r}"
            )
        check_format_version(str(raw.get("format_version", "")))
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in REQUIRED_MEMBERS if name not in raw]
        if missing:
            raise StoreFormatError(f"the store header lacks {', '.join(missing)}: the store is damaged or was not "
                                   "written by a reinforce writer; rebuild it")
        # Unknown keys are minor-version additions: ignored by this reader.
        return cls(**{key: value for key, value in raw.items() if key in known})


READERS_OF_MAJOR = {1: "0.1.0"}
"""The reinforce-loaders release that reads each earlier format major (2.0 replaced 1.x's float replay
arithmetic by the exact integer one: format_spec.md section 9)."""


def check_format_version(version: str) -> tuple[int, int]:
    """Parse ``"MAJOR.MINOR"``; raise if this reader cannot read that major version."""
    try:
        major, minor = (int(part) for part in version.split("."))
    except ValueError:
        raise StoreFormatError(f"store has a malformed format_version {shown(version)}; expected 'MAJOR.MINOR'"
                               ) from None
    if major != FORMAT_VERSION[0]:
        supported = f"{FORMAT_VERSION[0]}.x"
        advice = (
            "upgrade reinforce-loaders (pip install -U reinforce-loaders)"
            if major > FORMAT_VERSION[0]
            else "rebuild the store with this version of reinforce, or read it with the reinforce-loaders release "
                 f"that built it ({major}.x: reinforce-loaders {READERS_OF_MAJOR.get(major, 'of that time')})"
        )
        raise StoreFormatError(
            f"store format version {version} is not supported by this reader (it reads {supported}): {advice}"
        )
    return major, minor


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
                               f"({type(error).__name__}: {shown(str(error))}): the store is damaged or was not "
                               "written by a reinforce writer") from None
    if names != list(pipeline.param_names):
        raise StoreFormatError(f"the store header's param_encodings ({len(names)}) do not match the parameters of "
                               f"its augmentation pipeline ({pipeline.num_params}): the store is damaged")


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
