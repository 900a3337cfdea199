"""Stores whose records hold no augmentation parameters: readers re-derive them and check a digest per chunk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr

from reinforce_loaders import format as fmt
from reinforce_loaders.augment import make_pipeline
from reinforce_loaders.errors import StoreFormatError


def derived_header(preset: str, num_samples: int = 21, block: int = 8, a: int = 5, size: int = 32,
                   ) -> fmt.StoreHeader:
    pipeline = make_pipeline(preset, size)
    return fmt.StoreHeader(num_samples=num_samples, num_classes=50, top_k=4, num_augmentations=a, seed=11,
                           block_size=block, augmentation=pipeline.config(), teachers=[],
                           param_encodings=fmt.pipeline_param_encodings(pipeline), param_storage="derived")


def write_derived_store(path, header: fmt.StoreHeader, skipped: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Write a store the way a build does (sample per block with its partner pool, encode once, drop the
    parameter columns, digest each slot); returns (decoded-layout rows (N, A, W), image sizes)."""
    from reinforce_loaders import rng

    generator = np.random.default_rng(0)
    n, a, k = header.num_samples, header.num_augmentations, header.top_k
    sizes = generator.integers(20, 300, (n, 2))
    sizes[list(skipped)] = 0
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, spec in fmt.array_specs(header).items():
        group.create_array(name, **spec)
    pipeline, layout = header.pipeline, header.layout
    full = np.zeros((n, a, layout.width), dtype=np.int64)
    for block in range(header.num_blocks):
        start, stop = header.block_range(block)
        present = fmt.present_samples(sizes, start, stop)
        mixing = {}
        if pipeline.mixes:
            mixing = dict(num_samples=n, partner_pool=rng.partner_pool(header.seed, start, n, header.block_size),
                          partner_size=lambda p: None if not sizes[p].any() else tuple(sizes[p]))
        params = np.zeros((stop - start, a, pipeline.num_params))
        params[present - start] = pipeline.sample_block(header.seed, present, a, sizes[present, 0],
                                                        sizes[present, 1], **mixing)
        indices = np.argsort(generator.random((stop - start, a, header.num_classes)), axis=-1)[..., :k]
        probs = -np.sort(-generator.dirichlet(np.ones(k), (stop - start, a)), axis=-1) * 0.9
        columns = layout.params.encode(params, sizes[start:stop, :1], sizes[start:stop, 1:])
        rows = fmt.encode_records(header, indices, probs, columns, np.ones((stop - start, a)))
        rows[[i - start for i in range(start, stop) if i not in present]] = 0
        full[start:stop] = rows
        group[fmt.RECORDS][start:stop] = fmt.stored_rows(header, rows)
        group[fmt.PARAM_DIGESTS][block] = fmt.block_param_digests(header, rows[..., layout.columns["aug_params"]],
                                                                  sizes, start)
        group[fmt.BLOCKS_DONE][block] = 1
    group[fmt.IMAGE_SIZES][:] = sizes
    group.attrs[fmt.ATTRS_KEY] = dataclasses.replace(header, complete=True).to_attrs()
    return full, sizes


@pytest.mark.parametrize("preset", ["rrc", "rrc+m*+r*", "rrc+augmix"])
def test_derived_parameters_read_back_exactly(tmp_path, preset):
    header = derived_header(preset)
    full, sizes = write_derived_store(tmp_path / "s.zarr", header, skipped=(3, 17))
    group = fmt.open_store_group(tmp_path / "s.zarr")
    read = fmt.read_header(group)
    assert read.derives_params and read.layout.stored_width == 2 * header.top_k + 1
    assert group[fmt.RECORDS].shape[-1] == read.layout.stored_width
    for block in range(read.num_blocks):
        start, stop = read.block_range(block)
        for slot in (0, read.num_augmentations - 1):
            rows = fmt.read_block_slot(group, read, block, slot, image_sizes=sizes)
            present = fmt.present_samples(sizes, start, stop) - start
            np.testing.assert_array_equal(rows[present], full[start:stop, slot][present])
    decoded = fmt.read_all_records(group, read)
    expected = fmt.decode_records(header, full, sizes[:, :1], sizes[:, 1:], present=(sizes != 0).any(1)[:, None])
    present = fmt.present_samples(sizes, 0, header.num_samples)
    np.testing.assert_array_equal(decoded.params[present], expected.params[present])


def test_tampered_digest_or_different_arithmetic_is_refused(tmp_path):
    header = derived_header("rrc+ra/re")
    _, sizes = write_derived_store(tmp_path / "s.zarr", header)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    digests = group[fmt.PARAM_DIGESTS][1]
    digests[2] ^= 1
    group[fmt.PARAM_DIGESTS][1] = digests
    read = fmt.read_header(fmt.open_store_group(tmp_path / "s.zarr"))
    fmt.read_block_slot(group, read, 1, 1, image_sizes=sizes)  # other slots are fine
    with pytest.raises(StoreFormatError, match="block 1 slot 2 differ"):
        fmt.read_block_slot(group, read, 1, 2, image_sizes=sizes)
    other_seed = dataclasses.replace(read, seed=12)  # a reader deriving something else
    with pytest.raises(StoreFormatError, match="re-derived for block 0 slot 0"):
        fmt.read_block_slot(group, other_seed, 0, 0, image_sizes=sizes)
    with pytest.raises(ValueError, match="pass image_sizes"):
        fmt.read_block_slot(group, read, 0, 0)


def test_unknown_param_storage_is_refused():
    with pytest.raises(StoreFormatError, match="param_storage='sideways'"):
        dataclasses.replace(derived_header("rrc"), param_storage="sideways")


def test_header_survives_pickling_with_its_cached_layout():
    import pickle

    header = derived_header("rrc+mix")
    assert header.layout.width and header.pipeline.mixes
    copy = pickle.loads(pickle.dumps(header))
    columns = np.zeros((2, header.layout.params.columns), dtype=np.int64)
    np.testing.assert_array_equal(copy.layout.params.decode(columns, 10, 10), header.layout.params.decode(columns, 10, 10))


@pytest.mark.slow
def test_built_derived_store_verifies_and_trains_like_the_column_store(digits, teacher_weights, tmp_path):
    """End to end: `reinforce build --derived-params`, `reinforce verify`, and a DataLoader epoch that yields the
    same images and targets as the column store; a damaged digest is refused by both verify and the dataset."""
    import torch

    from conftest import build_store
    from reinforce.cli import main
    from reinforce_loaders import ReinforcedDataset

    stores = {kind: build_store(digits[0], tmp_path / f"{kind}.zarr", teacher_weights, augment="rrc+m*+r*",
                                param_storage=kind) for kind in ("columns", "derived")}
    assert main(["verify", str(stores["derived"]), "--data", str(digits[0])]) == 0
    epochs = {}
    for kind, path in stores.items():
        dataset = ReinforcedDataset(digits[0], path, target="sparse")
        dataset.set_epoch(1)
        epochs[kind] = list(torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2))
    for (images_c, (idx_c, p_c)), (images_d, (idx_d, p_d)) in zip(epochs["columns"], epochs["derived"]):
        assert torch.equal(images_c, images_d) and torch.equal(idx_c, idx_d) and torch.equal(p_c, p_d)
    group = zarr.open_group(str(stores["derived"]), mode="r+")
    digests = group[fmt.PARAM_DIGESTS][0]
    digests[1] ^= 1 << 40
    group[fmt.PARAM_DIGESTS][0] = digests
    assert main(["verify", str(stores["derived"])]) == 1
    dataset = ReinforcedDataset(digits[0], stores["derived"])
    slot_one_epoch = next(e for e in range(dataset.header.num_augmentations) if dataset.slot(0, e) == 1)
    dataset.set_epoch(slot_one_epoch)
    with pytest.raises(StoreFormatError, match="block 0 slot 1"):
        dataset[0]
