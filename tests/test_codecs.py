"""Typed parameter codecs, the cached store layout, and sampling that does not depend on batching."""

from __future__ import annotations

import numpy as np
import pytest

from reinforce_loaders import format as fmt
from reinforce_loaders import rng
from reinforce_loaders.augment import PRESETS, AugmentPipeline, make_pipeline
from reinforce_loaders.codecs import (CODECS, Float16Codec, IntCodec, LinearCodec, ParamLayout, RelativeCodec,
                                      codec_from_dict)
from reinforce_loaders.errors import StoreFormatError


@pytest.mark.parametrize("codec", [Float16Codec(), IntCodec(-3, 2), LinearCodec(-1.0, 2.5, 1000),
                                   RelativeCodec("source_width", 99, "op.left")])
def test_codec_dict_roundtrip(codec):
    data = codec.to_dict()
    assert CODECS[data["kind"]] is type(codec)
    assert codec_from_dict(data) == codec


def test_codec_header_json_is_format_1_0():
    # Exactly the members (and order) format 1.0 headers hold, so stores stay byte-identical.
    assert IntCodec().to_dict() == {"kind": "int", "offset": 0, "width": 1}
    assert LinearCodec().to_dict() == {"kind": "linear", "lo": 0.0, "hi": 1.0, "levels": 255}
    assert list(RelativeCodec("output", 7, "a.b").to_dict()) == ["kind", "ref", "levels", "start"]
    assert "start" not in RelativeCodec("output").to_dict()
    assert codec_from_dict({}) == Float16Codec()  # kind defaults to float16


@pytest.mark.parametrize("data, culprit", [
    ({"kind": "int", "width": 3}, "width"),
    ({"kind": "int", "offset": "0"}, "offset"),
    ({"kind": "int", "width": True}, "width"),
    ({"kind": "linear", "lo": 1.0, "hi": 1.0}, "hi > lo"),
    ({"kind": "linear", "levels": 0}, "levels"),
    ({"kind": "relative", "ref": "elsewhere"}, "ref"),
    ({"kind": "relative", "start": 5}, "start"),
    ({"kind": "zigzag"}, "zigzag"),
])
def test_bad_codec_settings_are_named(data, culprit):
    with pytest.raises(StoreFormatError, match=culprit):
        codec_from_dict(data)


def test_extent_must_follow_its_start():
    with pytest.raises(StoreFormatError, match="must come before"):
        ParamLayout(["a.h", "a.top"], [RelativeCodec(start_param="a.top"), RelativeCodec()], 32)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_grouped_decode_equals_decoding_each_codec(preset):
    pipeline = make_pipeline(preset, 64)
    layout = pipeline.param_layout
    sizes = np.array([[37, 500], [300, 41], [1, 1]])
    params = np.stack([pipeline.sample_slots(1, i, 6, *sizes[i], num_samples=3, partner_size=lambda p: sizes[p])
                       for i in range(3)])
    columns = layout.encode(params, sizes[:, :1], sizes[:, 1:])
    grouped = layout.decode(columns, sizes[:, :1], sizes[:, 1:])
    refs = layout._refs(columns.shape[:-1], sizes[:, :1], sizes[:, 1:])
    one_by_one = np.stack([codec.decode(columns[..., s], refs) for codec, s in zip(layout.codecs, layout.column_slices)],
                          axis=-1)
    np.testing.assert_array_equal(grouped, one_by_one)
    np.testing.assert_array_equal(layout.decode(columns[1, 2], 300, 41), grouped[1, 2])  # one record alone


def test_header_layout_is_parsed_once(store):
    header = fmt.read_header(fmt.open_store_group(store))
    assert header.layout is header.layout
    assert header.layout.width == header.layout.columns["teacher_entropy"].stop


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sampling_a_block_equals_sampling_each_record(preset):
    pipeline = make_pipeline(preset, 32)
    sizes = np.array([[40, 60], [33, 33], [500, 20], [1, 7], [64, 64]])
    unreadable = {3}
    partner_size = lambda p: None if p in unreadable else tuple(sizes[p])  # noqa: E731
    pool = rng.partner_pool(5, 0, 5, 3)
    kwargs = dict(num_samples=5, partner_size=partner_size, partner_pool=pool)
    block = pipeline.sample_block(5, [0, 1, 2, 4], 7, sizes[[0, 1, 2, 4], 0], sizes[[0, 1, 2, 4], 1], **kwargs)
    for row, sample in enumerate([0, 1, 2, 4]):
        np.testing.assert_array_equal(block[row], pipeline.sample_slots(5, sample, 7, *sizes[sample], **kwargs))
        for slot in (0, 6):
            np.testing.assert_array_equal(block[row, slot], pipeline.sample(5, sample, slot, *sizes[sample], **kwargs))


def test_mixing_beyond_two_to_the_24_samples_plans_and_encodes_exactly():
    """Partner indices are integers end to end (no float32 on the way), so web-scale datasets mix correctly."""
    pipeline = make_pipeline("rrc+mix", 224)
    num_samples = 2**24 + 1000
    samples = np.array([2**24 + 17, 2**24 + 999, 5])
    pool = np.array([3, 2**24 + 1, 2**24 + 3, 2**24 + 5, 2**24 + 7, 2**24 + 17, 2**24 + 999])
    params = pipeline.sample_block(9, samples, 64, [300] * 3, [400] * 3, num_samples=num_samples,
                                   partner_size=lambda p: (200, 100), partner_pool=pool)
    partners = pipeline.partner_indices(params)
    mixed = partners >= 0
    assert mixed.all() and set(partners.ravel()) <= set(pool.tolist())
    assert (partners != samples[:, None]).all()
    assert {int(p) % 2 for p in partners.ravel() if p > 2**24} == {1}  # odd pool members survive exactly
    layout = pipeline.param_layout
    columns = layout.encode(params, 300, 400)
    assert columns.max() <= 0xFFFF
    np.testing.assert_array_equal(layout.decode(columns, 300, 400)[..., layout.names.index("mix.partner")], partners)
    header = fmt.StoreHeader(num_samples=num_samples, num_classes=1000, top_k=5, num_augmentations=64, seed=9,
                             block_size=4096, augmentation=pipeline.config(), teachers=[],
                             param_encodings=fmt.pipeline_param_encodings(pipeline))
    assert header.layout.params.names == layout.names


def test_augmix_width_beyond_the_uniform_budget_is_refused():
    from reinforce_loaders.errors import AugmentationError
    with pytest.raises(AugmentationError, match="width must be between 1 and 3"):
        AugmentPipeline.from_config({"size": 32, "ops": [{"name": "center_crop"}, {"name": "augmix", "width": 4}]})


def test_decoding_checks_every_record(store):
    """A record that verify would reject never becomes a target: damaged probabilities or indices are named."""
    group = fmt.open_store_group(store)
    header = fmt.read_header(group)
    rows = fmt.read_block_slot(group, header, 0, 0)
    sizes = fmt.read_array(group, fmt.IMAGE_SIZES)[:len(rows)].astype(np.int64)
    fmt.decode_records(header, rows, sizes[:, 0], sizes[:, 1])  # as built: fine
    columns = header.layout.columns
    for column, value in ((columns["topk_probs"].start, 5000), (columns["topk_indices"].start + 1, None),
                          (columns["topk_indices"].start, header.num_classes), (columns["teacher_entropy"].start, 999)):
        bad = rows.copy()
        bad[2, column] = bad[2, column - 1] if value is None else value  # None: repeat the previous class index
        with pytest.raises(StoreFormatError, match=r"record \(2,\) of block 0 slot 0 is invalid"):
            fmt.decode_records(header, bad, sizes[:, 0], sizes[:, 1], where="block 0 slot 0")


@pytest.mark.parametrize("member, value, message", [
    ("seed", "x", "seed must be integer"), ("seed", -1, "seed=-1 is outside"), ("seed", 2**64, "outside"),
    ("num_augmentations", 4.0, "num_augmentations must be integer"), ("complete", "no", "complete must be boolean"),
    ("num_samples", 1.5e9 * 100, "num_samples must be integer"), ("num_samples", 2**40, "outside"),
    ("top_k", True, "top_k must be integer"), ("class_names", "abc", "class_names must be array or null"),
    ("teachers", {"a": 1}, "teachers must be array"),
])
def test_header_members_are_type_and_range_checked(store, member, value, message):
    group = fmt.open_store_group(store)
    attrs = {fmt.ATTRS_KEY: {**group.attrs.asdict()[fmt.ATTRS_KEY], member: value}}
    with pytest.raises(StoreFormatError, match=message):
        fmt.StoreHeader.from_attrs(attrs)


def test_header_errors_never_echo_control_characters(store):
    group = fmt.open_store_group(store)
    attrs = {fmt.ATTRS_KEY: {**group.attrs.asdict()[fmt.ATTRS_KEY], "format_name": "\x1b[31mevil"}}
    with pytest.raises(StoreFormatError) as error:
        fmt.StoreHeader.from_attrs(attrs)
    assert "\x1b" not in str(error.value) and "evil" in str(error.value)

