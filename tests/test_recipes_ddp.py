"""reinforce train under torchrun: 2 CPU processes with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from reinforce_loaders.samplers import ReinforcedSampler
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("recipes_ddp_worker.py")


def test_two_process_ddp_splits_samples_and_keeps_ranks_in_step(digits, store, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
               str(digits[0]), str(store), str(digits[1]), str(out)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * (45 // 16)  # equal step counts: no DDP hang
    for epoch in ("0", "1"):
        expected = []  # what a hand-written DDP loop over the loader's sampler would train on, in batches of 8
        for rank in (0, 1):
            sampler = ReinforcedSampler(range(45), seed=5, rank=rank, world_size=2, drop_last=True)
            sampler.set_epoch(int(epoch))
            positions = list(sampler)
            expected.append([positions[start:start + 8] for start in range(0, len(positions) - 7, 8)])
        assert [r["batches"][epoch] for r in ranks] == expected
        first, second = ({p for batch in r["batches"][epoch] for p in batch} for r in ranks)
        assert not first & second and len(first) == len(second) == 16  # disjoint halves of 32 samples
    assert ranks[0]["batches"]["0"] != ranks[0]["batches"]["1"]  # a new order each epoch

    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas' parameters identical
    last = load_file(str(out / "last.safetensors"))  # written by rank 0 only
    assert last["fc.weight"].flatten()[:4].tolist() == ranks[0]["weights"]["fc.weight"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and torch.isfinite(torch.tensor(rows[-1]["train_loss"]))


def test_two_process_ddp_adaptive_ranks_agree_on_the_estimated_lr(digits, store, tmp_path):
    """The LR range test runs on every rank; each must choose the same LR (from the ranks' averaged losses),
    or DDP would average gradients that each rank then applies at its own LR, drifting apart silently."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    pretrained = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(pretrained))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
               str(digits[0]), str(store), str(digits[1]), str(out), str(pretrained)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["lr"] == ranks[1]["lr"]  # before the fix: 0.289 on rank 0, 0.00143 on rank 1
    assert ranks[0]["weights"] == ranks[1]["weights"]
