"""Compressors that bound what they decode: a chunk declaring a decoded size larger than its chunk (a
decompression bomb) is refused before anything is allocated (format_spec.md section 8)."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.array import AsyncArray

from ..errors import StoreFormatError


def bounded_array(array: zarr.Array) -> zarr.Array:
    """``array`` read through compressors that refuse a chunk declaring a decoded size larger than its chunk
    (a decompression bomb: a 98 KB zstd frame may expand to 3 GiB, which zarr would allocate before noticing).

    zstd and blosc are bounded by the size their frame header declares; a frame without one, and any other
    compressor, is refused (StoreFormatError), as this reader cannot bound its output."""
    metadata = array.metadata
    bounded = dataclasses.replace(metadata, codecs=_bounded_codecs(metadata.codecs, array.path))
    return zarr.Array(AsyncArray(bounded, array.async_array.store_path, array.async_array.config))


_BOUNDED_MEMBERS: dict[int, dict[str, zarr.Array]] = {}


def bounded_member(group: zarr.Group, name: str) -> zarr.Array:
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
