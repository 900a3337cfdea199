"""ReinforcedDataset: targets, epochs and slots, resolution, DataLoader workers, light imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from reinforce_loaders import ReinforcedDataset, dense_target
from reinforce_loaders import format as fmt
from reinforce_loaders.rng import slot_for_epoch


def test_dense_and_sparse_targets(digits, store):
    records = fmt.read_all_records(fmt.open_store_group(store))
    sparse = ReinforcedDataset(digits[0], store, target="sparse")
    _, (indices, probs) = sparse[3]
    slot = sparse.slot(3)
    assert np.array_equal(indices.numpy(), records.indices[3, slot])
    assert np.allclose(probs.numpy(), records.probs[3, slot])

    _, renormalized = ReinforcedDataset(digits[0], store)[3]
    assert renormalized.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(renormalized[indices], probs / probs.sum())

    _, spread = ReinforcedDataset(digits[0], store, remaining_mass="spread")[3]
    assert spread.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(spread[indices], probs)
    others = torch.ones(10, dtype=torch.bool)
    others[indices] = False
    assert torch.allclose(spread[others], torch.full((7,), (1 - probs.sum().item()) / 7))


def test_dense_target_of_a_record_whose_probabilities_all_rounded_to_zero_is_its_k_classes_equally():
    indices, probs = torch.tensor([[4, 1, 7], [2, 0, 1]]), torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.3, 0.0]])
    target = dense_target(indices, probs, 10)
    assert torch.allclose(target[0], torch.zeros(10).index_fill_(0, indices[0], 1 / 3))
    assert torch.allclose(target[1, [2, 0, 1]], torch.tensor([0.625, 0.375, 0.0]))
    assert torch.allclose(target.sum(-1), torch.ones(2))


def test_dense_target_spread_when_k_is_all_classes():
    target = dense_target(torch.tensor([2, 0, 1]), torch.tensor([0.5, 0.3, 0.2]), 3, "spread")
    assert torch.allclose(target, torch.tensor([0.3, 0.2, 0.5]))


def test_every_slot_used_once_per_cycle():
    for sample in range(20):
        slots = [slot_for_epoch(1, epoch, sample, 6) for epoch in range(12)]
        assert sorted(slots[:6]) == list(range(6)) and sorted(slots[6:]) == list(range(6))
        assert slots[:6] != slots[6:] or sample > 18  # cycles are permuted independently


def test_set_epoch_changes_slots_and_replay_is_repeatable(digits, store):
    ds = ReinforcedDataset(digits[0], store)
    first = [ds.slot(i) for i in range(len(ds))]
    image_a, target_a = ds[5]
    ds.set_epoch(1)
    assert [ds.slot(i) for i in range(len(ds))] != first
    ds.set_epoch(0)
    image_b, target_b = ds[5]
    assert torch.equal(image_a, image_b) and torch.equal(target_a, target_b)


def test_any_resolution(digits, store):
    for resolution in (16, 48):
        image, _ = ReinforcedDataset(digits[0], store, resolution=resolution)[0]
        assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32


def test_dataloader_workers_follow_set_epoch(digits, store):
    ds = ReinforcedDataset(digits[0], store)
    loader = torch.utils.data.DataLoader(ds, batch_size=9, num_workers=2, persistent_workers=True)
    expected = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        expected[epoch] = torch.stack([ds[i][1] for i in range(len(ds))])
        got = torch.cat([targets for _, targets in loader])
        assert torch.equal(got, expected[epoch])
    assert not torch.equal(expected[0], expected[1])


def test_reinforce_loaders_does_not_import_ray_or_timm():
    code = "import sys, reinforce_loaders; print(sorted(m for m in ('ray', 'timm') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_class_vocabulary_store_gives_the_same_targets(digits, store, vocabulary_store):
    """A store whose indices go through a per-image class vocabulary (2 of the 10 classes, so both positions
    and escaped class ids occur) decodes to the same records and targets as one storing class ids, through
    DataLoader workers too."""
    plain, coded = (fmt.open_store_group(path) for path in (store, vocabulary_store))
    assert fmt.read_header(coded).class_vocabulary_size == 2 and fmt.read_header(plain).class_vocabulary_size == 0
    stored = np.asarray(coded[fmt.RECORDS][:])[..., :3]
    assert (stored < 2).any() and (stored >= 2).any()
    a, b = fmt.read_all_records(plain), fmt.read_all_records(coded)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.probs, b.probs)
    ds = ReinforcedDataset(digits[0], vocabulary_store, target="sparse")
    loader = torch.utils.data.DataLoader(ds, batch_size=9, num_workers=2)
    indices = torch.cat([targets[0] for _, targets in loader])
    slot = ds.slot(0)
    np.testing.assert_array_equal(indices.numpy(), a.indices[:, slot])
