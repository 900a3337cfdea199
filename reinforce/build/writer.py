"""Writing a reinforced store: create or resume, write whole blocks, mark them done, finalize.

Layout facts (names, dtypes, chunks, codecs, header, record encoding) come from
:mod:`reinforce_loaders.format`; this module only decides the order of writes. A block's data is written before its ``blocks_done`` flag, and the
header says ``complete`` only after every flag is set, so a crash at any moment leaves a store that a resumed
build completes and that readers refuse until then. A new store's skeleton (arrays and header) is made in a
hidden sibling directory and renamed into place, so ``--out`` is either absent or a resumable store; and a
build holds :func:`store_lock` (a ``<out>.lock`` file beside the store) so a second build of the same store
refuses instead of racing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from reinforce_loaders import format as fmt
from reinforce_loaders.augment import AugmentPipeline
from reinforce_loaders.errors import ReinforceError, StoreFormatError

UNREADABLE_LOCK_STALE_SECONDS = 60.0
"""A lock file nobody can read (a crash between creating and filling it) is stale after this many seconds."""


class StoreBusyError(ReinforceError):
    """Another build holds the store's lock."""


@dataclasses.dataclass
class BlockResult:
    """Everything a block of samples ``[start, start + n)`` contributes to the store.

    ``aug_params`` must be the parameters the teacher was shown, i.e. already passed through
    :meth:`~reinforce_loaders.codecs.ParamLayout.quantize` (the writer checks this).
    """

    start: int
    labels: np.ndarray          # (n,)
    fingerprints: np.ndarray    # (n,)
    image_sizes: np.ndarray     # (n, 2) height, width
    aug_params: np.ndarray      # (n, A, P)
    topk_indices: np.ndarray    # (n, A, K)
    topk_probs: np.ndarray      # (n, A, K)
    teacher_entropy: np.ndarray | None = None  # (n, A) entropy in nats of the full ensemble distribution
    class_vocabulary: np.ndarray | None = None  # (n, V); None: format.class_vocabulary of topk_indices
    param_columns: np.ndarray | None = None
    """(n, A, C) ``aug_params`` already encoded with the header's layout (the build encodes once, on the CPU);
    written as they are. None: the writer encodes ``aug_params`` and checks they are representable."""


class BlockSink:
    """Writes whole blocks into a store that exists: what a build worker holds.

    It never creates, resumes or cleans a store (that is the driver's :class:`StoreWriter`), so a worker,
    however often it is restarted, cannot touch another worker's files. Block ``b`` maps to whole chunks of
    the per-sample arrays, one whole shard of ``records`` and chunk ``b`` of ``blocks_done``, so writers of
    different blocks (in different processes) never touch the same file.
    """

    def __init__(self, group: zarr.Group, header: fmt.StoreHeader) -> None:
        self.group = group
        self.header = header
        self.codec = header.layout.params

    @classmethod
    def open(cls, path: str | os.PathLike[str], header: fmt.StoreHeader) -> BlockSink:
        """A sink into the existing store ``path``, whose header the driver has created or checked."""
        return cls(zarr.open_group(str(path), mode="r+", zarr_format=3), header)

    def write_block(self, block: int, result: BlockResult) -> None:
        """Encode and write one block, then mark it done (data first, so a crash leaves it pending)."""
        header = self.header
        start, stop = header.block_range(block)
        n, a, k = stop - start, header.num_augmentations, header.top_k
        if result.start != start or len(result.labels) != n:
            raise ValueError(f"block {block} covers samples [{start}, {stop}), got {len(result.labels)} from {result.start}")
        if result.teacher_entropy is None:
            raise ValueError("BlockResult.teacher_entropy is missing: the format stores the entropy of every record")
        expected = {"aug_params": (n, a, len(self.codec.names)), "topk_indices": (n, a, k), "topk_probs": (n, a, k),
                    "teacher_entropy": (n, a), "image_sizes": (n, 2), "fingerprints": (n,)}
        for name, shape in expected.items():
            if np.shape(getattr(result, name)) != shape:
                raise ValueError(f"block {block}: {name} has shape {np.shape(getattr(result, name))}, expected {shape}")
        sizes = np.asarray(result.image_sizes, dtype=np.int64)
        heights, widths = sizes[:, 0, None], sizes[:, 1, None]
        columns = self._param_columns(block, result, heights, widths)
        vocabulary = None
        if header.class_vocabulary_size:
            fill = header.fill_value
            vocabulary = result.class_vocabulary
            if vocabulary is None:
                vocabulary = fmt.class_vocabulary(result.topk_indices, header.class_vocabulary_size, fill)
            vocabulary = np.asarray(vocabulary, dtype=np.int64)
            if vocabulary.shape != (n, header.class_vocabulary_size) or vocabulary.min(initial=0) < 0 or (
                    (vocabulary >= header.num_classes) & (vocabulary != fill)).any():
                raise ValueError(f"block {block}: class_vocabulary must be ({n}, {header.class_vocabulary_size}) "
                                 f"classes below {header.num_classes}, padded with {fill}")
            self.group[fmt.CLASS_VOCABULARY][start:stop] = vocabulary.astype(header.dtype)
            vocabulary = vocabulary[:, None, :]
        records = fmt.encode_records(header, result.topk_indices, result.topk_probs, columns, result.teacher_entropy,
                                     vocabulary=vocabulary)
        self.group[fmt.LABELS][start:stop] = np.asarray(result.labels, dtype=fmt.LABEL_DTYPE)
        self.group[fmt.FINGERPRINTS][start:stop] = np.asarray(result.fingerprints, dtype=fmt.FINGERPRINT_DTYPE)
        self.group[fmt.IMAGE_SIZES][start:stop] = sizes.astype(fmt.IMAGE_SIZE_DTYPE)
        self.group[fmt.RECORDS][start:stop] = fmt.stored_rows(header, records)
        if header.derives_params:
            # The block's own sizes: its samples are rows 0..n-1 of them.
            self.group[fmt.PARAM_DIGESTS][block] = fmt.block_param_digests(header, columns, sizes, 0)
        self.group[fmt.BLOCKS_DONE][block] = 1

    def _param_columns(self, block: int, result: BlockResult, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """The block's encoded parameters: as given, or encoded here from ``aug_params``, which must then be
        exactly representable (what the teacher saw is what the student replays)."""
        n, a, width = len(result.labels), self.header.num_augmentations, self.codec.columns
        if result.param_columns is not None:
            columns = np.asarray(result.param_columns, dtype=np.int64)
            if columns.shape != (n, a, width):
                raise ValueError(f"block {block}: param_columns has shape {columns.shape}, expected {(n, a, width)}")
            return columns
        params = np.asarray(result.aug_params, dtype=np.float64)
        columns = self.codec.encode(params, heights, widths)
        quantized = self.codec.decode(columns, heights, widths)
        if not np.array_equal(quantized, params):
            bad = np.argwhere(quantized != params)[0]
            raise ValueError(
                f"block {block}: aug_params of record ({result.start + bad[0]}, {bad[1]}) param "
                f"{self.codec.names[bad[2]]} = {params[tuple(bad)]} is not representable in the store "
                f"(would be stored as {quantized[tuple(bad)]}): apply ParamLayout.quantize before the teacher sees "
                "the parameters, so the student replays what the teacher saw"
            )
        return columns


class StoreWriter(BlockSink):
    """The build driver's handle on a store: creates or resumes it, lists pending blocks, finalizes it."""

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike[str], header: fmt.StoreHeader,
                         num_params: int | None = None) -> StoreWriter:
        """Open ``path`` for writing: create a new store, or resume one built with the same settings.

        Only the build driver calls this: resuming removes the files that crashed writes left behind.
        """
        path = _out_path(path)
        header = with_param_encodings(header)
        if num_params is not None and len(header.param_encodings) != num_params:
            raise StoreFormatError(f"the augmentation pipeline has {len(header.param_encodings)} parameters, "
                                   f"the build passed num_params={num_params}")
        if path.is_dir() and any(path.iterdir()):
            return cls._resume(path, header)
        return cls._create(path, header)

    @classmethod
    def _resume(cls, path: Path, header: fmt.StoreHeader) -> StoreWriter:
        try:
            group = zarr.open_group(str(path), mode="r+", zarr_format=3)
            existing = fmt.StoreHeader.from_attrs(group.attrs.asdict())
        except (StoreFormatError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, OSError,
                ValueError, TypeError, KeyError) as error:
            # ValueError covers a zarr.json that is not JSON (JSONDecodeError) or not text (UnicodeDecodeError).
            reason = str(error) if isinstance(error, StoreFormatError) else f"{type(error).__name__}: {error}"
            raise StoreFormatError(
                f"--out {path} exists and is not a reinforce store this version can resume ({reason:.300}): "
                "choose another path or remove it"
            ) from None
        differences = _differences(existing.settings(), header.settings())
        if differences:
            raise StoreFormatError(
                f"--out {path} holds a store built with different settings ({'; '.join(differences)}): "
                "re-run with the original settings to resume it, or choose another --out"
            )
        # zarr writes each file as "<name>.<uuid>.partial" and then renames it; a crash leaves those behind.
        for leftover in path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
        return cls(group, existing)

    @classmethod
    def _create(cls, path: Path, header: fmt.StoreHeader) -> StoreWriter:
        """A new store: its skeleton is written in a hidden sibling, then renamed to ``path`` in one step."""
        for leftover in path.parent.glob(f".{path.name}.creating-*"):  # from a creation that crashed
            shutil.rmtree(leftover, ignore_errors=True)
        temporary = path.with_name(f".{path.name}.creating-{os.getpid()}")
        try:
            group = zarr.open_group(str(temporary), mode="w", zarr_format=3)
            for name, spec in fmt.array_specs(header).items():
                group.create_array(name, **spec)
            group.attrs[fmt.ATTRS_KEY] = header.to_attrs()
            if path.is_dir():
                path.rmdir()  # an empty directory given as --out
            os.rename(temporary, path)
        except OSError as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise StoreFormatError(f"cannot create the store --out {path}: {error.strerror or error} "
                                   f"({type(error).__name__}): choose a writable location with free space") from None
        return cls(zarr.open_group(str(path), mode="r+", zarr_format=3), header)

    def pending_blocks(self) -> list[int]:
        done = self.group[fmt.BLOCKS_DONE][:]
        return [int(block) for block in np.flatnonzero(done == 0)]

    def finalize(self) -> fmt.StoreHeader:
        """Mark the store complete (only if every block is written) and consolidate its metadata."""
        pending = self.pending_blocks()
        if pending:
            raise StoreFormatError(f"cannot finalize: {len(pending)} blocks are not written (first: {pending[0]})")
        self.header = dataclasses.replace(self.header, complete=True)
        self.group.attrs[fmt.ATTRS_KEY] = self.header.to_attrs()
        with warnings.catch_warnings():
            # zarr warns that consolidated metadata is not yet in the v3 spec; our readers rely on it, see spec.
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.group.store)
        return self.header


def with_param_encodings(header: fmt.StoreHeader) -> fmt.StoreHeader:
    """``header`` with ``param_encodings`` filled from its augmentation pipeline when not given."""
    if header.param_encodings is not None:
        return header
    pipeline = AugmentPipeline.from_config(header.augmentation)
    return dataclasses.replace(header, param_encodings=fmt.pipeline_param_encodings(pipeline))


def _out_path(path: str | os.PathLike[str]) -> Path:
    """``--out`` as a directory path (a symlink resolved), refusing what cannot hold a store."""
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise StoreFormatError(f"--out {path} is a broken symbolic link: remove it or choose another path")
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise StoreFormatError(f"--out {path} is a file, not a store directory: choose another path or remove it")
    return path


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of the store ``path``: ``<path>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def store_lock(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the build lock of the store ``path`` for the ``with`` block.

    The lock file names its holder (host, pid, start time). A lock whose holder process is gone (same host) or
    that cannot be read after :data:`UNREADABLE_LOCK_STALE_SECONDS` is stale and taken over; otherwise
    :class:`StoreBusyError` says who holds it.
    """
    lock = lock_path(_out_path(path))
    owner = {"host": socket.gethostname(), "pid": os.getpid(),
             "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(lock):
                lock.unlink(missing_ok=True)
                continue
            raise StoreBusyError(f"--out {lock.with_suffix('')} is being built by another process "
                                 f"({_holder_text(lock)}; lock file {lock}): wait for it to finish, or if no build "
                                 "is running, remove the lock file") from None
        except OSError as error:
            raise StoreFormatError(f"cannot create the lock file {lock} beside --out: {error.strerror or error}: "
                                   "choose a writable location") from None
        with os.fdopen(handle, "w") as file:
            json.dump(owner, file)
        break
    else:
        raise StoreBusyError(f"could not take the lock {lock}: other builds keep taking it")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _stale(lock: Path) -> bool:
    holder = _read_lock(lock)
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > UNREADABLE_LOCK_STALE_SECONDS
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False  # cannot see another machine's processes
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _holder_text(lock: Path) -> str:
    holder = _read_lock(lock)
    if holder is None:
        return "holder unknown"
    return f"process {holder['pid']} on {holder.get('host', '?')} since {holder.get('started', '?')}"


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{key}: store has {old.get(key)!r}, this run has {new.get(key)!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def store_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of every file under ``path``."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def data_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the arrays' chunk and shard files under ``path`` (no metadata): what ``reinforce inspect`` sums."""
    root = Path(path)
    return sum(file.stat().st_size for array in root.iterdir() if array.is_dir()
               for file in array.rglob("*") if file.is_file() and file.name != "zarr.json")
