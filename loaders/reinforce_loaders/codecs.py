"""Typed codecs of augmentation parameters: how one parameter becomes unsigned 16-bit ``records`` columns.

Each codec is a frozen class registered under its ``kind``; a store header lists one codec per parameter as
``{"param": "op.name", "kind": KIND, ...}`` (``format_spec.md`` section 4.2). Ops declare the codec of each of
their parameters (:attr:`~reinforce_loaders.augment.base.AugmentOp.param_codecs`); :class:`ParamLayout` holds
the codecs of a whole pipeline, parsed once from the header, and encodes or decodes every record at once.

The build replays the *decoded* parameters, so teacher and student see the same pixels whatever the precision.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from .errors import StoreFormatError

COLUMN_MAX = 0xFFFF
"""Largest value of one parameter column (columns are 16 bits wide whatever the record dtype)."""
REFERENCES = ("source_height", "source_width", "output")
"""What a ``relative`` codec's values are relative to."""


@dataclasses.dataclass(frozen=True)
class ParamRefs:
    """Per-record reference sizes a codec may need: the source image's height and width and the output side."""

    heights: np.ndarray
    widths: np.ndarray
    output_size: int

    def get(self, ref: str) -> np.ndarray:
        if ref == "source_height":
            return self.heights
        if ref == "source_width":
            return self.widths
        return np.full(self.heights.shape, self.output_size, dtype=np.int64)


GroupDecoder = Callable[[np.ndarray, "ParamRefs"], np.ndarray]


class Codec(ABC):
    """One parameter's encoding. Subclasses are frozen dataclasses registered with :func:`register_codec`."""

    kind: ClassVar[str]
    columns: int = 1
    """Record columns the parameter takes."""

    @abstractmethod
    def validate(self) -> None:
        """Raise :class:`StoreFormatError` if the codec's settings are out of range."""

    @abstractmethod
    def encode(self, values: np.ndarray, refs: ParamRefs, start: np.ndarray | None) -> np.ndarray:
        """``values`` ``(...)`` -> int64 ``(..., columns)``; ``start`` is the encoded start of an extent."""

    @abstractmethod
    def decode(self, columns: np.ndarray, refs: ParamRefs) -> np.ndarray:
        """int64 ``(..., columns)`` -> float64 ``(...)``: the inverse of :meth:`encode` up to its precision."""

    @classmethod
    def group_decoder(cls, codecs: Sequence[Codec]) -> GroupDecoder:
        """A function decoding several parameters of this class at once: ``columns`` ``(..., n, columns)`` ->
        ``(..., n)``.

        The default decodes one by one; codecs override it with one vectorised expression over constants
        computed here, once, which is what makes decoding a single record cheap (a reader decodes one per
        sample)."""
        def decode(columns: np.ndarray, refs: ParamRefs) -> np.ndarray:
            return np.stack([codec.decode(columns[..., i, :], refs) for i, codec in enumerate(codecs)], axis=-1)

        return decode

    @property
    def start(self) -> str:
        """Name of the parameter this one is an extent of (its box start), or ``""``."""
        return ""

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        """The codec as the header stores it: ``{"kind": ..., settings...}`` (empty ``start`` omitted)."""
        out: dict[str, Any] = {"kind": self.kind}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if not (field.name == "start" and not value):
                out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Codec:
        """Parse the settings of this kind, checking each member's type; unknown members are ignored."""
        values = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name not in data:
                continue
            value = data[field.name]
            wanted = {"int": int, "float": (int, float), "str": str}[str(field.type)]
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise StoreFormatError(f"parameter codec {cls.kind!r}: member {field.name!r} must be "
                                       f"{str(field.type)}, got {value!r:.60}")
            values[field.name] = float(value) if field.type == "float" else value
        return cls(**values)


CodecType = TypeVar("CodecType", bound=type[Codec])
CODECS: dict[str, type[Codec]] = {}
"""Codec classes by ``kind``."""


def register_codec(cls: CodecType) -> CodecType:
    """Class decorator: register a codec class under its ``kind``."""
    CODECS[cls.kind] = cls
    return cls


def codec_from_dict(data: Mapping[str, Any]) -> Codec:
    """The codec a header entry describes (``kind`` defaults to ``float16``, as format 1.0 allows)."""
    kind = data.get("kind", "float16")
    if kind not in CODECS:
        raise StoreFormatError(f"unknown parameter encoding kind {kind!r} (known: {', '.join(CODECS)}): the store "
                               "was written by a newer version; upgrade reinforce-loaders")
    return CODECS[kind].from_dict(data)


@register_codec
@dataclasses.dataclass(frozen=True)
class Float16Codec(Codec):
    """The IEEE binary16 bit pattern of the value (for unbounded reals)."""

    kind: ClassVar[str] = "float16"

    def validate(self) -> None:
        pass

    def encode(self, values: np.ndarray, refs: ParamRefs, start: np.ndarray | None) -> np.ndarray:
        with np.errstate(over="ignore"):
            half = values.astype(np.float16)
        if not np.isfinite(half).all():
            raise StoreFormatError("value overflows float16: declare another codec for it")
        return half.view(np.uint16).astype(np.int64)[..., None]

    def decode(self, columns: np.ndarray, refs: ParamRefs) -> np.ndarray:
        return columns[..., 0].astype(np.uint16).view(np.float16).astype(np.float64)


@register_codec
@dataclasses.dataclass(frozen=True)
class IntCodec(Codec):
    """An integer ``v`` in ``[offset, offset + 2**(16 * width))`` stored as ``v - offset`` in ``width`` (1 or 2)
    columns, low 16 bits first."""

    kind: ClassVar[str] = "int"
    offset: int = 0
    width: int = 1

    def validate(self) -> None:
        if self.width not in (1, 2):
            raise StoreFormatError(f"int parameter encoding width must be 1 or 2, got {self.width}")

    @property
    def columns(self) -> int:  # type: ignore[override]
        return self.width

    @classmethod
    def spanning(cls, low: int, high: int | None) -> IntCodec:
        """The narrowest codec for integers in ``[low, high]`` (``high`` None: up to ``low + 2**32 - 1``)."""
        return cls(offset=int(low), width=1 if high is not None and high - low <= COLUMN_MAX - 1 else 2)

    def encode(self, values: np.ndarray, refs: ParamRefs, start: np.ndarray | None) -> np.ndarray:
        q = np.rint(values).astype(np.int64) - self.offset
        if (q < 0).any() or (q >= 1 << (16 * self.width)).any():
            raise StoreFormatError("value is outside its int encoding range")
        return np.stack([q & 0xFFFF, q >> 16], axis=-1) if self.width == 2 else q[..., None]

    def decode(self, columns: np.ndarray, refs: ParamRefs) -> np.ndarray:
        q = columns[..., 0] | (columns[..., 1] << 16) if self.width == 2 else columns[..., 0]
        return (q + self.offset).astype(np.float64)

    @classmethod
    def group_decoder(cls, codecs: Sequence[Codec]) -> GroupDecoder:
        offsets = np.array([codec.offset for codec in codecs], dtype=np.float64)  # type: ignore[attr-defined]
        if codecs[0].columns == 2:
            return lambda columns, refs: (columns[..., 0] | (columns[..., 1] << 16)) + offsets
        return lambda columns, refs: columns[..., 0] + offsets


@register_codec
@dataclasses.dataclass(frozen=True)
class LinearCodec(Codec):
    """A real in ``[lo, hi]`` stored as ``round((v - lo) / (hi - lo) * levels)`` (values clipped to the range)."""

    kind: ClassVar[str] = "linear"
    lo: float = 0.0
    hi: float = 1.0
    levels: int = 255

    def validate(self) -> None:
        if not 1 <= self.levels <= COLUMN_MAX - 1:
            raise StoreFormatError(f"parameter encoding levels must be in [1, 65534], got {self.levels}")
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.hi > self.lo):
            raise StoreFormatError(f"linear parameter encoding needs finite hi > lo, got [{self.lo}, {self.hi}]")

    def encode(self, values: np.ndarray, refs: ParamRefs, start: np.ndarray | None) -> np.ndarray:
        scaled = (np.clip(values, self.lo, self.hi) - self.lo) / (self.hi - self.lo)
        return np.rint(scaled * self.levels).astype(np.int64)[..., None]

    def decode(self, columns: np.ndarray, refs: ParamRefs) -> np.ndarray:
        return self.lo + columns[..., 0] * ((self.hi - self.lo) / self.levels)

    @classmethod
    def group_decoder(cls, codecs: Sequence[Codec]) -> GroupDecoder:
        lo = np.array([codec.lo for codec in codecs])  # type: ignore[attr-defined]
        step = np.array([(codec.hi - codec.lo) / codec.levels for codec in codecs])  # type: ignore[attr-defined]
        return lambda columns, refs: lo + columns[..., 0] * step


@register_codec
@dataclasses.dataclass(frozen=True)
class RelativeCodec(Codec):
    """An integer pixel coordinate or extent in ``[0, ref]`` stored as ``round(v * levels / ref)``, ``ref`` being
    the source image's height or width or the output side. An extent names its ``start`` parameter: it decodes
    to at least 1, and the encoder keeps ``start + extent <= ref`` after decoding."""

    kind: ClassVar[str] = "relative"
    ref: str = "source_height"
    levels: int = 255
    start_param: str = dataclasses.field(default="", metadata={"json": "start"})

    def validate(self) -> None:
        if not 1 <= self.levels <= COLUMN_MAX - 1:
            raise StoreFormatError(f"parameter encoding levels must be in [1, 65534], got {self.levels}")
        if self.ref not in REFERENCES:
            raise StoreFormatError(f"relative parameter encoding ref must be {', '.join(REFERENCES)}, "
                                   f"got {self.ref!r}")

    @property
    def start(self) -> str:
        return self.start_param

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "ref": self.ref, "levels": self.levels}
        if self.start_param:
            out["start"] = self.start_param
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RelativeCodec:
        renamed = {("start_param" if key == "start" else key): value for key, value in data.items()}
        for key, wanted in (("ref", str), ("levels", int), ("start_param", str)):
            if key in renamed and (isinstance(renamed[key], bool) or not isinstance(renamed[key], wanted)):
                raise StoreFormatError(f"parameter codec 'relative': member {key.replace('_param', '')!r} must "
                                       f"be {wanted.__name__}, got {renamed[key]!r:.60}")
        return cls(**{key: renamed[key] for key in ("ref", "levels", "start_param") if key in renamed})

    def encode(self, values: np.ndarray, refs: ParamRefs, start: np.ndarray | None) -> np.ndarray:
        ref = refs.get(self.ref)
        v = np.clip(np.rint(values).astype(np.int64), 0, ref)
        q = (2 * v * self.levels + ref) // (2 * np.maximum(ref, 1))  # ref 0: a skipped sample
        if start is not None:  # choose the extent so the decoded box stays inside the image
            limit = ref - pixel_of_level(start, ref, self.levels)
            for _ in range(2):
                q = np.where((pixel_of_level(q, ref, self.levels) > limit) & (q > 0), q - 1, q)
        return q[..., None]

    def decode(self, columns: np.ndarray, refs: ParamRefs) -> np.ndarray:
        v = pixel_of_level(columns[..., 0], refs.get(self.ref), self.levels)
        return (np.maximum(v, 1) if self.start_param else v).astype(np.float64)

    @classmethod
    def group_decoder(cls, codecs: Sequence[Codec]) -> GroupDecoder:
        which = np.array([REFERENCES.index(codec.ref) for codec in codecs])  # type: ignore[attr-defined]
        levels = np.array([codec.levels for codec in codecs], dtype=np.int64)  # type: ignore[attr-defined]
        minimum = np.array([1 if codec.start else 0 for codec in codecs], dtype=np.int64)

        def decode(columns: np.ndarray, refs: ParamRefs) -> np.ndarray:
            if refs.heights.ndim == 0:
                ref = np.array([refs.heights, refs.widths, refs.output_size], dtype=np.int64)[which]
            else:
                ref = np.stack([refs.heights, refs.widths, np.full_like(refs.heights, refs.output_size)],
                               axis=-1)[..., which]
            return np.maximum(pixel_of_level(columns[..., 0], ref, levels), minimum).astype(np.float64)

        return decode


def pixel_of_level(q: np.ndarray, ref: np.ndarray, levels: int) -> np.ndarray:
    """Pixel value of quantized level ``q``: ``round_half_up(q * ref / levels)`` in integers."""
    return (2 * q * ref + levels) // (2 * levels)


# Shorthands ops use to declare their parameters.
FLAG = IntCodec()
FRACTION_255 = LinearCodec(0.0, 1.0, 255)


def relative(ref: str, start: str = "", levels: int = 255) -> RelativeCodec:
    return RelativeCodec(ref=ref, levels=levels, start_param=start)


class ParamLayout:
    """The codecs of every parameter of a pipeline, in record order: parsed once, encodes and decodes records.

    ``encode`` maps float64 parameters ``(..., P)`` with per-row source ``heights``/``widths`` (broadcast against
    ``(...)``) to int64 columns ``(..., columns)``; ``decode`` is its inverse up to each codec's precision.
    """

    def __init__(self, names: Sequence[str], codecs: Sequence[Codec], output_size: int) -> None:
        self.names = [str(name) for name in names]
        self.codecs = list(codecs)
        self.output_size = int(output_size)
        if len(self.names) != len(self.codecs):
            raise StoreFormatError("parameter names and codecs differ in number")
        offsets = np.cumsum([0] + [codec.columns for codec in self.codecs])
        self.column_slices = [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]
        self.columns = int(offsets[-1])
        position = {name: p for p, name in enumerate(self.names)}
        self._starts: list[int | None] = []
        for p, (name, codec) in enumerate(zip(self.names, self.codecs)):
            if codec.start and position.get(codec.start, p) >= p:
                raise StoreFormatError(f"parameter {name} is an extent of {codec.start!r}, which must come "
                                       "before it in the pipeline")
            self._starts.append(position[codec.start] if codec.start else None)
        groups: dict[tuple[type[Codec], int], list[int]] = {}
        for p, codec in enumerate(self.codecs):
            groups.setdefault((type(codec), codec.columns), []).append(p)
        self._decoders = [(np.array(params), np.array([np.arange(self.column_slices[p].start,
                                                                   self.column_slices[p].stop) for p in params]),
                           kind.group_decoder([self.codecs[p] for p in params]))
                          for (kind, _), params in groups.items()]

    def __reduce__(self) -> tuple[Any, ...]:  # the decoders are closures: rebuild them instead of pickling
        return type(self), (self.names, self.codecs, self.output_size)

    @classmethod
    def for_pipeline(cls, pipeline: Any) -> ParamLayout:
        """The layout of an ``AugmentPipeline`` (its ``param_layout``)."""
        return pipeline.param_layout

    @classmethod
    def from_json(cls, encodings: Sequence[Mapping[str, Any]], output_size: int) -> ParamLayout:
        """Parse the header's ``param_encodings`` list."""
        if not isinstance(encodings, Sequence) or isinstance(encodings, (str, bytes)):
            raise StoreFormatError("the header's param_encodings must be a list")
        names, codecs = [], []
        for position, item in enumerate(encodings):
            if not isinstance(item, Mapping) or not isinstance(item.get("param"), str):
                raise StoreFormatError(f"param_encodings[{position}] must be an object with a string 'param'")
            names.append(item["param"])
            codecs.append(codec_from_dict(item))
        return cls(names, codecs, output_size)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"param": name, **codec.to_dict()} for name, codec in zip(self.names, self.codecs)]

    def _refs(self, shape: tuple[int, ...], heights: Any, widths: Any) -> ParamRefs:
        heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
        if heights.shape != shape or widths.shape != shape:
            heights, widths = np.broadcast_to(heights, shape), np.broadcast_to(widths, shape)
        return ParamRefs(heights, widths, self.output_size)

    def encode(self, params: np.ndarray, heights: Any, widths: Any) -> np.ndarray:
        params = np.asarray(params, dtype=np.float64)
        refs = self._refs(params.shape[:-1], heights, widths)
        out = np.empty(params.shape[:-1] + (self.columns,), dtype=np.int64)
        for p, (name, codec) in enumerate(zip(self.names, self.codecs)):
            values = params[..., p]
            if not np.isfinite(values).all():
                raise StoreFormatError(f"augmentation parameter {name} has non-finite values")
            start = self._starts[p]
            try:
                out[..., self.column_slices[p]] = codec.encode(
                    values, refs, None if start is None else out[..., self.column_slices[start].start])
            except StoreFormatError as error:
                raise StoreFormatError(f"augmentation parameter {name}: {error}") from None
        return out

    def decode(self, columns: np.ndarray, heights: Any, widths: Any) -> np.ndarray:
        columns = np.asarray(columns).astype(np.int64)
        refs = self._refs(columns.shape[:-1], heights, widths)
        out = np.empty(columns.shape[:-1] + (len(self.codecs),), dtype=np.float64)
        for params, column_index, decode in self._decoders:
            out[..., params] = decode(columns[..., column_index], refs)
        return out

    def quantize(self, params: np.ndarray, heights: Any, widths: Any) -> np.ndarray:
        """``decode(encode(params))``: the parameters a student will replay."""
        return self.decode(self.encode(params, heights, widths), heights, widths)

