"""ReinforcedSampler: mid-epoch resume with another worker count, the two known resume bugs of other loaders
(an epoch dropped on load: meta-pytorch/data #1437; shortened epochs after resuming with persistent workers:
huggingface/datasets #7447), and a 2-process gloo split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reinforce_loaders import ReinforcedDataset
from reinforce_loaders.samplers import ReinforcedSampler, SamplerStateError
from test_loader_dataset import jpeg_stores, photo_jpegs  # noqa: F401  (module fixtures)

BATCH = 4


def loader_of(dataset, sampler, workers: int, persistent: bool = False):
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
                                       persistent_workers=persistent and workers > 0)


def run_epoch(sampler, loader, epoch: int, stop_after: int | None = None):
    """Targets of each batch of ``epoch``; with ``stop_after``, also the sampler state saved after that batch."""
    sampler.set_epoch(epoch)
    batches, state = [], None
    for step, (_, targets) in enumerate(sampler.track(loader)):
        batches.append(targets)
        if step + 1 == stop_after:
            state = json.loads(json.dumps(sampler.state_dict()))  # as a checkpoint stores it
    return batches, state


def test_resume_mid_epoch_with_another_worker_count_then_whole_epochs(digits, store):
    dataset = ReinforcedDataset(digits[0], store)
    sampler = ReinforcedSampler(dataset, seed=3)
    full, state = run_epoch(sampler, loader_of(dataset, sampler, workers=2), epoch=5, stop_after=5)
    assert state["epoch"] == 5 and state["position"] == 5 * BATCH
    following, _ = run_epoch(sampler, loader_of(dataset, sampler, workers=2), epoch=6)

    # A new process: fresh dataset and sampler, 1 persistent worker instead of 2.
    dataset2 = ReinforcedDataset(digits[0], store)
    sampler2 = ReinforcedSampler(dataset2, seed=3)
    sampler2.load_state_dict(state)
    assert sampler2.resume_epoch == 5 and dataset2.epoch == 5  # the stored slots of epoch 5 are selected
    loader2 = loader_of(dataset2, sampler2, workers=1, persistent=True)
    rest, _ = run_epoch(sampler2, loader2, epoch=5)
    assert torch.equal(torch.cat(rest), torch.cat(full[5:]))  # same order, same stored slots
    for _ in range(2):  # later epochs are whole again (the persistent workers are reused)
        again, _ = run_epoch(sampler2, loader2, epoch=6)
        assert torch.equal(torch.cat(again), torch.cat(following)) and len(torch.cat(again)) == len(dataset)


def test_state_saved_at_the_end_of_an_epoch_drops_and_repeats_nothing(digits, store):
    dataset = ReinforcedDataset(digits[0], store)
    sampler = ReinforcedSampler(dataset, seed=1)
    run_epoch(sampler, loader_of(dataset, sampler, workers=0), epoch=2)
    state = sampler.state_dict()
    assert state["position"] == len(dataset)

    resumed = ReinforcedSampler(dataset, seed=1)
    resumed.load_state_dict(state)
    assert resumed.resume_epoch == 3
    resumed.set_epoch(2)
    assert len(resumed) == 0 and list(resumed) == []  # epoch 2 was complete
    resumed.set_epoch(3)
    fresh = ReinforcedSampler(dataset, seed=1)
    fresh.set_epoch(3)
    assert list(resumed) == list(fresh) and sorted(fresh) == list(range(len(dataset)))


@pytest.mark.parametrize("where", ["loader", "sampler"])
def test_an_epoch_that_drop_last_cut_short_is_complete_once_its_last_batch_is_handed_out(digits, store, where):
    """45 samples in batches of 4 with the DataLoader's drop_last (44 trained), or 2 ranks with the sampler's
    (22 each): the state saved with the last batch, or after the loop, resumes at the next epoch."""
    dataset = ReinforcedDataset(digits[0], store)
    sampler = ReinforcedSampler(dataset, seed=1, rank=0, world_size=2 if where == "sampler" else 1,
                                drop_last=where == "sampler", check_epochs=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler,
                                         drop_last=where == "loader")
    sampler.set_epoch(2)
    saved = [sampler.state_dict() for _ in sampler.track(loader)]
    assert saved[-2]["position"] < len(dataset) and saved[-1]["position"] == len(dataset)
    assert sampler.state_dict()["position"] == len(dataset)
    resumed = ReinforcedSampler(dataset, seed=1, rank=0, world_size=sampler.world_size, drop_last=sampler.drop_last,
                                check_epochs=False)
    resumed.load_state_dict(saved[-1])
    assert resumed.resume_epoch == 3  # not an empty re-run of epoch 2


def test_iterating_again_without_set_epoch_gives_a_whole_pass(digits, store):
    dataset = ReinforcedDataset(digits[0], store)
    sampler = ReinforcedSampler(dataset, seed=1)
    sampler.load_state_dict({**sampler.state_dict(), "position": 40})
    assert len(list(sampler)) == 5
    assert len(sampler) == len(dataset) and len(list(sampler)) == len(dataset)


def test_foreign_state_is_refused(digits, store):
    sampler = ReinforcedSampler(ReinforcedDataset(digits[0], store), seed=1)
    with pytest.raises(SamplerStateError, match="seed=2 but this sampler has 1"):
        sampler.load_state_dict({**sampler.state_dict(), "seed": 2})
    with pytest.raises(SamplerStateError, match="num_samples"):
        sampler.load_state_dict({**sampler.state_dict(), "num_samples": 7})


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_evenly_and_disjointly(drop_last):
    shares = []
    for rank in range(3):
        sampler = ReinforcedSampler(range(10), seed=4, rank=rank, world_size=3, drop_last=drop_last)
        sampler.set_epoch(1)
        shares.append(list(sampler))
    assert {len(share) for share in shares} == {3 if drop_last else 4}
    together = sum(shares, [])
    if drop_last:
        assert len(set(together)) == 9
    else:
        assert set(together) == set(range(10)) and len(together) == 12  # two samples repeated as padding


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {}
        for drop_last in (False, True):
            sampler = ReinforcedSampler(range(45), seed=9, drop_last=drop_last)
            sampler.set_epoch(2)
            result[f"drop_last={drop_last}"] = list(sampler)
        sampler = ReinforcedSampler(range(45), seed=9)
        sampler.set_epoch(2)
        result["state"] = sampler.state_dict(samples_consumed=10)  # both ranks trained 10 samples
        try:
            sampler.set_epoch(3 + rank)  # ranks disagree on the epoch
            result["mismatch"] = "not detected"
        except SamplerStateError as error:
            result["mismatch"] = str(error)
        with open(f"{out_dir}/rank{rank}.json", "w") as file:
            json.dump(result, file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_split_disjointly_agree_on_epochs_and_resume_elastically(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    padded = [r["drop_last=False"] for r in ranks]
    assert len(padded[0]) == len(padded[1]) == 23 and set(padded[0] + padded[1]) == set(range(45))
    dropped = [r["drop_last=True"] for r in ranks]
    assert len(dropped[0]) == len(dropped[1]) == 22 and not set(dropped[0]) & set(dropped[1])
    assert all("ranks disagree on the epoch" in r["mismatch"] for r in ranks)

    state = ranks[0]["state"]
    assert state == ranks[1]["state"] and state["position"] == 20 and state["world_size"] == 2
    single = ReinforcedSampler(range(45), seed=9, rank=0, world_size=1)  # resumed on one process
    single.load_state_dict(state)
    single.set_epoch(2)
    consumed = padded[0][:10] + padded[1][:10]
    rest = list(single)
    assert len(rest) == 25 and sorted(consumed + rest) == list(range(45))
    assert np.array_equal(single.order(2)[20:], rest)


def test_paired_partners_are_adjacent_and_decoded_once_per_batch(photo_jpegs, jpeg_stores, monkeypatch):
    dataset = ReinforcedDataset(photo_jpegs, jpeg_stores["rrc+mix"], transform=torch.nn.Identity())
    sampler = ReinforcedSampler(dataset, seed=2, pair_partners=True)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(len(dataset)))
    partners = dataset.partner_positions(1)

    def images_decoded(sequence: list[int]) -> int:
        return sum(len(set(batch) | {int(partners[p]) for p in batch if partners[p] >= 0})
                   for batch in (sequence[first:first + 8] for first in range(0, len(sequence), 8)))

    shuffled = ReinforcedSampler(dataset, seed=2)
    shuffled.set_epoch(1)
    assert images_decoded(order) < images_decoded(list(shuffled)) and images_decoded(order) <= 1.25 * len(order)
    ranks = [ReinforcedSampler(dataset, seed=2, pair_partners=True, rank=r, world_size=2) for r in range(2)]
    for rank in ranks:
        rank.set_epoch(1)
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(len(dataset)))
    with pytest.raises(SamplerStateError, match="resume with 2 ranks"):
        sampler.load_state_dict(ranks[0].state_dict(samples_consumed=4))

    loads = []
    load = dataset.source.load
    monkeypatch.setattr(dataset.source, "load",
                        lambda index, *args, **kwargs: loads.append(index) or load(index, *args, **kwargs))
    batch = order[:8]
    samples = dataset.__getitems__(batch)
    needed = set(batch) | {int(partners[p]) for p in batch if partners[p] >= 0}
    assert sorted(loads) == sorted(needed)  # each image of the batch decoded once, own or partner
    reference = ReinforcedDataset(photo_jpegs, jpeg_stores["rrc+mix"], transform=torch.nn.Identity())
    reference.set_epoch(1)
    for position, (image, target) in zip(batch, samples):
        want_image, want_target = reference[position]
        assert torch.equal(image, want_image) and torch.equal(target, want_target)


@pytest.mark.parametrize("backend, expected", [
    ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("mpi", "cpu"), ("nccl", "cuda:0"),
])
def test_the_rank_check_puts_its_tensor_where_the_process_group_can_carry_it(monkeypatch, backend, expected):
    import torch

    from reinforce_loaders.samplers import collective_device

    monkeypatch.setattr(torch.distributed, "get_backend", lambda *args: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # An NCCL-only group (the usual init_process_group("nccl")) carries no CPU tensors.
    assert collective_device() == torch.device(expected)
