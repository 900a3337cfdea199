"""Soft-target collate, device-side replay of crops, batch MixUp / CutMix of soft targets, and timm's loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from reinforce_loaders import (Crop, ReinforcedDataset, ReplayTransformError, SoftTargetMixup, replay_crops,
                               soft_target_collate, to_device)
from reinforce_loaders.collate import MixingStoreError
from test_loader_dataset import jpeg_stores, photo_jpegs  # noqa: F401  (module fixtures)


@pytest.mark.parametrize("preset", ["rrc", "rrc+mix"])
@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_crops_replayed_batched_equal_the_dataset_replay(preset, decode, photo_jpegs, jpeg_stores):
    store = jpeg_stores[preset]
    replayed = ReinforcedDataset(photo_jpegs, store, transform=torch.nn.Identity(), decode=decode)
    crops = ReinforcedDataset(photo_jpegs, store, output="crops", decode=decode)
    for ds in (replayed, crops):
        ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(crops, batch_size=6, num_workers=2, collate_fn=soft_target_collate)
    got_images, got_targets = zip(*[(replay_crops(crops.pipeline, batch), targets) for batch, targets in loader])
    want_images, want_targets = soft_target_collate([replayed[i] for i in range(len(replayed))])
    assert torch.equal(torch.cat(got_images), want_images)
    assert torch.equal(torch.cat(got_targets), want_targets)
    batch, _ = next(iter(loader))
    assert isinstance(batch, Crop) and batch.image.dtype == torch.uint8 and batch.image.shape[-1] == 16


def test_collate_keeps_uint8_and_sparse_pairs(digits, store):
    ds = ReinforcedDataset(digits[0], store, transform=torch.nn.Identity(), target="sparse")
    images, (indices, probs) = soft_target_collate([ds[i] for i in range(5)])
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 32, 32)
    assert indices.shape == probs.shape == (5, 3) and probs.dtype == torch.float32
    normalized = to_device(images, "cpu", mean=(0.5,) * 3, std=(0.25,) * 3)
    expected = v2.Normalize((0.5,) * 3, (0.25,) * 3)(images.float() / 255)
    torch.testing.assert_close(normalized, expected)


def test_to_device_refuses_float_images_and_the_dataset_bad_settings_up_front(digits, store):
    floats = ReinforcedDataset(digits[0], store)[0][0][None]  # the default transform: float32 in [0, 1]
    with pytest.raises(TypeError, match="uint8 images .* got torch.float32: .*transform=torch.nn.Identity"):
        to_device(floats, "cpu")
    for resolution in (0, -4, 2.5):
        with pytest.raises(ValueError, match=f"resolution must be a whole number .* got {resolution}"):
            ReinforcedDataset(digits[0], store, resolution=resolution)
    with pytest.raises(ValueError, match="remaining_mass must be one of 'renormalize', 'spread', got 'uniform'"):
        ReinforcedDataset(digits[0], store, remaining_mass="uniform")


def test_soft_target_mixup_mixes_targets_like_pixels():
    images = torch.arange(4, dtype=torch.uint8).mul(60).view(4, 1, 1, 1).expand(4, 3, 20, 20).contiguous()
    targets = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(0)), -1)
    for mixer in (SoftTargetMixup(mixup_alpha=0.0, cutmix_alpha=1.0, seed=5),
                  SoftTargetMixup(mixup_alpha=1.0, cutmix_alpha=0.0, seed=5)):
        for step in range(6):
            mixed, soft = mixer(images, targets, step)
            again = mixer(images, targets, step)
            assert torch.equal(mixed, again[0]) and torch.equal(soft, again[1])  # keyed by (seed, step)
            torch.testing.assert_close(soft.sum(-1), torch.ones(4))
            # lam is recovered from sample 0's pixels (its own value 0, the partner's 180) and matches the targets.
            own_share = 1 - mixed[0].float().mean().item() / 180
            torch.testing.assert_close(soft[0], own_share * targets[0] + (1 - own_share) * targets[3],
                                       atol=3e-3, rtol=0)
    mixer = SoftTargetMixup(seed=5)
    assert not torch.equal(mixer(images, targets, 0)[1], mixer(images, targets, 1)[1])
    with pytest.raises(ValueError, match="dense soft targets"):
        SoftTargetMixup()(images, torch.arange(4), 0)


def test_soft_target_mixup_refuses_stores_that_already_mix(photo_jpegs, jpeg_stores):
    with pytest.raises(MixingStoreError, match="already mixed"):
        SoftTargetMixup.for_dataset(ReinforcedDataset(photo_jpegs, jpeg_stores["rrc+mix"]))
    assert SoftTargetMixup.for_dataset(ReinforcedDataset(photo_jpegs, jpeg_stores["rrc"]), seed=1).seed == 1


def test_timm_create_loader_cannot_re_augment_silently(digits, store):
    from timm.data import create_loader

    strict = ReinforcedDataset(digits[0], store)
    with pytest.raises(ReplayTransformError, match="would augment the replayed images again"):
        create_loader(strict, input_size=(3, 32, 32), batch_size=8, is_training=True, use_prefetcher=False)
    ds = ReinforcedDataset(digits[0], store, transform=torch.nn.Identity(), transform_policy="ignore")
    with pytest.warns(UserWarning, match="ignored"):
        loader = create_loader(ds, input_size=(3, 32, 32), batch_size=8, is_training=False, use_prefetcher=False,
                               collate_fn=soft_target_collate, num_workers=0)
    images, targets = next(iter(loader))
    want_images, want_targets = soft_target_collate([ds[i] for i in range(8)])
    assert torch.equal(images, want_images) and torch.equal(targets, want_targets)
    assert np.allclose(targets.sum(-1).numpy(), 1, atol=1e-5)


def _decoders_agree(paths) -> bool:
    """Whether torchvision's libjpeg-turbo gives Pillow's pixels for every file of ``paths``."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from reinforce_loaders.source import decode_image

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return all(torch.equal(decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB), decode_image(p, "pillow"))
                   for p in paths)


@pytest.mark.parametrize("preset", ["rrc", "rrc+mix"])
def test_gpu_decode_hands_over_files_and_replays_the_exact_batches(preset, photo_jpegs, jpeg_stores, tmp_path):
    """decode="gpu" on a CPU device: the workers read the JPEGs without decoding them (a PNG among them is
    decoded there), the batch is decoded in one call and replayed batched, and it equals
    the exact replay wherever the decoders agree (else it stays within a level on average); targets are equal."""
    import shutil

    from PIL import Image

    from reinforce_loaders import Encoded, replay_encoded

    source = tmp_path / "data"
    shutil.copytree(photo_jpegs, source)
    png = sorted(source.rglob("*.jpg"))[3]
    with Image.open(png) as image:  # the same pixels: the store's fingerprint still matches
        image.convert("RGB").save(png.with_suffix(".png"))
    png.unlink()
    store = jpeg_stores[preset]
    exact = ReinforcedDataset(source, store, transform=torch.nn.Identity())
    on_device = ReinforcedDataset(source, store, decode="gpu")
    for ds in (exact, on_device):
        ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(on_device, batch_size=6, num_workers=2, collate_fn=soft_target_collate)
    batches = list(loader)
    kinds = {tuple(image.ndim for image in batch.image) for batch, _ in batches}
    assert {ndim for kind in kinds for ndim in kind} == {1, 3}  # JPEG bytes, and the PNG decoded in its worker
    got = torch.cat([replay_encoded(on_device.pipeline, batch, "cpu") for batch, _ in batches])
    want_images, want_targets = soft_target_collate([exact[i] for i in range(len(exact))])
    assert torch.equal(torch.cat([targets for _, targets in batches]), want_targets)
    assert got.shape == want_images.shape and got.dtype == torch.uint8
    jpegs = [p for p in source.rglob("*.jpg")]
    if _decoders_agree(jpegs):
        assert torch.equal(got, want_images)
    else:
        assert (got.float() - want_images.float()).abs().mean() < 1.0
    assert isinstance(batches[0][0], Encoded)


def test_gpu_decode_checks_sizes_from_the_header_and_names_an_undecodable_batch(photo_jpegs, jpeg_stores, tmp_path):
    import shutil

    from PIL import Image

    from reinforce_loaders import Encoded, SourceError, SourceMismatchError, replay_encoded

    source = tmp_path / "data"
    shutil.copytree(photo_jpegs, source)
    second = sorted(source.rglob("*.jpg"))[1]  # sample 1: sample 0 is also decoded in full for its fingerprint
    with Image.open(second) as image:
        image.resize((image.width + 1, image.height)).save(second, quality=90)
    ds = ReinforcedDataset(source, jpeg_stores["rrc"], decode="gpu")
    with pytest.raises(SourceMismatchError, match=f"{second.name} is .* but the store was built from one of"):
        ds[1]
    with pytest.raises(ValueError, match="output='crops' crops in the workers, decode='gpu' decodes on the device"):
        ReinforcedDataset(source, jpeg_stores["rrc"], decode="gpu", output="crops")
    sample, _ = ds[2]
    damaged = sample._replace(image=sample.image[:len(sample.image) // 3])
    batch, _ = soft_target_collate([(damaged, torch.zeros(3))])
    with pytest.raises(SourceError, match="could not be decoded on cpu .*--decode exact"):
        replay_encoded(ds.pipeline, batch, "cpu")
    assert isinstance(batch, Encoded)
