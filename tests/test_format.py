"""Storage format v1: encoding fidelity, versioning, layout, damage detection, resume, remote reading."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from range_server import RangeServer

from reinforce.build.writer import BlockResult, StoreWriter
from reinforce_loaders import ReinforcedDataset, make_pipeline
from reinforce_loaders import format as fmt
from reinforce_loaders import rng
from reinforce_loaders.codecs import ParamLayout
from reinforce_loaders.errors import IncompleteStoreError, StoreFormatError


def teacher_like(generator: np.random.Generator, shape: tuple[int, ...], num_classes: int, k: int):
    """Top-k of softmax distributions with a dominant class and a long tail, plus their entropies."""
    logits = generator.standard_normal(shape + (num_classes,)) * 2.0
    logits[..., 0] += generator.uniform(0, 8, shape)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1)
    values, classes = torch.sort(probs, dim=-1, descending=True, stable=True)
    entropy = torch.special.entr(probs).sum(-1)
    return classes[..., :k].numpy(), values[..., :k].numpy().astype(np.float32), entropy.numpy()


def synthetic_header(num_samples=40, num_classes=1000, k=10, a=6, block=16, size=32,
                     vocabulary=0) -> fmt.StoreHeader:
    pipeline = make_pipeline("rrc", size)
    return fmt.StoreHeader(num_samples=num_samples, num_classes=num_classes, top_k=k, num_augmentations=a, seed=3,
                           block_size=block, augmentation=pipeline.config(), teachers=[],
                           param_encodings=fmt.pipeline_param_encodings(pipeline), class_vocabulary_size=vocabulary)


def synthetic_block(header: fmt.StoreHeader, block: int, generator: np.random.Generator) -> BlockResult:
    start, stop = header.block_range(block)
    n, a, k = stop - start, header.num_augmentations, header.top_k
    pipeline = make_pipeline("rrc", header.augmentation["size"])
    sizes = generator.integers(20, 700, (n, 2))
    params = np.stack([pipeline.sample_slots(header.seed, start + i, a, *sizes[i]) for i in range(n)])
    params = header.layout.params.quantize(params, sizes[:, :1], sizes[:, 1:])
    indices, probs, entropy = teacher_like(generator, (n, a), header.num_classes, k)
    return BlockResult(start=start, labels=generator.integers(0, header.num_classes, n),
                       fingerprints=generator.integers(1, 2**63, n, dtype=np.uint64), image_sizes=sizes,
                       aug_params=params, topk_indices=indices, topk_probs=probs, teacher_entropy=entropy)


def write_store(path: Path, header: fmt.StoreHeader, blocks=None, seed=0) -> dict[int, BlockResult]:
    writer = StoreWriter.create_or_resume(path, header, len(header.param_encodings))
    generator = np.random.default_rng(seed)
    results = {block: synthetic_block(header, block, generator) for block in range(header.num_blocks)}
    for block in (range(header.num_blocks) if blocks is None else blocks):
        writer.write_block(block, results[block])
    if blocks is None:
        writer.finalize()
    return results


def read_all(path, header) -> np.ndarray:
    group = fmt.open_store_group(path)
    return np.concatenate([
        np.stack([fmt.read_block_slot(group, header, b, s) for s in range(header.num_augmentations)], axis=1)
        for b in range(header.num_blocks)])


@pytest.mark.parametrize("vocabulary", [0, 8])
def test_encode_decode_fidelity(tmp_path, vocabulary):
    header = synthetic_header(vocabulary=vocabulary)
    results = write_store(tmp_path / "s.zarr", header)
    rows = read_all(tmp_path / "s.zarr", header)
    group = fmt.open_store_group(tmp_path / "s.zarr")
    sizes = group[fmt.IMAGE_SIZES][:].astype(np.int64)
    table = fmt.read_vocabulary(group, header)
    decoded = fmt.decode_records(header, rows, sizes[:, :1], sizes[:, 1:],
                                 vocabulary=None if table is None else table[:, None, :])
    stored = rows[..., header.layout.columns["topk_indices"]]
    if vocabulary:  # both kinds of stored value occur: positions in the vocabulary and escaped class ids
        assert (stored < vocabulary).any() and (stored >= vocabulary).any()
        assert table.shape == (header.num_samples, vocabulary)
    else:
        assert table is None
    expect = {name: np.concatenate([getattr(results[b], name) for b in sorted(results)])
              for name in ("topk_indices", "topk_probs", "aug_params", "teacher_entropy")}
    assert rows.dtype == np.uint16
    np.testing.assert_array_equal(decoded.indices, expect["topk_indices"])
    error = np.abs(decoded.probs - expect["topk_probs"]).max()
    assert error <= 0.5 / header.prob_scale + 1e-6 < 1e-3
    np.testing.assert_array_equal(decoded.params, expect["aug_params"])
    assert np.abs(decoded.entropy - expect["teacher_entropy"]).max() <= math.log(1000) / fmt.ENTROPY_LEVELS / 2 + 1e-4
    np.testing.assert_array_equal(group[fmt.LABELS][:], np.concatenate([r.labels for r in results.values()]))


def test_param_encodings_keep_boxes_inside_and_are_idempotent():
    pipeline = make_pipeline("rrc", 224)
    codec = ParamLayout.for_pipeline(pipeline)
    generator = np.random.default_rng(1)
    for trial in range(100):
        height, width = (int(v) for v in generator.integers(4, 4000, 2))
        params = pipeline.sample_slots(0, trial, 16, height, width)
        quantized = codec.quantize(params, np.array(height), np.array(width))
        np.testing.assert_array_equal(codec.quantize(quantized, np.array(height), np.array(width)), quantized)
        assert (quantized[:, 0] + quantized[:, 2] <= height).all() and (quantized[:, 2] >= 1).all()
        assert (quantized[:, 1] + quantized[:, 3] <= width).all() and (quantized[:, 3] >= 1).all()
        if max(height, width) <= 255:  # one level per pixel or finer: exact
            np.testing.assert_array_equal(quantized, params)
        else:  # a level is ref / 255 pixels
            assert np.abs(quantized[:, :2] - params[:, :2]).max() <= max(height, width) / 255


def test_param_encoding_kinds_roundtrip():
    encodings = [{"param": "a.x", "kind": "float16"}, {"param": "a.n", "kind": "int", "offset": -5, "width": 2},
                 {"param": "a.m", "kind": "linear", "lo": 0.0, "hi": 10.0, "levels": 100},
                 {"param": "a.t", "kind": "relative", "ref": "output", "levels": 255}]
    codec = ParamLayout.from_json(encodings, output_size=224)
    params = np.array([[0.1234, 123456.0, 9.04, 100.0], [-3.5, -5.0, 0.0, 224.0]])
    columns = codec.encode(params, np.array([300, 300]), np.array([400, 400]))
    assert columns.shape == (2, 5) and columns.max() <= 0xFFFF
    decoded = codec.decode(columns, np.array([300, 300]), np.array([400, 400]))
    np.testing.assert_allclose(decoded[:, 0], params[:, 0], rtol=1e-3)
    np.testing.assert_array_equal(decoded[:, 1], params[:, 1])
    np.testing.assert_allclose(decoded[:, 2], params[:, 2], atol=0.05)
    np.testing.assert_allclose(decoded[:, 3], params[:, 3], atol=224 / 255)
    with pytest.raises(StoreFormatError, match="float16"):
        codec.encode(np.array([[1e6, 0, 0, 0]]), np.array([1]), np.array([1]))


def test_class_vocabulary_ranks_by_frequency_and_positions_roundtrip():
    indices = np.array([[[5, 2, 9], [2, 5, 7], [2, 9, 5], [2, 1, 3]]])  # counts: 2:4, 5:3, 9:2, then 1, 3, 7
    vocabulary = fmt.class_vocabulary(indices, 4, fill=0xFFFF)
    np.testing.assert_array_equal(vocabulary, [[2, 5, 9, 1]])
    np.testing.assert_array_equal(fmt.class_vocabulary(indices[:, :1], 4, fill=0xFFFF), [[2, 5, 9, 0xFFFF]])
    header = synthetic_header(num_classes=10, k=3, vocabulary=4)
    stored = fmt.encode_indices(header, indices, vocabulary[:, None, :])
    np.testing.assert_array_equal(stored, [[[1, 0, 2], [0, 1, 4 + 7], [0, 2, 1], [0, 3, 4 + 3]]])
    np.testing.assert_array_equal(fmt.decode_indices(header, stored, vocabulary[:, None, :]), indices)
    np.testing.assert_array_equal(fmt.decode_indices(header, stored[0, 1], vocabulary[0]), indices[0, 1])
    with pytest.raises(StoreFormatError, match="empty or invalid class_vocabulary entry"):
        fmt.decode_indices(header, np.array([3, 0, 1]), np.array([2, 5, 9, 0xFFFF]))
    with pytest.raises(ValueError, match="class_vocabulary"):
        fmt.decode_indices(header, stored, None)


def test_record_dtype_by_num_classes():
    assert fmt.record_dtype(1000) == np.uint16 and fmt.record_dtype(65535) == np.uint16
    assert fmt.record_dtype(65536) == np.uint32
    assert fmt.record_dtype(65535 - 32, 32) == np.uint16 and fmt.record_dtype(65535 - 31, 32) == np.uint32
    header = synthetic_header(num_classes=70000, k=3)
    assert header.dtype == np.uint32


@pytest.mark.parametrize("vocabulary", [0, 32])
def test_layout_chunks_one_slot_of_a_block_and_shards_a_block(tmp_path, vocabulary):
    header = synthetic_header(num_samples=40, block=16, vocabulary=vocabulary)
    write_store(tmp_path / "s.zarr", header)
    group = fmt.open_store_group(tmp_path / "s.zarr")
    records = group[fmt.RECORDS]
    assert records.chunks == (16, 1, header.layout.width) and records.shards == (16, 6, header.layout.width)
    files = [f for f in (tmp_path / "s.zarr").rglob("*") if f.is_file()]
    assert len(files) == fmt.expected_file_count(header)
    assert len(list((tmp_path / "s.zarr" / fmt.RECORDS).rglob("c/*/*/*"))) == header.num_blocks


def test_slot_for_epoch_visits_every_slot_once_per_cycle_and_is_shared():
    a = 7
    for cycle in range(3):
        slots = [rng.slot_for_epoch(5, cycle * a + e, 0, a) for e in range(a)]
        assert sorted(slots) == list(range(a))
    assert {rng.slot_for_epoch(5, 3, i, a) for i in range(50)} == {rng.slot_for_epoch(5, 3, 0, a)}
    assert [rng.slot_for_epoch(5, e, 0, a) for e in range(a)] != [rng.slot_for_epoch(6, e, 0, a) for e in range(a)]


def _edit_header(path: Path, **changes) -> None:
    """Edit the root attributes (and their consolidated copy) of a store on disk."""
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"][fmt.ATTRS_KEY].update(changes)
    meta_path.write_text(json.dumps(meta))


def test_newer_major_version_is_rejected_minor_additions_ignored(digits, store, tmp_path):
    newer = tmp_path / "newer.zarr"
    shutil.copytree(store, newer)
    _edit_header(newer, format_version="3.0")
    with pytest.raises(StoreFormatError, match=r"format version 3\.0 is not supported.*upgrade reinforce-loaders"):
        ReinforcedDataset(digits[0], newer)
    minor = tmp_path / "minor.zarr"
    shutil.copytree(store, minor)
    _edit_header(minor, format_version="2.9", some_future_field={"x": 1})
    ds = ReinforcedDataset(digits[0], minor)
    assert ds.header.format_version == "2.9" and ds[0][0].shape == (3, 32, 32)


def test_a_format_1_store_float_replay_arithmetic_is_refused_naming_the_release_that_reads_it(digits, store, tmp_path):
    older = tmp_path / "older.zarr"
    shutil.copytree(store, older)
    _edit_header(older, format_version="1.1")
    with pytest.raises(StoreFormatError, match=r"format version 1\.1 is not supported.*rebuild the store.*"
                                               r"reinforce-loaders 0\.1\.0"):
        ReinforcedDataset(digits[0], older)


def test_header_missing_member_is_named(digits, store, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    meta = json.loads((damaged / "zarr.json").read_text())
    del meta["attributes"][fmt.ATTRS_KEY]["num_classes"]
    (damaged / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="header lacks num_classes"):
        ReinforcedDataset(digits[0], damaged)


def _shard(path: Path, block: int) -> Path:
    return path / fmt.RECORDS / "c" / str(block) / "0" / "0"


def test_corrupted_chunk_raises_clear_error(tmp_path):
    header = synthetic_header()
    path = tmp_path / "s.zarr"
    write_store(path, header)
    shard = _shard(path, 1)
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x5A  # inside the first chunk's compressed bytes
    shard.write_bytes(bytes(data))
    group = fmt.open_store_group(path)
    with pytest.raises(StoreFormatError, match="damaged"):
        for slot in range(header.num_augmentations):
            fmt.read_block_slot(group, header, 1, slot)
    # Undamaged blocks still read.
    fmt.read_block_slot(group, header, 0, 0)


def test_truncated_and_missing_shards_raise(tmp_path):
    header = synthetic_header()
    path = tmp_path / "s.zarr"
    write_store(path, header)
    shard = _shard(path, 2)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    group = fmt.open_store_group(path)
    with pytest.raises(StoreFormatError, match="damaged or truncated"):
        fmt.read_block_slot(group, header, 2, 0)
    _shard(path, 0).unlink()
    with pytest.raises(StoreFormatError, match="missing"):
        fmt.read_block_slot(group, header, 0, 3)


def test_incomplete_build_is_refused_then_resumed(tmp_path, digits, store):
    header = synthetic_header()
    path = tmp_path / "s.zarr"
    write_store(path, header, blocks=[1])
    with pytest.raises(IncompleteStoreError, match="1 of 3 blocks written.*resume"):
        fmt.read_header(fmt.open_store_group(path))
    writer = StoreWriter.create_or_resume(path, header, len(header.param_encodings))
    assert writer.pending_blocks() == [0, 2]
    generator = np.random.default_rng(0)
    results = {block: synthetic_block(header, block, generator) for block in range(header.num_blocks)}
    for block in writer.pending_blocks():
        writer.write_block(block, results[block])
    writer.finalize()
    group = fmt.open_store_group(path)
    assert fmt.read_header(group).complete
    np.testing.assert_array_equal(read_all(path, header)[:, :, :header.top_k],
                                  np.concatenate([results[b].topk_indices for b in range(3)]))


def test_writer_refuses_unquantized_params(tmp_path):
    header = synthetic_header()
    writer = StoreWriter.create_or_resume(tmp_path / "s.zarr", header, len(header.param_encodings))
    result = synthetic_block(header, 0, np.random.default_rng(0))
    result.image_sizes[:] = 600
    result.aug_params[0, 0, 0] = 301.0  # not on the 600/255 grid
    with pytest.raises(ValueError, match="not representable.*ParamLayout.quantize"):
        writer.write_block(0, result)


def test_built_store_replays_and_dataloader_workers_share_epoch(digits, store):
    ds = ReinforcedDataset(digits[0], store, target="sparse")
    a = ds.header.num_augmentations
    ds.set_epoch(2)
    slot = ds.slot(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    for epoch in (2, 3):
        ds.set_epoch(epoch)
        got = torch.cat([targets[0] for _, targets in loader])
        reference = ReinforcedDataset(digits[0], store, target="sparse")
        want = torch.stack([reference.replay(i, reference.slot(i, epoch))[1][0] for i in range(len(ds))])
        torch.testing.assert_close(got, want)
    assert 0 <= slot < a
    # Every block of the current epoch was loaded once, into the shared table.
    ds.set_epoch(0)
    for index in range(len(ds)):
        ds[index]
    assert (ds._block_epoch == 0).all()


@pytest.mark.parametrize("which", ["store", "vocabulary_store"])
def test_remote_http_store_reads_in_bounded_requests(digits, which, request):
    store = request.getfixturevalue(which)
    with RangeServer(store.parent) as server:
        url = f"{server.url}/{store.name}"
        ds = ReinforcedDataset(digits[0], url, target="sparse")
        opening = list(server.log)
        per_sample_arrays = 4 if ds.header.class_vocabulary_size else 3
        assert opening[0].path.endswith("/zarr.json")
        last_block_check = 4  # blocks_done, labels and the records shard index and slot 0 of the last block
        assert len(opening) <= 1 + last_block_check + per_sample_arrays * ds.header.num_blocks
        assert not any(r.path.endswith("zarr.json") for r in opening[1:])  # consolidated metadata only
        local = ReinforcedDataset(digits[0], store, target="sparse")
        ds.set_epoch(1)
        local.set_epoch(1)
        before = len(server.log)
        for index in range(len(ds)):
            _, (indices, probs) = ds[index]
            _, (local_indices, local_probs) = local[index]
            assert torch.equal(indices, local_indices) and torch.equal(probs, local_probs)
        epoch_requests = server.log[before:]
        # One shard-index read and one chunk read per block.
        assert len(epoch_requests) == 2 * ds.header.num_blocks
        assert all(r.status == 206 for r in epoch_requests)


def _write_blocks_in_child(path: str, blocks: list[int]) -> None:
    header = synthetic_header()
    writer = StoreWriter.create_or_resume(path, header, len(header.param_encodings))
    generator = np.random.default_rng(0)
    results = {block: synthetic_block(header, block, generator) for block in range(header.num_blocks)}
    for block in blocks:
        writer.write_block(block, results[block])


def test_processes_write_disjoint_blocks_without_locks(tmp_path):
    import multiprocessing

    header = synthetic_header()
    path = tmp_path / "s.zarr"
    StoreWriter.create_or_resume(path, header, len(header.param_encodings))
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_write_blocks_in_child, args=(str(path), blocks)) for blocks in ([0, 2], [1])]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    writer = StoreWriter.create_or_resume(path, header, len(header.param_encodings))
    assert writer.pending_blocks() == []
    writer.finalize()
    generator = np.random.default_rng(0)
    expected = np.concatenate([synthetic_block(header, b, generator).topk_indices for b in range(header.num_blocks)])
    np.testing.assert_array_equal(read_all(path, header)[:, :, :header.top_k], expected)


def test_remote_s3_store_reads_like_the_local_one(digits, vocabulary_store):
    """s3:// through fsspec/s3fs, against a local S3 server (moto), with a class-vocabulary store."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        credentials = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
        client = boto3.client("s3", endpoint_url=endpoint, **credentials)
        client.create_bucket(Bucket="stores")
        for file in vocabulary_store.rglob("*"):
            if file.is_file():
                client.upload_file(str(file), "stores", f"v.zarr/{file.relative_to(vocabulary_store)}")
        options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint,
                                                                      "region_name": "us-east-1"}}
        remote = ReinforcedDataset(digits[0], "s3://stores/v.zarr", target="sparse", storage_options=options)
        local = ReinforcedDataset(digits[0], vocabulary_store, target="sparse")
        assert remote.header.class_vocabulary_size == 2
        for epoch in (0, 3):
            remote.set_epoch(epoch)
            local.set_epoch(epoch)
            for index in range(len(local)):
                (image, (indices, probs)), (local_image, (local_indices, local_probs)) = remote[index], local[index]
                assert torch.equal(image, local_image) and torch.equal(indices, local_indices)
                assert torch.equal(probs, local_probs)
        group = fmt.open_store_group("s3://stores/v.zarr", storage_options=options)
        np.testing.assert_array_equal(fmt.read_all_records(group).indices,
                                      fmt.read_all_records(fmt.open_store_group(vocabulary_store)).indices)
    finally:
        server.stop()
