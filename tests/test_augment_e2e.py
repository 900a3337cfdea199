"""Every preset through `reinforce build --augment PRESET` and ReinforcedDataset: the student replays the image
the teacher labelled (for mixing presets: with the partner image, mixed as stored)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reinforce.cli import main
from reinforce.build.teachers import create_ensemble
from reinforce_loaders import ReinforcedDataset, make_pipeline
from reinforce_loaders.augment import PRESETS

SIZE = 32


@pytest.fixture(scope="module")
def ensemble(teacher_weights):
    return create_ensemble(teacher_weights)


@pytest.fixture(scope="module")
def stores(digits, teacher_weights, tmp_path_factory):
    """Stores built per preset on first use, shared by this module's tests."""
    built = {}

    def get(preset: str):
        if preset not in built:
            out = tmp_path_factory.mktemp("augment-e2e") / "store.zarr"
            build(digits, teacher_weights, out, preset)
            built[preset] = out
        return built[preset]

    return get


def build(digits, teacher_weights, out, augment: str) -> None:
    teachers = [arg for spec in teacher_weights for arg in ("--teacher", spec)]
    code = main(["build", str(digits[0]), *teachers, "--augment", augment, "--image-size", str(SIZE), "-A", "2",
                 "-k", "3", "--out", str(out), "--seed", "5", "--batch-size", "96", "--block-size", "64",
                 "--no-progress"])
    assert code == 0


def assert_replay_matches_teacher(ds: ReinforcedDataset, ensemble, index: int, slot: int) -> None:
    by_size = {size: ds.replay(index, slot, resolution=size)[0][None] for size in ensemble.input_sizes}
    probs = ensemble.probs(by_size)[0]
    stored_indices, stored_probs = ds.replay(index, slot)[1]
    # The replayed image is the teacher's (bit-exact: tests/test_replay.py), so the teacher's probabilities on it
    # are the stored ones up to their quantization (0.5 / prob_scale) and float noise of batch size 1 vs 96.
    tolerance = 0.5 / ds.header.prob_scale + 1e-5
    torch.testing.assert_close(probs[stored_indices], stored_probs, atol=tolerance, rtol=0)
    assert probs.max() <= stored_probs[0] + tolerance


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds_and_replays_what_the_teacher_saw(preset, digits, ensemble, stores):
    out = stores(preset)
    ds = ReinforcedDataset(digits[0], out, target="sparse", transform=lambda image: image)
    assert ds.header.augmentation == json.loads(json.dumps(make_pipeline(preset, SIZE).config()))
    mixed = 0
    for index in (0, 16, 44):
        for slot in range(2):
            assert_replay_matches_teacher(ds, ensemble, index, slot)
            partners = ds.pipeline.partner_indices(ds.record(index, slot)[0][None])
            mixed += int(partners is not None and partners[0] >= 0)
    assert (mixed > 0) == ds.pipeline.mixes
    # A student at another resolution replays the same store.
    image, target = ReinforcedDataset(digits[0], out, resolution=48)[3]
    assert image.shape == (3, 48, 48) and abs(float(target.sum()) - 1) < 1e-5


@pytest.mark.slow
def test_mixing_replay_needs_the_partner_image(digits, stores):
    out = stores("rrc+mix")
    ds = ReinforcedDataset(digits[0], out, transform=lambda image: image)
    params = ds.record(5, 0)[0]
    partner = int(ds.pipeline.partner_indices(params[None])[0])
    assert partner >= 0 and partner != 5
    own = ds.source.load(5)[0]
    replayed = ds.replay(5, 0)[0]
    # Mixing with another partner image gives other pixels: the replay did use the stored partner.
    other = ds.source.load((partner + 1) % len(ds))[0]
    assert not torch.equal(ds.pipeline.apply(own, params, partner_image=other), replayed)
    assert torch.equal(ds.pipeline.apply(own, params, partner_image=ds.source.load(partner)[0]), replayed)
    loader = torch.utils.data.DataLoader(ReinforcedDataset(digits[0], out), batch_size=16)
    images, targets = next(iter(loader))
    assert images.shape == (16, 3, SIZE, SIZE) and np.allclose(targets.sum(-1).numpy(), 1, atol=1e-5)


@pytest.mark.slow
def test_build_with_a_json_pipeline(digits, teacher_weights, ensemble, tmp_path):
    config = tmp_path / "pipeline.json"
    config.write_text(json.dumps({"ops": [{"name": "random_crop", "crop_fraction": 0.8},
                                          {"name": "augmix", "severity": 2},
                                          {"name": "cutmix", "alpha": 1.0, "p": 0.5}]}))
    out = tmp_path / "custom.zarr"
    build(digits, teacher_weights, out, str(config))
    ds = ReinforcedDataset(digits[0], out, target="sparse", transform=lambda image: image)
    assert [op["name"] for op in ds.header.augmentation["ops"]] == ["random_crop", "augmix", "cutmix"]
    for index in (1, 30):
        assert_replay_matches_teacher(ds, ensemble, index, 1)


def test_unknown_preset_is_a_clear_cli_error(digits, teacher_weights, tmp_path, capsys):
    teachers = [arg for spec in teacher_weights for arg in ("--teacher", spec)]
    code = main(["build", str(digits[0]), *teachers, "--augment", "rrc+everything", "-A", "1", "-k", "1",
                 "--out", str(tmp_path / "x.zarr"), "--no-progress"])
    assert code == 2
    assert "unknown augmentation preset 'rrc+everything'" in capsys.readouterr().err


@pytest.mark.slow
def test_damaged_partner_index_is_a_clear_error(digits, stores, tmp_path):
    import shutil

    import zarr

    from reinforce_loaders import format as fmt
    from reinforce_loaders.errors import StoreFormatError

    out = tmp_path / "damaged.zarr"
    shutil.copytree(stores("rrc+mix"), out)
    ds = ReinforcedDataset(digits[0], out)
    params = ds.record(2, 0)[0].copy()
    params[ds.pipeline.param_names.index("mix.partner")] = 10_000
    height, width = (int(v) for v in ds._image_sizes[2])
    columns = ds.header.layout.columns["aug_params"]
    records = zarr.open_group(str(out), mode="r+")[fmt.RECORDS]
    row = records[2, 0]
    row[columns] = ds.header.layout.params.encode(params[None], np.array([height]), np.array([width]))[0]
    records[2, 0] = row
    with pytest.raises(StoreFormatError, match="mixes with sample 10000"):
        ReinforcedDataset(digits[0], out).replay(2, 0)
