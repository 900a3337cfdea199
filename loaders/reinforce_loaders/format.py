"""Single source of truth for the layout of a reinforced store (normative text: ``format_spec.md``).

The builder (``reinforce``) writes with these names, dtypes, codecs and attributes and the readers in this
package read with them; nothing about the layout is written down anywhere else in code.

Layout in one paragraph: every (sample, slot) record is one row of ``W`` unsigned integers in the array
``records`` of shape ``(num_samples, num_augmentations, W)``: top-k class indices (as positions in the
sample's ``class_vocabulary`` when they are in it), quantized top-k probabilities, encoded augmentation
parameters and the quantized teacher entropy. Records are chunked one
slot of one block of samples per chunk, and sharded one block (all slots) per shard, so a build worker owns
whole shards and a reader fetches an epoch (one slot per sample, :func:`~reinforce_loaders.rng.slot_for_epoch`)
with one chunk per block.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from .errors import IncompleteStoreError, StoreFormatError

FORMAT_NAME = "reinforce-store"
FORMAT_VERSION = (1, 0)
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

PER_SAMPLE_ARRAYS = (LABELS, FINGERPRINTS, IMAGE_SIZES)
PER_RECORD_ARRAYS = (RECORDS,)
ALL_ARRAYS = PER_SAMPLE_ARRAYS + (CLASS_VOCABULARY,) + PER_RECORD_ARRAYS + (BLOCKS_DONE,)
"""Every array a store may hold; :attr:`StoreHeader.array_names` lists those a given store holds."""

LABEL_DTYPE = np.dtype("<i4")
FINGERPRINT_DTYPE = np.dtype("<u8")
IMAGE_SIZE_DTYPE = np.dtype("<u4")
BLOCK_DONE_DTYPE = np.dtype("u1")

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


def topk_index_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds every class index below ``num_classes``."""
    if num_classes <= 2**8:
        return np.dtype("u1")
    if num_classes <= 2**16:
        return np.dtype("<u2")
    return np.dtype("<u4")


# ----------------------------------------------------------------------------------------------------------
# Augmentation parameter encodings
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamEncoding:
    """How one augmentation parameter (a float64 in the pipeline) becomes unsigned 16-bit record columns.

    ``kind`` is one of:

    * ``"float16"`` (default for undeclared params): the IEEE binary16 bit pattern of the value.
    * ``"int"``: an integer value ``v`` in ``[offset, offset + 2**(16 * width))`` stored as ``v - offset``
      in ``width`` (1 or 2) columns, low 16 bits first.
    * ``"linear"``: a float in ``[lo, hi]`` stored as ``round((v - lo) / (hi - lo) * levels)``.
    * ``"relative"``: an integer pixel coordinate or extent in ``[0, ref]`` stored as
      ``round(v * levels / ref)`` where ``ref`` is the source image's height or width
      (``"source_height"`` / ``"source_width"``) or the pipeline's output size (``"output"``). An extent
      names its ``start`` param: it decodes to at least 1, and the encoder keeps ``start + extent <= ref``.

    An op declares encodings with the optional attribute ``param_encoding: dict[str, ParamEncoding]``
    (keyed by its param names); else :data:`KNOWN_PARAM_ENCODINGS` (source-pixel crop boxes), else the op's
    ``param_specs`` (see :func:`encoding_from_spec`), else ``float16``. The build applies the *decoded* parameters, so teacher and student see the same image
    whatever the precision.
    """

    kind: str = "float16"
    offset: int = 0
    width: int = 1
    lo: float = 0.0
    hi: float = 1.0
    levels: int = 255
    ref: str = ""
    start: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("float16", "int", "linear", "relative"):
            raise StoreFormatError(f"unknown parameter encoding kind {self.kind!r}")
        if self.kind == "int" and self.width not in (1, 2):
            raise StoreFormatError(f"int parameter encoding width must be 1 or 2, got {self.width}")
        if self.kind in ("linear", "relative") and not 1 <= self.levels <= RECORD_FILL_U16 - 1:
            raise StoreFormatError(f"parameter encoding levels must be in [1, 65534], got {self.levels}")
        if self.kind == "linear" and not self.hi > self.lo:
            raise StoreFormatError(f"linear parameter encoding needs hi > lo, got [{self.lo}, {self.hi}]")
        if self.kind == "relative" and self.ref not in ("source_height", "source_width", "output"):
            raise StoreFormatError(f"relative parameter encoding ref must be source_height, source_width or "
                                   f"output, got {self.ref!r}")

    @property
    def columns(self) -> int:
        return self.width if self.kind == "int" else 1

    def to_json(self) -> dict[str, Any]:
        keys = {"float16": (), "int": ("offset", "width"), "linear": ("lo", "hi", "levels"),
                "relative": ("ref", "levels", "start")}[self.kind]
        out: dict[str, Any] = {"kind": self.kind}
        out.update({key: getattr(self, key) for key in keys if not (key == "start" and not self.start)})
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ParamEncoding:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def rel(ref: str, levels: int = 255, start: str = "") -> ParamEncoding:
    """Shorthand for a ``relative`` encoding."""
    return ParamEncoding(kind="relative", ref=ref, levels=levels, start=start)


FLAG = ParamEncoding(kind="int")

KNOWN_PARAM_ENCODINGS: dict[str, ParamEncoding] = {
    "random_resized_crop.top": rel("source_height"),
    "random_resized_crop.left": rel("source_width"),
    "random_resized_crop.height": rel("source_height", start="random_resized_crop.top"),
    "random_resized_crop.width": rel("source_width", start="random_resized_crop.left"),
    "random_crop.top": rel("source_height"),
    "random_crop.left": rel("source_width"),
    "random_crop.height": rel("source_height", start="random_crop.top"),
    "random_crop.width": rel("source_width", start="random_crop.left"),
    "horizontal_flip.flip": FLAG,
}
"""Encodings of the ops that do not declare ``param_encoding`` themselves, keyed ``op.param``."""


REAL_LEVELS = 255
"""Levels of a bounded real parameter that neither the op nor :data:`KNOWN_PARAM_ENCODINGS` encodes."""


def encoding_from_spec(spec: Any) -> ParamEncoding | None:
    """Default encoding from an op's ``param_specs`` entry (``low``, ``high``, ``integer``), if it has one.

    Integers become ``int`` (two columns when the range may exceed 16 bits), bounded reals ``linear`` with
    :data:`REAL_LEVELS` levels, unbounded reals ``float16``.
    """
    low, high, integer = getattr(spec, "low", None), getattr(spec, "high", None), getattr(spec, "integer", None)
    if low is None or integer is None:
        return None
    if integer:
        width = 1 if high is not None and high - low <= RECORD_FILL_U16 - 1 else 2
        return ParamEncoding(kind="int", offset=int(low), width=width)
    if high is None:
        return ParamEncoding()
    return ParamEncoding(kind="linear", lo=float(low), hi=float(high), levels=REAL_LEVELS)


def pipeline_param_encodings(pipeline: Any) -> list[dict[str, Any]]:
    """``[{"param": "op.name", **encoding}, ...]`` for every parameter of an ``AugmentPipeline``, in order."""
    out = []
    for op in pipeline.ops:
        declared = getattr(op, "param_encoding", None) or {}
        specs = getattr(op, "param_specs", None)
        for position, name in enumerate(op.param_names):
            full = f"{op.name}.{name}"
            encoding = (declared.get(name) or KNOWN_PARAM_ENCODINGS.get(full)
                        or (encoding_from_spec(specs[position]) if specs else None) or ParamEncoding())
            if isinstance(encoding, Mapping):
                encoding = ParamEncoding.from_json(encoding)
            out.append({"param": full, **encoding.to_json()})
    return out


class ParamCodec:
    """Encodes ``(n, P)`` float64 parameters to ``(n, columns)`` integers and back, per the header's encodings."""

    def __init__(self, encodings: Sequence[Mapping[str, Any]], output_size: int) -> None:
        self.names = [str(item["param"]) for item in encodings]
        self.encodings = [ParamEncoding.from_json(item) for item in encodings]
        self.output_size = int(output_size)
        self.columns = int(sum(e.columns for e in self.encodings))
        for name, encoding in zip(self.names, self.encodings):
            if encoding.start and encoding.start not in self.names[:self.names.index(name)]:
                raise StoreFormatError(f"parameter {name} is an extent of {encoding.start!r}, which must come "
                                       "before it in the pipeline")

    @classmethod
    def for_pipeline(cls, pipeline: Any) -> ParamCodec:
        return cls(pipeline_param_encodings(pipeline), pipeline.size)

    def _ref(self, encoding: ParamEncoding, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        if encoding.ref == "source_height":
            return heights.astype(np.int64)
        if encoding.ref == "source_width":
            return widths.astype(np.int64)
        return np.full(heights.shape, self.output_size, dtype=np.int64)

    def encode(self, params: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """``params`` ``(..., P)`` and per-row source ``heights``/``widths`` ``(...)`` -> ``(..., columns)`` int64."""
        params = np.asarray(params, dtype=np.float64)
        heights, widths = np.broadcast_to(heights, params.shape[:-1]), np.broadcast_to(widths, params.shape[:-1])
        out = np.empty(params.shape[:-1] + (self.columns,), dtype=np.int64)
        q_start: dict[str, np.ndarray] = {}
        column = 0
        for p, (name, encoding) in enumerate(zip(self.names, self.encodings)):
            value = params[..., p]
            if not np.isfinite(value).all():
                raise StoreFormatError(f"augmentation parameter {name} has non-finite values")
            if encoding.kind == "float16":
                with np.errstate(over="ignore"):
                    half = value.astype(np.float16)
                if not np.isfinite(half).all():
                    raise StoreFormatError(f"augmentation parameter {name} overflows float16: declare a "
                                           "param_encoding for it")
                out[..., column] = half.view(np.uint16)
            elif encoding.kind == "int":
                q = np.rint(value).astype(np.int64) - encoding.offset
                if (q < 0).any() or (q >= 1 << (16 * encoding.width)).any():
                    raise StoreFormatError(f"augmentation parameter {name} is outside its int encoding range")
                out[..., column] = q & 0xFFFF
                if encoding.width == 2:
                    out[..., column + 1] = q >> 16
            elif encoding.kind == "linear":
                scaled = (np.clip(value, encoding.lo, encoding.hi) - encoding.lo) / (encoding.hi - encoding.lo)
                out[..., column] = np.rint(scaled * encoding.levels).astype(np.int64)
            else:
                ref = self._ref(encoding, heights, widths)
                v = np.clip(np.rint(value).astype(np.int64), 0, ref)
                q = (2 * v * encoding.levels + ref) // (2 * np.maximum(ref, 1))  # ref 0: a skipped sample
                if encoding.start:  # choose the extent so the decoded box stays inside the image
                    limit = ref - _grid(q_start[encoding.start], ref, encoding.levels)
                    for _ in range(2):
                        q = np.where((_grid(q, ref, encoding.levels) > limit) & (q > 0), q - 1, q)
                out[..., column] = q
                q_start[name] = q
            column += encoding.columns
        return out

    def decode(self, columns: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`encode` (up to the declared precision): ``(..., columns)`` -> ``(..., P)`` float64."""
        columns = np.asarray(columns).astype(np.int64)
        heights, widths = np.broadcast_to(heights, columns.shape[:-1]), np.broadcast_to(widths, columns.shape[:-1])
        out = np.empty(columns.shape[:-1] + (len(self.encodings),), dtype=np.float64)
        column = 0
        for p, encoding in enumerate(self.encodings):
            q = columns[..., column]
            if encoding.kind == "float16":
                out[..., p] = q.astype(np.uint16).view(np.float16).astype(np.float64)
            elif encoding.kind == "int":
                if encoding.width == 2:
                    q = q | (columns[..., column + 1] << 16)
                out[..., p] = q + encoding.offset
            elif encoding.kind == "linear":
                out[..., p] = encoding.lo + q * ((encoding.hi - encoding.lo) / encoding.levels)
            else:
                v = _grid(q, self._ref(encoding, heights, widths), encoding.levels)
                out[..., p] = np.maximum(v, 1) if encoding.start else v
            column += encoding.columns
        return out

    def quantize(self, params: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """``decode(encode(params))``: the parameters a student will replay. The build applies these."""
        return self.decode(self.encode(params, heights, widths), heights, widths)


def _grid(q: np.ndarray, ref: np.ndarray, levels: int) -> np.ndarray:
    """Pixel value of quantized level ``q``: ``round_half_up(q * ref / levels)`` in integers."""
    return (2 * q * ref + levels) // (2 * levels)


# ----------------------------------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------------------------------

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
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    complete: bool = False
    format_name: str = FORMAT_NAME
    format_version: str = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.top_k > self.num_classes:
            raise StoreFormatError(f"top_k={self.top_k} must be between 1 and num_classes={self.num_classes}")
        if self.num_augmentations < 1:
            raise StoreFormatError(f"num_augmentations={self.num_augmentations} must be at least 1")
        if self.block_size < 1:
            raise StoreFormatError(f"block_size={self.block_size} must be at least 1")
        if not 500 < self.prob_scale < RECORD_FILL_U16:
            raise StoreFormatError(f"prob_scale={self.prob_scale} must be in (500, 65535) so probabilities keep "
                                   "an error below 1e-3")
        if not 0 <= self.class_vocabulary_size <= self.num_classes:
            raise StoreFormatError(f"class_vocabulary_size={self.class_vocabulary_size} must be between 0 and "
                                   f"num_classes={self.num_classes}")

    @property
    def num_blocks(self) -> int:
        return -(-self.num_samples // self.block_size)

    @property
    def index_dtype(self) -> np.dtype:
        return topk_index_dtype(self.num_classes)

    @property
    def dtype(self) -> np.dtype:
        """Element type of the ``records`` and ``class_vocabulary`` arrays."""
        return record_dtype(self.num_classes, self.class_vocabulary_size)

    @property
    def fill_value(self) -> int:
        """Fill value of ``records`` and ``class_vocabulary`` (``max(T)``): never a valid stored value."""
        return int(np.iinfo(self.dtype).max)

    @property
    def array_names(self) -> tuple[str, ...]:
        """The arrays of this store, in :data:`ALL_ARRAYS` order."""
        return tuple(name for name in ALL_ARRAYS if name != CLASS_VOCABULARY or self.class_vocabulary_size)

    @property
    def param_codec(self) -> ParamCodec:
        if self.param_encodings is None:
            raise StoreFormatError("the store header has no param_encodings: it was not written by a v1 writer")
        return ParamCodec(self.param_encodings, self.augmentation["size"])

    @property
    def record_columns(self) -> dict[str, slice]:
        """Column ranges of one ``records`` row."""
        k = self.top_k
        p = self.param_codec.columns
        return {"topk_indices": slice(0, k), "topk_probs": slice(k, 2 * k), "aug_params": slice(2 * k, 2 * k + p),
                "teacher_entropy": slice(2 * k + p, 2 * k + p + 1)}

    @property
    def record_width(self) -> int:
        return self.record_columns["teacher_entropy"].stop

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
        raw = dict(attrs[ATTRS_KEY])
        if raw.get("format_name") != FORMAT_NAME:
            raise StoreFormatError(
                f"unknown store format {raw.get('format_name')!r}; expected {FORMAT_NAME!r}"
            )
        check_format_version(str(raw.get("format_version", "")))
        known = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in raw]
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
        raise StoreFormatError(f"store has a malformed format_version {version!r}; expected 'MAJOR.MINOR'") from None
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
    n, a, b, w = header.num_samples, header.num_augmentations, header.block_size, header.record_width
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
        BLOCKS_DONE: dict(shape=(header.num_blocks,), chunks=(1,), dtype=BLOCK_DONE_DTYPE, fill_value=0,
                          compressors=[Crc32cCodec()]),
    }
    return {name: specs[name] for name in header.array_names}


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
    is_url = isinstance(store, str) and "://" in store and not store.startswith("file://")
    kwargs: dict[str, Any] = {"storage_options": storage_options} if is_url and storage_options else {}
    if isinstance(store, str) and store.startswith("file://"):
        store = store[len("file://"):]
    try:
        if mode == "r":
            try:
                return zarr.open_consolidated(store=store, mode="r", zarr_format=3, **kwargs)
            except ValueError:  # no consolidated metadata (a build in progress): read the nodes themselves
                pass
        return zarr.open_group(store=store, mode=mode, zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise StoreFormatError(
            f"no reinforce store at {store!s}: check the path or URL (it must be the directory written by "
            "`reinforce build --out`)"
        ) from None


def read_header(group: zarr.Group, *, require_complete: bool = True) -> StoreHeader:
    """Read and validate the header of an open store group."""
    header = StoreHeader.from_attrs(group.attrs.asdict())
    if require_complete and not header.complete:
        raise IncompleteStoreError(
            f"the store's build has not finished ({_blocks_done_summary(group, header)}): "
            "re-run the same `reinforce build` command to resume it"
        )
    return header


def read_array(group: zarr.Group, name: str, selection: Any = slice(None), what: str = "") -> np.ndarray:
    """``group[name][selection]``, turning a damaged chunk (checksum, truncation) into a StoreFormatError."""
    try:
        return np.asarray(group[name][selection])
    except KeyError:
        raise StoreFormatError(f"array '{name}' is missing from the store: the store is damaged; re-download "
                               "or rebuild it") from None
    except Exception as error:  # zarr reports damage as ValueError, RuntimeError or struct/codec errors
        raise StoreFormatError(
            f"cannot read {what or 'data'} of array '{name}' ({type(error).__name__}: {error}): the store is "
            "damaged or truncated; re-download it, or run `reinforce verify` to find every damaged block"
        ) from error


@dataclasses.dataclass
class DecodedRecords:
    """Records of some (sample, slot) pairs: ``indices``/``probs`` ``(..., K)``, ``params`` ``(..., P)``."""

    indices: np.ndarray
    probs: np.ndarray
    params: np.ndarray
    entropy: np.ndarray


def read_block_slot(group: zarr.Group, header: StoreHeader, block: int, slot: int) -> np.ndarray:
    """Raw ``records`` rows ``(block samples, W)`` of one slot of one block: one chunk, one zarr call.

    Raises :class:`StoreFormatError` if the chunk is damaged or missing (fill values).
    """
    start, stop = header.block_range(block)
    rows = read_array(group, RECORDS, (slice(start, stop), slot), what=f"block {block} slot {slot}")
    check_rows_present(header, rows, f"block {block} slot {slot}")
    return rows


def read_all_records(group: zarr.Group, header: StoreHeader | None = None) -> DecodedRecords:
    """Every record of a store decoded, ``(N, A, ...)``, read one shard per block (for tools and tests)."""
    header = header or read_header(group, require_complete=False)
    rows = np.concatenate([read_array(group, RECORDS, slice(*header.block_range(b)), what=f"block {b}")
                           for b in range(header.num_blocks)])
    check_rows_present(header, rows, "the store")
    sizes = read_array(group, IMAGE_SIZES).astype(np.int64)
    vocabulary = read_vocabulary(group, header)
    return decode_records(header, rows, sizes[:, :1], sizes[:, 1:],
                          vocabulary=None if vocabulary is None else vocabulary[:, None, :])


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
                   codec: ParamCodec | None = None, vocabulary: np.ndarray | None = None) -> DecodedRecords:
    """Decode raw ``records`` rows ``(..., W)`` given the source ``heights``/``widths`` of their samples and,
    for a store with a class vocabulary, their samples' ``class_vocabulary`` rows (broadcast like the
    heights, with a trailing ``V`` axis: ``(n, 1, V)`` for rows ``(n, A, W)``, ``(V,)`` for one row)."""
    columns = header.record_columns
    codec = codec or header.param_codec
    return DecodedRecords(
        indices=decode_indices(header, rows[..., columns["topk_indices"]], vocabulary),
        probs=quantized_probs(header, rows).astype(np.float32) / np.float32(header.prob_scale),
        params=codec.decode(rows[..., columns["aug_params"]], heights, widths),
        entropy=rows[..., columns["teacher_entropy"].start].astype(np.float32) / np.float32(header.entropy_levels)
        * np.float32(math.log(header.num_classes)),
    )


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
    table = np.broadcast_to(np.asarray(vocabulary).astype(np.int64), stored.shape[:-1] + (size,))
    return stored < size, np.take_along_axis(table, np.minimum(stored, size - 1), axis=-1)


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
    drops = np.cumsum(stored[..., 1:], axis=-1)
    return np.concatenate([stored[..., :1], stored[..., :1] - drops], axis=-1)


def encode_records(header: StoreHeader, indices: np.ndarray, probs: np.ndarray, params: np.ndarray,
                   entropy: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                   codec: ParamCodec | None = None, vocabulary: np.ndarray | None = None) -> np.ndarray:
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


def _blocks_done_summary(group: zarr.Group, header: StoreHeader) -> str:
    try:
        done = int(np.count_nonzero(group[BLOCKS_DONE][:]))
    except KeyError:
        done = 0
    return f"{done} of {header.num_blocks} blocks written"
