"""Source images: list an ImageFolder directory or wrap a map-style dataset, decode to RGB uint8 tensors.

Both the builder and the student decode through :func:`decode_image`, so the teacher and the student start
from the same pixels, and both fingerprint those pixels with :func:`fingerprint`.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS
try:  # deprecated since torchvision 0.29 in favour of TorchCodec; Pillow decodes everything without them
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_jpeg = None
from torchvision.transforms.v2 import functional as F

from . import jpeg as fast_jpeg
from .augment.geometric import resized_crop
from .errors import SourceError, SourceMismatchError


def _may_be_rotated(image: Image.Image) -> bool:
    """False for a JPEG without EXIF or XMP data, whose orientation needs no parsing (parsing costs ~0.2 ms)."""
    return image.format != "JPEG" or any(key in image.info for key in ("exif", "xmp", "XML:com.adobe.xmp"))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, honouring EXIF orientation and scaling 16/32-bit gray to 8 bits."""
    if _may_be_rotated(image):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


Decoder = Literal["auto", "pillow"]

_EXIF_ORIENTATION = 0x0112
_PLAIN_JPEG_MODES = ("RGB", "L")


class _LibjpegAgreement:
    """Whether the libjpeg-turbo bindings give Pillow's pixels in this process (None: not probed yet):
    ``agrees`` for torchvision's decoder, ``turbo`` for simplejpeg's.

    All wrap libjpeg-turbo, but they may bundle different versions; the first plain JPEG a binding decodes is
    also decoded by Pillow and the binding is used only if the pixels are identical. A later fingerprint
    mismatch switches both off (:func:`distrust_libjpeg_bindings`).
    """

    agrees: bool | None = None
    turbo: bool | None = None


def distrust_libjpeg_bindings() -> None:
    """Decode every later JPEG of this process with Pillow (called when a binding's decode did not match)."""
    _LibjpegAgreement.agrees = False
    _LibjpegAgreement.turbo = False


def is_plain_jpeg(image: Image.Image) -> bool:
    """A baseline RGB or grayscale JPEG without EXIF rotation: decoders agree on these, no conversion needed."""
    return (image.format == "JPEG" and image.mode in _PLAIN_JPEG_MODES and not image.info.get("progressive")
            and (not _may_be_rotated(image) or image.getexif().get(_EXIF_ORIENTATION, 1) == 1))


def _torchvision_jpeg(path: str | os.PathLike[str], image: Image.Image) -> torch.Tensor | None:
    """torchvision's decode of a plain JPEG when it is known (or now probed) to equal Pillow's, else None."""
    if decode_jpeg is None or _LibjpegAgreement.agrees is False or not is_plain_jpeg(image):
        return None
    with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(read_file(os.fspath(path)), mode=ImageReadMode.RGB)
    if _LibjpegAgreement.agrees is None:
        _LibjpegAgreement.agrees = torch.equal(decoded, F.pil_to_tensor(to_rgb(image)))
        if not _LibjpegAgreement.agrees:
            return None
    return decoded


def decode_image(path: str | os.PathLike[str], decoder: Decoder = "auto") -> torch.Tensor:
    """Decode an image file to an RGB uint8 ``[3, H, W]`` tensor: Pillow's pixels.

    ``decoder="auto"`` decodes plain JPEGs with a libjpeg-turbo binding, once it has been seen to give Pillow's
    exact pixels in this process: simplejpeg's when installed (straight from the file's bytes), else
    torchvision's (about 1.5x faster than Pillow here, no copy); ``"pillow"`` always uses Pillow.
    """
    try:
        data = None  # a JPEG's bytes once read: a file the fast path declines is not read from disk again
        if decoder == "auto" and fast_jpeg.available() and _LibjpegAgreement.turbo is not False:
            data = _jpeg_bytes(path)
            decoded = None if data is None else _turbo_jpeg(path, data)
            if decoded is not None:
                return decoded
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            check_pixel_count(image, path)
            decoded = _torchvision_jpeg(path, image) if decoder == "auto" else None
            return decoded if decoded is not None else F.pil_to_tensor(to_rgb(image))
    except Image.DecompressionBombError as error:
        raise _bomb_error(path, error) from error
    except (UnidentifiedImageError, OSError, ValueError, RuntimeError) as error:
        raise SourceError(
            f"cannot read image {path}: {error}. Remove or replace the file and run again"
        ) from error


def _turbo_jpeg(path: str | os.PathLike[str], data: bytes) -> torch.Tensor | None:
    """simplejpeg's decode of the plain JPEG ``data`` (the bytes of ``path``) when it is known (or now probed) to
    equal Pillow's, else None (also for a damaged file: Pillow's path then names the problem)."""
    try:
        header = fast_jpeg.read_header(data)
        if header is None or not header.plain:
            return None
        check_pixel_size(header.width, header.height, path)
        decoded = torch.from_numpy(fast_jpeg.decode_exact(data)).permute(2, 0, 1)
    except ValueError:
        return None
    if _LibjpegAgreement.turbo is None:
        with Image.open(io.BytesIO(data)) as image:
            _LibjpegAgreement.turbo = torch.equal(decoded, F.pil_to_tensor(to_rgb(image)))
    return decoded if _LibjpegAgreement.turbo else None


def _jpeg_bytes(path: str | os.PathLike[str]) -> bytes | None:
    """The file's bytes if it starts like a JPEG, else None after reading two bytes (a PNG is not read twice)."""
    with open(path, "rb") as handle:
        start = handle.read(2)
        return start + handle.read() if start == b"\xff\xd8" else None


_PIXEL_ADVICE = ("Remove or replace the file, or raise the limit if the image is genuine (reinforce build "
                 "--max-image-pixels, ReinforcedDataset(max_image_pixels=...)).")


def _bomb_error(path: str | os.PathLike[str], error: Exception) -> SourceError:
    """Pillow's refusal of an image over twice its limit, said with the limit the user set."""
    return SourceError(f"cannot read image {path}: over the limit of {Image.MAX_IMAGE_PIXELS or 0:,} pixels (a "
                       f"decompression bomb? Pillow: {error}). {_PIXEL_ADVICE}")


def check_pixel_count(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """Raise :class:`SourceError` for an image of more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow only
    warns below twice the limit): a decompression bomb is refused before it is decoded."""
    check_pixel_size(image.width, image.height, path)


def check_pixel_size(width: int, height: int, path: str | os.PathLike[str]) -> None:
    """:func:`check_pixel_count` from a header's size."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise SourceError(f"cannot read image {path}: {width} x {height} = {width * height:,} "
                          f"pixels, over the limit of {limit:,} pixels (a decompression bomb?). {_PIXEL_ADVICE}")


def set_max_image_pixels(limit: int | None) -> None:
    """Largest source image, in pixels, decoded by this process (``PIL.Image.MAX_IMAGE_PIXELS``; 0: no limit,
    None: leave it as it is, by default Pillow's 89,478,485)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"max_image_pixels must be an integer >= 0 (0: no limit), got {limit!r}")
    Image.MAX_IMAGE_PIXELS = limit or None


def reduced_scale(box: Sequence[float], size: int) -> int:
    """Largest JPEG DCT scale (8, 4, 2; 1 = none) at which source box ``(top, left, height, width)`` still
    has at least ``size`` pixels on both sides, i.e. the crop is downscaled by that factor or more."""
    height, width = box[2], box[3]
    return next((scale for scale in (8, 4, 2) if min(height, width) >= scale * size), 1)


def decode_crop(path: str | os.PathLike[str], box: Sequence[float], size: int,
                expected_size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """Fast, approximate crop: the source box ``(top, left, height, width)`` resampled to ``size`` x ``size``
    from a JPEG decoded at the smallest scale (1, 1/2, 1/4, 1/8) that keeps at least ``size`` pixels across the
    box.

    With ``simplejpeg`` installed (the ``[fast]`` extra) every plain JPEG is decoded this way, with libjpeg's
    plain chroma upsampling, and the box is resampled like the exact replay: rounded to whole pixels of the
    reduced image (so at most half an output pixel off), torchvision's antialiased bilinear. Without it, only
    crops downscaled 2x or more are decoded reduced, by Pillow's draft mode, and resampled with Pillow's filter
    from the exact sub-pixel box. Returns None where the full decode must be used: a file that is not a plain
    JPEG, or (Pillow) a crop not downscaled 2x.
    ``expected_size`` ``(height, width)``: raise :class:`SourceMismatchError` if the file's size differs.
    """
    if fast_jpeg.available():
        return _turbo_crop(path, box, size, expected_size)
    return _draft_crop(path, box, size, expected_size)


def encoded_jpeg(path: str | os.PathLike[str], expected_size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """The bytes of ``path`` as a uint8 tensor, undecoded, if it is a plain JPEG (:func:`is_plain_jpeg`: every
    JPEG decoder, nvjpeg included, reads it as the same RGB image up to its arithmetic), else None. Its size
    is read from the header: an image of more pixels than the limit, or (``expected_size`` ``(height,
    width)``) of another size than the store's, is refused before anything decodes it."""
    try:
        data = _jpeg_bytes(path)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            _check_decoded_size(path, image.height, image.width, expected_size)
            if not is_plain_jpeg(image):
                return None
    except Image.DecompressionBombError as error:
        raise _bomb_error(path, error) from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SourceError(f"cannot read image {path}: {error}. Remove or replace the file and run again") from error
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def fast_decode_applies(box: Sequence[float], size: int) -> bool:
    """Whether :func:`decode_crop` decodes a JPEG crop of source box ``box`` differently from the full decode."""
    return fast_jpeg.available() or reduced_scale(box, size) > 1


def _turbo_crop(path: str | os.PathLike[str], box: Sequence[float], size: int,
                expected_size: tuple[int, int] | None) -> torch.Tensor | None:
    try:
        data = _jpeg_bytes(path)
        header = None if data is None else fast_jpeg.read_header(data)
        if header is None or not header.reducible:
            return None
        _check_decoded_size(path, header.height, header.width, expected_size)
        scale = reduced_scale(box, size)
        pixels = torch.from_numpy(fast_jpeg.decode_scaled(data, header, scale)).permute(2, 0, 1)
    except OSError as error:
        raise SourceError(f"cannot read image {path}: {error}. Remove or replace the file and run again") from error
    except ValueError:
        return None  # a damaged file: the full decode names what is wrong with it
    return resized_crop(pixels, [float(value) / scale for value in box], size)


def _draft_crop(path: str | os.PathLike[str], box: Sequence[float], size: int,
                expected_size: tuple[int, int] | None) -> torch.Tensor | None:
    scale = reduced_scale(box, size)
    try:
        with Image.open(path) as image:
            _check_decoded_size(path, image.height, image.width, expected_size)
            if scale == 1 or not is_plain_jpeg(image):
                return None
            width, height = image.size
            drafted = image.draft(image.mode, (width // scale, height // scale))
            if drafted is None:
                return None
            step = round(width / drafted[1][2])  # the scale the decoder will use (2, 4 or 8)
            top, left, h, w = (float(v) / step for v in box)
            crop = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h),
                                reducing_gap=None)
            return F.pil_to_tensor(crop if crop.mode == "RGB" else crop.convert("RGB"))
    except Image.DecompressionBombError as error:
        raise _bomb_error(path, error) from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SourceError(
            f"cannot read image {path}: {error}. Remove or replace the file and run again"
        ) from error


def _check_decoded_size(path: str | os.PathLike[str], height: int, width: int,
                        expected_size: tuple[int, int] | None) -> None:
    """Refuse a bomb, and an image of another size than the store's records were encoded against."""
    check_pixel_size(width, height, path)
    if expected_size is not None and (height, width) != tuple(expected_size):
        raise SourceMismatchError(
            f"source image {path} is {height} x {width} pixels but the store was built from "
            f"one of {expected_size[0]} x {expected_size[1]}: pass the same dataset that was reinforced")


def as_uint8_image(image: Any) -> torch.Tensor:
    """Normalize what a dataset returns (PIL image, uint8 or float tensor, HWC numpy) to RGB uint8 CHW."""
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(to_rgb(image))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        if image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4):
            image = image.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise SourceError(f"dataset returned an image of type {type(image).__name__}; return a PIL image or a tensor")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise SourceError(f"dataset returned an image tensor of shape {tuple(image.shape)}; expected [C, H, W]")
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise SourceError(f"dataset returned an image tensor of dtype {image.dtype}; use uint8 or float in [0, 1]")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        image = image[:3]
    return image.contiguous()


def fingerprint(image: torch.Tensor) -> int:
    """64-bit fingerprint of a decoded uint8 ``[3, H, W]`` image: blake2b-64 of its shape then its pixels."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(image.shape, dtype="<u4").tobytes())
    digest.update(image.contiguous().numpy())  # hashed in place, outside the GIL (no bytes copy)
    return int.from_bytes(digest.digest(), "little")


class MapDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[Any, int]: ...


class PathList(Sequence[str]):
    """File paths kept as one byte buffer and an offset array instead of a list of Python strings.

    A forked DataLoader worker that reads a Python string writes its reference count, so the kernel copies the
    string's memory page into the worker: over an epoch every worker would hold its own copy of the path list
    (measured at ImageNet size, ``benchmarks/loader_memory.py``: ~127 MiB per worker). Numpy arrays are only
    read, so their pages stay shared.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        encoded = [os.fsencode(path) for path in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(path) for path in encoded], out=self._offsets[1:])
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int | slice) -> str | list[str]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"path index {index} out of range for {len(self)} paths")
        index %= len(self)
        return os.fsdecode(self._bytes[self._offsets[index]:self._offsets[index + 1]].tobytes())


class ImageSource:
    """Indexed access to decoded source images and their labels.

    Build it with :meth:`from_folder` (ImageFolder layout: ``ROOT/CLASS/IMAGE``, classes and files sorted)
    or :meth:`from_dataset` (any map-style dataset returning ``(image, label)``).
    """

    def __init__(self, *, paths: Sequence[str] | None = None, targets: Sequence[int] | None = None,
                 classes: Sequence[str] | None = None, dataset: MapDataset | None = None,
                 description: str = "") -> None:
        self._paths = PathList(paths) if paths is not None else None
        self.targets = list(targets) if targets is not None else None
        self.classes = list(classes) if classes is not None else None
        self._dataset = dataset
        self.description = description

    @classmethod
    def from_folder(cls, root: str | os.PathLike[str], *, allow_empty_classes: bool = False) -> ImageSource:
        """List ``ROOT/CLASS/.../IMAGE``: classes and files sorted, hidden entries (``.name``) skipped at every
        depth, symbolic links followed but a directory reached twice (a link loop such as ``cat/up -> ..``, or a
        second link to the same folder) skipped with a warning. A class folder without images is refused, as
        torchvision's ImageFolder does (the labels of later classes would shift), unless
        ``allow_empty_classes``: it then keeps its label and has no samples."""
        root = Path(root)
        if not root.exists():
            raise SourceError(f"source directory {root} does not exist: pass a directory laid out as ROOT/CLASS/IMAGE")
        if not root.is_dir():
            raise SourceError(f"source {root} is not a directory: pass a directory laid out as ROOT/CLASS/IMAGE")
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
        if not classes:
            raise SourceError(
                f"source directory {root} has no class subdirectories: lay it out as ROOT/CLASS/IMAGE"
            )
        paths, targets = [], []
        visited = {_identity(root)} | {_identity(root / name) for name in classes}
        for label, name in enumerate(classes):
            found = _list_images(root / name, visited)
            if not found and not allow_empty_classes:
                raise SourceError(
                    f"class folder {root / name} holds no images (looked for {', '.join(IMG_EXTENSIONS)} files, "
                    "hidden ones skipped): every later class's label would shift, so it is refused as torchvision's "
                    "ImageFolder refuses it. Add images, remove the folder, or keep it as a class without samples "
                    "(allow_empty_classes=True; --allow-empty-classes of reinforce build and reinforce train)")
            paths.extend(found)
            targets.extend([label] * len(found))
        if not paths:
            raise SourceError(
                f"source directory {root} holds no images (looked for {', '.join(IMG_EXTENSIONS)} files "
                "under its class subdirectories)"
            )
        return cls(paths=paths, targets=targets, classes=classes, description=str(root))

    @classmethod
    def from_dataset(cls, dataset: MapDataset) -> ImageSource:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise SourceError(f"{type(dataset).__name__} is not a map-style dataset (needs __len__ and __getitem__)")
        targets = getattr(dataset, "targets", None)
        classes = getattr(dataset, "classes", None)
        return cls(dataset=dataset, targets=list(targets) if targets is not None else None,
                   classes=classes, description=type(dataset).__name__)

    def __len__(self) -> int:
        return len(self._paths) if self._paths is not None else len(self._dataset)

    def name_of(self, index: int) -> str:
        """Human-readable name of a sample for error messages."""
        return self._paths[index] if self._paths is not None else f"{self.description}[{index}]"

    def load(self, index: int, decoder: Decoder = "auto") -> tuple[torch.Tensor, int]:
        """Decoded RGB uint8 ``[3, H, W]`` image and integer label of sample ``index``."""
        if self._paths is not None:
            return decode_image(self._paths[index], decoder), self.targets[index]
        image, label = self._dataset[index]
        return as_uint8_image(image), int(label)

    def load_crop(self, index: int, box: Sequence[float], size: int,
                  expected_size: tuple[int, int] | None = None) -> torch.Tensor | None:
        """:func:`decode_crop` of a file source's sample ``index``; None for dataset sources and wherever
        :func:`decode_crop` declines (load the full image then)."""
        if self._paths is None:
            return None
        return decode_crop(self._paths[index], box, size, expected_size)

    def load_encoded(self, index: int, expected_size: tuple[int, int] | None = None) -> torch.Tensor | None:
        """:func:`encoded_jpeg` of a file source's sample ``index``; None for dataset sources and files that are
        not plain JPEGs (decode those with :meth:`load`)."""
        if self._paths is None:
            return None
        return encoded_jpeg(self._paths[index], expected_size)


def _list_images(directory: Path, visited: set[tuple[int, int]]) -> list[str]:
    """Image files under ``directory`` (sorted walk, links followed, hidden entries skipped); a directory below
    it whose (device, inode) is in ``visited`` (the root, the class folders, those walked) is skipped with a
    warning, and every directory walked is added to ``visited``."""
    found = []
    for current, subdirs, files in os.walk(directory, followlinks=True):
        identity = _identity(Path(current))
        if current != str(directory) and identity in visited:
            warnings.warn(f"source folder {current} was already listed (a symbolic link loop or a second link to "
                          "the same folder): skipped, so no image is listed twice or under another class",
                          RuntimeWarning, stacklevel=3)
            subdirs.clear()
            continue
        visited.add(identity)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(os.path.join(current, file) for file in sorted(files)
                     if file.lower().endswith(IMG_EXTENSIONS) and not file.startswith("."))
    return found


def _identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def open_source(source: str | os.PathLike[str] | MapDataset | ImageSource, *,
                allow_empty_classes: bool = False) -> ImageSource:
    """An :class:`ImageSource` from a directory path (see :meth:`ImageSource.from_folder`), a map-style dataset,
    or an existing source."""
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        return ImageSource.from_folder(source, allow_empty_classes=allow_empty_classes)
    return ImageSource.from_dataset(source)
