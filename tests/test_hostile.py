"""Hostile stores (issue 10): sizes a header claims, array metadata, decompression bombs and damaged records.

Every case goes through the public dataset and CLI. Cases that a reader without limits would turn into a huge
allocation run in a child process (:mod:`limited_child`) whose address space is limited to what it had after its
imports plus :data:`EXTRA_MEMORY`, so a reader that allocated what the store claims would fail with MemoryError
instead of the named error asserted here; the child's peak RSS is checked too.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
import zarr

import limited_child
from reinforce_loaders import format as fmt
from test_source_listing import _build

EXTRA_MEMORY = 1536 << 20
"""Address space a limited child may add after its imports (a bomb here claims 3 GiB)."""
BOMB_BYTES = 3 << 30


def run_limited(*actions: list) -> list[dict]:
    """:func:`limited_child.run_limited` (``["dataset", source, store(, (index, slot))]``, ``["cli", argv]``) with
    :data:`EXTRA_MEMORY` as the child's extra address space."""
    return limited_child.run_limited(*actions, extra_address_space=EXTRA_MEMORY, timeout=300)


def copy_store(store: Path, where: Path) -> Path:
    shutil.copytree(store, where)
    return where


def edit_header(path: Path, **members) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.attrs[fmt.ATTRS_KEY] = {**group.attrs[fmt.ATTRS_KEY], **members}
    zarr.consolidate_metadata(str(path))


def metadata_only_store(like: Path, path: Path, **members) -> Path:
    """A complete-looking store with ``like``'s header changed by ``members`` and consistent array metadata, but
    no chunk at all: a few KB claiming any number of samples."""
    attrs = {**zarr.open_group(str(like), mode="r").attrs[fmt.ATTRS_KEY], "complete": True, **members}
    header = fmt.StoreHeader.from_attrs({fmt.ATTRS_KEY: attrs})
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, spec in fmt.array_specs(header).items():
        group.create_array(name, **spec)
    group.attrs[fmt.ATTRS_KEY] = attrs
    zarr.consolidate_metadata(str(path))
    return path


def with_crc(data: bytes) -> bytes:
    return data + np.uint32(google_crc32c.value(data)).tobytes()


def zstd_bomb(size: int) -> bytes:
    """A zstd frame (RFC 8878) of RLE blocks that really expands to ``size`` zero bytes: ~32 bytes per MiB."""
    frame = bytearray(b"\x28\xb5\x2f\xfd\xe0") + struct.pack("<Q", size)  # single segment, 8-byte content size
    block = 1 << 17
    while size:
        n = min(block, size)
        size -= n
        frame += (int(not size) | 1 << 1 | n << 3).to_bytes(3, "little") + b"\x00"
    return bytes(frame)


def replace_shard_chunk(shard: Path, slot: int, chunk: bytes, slots: int) -> None:
    """Rewrite chunk ``slot`` of a ``records`` shard (index at the end: (offset, nbytes) per chunk, crc32c)."""
    data = shard.read_bytes()
    index = np.frombuffer(data[-(16 * slots + 4):-4], dtype="<u8").reshape(slots, 2)
    chunks = [chunk if s == slot else data[int(o):int(o + n)] for s, (o, n) in enumerate(index)]
    offsets = np.cumsum([0] + [len(c) for c in chunks[:-1]])
    new_index = np.stack([offsets, [len(c) for c in chunks]], axis=1).astype("<u8").tobytes()
    shard.write_bytes(b"".join(chunks) + with_crc(new_index))


@pytest.fixture()
def copied(store, tmp_path) -> Path:
    return copy_store(store, tmp_path / "copy.zarr")


# -- sizes a header claims --------------------------------------------------------------------------------------

@pytest.mark.parametrize("members, culprit", [
    ({"num_augmentations": 200_000_000}, r"num_augmentations=200000000 is outside \[1, 65536\]"),
    ({"num_samples": 1_500_000_000}, "num_samples=1500000000 and block_size=16 make 93750000 blocks, over the limit"),
    ({"block_size": 1 << 20, "num_augmentations": 1000}, "a shard of array 'records' would hold 25,165,824,000"),
])
def test_header_sizes_beyond_the_limits_are_refused_by_every_reader(digits, copied, members, culprit, capsys):
    from reinforce.cli import main
    from reinforce_loaders import ReinforcedDataset, StoreFormatError

    edit_header(copied, **members)
    with pytest.raises(StoreFormatError, match=culprit):
        ReinforcedDataset(digits[0], copied)
    assert main(["verify", str(copied)]) != 0
    assert main(["inspect", str(copied)]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(re.findall(culprit, err)) == 2, err


def test_a_count_differing_from_the_source_is_refused_before_anything_is_read(digits, copied):
    """1.5e9 samples in blocks of 4096 passes the header limits; the dataset compares the count with the source
    first, and verify/inspect find the arrays' shapes disagree with the header, all without allocating."""
    edit_header(copied, num_samples=1_500_000_000, block_size=4096)
    dataset, verify, inspect = run_limited(["dataset", str(digits[0]), str(copied)],
                                           ["cli", ["verify", str(copied)]], ["cli", ["inspect", str(copied)]])
    assert dataset["error"] == "SourceMismatchError"
    assert "has 45 samples but the store was built from 1500000000" in dataset["message"]
    assert verify["rc"] == 1 and "array 'labels' has shape (45,)" in verify["stderr"]
    assert "implies (1500000000,)" in verify["stderr"]
    assert inspect["rc"] == 2 and "array 'labels' has shape (45,)" in inspect["stderr"]


@pytest.mark.parametrize("num_samples, block_size", [(8_000_000, 8), (4_000_000_000, 4096)])
def test_a_store_of_metadata_alone_claiming_many_samples_fails_at_once(store, digits, tmp_path, num_samples,
                                                                       block_size):
    hostile = metadata_only_store(store, tmp_path / "hostile.zarr", num_samples=num_samples, block_size=block_size)
    assert sum(f.stat().st_size for f in hostile.rglob("*") if f.is_file()) < 64_000
    last = -(-num_samples // block_size) - 1
    dataset, verify, inspect = run_limited(["dataset", str(digits[0]), str(hostile)],
                                           ["cli", ["verify", str(hostile)]], ["cli", ["inspect", str(hostile)]])
    assert dataset["error"] == "SourceMismatchError" and f"built from {num_samples}" in dataset["message"]
    for result in (verify, inspect):
        assert result["rc"] in (1, 2)
        assert f"the last block ({last}) of the store is not written" in result["stderr"], result["stderr"]


def test_an_unfinished_store_claiming_a_million_blocks_is_inspected_and_refused_at_once(store, digits, tmp_path):
    hostile = metadata_only_store(store, tmp_path / "hostile.zarr", num_samples=8_000_000, block_size=8,
                                  complete=False)
    inspect, verify, dataset = run_limited(["cli", ["inspect", str(hostile)]], ["cli", ["verify", str(hostile)]],
                                           ["dataset", str(digits[0]), str(hostile)])
    assert inspect["rc"] == 0
    for text in (verify["stderr"], dataset["message"]):
        assert "the store's build has not finished (the header claims 1000000 blocks)" in text, text


# -- array metadata -----------------------------------------------------------------------------------------------

def _edit_array_metadata(path: Path, name: str, edit) -> None:
    meta_path = path / name / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    zarr.consolidate_metadata(str(path))


@pytest.mark.parametrize("name, edit, culprit", [
    ("labels", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[8]),
     r"array 'labels' has shape \(45,\), dtype int32, chunks \(8,\)"),
    ("image_sizes", lambda m: m.update(data_type="uint8"), "array 'image_sizes' has shape (45, 2), dtype uint8"),
    ("records", lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[16, 2, m["shape"][2]]),
     "array 'records' has shape"),
    ("labels", lambda m: m.update(fill_value=7), "array 'labels' has fill value 7"),
    ("fingerprints", lambda m: m["codecs"].__setitem__(1, {"name": "gzip", "configuration": {"level": 1}}),
     "array 'fingerprints' uses the compressor GzipCodec"),
])
def test_array_metadata_that_disagrees_with_the_spec_is_refused(digits, copied, name, edit, culprit, capsys):
    from reinforce.cli import main
    from reinforce_loaders import ReinforcedDataset, StoreFormatError

    _edit_array_metadata(copied, name, edit)
    with pytest.raises(StoreFormatError) as caught:
        ReinforcedDataset(digits[0], copied)
    assert culprit in str(caught.value) or re.search(culprit, str(caught.value)), caught.value
    assert main(["verify", str(copied)]) == 1
    assert main(["inspect", str(copied)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count(f"array '{name}'") == 2, err


# -- decompression bombs ------------------------------------------------------------------------------------------

def test_a_zstd_chunk_expanding_to_3_gib_is_refused_before_it_is_decoded(digits, copied):
    (copied / fmt.LABELS / "c" / "0").write_bytes(with_crc(zstd_bomb(BOMB_BYTES)))
    assert (copied / fmt.LABELS / "c" / "0").stat().st_size < 100_000
    dataset, verify = run_limited(["dataset", str(digits[0]), str(copied)], ["cli", ["verify", str(copied)]])
    for text in (dataset.get("message"), verify["stderr"]):
        assert "array 'labels'" in text and "declares 3,221,225,472 decoded bytes for a chunk of 64 bytes" in text


def test_a_refused_chunk_leaves_no_read_of_its_call_running(copied, monkeypatch):
    """zarr does not cancel the other chunks of a call when one fails; a process exiting under them (verify on a
    damaged store) printed "Task was destroyed but it is pending!" and their tracebacks (seen once in CI)."""
    import asyncio
    import threading
    import time

    from zarr.core.sync import sync

    (copied / fmt.LABELS / "c" / "0").write_bytes(with_crc(zstd_bomb(BOMB_BYTES)))
    decode, bomb_refused = fmt.BoundedZstdCodec._decode_sync, threading.Event()

    def slow_beside_the_bomb(self, chunk_bytes, chunk_spec):
        if fmt.zstd_content_size(chunk_bytes.as_numpy_array()) > 1 << 20:
            bomb_refused.set()
        else:  # still decoding when the bomb is refused
            bomb_refused.wait(5)
            time.sleep(0.5)
        return decode(self, chunk_bytes, chunk_spec)

    async def running_tasks() -> int:
        return len(asyncio.all_tasks() - {asyncio.current_task()})

    monkeypatch.setattr(fmt.BoundedZstdCodec, "_decode_sync", slow_beside_the_bomb)
    with pytest.raises(fmt.StoreFormatError, match="a decompression bomb"):
        fmt.read_array(fmt.open_store_group(copied), fmt.LABELS)
    assert bomb_refused.is_set()
    assert sync(running_tasks()) == 0


def test_a_blosc_records_chunk_declaring_2_gb_is_refused_before_it_is_allocated(digits, copied):
    header = fmt.read_header(fmt.open_store_group(copied))
    shard = copied / fmt.RECORDS / "c" / "0" / "0" / "0"
    data = shard.read_bytes()
    offset, nbytes = np.frombuffer(data[-(16 * header.num_augmentations + 4):-4], dtype="<u8")[:2]
    chunk = bytearray(data[int(offset):int(offset + nbytes) - 4])
    chunk[4:8] = struct.pack("<I", 2_000_000_000)  # blosc's header: the size numcodecs allocates (< 2**31)
    replace_shard_chunk(shard, 0, with_crc(bytes(chunk)), header.num_augmentations)
    dataset, verify = run_limited(["dataset", str(digits[0]), str(copied), [0, 0]], ["cli", ["verify", str(copied)]])
    for text in (dataset.get("message"), verify["stderr"]):
        assert "array 'records'" in text and "a blosc frame declares 2,000,000,000 decoded bytes" in text, text


# -- the loader checks what it serves -----------------------------------------------------------------------------

def test_an_image_size_differing_from_the_decoded_image_is_refused_naming_the_sample(digits, copied, capsys):
    from reinforce.cli import main
    from reinforce_loaders import ReinforcedDataset, SourceMismatchError

    group = zarr.open_group(str(copied), mode="r+")
    group[fmt.IMAGE_SIZES][3] = (1, 1)  # rewritten through zarr: valid checksums
    ds = ReinforcedDataset(digits[0], copied, verify="none")
    ds[2]
    with pytest.raises(SourceMismatchError, match=r"source sample 3 \(.*\.png\) is 32 x 32 pixels but the store "
                                                  r"records 1 x 1"):
        ds[3]
    with pytest.raises(SourceMismatchError, match="source sample 3 .* records 1 x 1"):
        ReinforcedDataset(digits[0], copied, verify="full")
    assert main(["verify", str(copied), "--data", str(digits[0])]) == 1
    err = capsys.readouterr().err  # the records check finds it first: parameters encoded for another size
    assert "for sample 3 (image_sizes)" in err or "source sample 3" in err


class FolderWithoutTargets(torch.utils.data.Dataset):
    """A map-style dataset of the digits folder, in the store's order, without a ``targets`` attribute."""

    def __init__(self, root: Path, relabel: dict[int, int]) -> None:
        from reinforce_loaders.source import ImageSource

        listed = ImageSource.from_folder(root)
        self.paths = [listed.name_of(i) for i in range(len(listed))]
        self.labels = [relabel.get(i, label) for i, label in enumerate(listed.targets)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), self.labels[index]


def test_a_source_without_targets_is_label_checked_through_the_dataset(digits, store):
    from reinforce_loaders import ReinforcedDataset, SourceMismatchError

    source = FolderWithoutTargets(digits[0], relabel={7: 9})
    assert not hasattr(source, "targets")
    message = r"source sample 7 \(FolderWithoutTargets\[7\]\) has label 9 but the store has 1"
    with pytest.raises(SourceMismatchError, match=message):
        ReinforcedDataset(source, store, verify="full")
    ds = ReinforcedDataset(source, store, verify="none")
    ds[6]
    with pytest.raises(SourceMismatchError, match=message):
        ds[7]
    assert len(ReinforcedDataset(FolderWithoutTargets(digits[0], {}), store, verify="full")) == 45


# -- decompression bombs among the source images ------------------------------------------------------------------

def png_bomb(path: Path, side: int = 30_000) -> None:
    """A ``side`` x ``side`` 1-bit grey PNG of zeros: ~110 KB on disk for 30000 x 30000 = 9e8 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + -(-side // 8))  # filter byte, then the row's bits
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_decompression_bomb_among_the_source_images_is_an_unreadable_image(digits, teacher_weights, store,
                                                                            tmp_path, capsys):
    from reinforce.cli import main
    from reinforce_loaders import ImageSource, ReinforcedDataset
    from reinforce_loaders.errors import SourceError

    source = tmp_path / "src"
    shutil.copytree(digits[0], source)
    victim = sorted((source / "3").iterdir())[0]
    png_bomb(victim)
    assert victim.stat().st_size < 200_000
    assert _build(source, tmp_path / "fail.zarr", teacher_weights) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {victim}" in err and "decompression bomb" in err and "--max-image-pixels" in err
    assert _build(source, tmp_path / "skip.zarr", teacher_weights, "--on-bad-image", "skip") == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable images" in out and str(victim) in out
    assert main(["verify", str(store), "--data", str(source)]) != 0
    assert f"cannot read image {victim}" in capsys.readouterr().err
    index = [ImageSource.from_folder(source).name_of(i) for i in range(45)].index(str(victim))
    ds = ReinforcedDataset(source, store)
    with pytest.raises(SourceError, match=f"cannot read image {re.escape(str(victim))}: .*decompression bomb"):
        ds[index]


def test_max_image_pixels_sets_the_limit_for_the_build_and_the_dataset(digits, teacher_weights, store, tmp_path,
                                                                       capsys, monkeypatch):
    from PIL import Image

    from reinforce_loaders import ReinforcedDataset
    from reinforce_loaders.errors import SourceError

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    assert _build(digits[0], tmp_path / "s.zarr", teacher_weights, "--max-image-pixels", "100") == 2
    err = capsys.readouterr().err
    assert "over the limit of 100 pixels (a decompression bomb?" in err and "cannot read image" in err
    with pytest.raises(SourceError, match=r"over the limit of 100 pixels"):
        ReinforcedDataset(digits[0], store, max_image_pixels=100)[0]
    assert ReinforcedDataset(digits[0], store, max_image_pixels=0)[0][0].shape[-1] == 32
    assert Image.MAX_IMAGE_PIXELS is None


def test_a_local_zarr_json_nested_past_the_recursion_limit_is_a_one_line_error(copied, capsys):
    meta = json.loads((copied / "zarr.json").read_text())
    meta["attributes"]["deep"] = None
    nested = "[" * 5000 + "]" * 5000  # json.dumps cannot write it: spliced in as text
    (copied / "zarr.json").write_text(json.dumps(meta).replace('"deep": null', '"deep": ' + nested))
    with pytest.raises(fmt.StoreFormatError, match="zarr.json.*is invalid"):
        fmt.open_store_group(copied)
    from reinforce.cli import main

    assert main(["inspect", str(copied)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid" in err
