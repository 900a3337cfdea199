"""Opening a store and reading its arrays: the header, whole arrays or selections of them (a damaged chunk
becomes a StoreFormatError), the checks a reader makes before reading, and the records of a block's slot."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from ..errors import IncompleteStoreError, StoreFormatError
from .bounded import bounded_array, bounded_member
from .derived import check_param_digest, derive_param_columns, expand_rows
from .header import StoreHeader, array_specs, check_pipeline, shown
from .records import DecodedRecords, check_rows_present, decode_records
from .remote import http_store
from .spec import BLOCKS_DONE, CLASS_VOCABULARY, IMAGE_SIZES, LABELS, PARAM_DIGESTS, RECORDS


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
        store = http_store(store, read_only=mode == "r", storage_options=storage_options or {})
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
    except (ValueError, TypeError, LookupError, AttributeError, ArithmeticError, RecursionError) as error:
        # zarr parsing bad JSON (RecursionError: nested past the interpreter's limit)
        raise StoreFormatError(f"the Zarr metadata (zarr.json) of the store at {where!s} is invalid "
                               f"({type(error).__name__}: {shown(str(error))}): the store is damaged or was not "
                               "written by reinforce; re-download or rebuild it") from None


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


def _blocks_done_summary(group: zarr.Group, header: StoreHeader) -> str:
    if header.num_blocks > 1 << 16:  # not counted: one read per block of a header that may be hostile
        return f"the header claims {header.num_blocks} blocks"
    try:
        done = int(np.count_nonzero(group[BLOCKS_DONE][:]))
    except KeyError:
        done = 0
    return f"{done} of {header.num_blocks} blocks written"


def read_array(group: zarr.Group, name: str, selection: Any = slice(None), what: str = "") -> np.ndarray:
    """``group[name][selection]``, turning a damaged chunk (checksum, truncation) into a StoreFormatError."""
    try:
        array = bounded_member(group, name)
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
            raise StoreFormatError(f"array '{name}' has fill value {shown(np.asarray(array.fill_value).tolist())}, "
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
