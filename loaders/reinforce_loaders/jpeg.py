"""JPEG decoding through libjpeg-turbo without Pillow (the optional ``simplejpeg`` package).

``simplejpeg`` ships libjpeg-turbo in its wheels. It decodes straight from the file's bytes (no Pillow open, about
0.1 ms less per ImageNet-size image), which both modes use: ``decode="exact"`` with libjpeg's defaults, once the
pixels are seen to equal Pillow's (:mod:`reinforce_loaders.source`), and ``decode="fast"`` with two things Pillow
does not expose together: scaled decoding and libjpeg's plain (not "fancy") chroma upsampling.
Measured on JPEGs of quality 90 (``benchmarks/loader.py``), entropy decoding dominates a decode, so the
1/2-scale IDCT saves about a quarter of it, not three quarters; only the power-of-two scales are worth using,
since libjpeg-turbo decodes the other M/8 scales with slower, non-SIMD code. Plain upsampling saves about 7 %
of a full-scale decode for 0.4 levels of mean difference; the fast IDCT would save 3 % more for another 0.5, so
it is not used.

Install with ``pip install 'reinforce-loaders[fast]'``; without it ``decode="exact"`` uses torchvision's binding
and ``decode="fast"`` Pillow's draft mode (see :func:`reinforce_loaders.source.decode_crop`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

try:
    import simplejpeg
except ImportError:  # the optional [fast] extra
    simplejpeg = None

PLAIN_COLORSPACES = ("YCbCr", "Gray")
"""Colour spaces every decoder turns into the same RGB (CMYK, YCCK and Adobe RGB JPEGs go through Pillow)."""

_SOI, _SOS, _EOI = 0xD8, 0xDA, 0xD9
_APP1 = 0xE1  # Exif or XMP: may carry an orientation that Pillow's path honours
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_FRAMES = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})  # SOFn
_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded


def available() -> bool:
    """Whether ``simplejpeg`` is installed."""
    return simplejpeg is not None


@dataclasses.dataclass(frozen=True)
class JpegHeader:
    """What a decode needs to know before decoding: pixel size, colour space, the frame type (its SOF marker)
    and whether the file has an APP1 (Exif/XMP) segment, which may rotate the image."""

    height: int
    width: int
    colorspace: str
    frame: int
    has_app1: bool

    @property
    def reducible(self) -> bool:
        """In YCbCr or gray with no orientation to apply: ``decode="fast"`` may decode it here."""
        return self.colorspace in PLAIN_COLORSPACES and not self.has_app1

    @property
    def plain(self) -> bool:
        """A baseline (or extended sequential, Huffman) JPEG in YCbCr or gray with no orientation to apply:
        every libjpeg-turbo decodes it to the same RGB pixels as Pillow, and none needs Pillow's handling."""
        return self.reducible and self.frame in _SEQUENTIAL


def read_header(data: bytes) -> JpegHeader | None:
    """The header of JPEG ``data``; None if ``data`` is not a JPEG (or ``simplejpeg`` is missing).

    Raises ``ValueError`` for a JPEG whose header is damaged.
    """
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    frame, has_app1 = _scan_markers(data)
    return JpegHeader(int(height), int(width), str(colorspace), frame, has_app1)


def _scan_markers(data: bytes) -> tuple[int, bool]:
    """(the frame's SOF marker, 0 if none was found; whether there is an APP1 segment), walking the segments
    before the first scan by their lengths."""
    position, has_app1, frame = 2, False, 0
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return 0, True  # not a marker where one must be: let Pillow judge the file
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (_SOS, _EOI):
            break
        if marker in _STANDALONE or marker == _SOI:
            position += 2
            continue
        has_app1 |= marker == _APP1
        if marker in _FRAMES:
            frame = marker
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return frame, has_app1


def decode_exact(data: bytes) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` of ``data`` with libjpeg's defaults (accurate IDCT, fancy upsampling): Pillow's
    pixels when both use the same libjpeg-turbo arithmetic, which :mod:`reinforce_loaders.source` checks
    before it trusts this. Raises ``ValueError`` for a damaged file."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def decode_scaled(data: bytes, header: JpegHeader, scale: int) -> np.ndarray:
    """RGB uint8 ``[H', W', 3]`` of ``data`` decoded at ``1/scale`` (1, 2, 4 or 8; libjpeg rounds the sides up)
    with plain chroma upsampling. Raises ``ValueError`` for a damaged file."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastupsample=True,
                                  min_height=math.ceil(header.height / scale),
                                  min_width=math.ceil(header.width / scale))
