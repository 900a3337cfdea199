"""Augmentation ops: configs, keyed sampling, parameter ranges, odd sources, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from reinforce_loaders import rng
from reinforce_loaders.augment import (OPS, PRESETS, AugmentPipeline, AugMix, CenterCrop, CutMix, HorizontalFlip, Mix,
                                       MixUp, RandAugment, RandomCrop, RandomErasing, RandomResizedCrop,
                                       make_pipeline)
from reinforce_loaders.augment.geometric import _central_crop
from reinforce_loaders.errors import AugmentationError
from reinforce_loaders.source import decode_image

# One instance of every op with non-default arguments, behind a crop when it is not one.
OP_INSTANCES = [
    RandomResizedCrop(scale=(0.2, 0.9), ratio=(0.5, 2.0), resample="antialias"), RandomCrop(0.75), CenterCrop(0.9), HorizontalFlip(0.3),
    RandAugment(num_ops=3, magnitude=12, num_magnitude_bins=21, p=0.8, magnitude_std=1.0), AugMix(severity=2, width=2),
    RandomErasing(p=0.6, scale=(0.05, 0.2), ratio=(0.5, 2.0), value=[10, 20, 30]),
    Mix(mixup_alpha=0.4, cutmix_alpha=0.8, p=0.9, switch_prob=0.3), MixUp(0.3), CutMix(0.7),
]


def pipeline_of(op, size: int = 24) -> AugmentPipeline:
    return AugmentPipeline([op] if op.name in ("random_resized_crop", "random_crop", "center_crop")
                           else [RandomResizedCrop(), op], size)


def sizes_of(shapes):
    return lambda p: shapes[p]


@pytest.mark.parametrize("op", OP_INSTANCES, ids=lambda op: op.name)
def test_config_round_trip(op):
    pipeline = pipeline_of(op)
    config = json.loads(json.dumps(pipeline.config()))
    again = AugmentPipeline.from_config(config)
    assert again.config() == pipeline.config()
    assert again.param_names == pipeline.param_names
    shapes = [(40, 30), (17, 64), (5, 5)]
    first = pipeline.sample_slots(3, 1, 6, *shapes[1], num_samples=3, partner_size=sizes_of(shapes))
    second = again.sample_slots(3, 1, 6, *shapes[1], num_samples=3, partner_size=sizes_of(shapes))
    np.testing.assert_array_equal(first, second)
    # Stored as float32, the parameters decode to exactly what was sampled.
    np.testing.assert_array_equal(first.astype(np.float32).astype(np.float64), first)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_same_key_same_params(preset):
    pipeline = make_pipeline(preset, 32)
    shapes = [(50, 70), (64, 64), (33, 90), (20, 10)]
    kwargs = dict(num_samples=4, partner_size=sizes_of(shapes))
    all_slots = pipeline.sample_slots(11, 2, 5, *shapes[2], **kwargs)
    again = make_pipeline(preset, 32).sample_slots(11, 2, 5, *shapes[2], **kwargs)
    np.testing.assert_array_equal(all_slots, again)
    for slot in range(5):  # one slot at a time gives the same record as all slots at once
        np.testing.assert_array_equal(pipeline.sample(11, 2, slot, *shapes[2], **kwargs), all_slots[slot])
    other_seed = pipeline.sample_slots(12, 2, 5, *shapes[2], **kwargs)
    assert not np.array_equal(all_slots, other_seed)


def test_presets_follow_the_paper():
    names = {preset: [op.name for op in make_pipeline(preset, 224).ops] for preset in PRESETS}
    assert names["cropflip"] == ["random_crop", "horizontal_flip"]
    assert names["rrc"] == ["random_resized_crop", "horizontal_flip"]
    assert names["rrc+ra/re"] == ["random_resized_crop", "horizontal_flip", "rand_augment", "random_erasing"]
    assert names["rrc+mix"] == ["random_resized_crop", "horizontal_flip", "mix"]
    assert names["rrc+m*+r*"][-1] == "mix" and "rand_augment" in names["rrc+m*+r*"]
    ra_re = make_pipeline("rrc+ra/re", 224)
    assert ra_re.ops[2].p == 1.0 and ra_re.ops[2].num_ops == 2 and ra_re.ops[3].p == 0.25
    # Mixing pipelines store the partner's parameters of every op before the mix.
    mix = make_pipeline("rrc+m*+r*", 224)
    assert [n for n in mix.param_names if n.startswith("mix.partner.")] == [
        f"mix.partner.{n}" for n in mix.param_names if n.split(".")[0] in
        ("random_resized_crop", "horizontal_flip", "rand_augment", "random_erasing")]


def _in_codec_range(row: np.ndarray, pipeline, height: int, width: int) -> None:
    """Integer-coded parameters are stored exactly; linear-coded ones lie in their codec's range."""
    from reinforce_loaders.codecs import IntCodec, LinearCodec

    stored = pipeline.param_layout.quantize(row[None], height, width)[0]
    for name, codec, value, back in zip(pipeline.param_names, pipeline.param_layout.codecs, row, stored):
        if isinstance(codec, IntCodec):
            assert value == back, (name, value, back)
        if isinstance(codec, LinearCodec):
            assert codec.lo <= value <= codec.hi, (name, value)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**63), sample=st.integers(0, 9), height=st.integers(1, 500), width=st.integers(1, 500),
       preset=st.sampled_from(sorted(PRESETS)))
def test_sampled_params_in_range(seed, sample, height, width, preset):
    pipeline = make_pipeline(preset, 16)
    shapes = [(height, width)] * 10
    params = pipeline.sample_slots(seed, sample, 3, height, width, num_samples=10, partner_size=sizes_of(shapes))
    assert params.shape == (3, pipeline.num_params)
    for row in params:
        _in_codec_range(row, pipeline, height, width)
        names = dict(zip(pipeline.param_names, row))
        for prefix in ("random_resized_crop", "random_crop", "mix.partner.random_resized_crop"):
            if f"{prefix}.top" in names:  # crops lie inside the source and cover at least one pixel
                assert names[f"{prefix}.top"] + names[f"{prefix}.height"] <= height
                assert names[f"{prefix}.left"] + names[f"{prefix}.width"] <= width
                assert names[f"{prefix}.height"] >= 1 and names[f"{prefix}.width"] >= 1
        if "mix.partner" in names and names["mix.partner"] >= 0:
            assert names["mix.partner"] != sample and names["mix.partner"] < 10
        if "augmix.weight0" in names:
            assert sum(v for n, v in names.items() if n.startswith("augmix.weight")) == pytest.approx(1, abs=1e-6)
        if "random_erasing.height" in names:
            assert names["random_erasing.top"] + names["random_erasing.height"] <= 1 + 1e-6


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), height=st.integers(20, 400), width=st.integers(20, 400))
def test_rrc_follows_scale_and_ratio(seed, height, width):
    op = RandomResizedCrop(scale=(0.25, 0.5), ratio=(0.75, 4 / 3))
    top, left, h, w = op.sample(rng.slot_uniforms(seed, 0, 0, 0), height, width)
    area = h * w
    fallback = _central_crop(height, width, op.ratio)
    if not np.allclose([top, left, h, w], fallback):  # a fitted try
        assert 0.25 - 0.1 <= area / (height * width) <= 0.5 + 0.1
        aspect = w / h
        assert 0.75 * 0.8 <= aspect <= 4 / 3 * 1.25


def test_sampling_statistics():
    """Probabilities of the paper: flip 0.5, erasing 0.25, CutMix vs MixUp 0.5, RandAugment p=1 always applies."""
    pipeline = make_pipeline("rrc+m*+r*", 32)
    shapes = [(40, 40)] * 50
    params = np.concatenate([pipeline.sample_slots(0, i, 40, 40, 40, num_samples=50, partner_size=sizes_of(shapes))
                             for i in range(50)])
    col = {name: params[:, k] for k, name in enumerate(pipeline.param_names)}
    assert abs(col["horizontal_flip.flip"].mean() - 0.5) < 0.05
    assert abs((col["random_erasing.height"] > 0).mean() - 0.25) < 0.05
    assert abs((col["mix.mode"] == 2).mean() - 0.5) < 0.05
    assert (col["mix.partner"] >= 0).all()
    assert len(np.unique(col["mix.partner"])) == 50
    # p=1: the identity is only drawn as one of the 14 ops (1/14), never because the op was skipped.
    assert abs((col["rand_augment.op0"] == 0).mean() - 1 / 14) < 0.03
    mixup = col["mix.mode"] == 1
    assert abs(col["mix.lam"][mixup].mean() - 0.5) < 0.05  # Beta(0.2, 0.2) is symmetric around 0.5
    assert ((col["mix.lam"][mixup] < 0.1) | (col["mix.lam"][mixup] > 0.9)).mean() > 0.5  # and U-shaped


def test_beta_sampler_matches_moments():
    from reinforce_loaders.augment.base import beta_sample

    for alpha in (0.2, 0.5, 1.0):
        draws = np.array([beta_sample(rng.uniforms(5, i, 0, 0, 64), alpha) for i in range(3000)])
        assert abs(draws.mean() - 0.5) < 0.03
        assert abs(draws.var() - 1 / (4 * (2 * alpha + 1))) < 0.02


@pytest.mark.parametrize("shape", [(1, 1), (3, 50), (50, 3), (1, 1000), (1000, 2), (7, 7)])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tiny_and_extreme_images(shape, preset):
    pipeline = make_pipeline(preset, 16)
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    params = pipeline.sample_slots(0, 0, 3, *shape, num_samples=2, partner_size=lambda p: shape)
    for row in params:
        out = pipeline.apply(image, row, partner_image=image)
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert pipeline.apply(image, params[0], size=1, partner_image=image).shape == (3, 1, 1)


def test_odd_sources_decode_and_replay(tmp_path):
    gray16 = Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50))
    assert gray16.mode.startswith("I;16")
    palette = Image.new("P", (30, 20))
    palette.putpalette([i % 256 for i in range(768)])
    palette_alpha = palette.copy()
    palette_alpha.info["transparency"] = 3
    exif_image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif_image.paste((255, 255, 255), (0, 0, 20, 20))
    exif = exif_image.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    files = {"gray16.png": (gray16, {}), "gray.png": (Image.new("L", (9, 4), 77), {}), "palette.png": (palette, {}),
             "palette_alpha.png": (palette_alpha, {}), "rgba.png": (Image.new("RGBA", (25, 35), (200, 100, 50, 128)), {}),
             "exif.jpg": (exif_image, {"exif": exif.tobytes(), "quality": 95}), "one.png": (Image.new("RGB", (1, 1)), {})}
    pipeline = make_pipeline("rrc+m*+r*", 20)
    decoded = {}
    for name, (pil, save_args) in files.items():
        pil.save(tmp_path / name, **save_args)
        image = decode_image(tmp_path / name)
        assert image.shape[0] == 3 and image.dtype == torch.uint8, name
        decoded[name] = image
        h, w = image.shape[1:]
        params = pipeline.sample_slots(1, 0, 4, h, w, num_samples=2, partner_size=lambda p: (h, w))
        for row in params:
            single = pipeline.apply(image, row, partner_image=image)
            batched = pipeline.apply_batch([image, image], np.stack([row, row]), partner_images=[image, image])
            assert torch.equal(single, batched[0]) and torch.equal(single, batched[1]), name
    # EXIF orientation 6 turns the 40x20 (w x h) image upright to 20 wide, 40 high, white half on top.
    assert decoded["exif.jpg"].shape == (3, 40, 20)
    assert decoded["exif.jpg"][:, :18].float().mean() > 200 and decoded["exif.jpg"][:, 22:].float().mean() < 50
    assert int(decoded["gray16.png"].max()) > 200  # 16-bit values scaled to 8 bits, not clipped


def test_crop_box_is_exact_on_an_identity_resample():
    image = torch.arange(3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 8, 8)
    pipeline = AugmentPipeline([RandomCrop(0.5)], 4)
    params = np.array([[2, 3, 4, 4]])
    assert torch.equal(pipeline.apply(image, params[0]), image[:, 2:6, 3:7])
    flipped = AugmentPipeline([CenterCrop(1.0), HorizontalFlip(1.0)], 8).apply(image, [1.0])
    assert torch.equal(flipped, image.flip(-1))


def test_erasing_and_cutmix_boxes_scale_with_resolution():
    pipeline = AugmentPipeline([CenterCrop(1.0), RandomErasing(p=1.0, value=0)], 8)
    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    params = [0.25, 0.5, 0.5, 0.25]
    for size in (8, 16, 40):
        out = pipeline.apply(image, params, size=size)
        erased = (out[0] == 0).float()
        assert erased.mean().item() == pytest.approx(0.5 * 0.25, abs=1.5 / size)
        assert erased[size // 4 + 1, size // 2 + 1] == 1


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(AugmentationError, match="unknown augmentation preset"):
        make_pipeline("nope")
    with pytest.raises(AugmentationError, match="first op of a pipeline must be a crop"):
        AugmentPipeline([HorizontalFlip()], 8)
    with pytest.raises(AugmentationError, match="at most one mixing op"):
        AugmentPipeline([RandomResizedCrop(), MixUp(), CutMix()], 8)
    with pytest.raises(AugmentationError, match="scale"):
        RandomResizedCrop(scale=(0.5, 0.1))
    with pytest.raises(AugmentationError, match="resample must be one of"):
        RandomCrop(resample="bicubic")
    with pytest.raises(AugmentationError, match="alpha=1.0 only"):
        AugMix(alpha=0.5)
    with pytest.raises(AugmentationError, match="unknown augmentation op"):
        AugmentPipeline.from_config({"size": 8, "ops": [{"name": "random_resized_crop"}, {"name": "warp"}]})
    with pytest.raises(AugmentationError, match="bad arguments"):
        AugmentPipeline.from_config({"size": 8, "ops": [{"name": "random_resized_crop", "scael": [0.1, 1]}]})
    mixing = make_pipeline("rrc+mix", 8)
    with pytest.raises(AugmentationError, match="num_samples and partner_size"):
        mixing.sample_slots(0, 0, 2, 10, 10)
    params = mixing.sample_slots(0, 0, 2, 10, 10, num_samples=3, partner_size=lambda p: (10, 10))
    with pytest.raises(AugmentationError, match="partner images"):
        mixing.apply_batch([torch.zeros(3, 10, 10, dtype=torch.uint8)] * 2, params)
    with pytest.raises(AugmentationError, match="shape"):
        make_pipeline("rrc", 8).apply(torch.zeros(3, 10, 10, dtype=torch.uint8), [0.0, 0.0, 1.0])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AugmentationError, match="not valid JSON"):
        make_pipeline(str(bad))


def test_custom_pipeline_from_json_file(tmp_path):
    config = {"ops": [{"name": "random_resized_crop", "scale": [0.35, 1.0]}, {"name": "horizontal_flip"},
                      {"name": "rand_augment", "num_ops": 1, "magnitude": 5, "magnitude_std": 0.0},
                      {"name": "cutmix", "alpha": 1.0, "p": 0.5}]}
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(config))
    pipeline = make_pipeline(str(path), 48)
    assert pipeline.size == 48 and pipeline.mixes
    assert [op.name for op in pipeline.ops] == ["random_resized_crop", "horizontal_flip", "rand_augment", "cutmix"]
    assert pipeline.ops[0].scale == (0.35, 1.0)
    assert AugmentPipeline.from_config(pipeline.config()).config() == pipeline.config()


def test_every_op_is_registered():
    assert {op.name for op in OP_INSTANCES} == set(OPS)


def test_partner_params_are_sampled_for_the_partners_size():
    pipeline = make_pipeline("rrc+mix", 32)
    wide = pipeline.sample_slots(4, 0, 6, 50, 50, num_samples=2, partner_size=lambda p: (20, 400))
    square = pipeline.sample_slots(4, 0, 6, 50, 50, num_samples=2, partner_size=lambda p: (100, 100))
    own = [k for k, n in enumerate(pipeline.param_names) if not n.startswith("mix.partner.")]
    partner = [k for k, n in enumerate(pipeline.param_names) if n.startswith("mix.partner.random_resized_crop")]
    np.testing.assert_array_equal(wide[:, own], square[:, own])
    assert not np.array_equal(wide[:, partner], square[:, partner])
    # In partner pixels the wide partner's crops keep RandomResizedCrop's aspect ratios (3/4..4/3) where fitted.
    names = pipeline.param_names
    h = wide[:, names.index("mix.partner.random_resized_crop.height")]
    w = wide[:, names.index("mix.partner.random_resized_crop.width")]
    assert (h <= 20).all() and (w <= 400).all()
    assert ((w / h > 0.7) & (w / h < 1.4)).all()


def test_mix_partner_is_uniform_over_the_pool_without_the_sample_itself():
    pipeline = make_pipeline("rrc+mix", 32)
    mix = pipeline.ops[pipeline.mix_index]
    pool = np.array([2, 5, 7, 11, 13])
    for sample, others in ((7, [2, 5, 11, 13]), (8, [2, 5, 7, 11, 13])):
        u = np.full(64, 0.5)
        u[0] = 0.0  # mixed
        drawn = []
        for t in range(len(others)):
            u[1] = (t + 0.5) / len(others)
            drawn.append(int(mix.sample_mix(u, sample, 100, pool)[0]))
        assert drawn == others  # each candidate once over an even grid of draws


def test_stores_of_another_arithmetic_are_refused_naming_both_versions():
    """A store header's augmentation (it has param_names) without ``arithmetic`` was built with arithmetic 1
    (float, device-dependent pixels): refused, saying what to do; an unknown version is refused; this version's
    config and a hand-written config without the member are accepted."""
    from reinforce_loaders.augment.pipeline import ARITHMETIC_VERSION

    config = make_pipeline("rrc+ra/re", 32).config()
    assert config["arithmetic"] == ARITHMETIC_VERSION == 2
    assert AugmentPipeline.from_config(config).config() == config
    old = {key: value for key, value in config.items() if key != "arithmetic"}
    with pytest.raises(AugmentationError) as raised:
        AugmentPipeline.from_config(old)
    message = str(raised.value)
    assert "arithmetic 1" in message and "arithmetic 2" in message and "Rebuild" in message and "0.1.0" in message
    for version in (3, "2", True, None):
        with pytest.raises(AugmentationError, match="arithmetic"):
            AugmentPipeline.from_config({**config, "arithmetic": version})
    hand_written = {"size": 32, "ops": config["ops"]}
    assert AugmentPipeline.from_config(hand_written).config() == config
