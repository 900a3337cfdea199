"""ReinforcedDataset loading paths: batched replay, decode="fast", the file-mapped epoch table, decoder agreement,
transforms that would re-augment."""

from __future__ import annotations

import gc
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import v2

from conftest import build_store
from reinforce_loaders import ReinforcedDataset, SourceMismatchError
from reinforce_loaders import source as source_module
from reinforce_loaders.dataset import FAST_FINGERPRINT_EVERY, ReplayTransformError
from reinforce_loaders import jpeg as fast_jpeg
from reinforce_loaders.source import reduced_scale

RESOLUTION = 16


@pytest.fixture(scope="module")
def photo_jpegs(tmp_path_factory) -> Path:
    """An ImageFolder of 16 JPEGs (quality 90) cut from scikit-learn's two photos, 90-200 px a side."""
    root = tmp_path_factory.mktemp("photos") / "data"
    generator = np.random.default_rng(3)
    for i in range(16):
        photo = load_sample_images().images[i % 2]
        h, w = int(generator.integers(90, 200)), int(generator.integers(90, 200))
        top, left = int(generator.integers(0, photo.shape[0] - h)), int(generator.integers(0, photo.shape[1] - w))
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top:top + h, left:left + w]).save(folder / f"{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpeg_stores(photo_jpegs, teacher_weights, tmp_path_factory) -> dict[str, Path]:
    """rrc and rrc+mix stores of the JPEGs at 16 px, so most crops are downscaled 2x or more (the 10-class
    teachers on the 3 folders on purpose: teacher_classes="all")."""
    out = tmp_path_factory.mktemp("jpeg-stores")
    return {preset: build_store(photo_jpegs, out / f"{preset.replace('+', '_')}.zarr", teacher_weights,
                                augment=preset, image_size=RESOLUTION, num_augmentations=2, block_size=8,
                                teacher_classes="all")
            for preset in ("rrc", "rrc+mix")}


def uint8_dataset(source, store, **options) -> ReinforcedDataset:
    return ReinforcedDataset(source, store, transform=torch.nn.Identity(), target="sparse", **options)


def assert_same_samples(got, want) -> None:
    assert len(got) == len(want)
    for (image_a, (indices_a, probs_a)), (image_b, (indices_b, probs_b)) in zip(got, want):
        assert torch.equal(image_a, image_b)
        assert torch.equal(indices_a, indices_b) and torch.equal(probs_a, probs_b)


@pytest.mark.parametrize("preset", ["rrc", "rrc+mix"])
def test_batched_getitems_equals_one_sample_at_a_time(preset, photo_jpegs, jpeg_stores):
    ds = uint8_dataset(photo_jpegs, jpeg_stores[preset])
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        positions = [5, 0, 15, 7, 7, 3]
        assert_same_samples(ds.__getitems__(positions), [ds[p] for p in positions])


def test_dataloader_uses_batched_replay_and_matches_in_process(photo_jpegs, jpeg_stores):
    ds = uint8_dataset(photo_jpegs, jpeg_stores["rrc+mix"])
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    images = torch.cat([batch[0] for batch in loader])
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(len(ds))]))


@pytest.mark.parametrize("backend", ["libjpeg-turbo", "pillow"])
def test_fast_decode_crops_reduced_jpegs_close_to_exact(photo_jpegs, jpeg_stores, backend, monkeypatch):
    turbo = backend == "libjpeg-turbo"
    if turbo and not fast_jpeg.available():
        pytest.skip("simplejpeg (the [fast] extra) is not installed")
    if not turbo:
        monkeypatch.setattr(fast_jpeg, "simplejpeg", None)  # Pillow's draft mode, as without the extra
    for preset, store in jpeg_stores.items():
        exact, fast = (uint8_dataset(photo_jpegs, store, decode=mode) for mode in ("exact", "fast"))
        full_scale, differences = [], []
        for epoch in (0, 1):
            exact.set_epoch(epoch)
            fast.set_epoch(epoch)
            for index in range(len(exact)):
                (a, (ia, pa)), (b, (ib, pb)) = exact[index], fast[index]
                assert torch.equal(ia, ib) and torch.equal(pa, pb)  # targets never change
                difference = (a.float() - b.float()).abs().mean().item()
                box = exact.record(index, exact.slot(index))[0][:4]
                if reduced_scale(box, RESOLUTION) == 1 and preset == "rrc":
                    full_scale.append(difference)
                differences.append(difference)
        # Not downscaled 2x: Pillow's path decodes in full (exact); libjpeg-turbo's differs by its plain chroma
        # upsampling alone.
        assert all(d < 1.5 if turbo else d == 0 for d in full_scale), full_scale
        # At 16 px, the turbo path's box, whole pixels of an image reduced up to 8x, is up to half an output
        # pixel off (about 2 levels at 224 px: benchmarks/RESULTS.md); Pillow's resamples the sub-pixel box.
        assert 0 < np.mean(differences) < (5 if turbo else 2) and max(differences) < 20, (preset, differences)


def test_fast_decode_checks_image_sizes_and_some_fingerprints(photo_jpegs, jpeg_stores, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(photo_jpegs, copy)
    ds = uint8_dataset(copy, jpeg_stores["rrc"], decode="fast")
    index = next(i for i in range(1, len(ds)) if i % FAST_FINGERPRINT_EVERY
                 and reduced_scale(ds.record(i, ds.slot(i))[0][:4], RESOLUTION) > 1)
    path = Path(ds.source.name_of(index))
    with Image.open(path) as image:
        image.crop((0, 0, image.width - 8, image.height)).save(path, quality=90)  # another image in its place
    with pytest.raises(SourceMismatchError, match="pixels but the store was built from one of"):
        ds[index]
    assert ds[0] is not None and ds._table.verified[0]  # sample 0 is fully decoded once and fingerprinted


def use_binding(binding: str, monkeypatch) -> str:
    """Make ``binding`` the JPEG decoder ``decode_image`` tries first; the name of its agreement flag."""
    if binding == "simplejpeg" and not fast_jpeg.available():
        pytest.skip("simplejpeg (the [fast] extra) is not installed")
    if binding == "torchvision":
        monkeypatch.setattr(fast_jpeg, "simplejpeg", None)
    return "turbo" if binding == "simplejpeg" else "agrees"


@pytest.mark.parametrize("binding", ["simplejpeg", "torchvision"])
def test_jpeg_binding_that_disagrees_falls_back_to_pillow(photo_jpegs, jpeg_stores, binding, monkeypatch):
    flag = use_binding(binding, monkeypatch)
    reference = uint8_dataset(photo_jpegs, jpeg_stores["rrc"], verify="none")
    want = [reference[i] for i in range(4)]
    monkeypatch.setattr(source_module._LibjpegAgreement, flag, True)  # as if a probe had passed
    if binding == "simplejpeg":
        real = fast_jpeg.decode_exact
        monkeypatch.setattr(fast_jpeg, "decode_exact", lambda *args: real(*args) ^ 1)
    else:
        real = source_module.decode_jpeg
        monkeypatch.setattr(source_module, "decode_jpeg", lambda *args, **kwargs: real(*args, **kwargs) ^ 1)
    ds = uint8_dataset(photo_jpegs, jpeg_stores["rrc"])
    assert_same_samples([ds[i] for i in range(4)], want)
    assert getattr(source_module._LibjpegAgreement, flag) is False
    assert ds._table.pillow_only[0]  # DataLoader workers that still trust the binding see this too
    monkeypatch.setattr(source_module._LibjpegAgreement, flag, True)
    assert_same_samples([ds[i] for i in range(4)], want)


@pytest.mark.parametrize("binding", ["simplejpeg", "torchvision"])
def test_jpeg_binding_is_probed_before_use(photo_jpegs, binding, monkeypatch):
    flag = use_binding(binding, monkeypatch)
    monkeypatch.setattr(source_module._LibjpegAgreement, flag, None)
    path = next(photo_jpegs.rglob("*.jpg"))
    with Image.open(path) as image:
        pillow = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(source_module.decode_image(path), pillow)
    assert getattr(source_module._LibjpegAgreement, flag) is not None  # probed (True where versions agree)
    assert torch.equal(source_module.decode_image(path, decoder="pillow"), pillow)
    if binding == "simplejpeg":  # a probe that fails keeps the binding off for good
        monkeypatch.setattr(source_module._LibjpegAgreement, flag, None)
        real = fast_jpeg.decode_exact
        monkeypatch.setattr(fast_jpeg, "decode_exact", lambda *args: real(*args) ^ 1)
        assert torch.equal(source_module.decode_image(path), pillow)
        assert source_module._LibjpegAgreement.turbo is False


def test_epoch_table_is_a_file_mapping_shared_with_workers_and_removed(digits, store, tmp_path, monkeypatch):
    def no_shared_memory(self):
        raise RuntimeError("/dev/shm is full")

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_shared_memory)
    ds = ReinforcedDataset(digits[0], store, table_dir=tmp_path)
    (table,) = tmp_path.glob("reinforce-epoch-table-*")
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, persistent_workers=True)
    for epoch in (0, 2):
        ds.set_epoch(epoch)
        got = torch.cat([targets for _, targets in loader])
        assert torch.equal(got, torch.stack([ds[i][1] for i in range(len(ds))]))
        assert (ds._block_epoch == epoch).all()  # the workers filled the table this process reads
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets: the same file, mapped again
    ds.set_epoch(3)
    assert copy.epoch == 3
    del loader, ds, copy
    gc.collect()
    assert not table.exists()


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare to mount a small /dev/shm")
def test_dataset_loads_with_a_tiny_dev_shm(digits, store):
    code = textwrap.dedent(f"""
        import torch
        from reinforce_loaders import ReinforcedDataset
        try:
            torch.zeros(1 << 16).share_memory_()
            raise SystemExit("the /dev/shm limit did not bite")
        except RuntimeError:
            pass
        ds = ReinforcedDataset({str(digits[0])!r}, {str(store)!r})
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            assert len([ds[i] for i in range(len(ds))]) == len(ds)
        print("ok")
    """)
    namespace = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
    mount = "mount -t tmpfs -o size=4k tmpfs /dev/shm"
    probe = subprocess.run(namespace + [mount], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a small /dev/shm here: {probe.stderr.strip()[:200]}")
    result = subprocess.run(namespace + [f"{mount} && exec {sys.executable} -c \"$0\"", code],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_transform_that_would_augment_again_is_refused_or_ignored(digits, store):
    ds = ReinforcedDataset(digits[0], store)
    with pytest.raises(ReplayTransformError, match="RandomResizedCrop.*transform_policy='ignore'"):
        ds.transform = v2.Compose([v2.RandomResizedCrop(32), v2.ToDtype(torch.float32, scale=True)])
    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    ds.transform = normalize  # dtype and normalization are fine
    lenient = ReinforcedDataset(digits[0], store, transform=normalize, transform_policy="ignore")
    with pytest.warns(UserWarning, match="RandomHorizontalFlip.*ignored"):
        lenient.transform = v2.RandomHorizontalFlip()
    assert lenient.transform is normalize
    assert torch.equal(lenient[3][0], ds[3][0])


def test_fast_decode_does_not_depend_on_which_load_checks_the_fingerprint(photo_jpegs, jpeg_stores):
    """Sample 0 is fingerprinted in full on its first load in fast mode; its replay must not change with that."""
    probe = uint8_dataset(photo_jpegs, jpeg_stores["rrc"], decode="fast")
    epoch = next(e for e in range(8) if reduced_scale(probe.record(0, probe.slot(0, e))[0][:4], RESOLUTION) > 1)
    first, later = (uint8_dataset(photo_jpegs, jpeg_stores["rrc"], decode="fast") for _ in range(2))
    for ds in (first, later):
        ds.set_epoch(epoch)
    later[0]  # the fingerprint check happens here
    assert not first._table.verified[0] and later._table.verified[0]
    assert_same_samples([first[0]], [later[0]])
