"""Run by tests/test_recipes_ddp.py under torchrun: trains with DDP and writes what this rank did."""

from __future__ import annotations

import json
import os
import sys

import torch

from reinforce.recipes import TrainConfig, train


def main(train_dir: str, store: str, val_dir: str, out: str, pretrained: str = "") -> None:
    """usi for 2 epochs; with ``pretrained`` weights, adaptive for 1 epoch after its LR range test."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    batches: dict[str, list[list[int]]] = {}
    steps = [0]
    trainers = []

    def on_step(trainer, epoch, step):
        if step == 1:
            trainers[:] = [trainer]
            trainer.parts.sampler.set_start(0)  # the loader already holds its iterator; list this rank's epoch
            batches[str(epoch)] = list(trainer.parts.sampler)
        steps[0] += 1

    config = TrainConfig(train_source=train_dir, store=store, val_source=val_dir, model="test_resnet",
                         recipe="usi", epochs=2, batch_size=8, out=out, progress=False, seed=5)
    if pretrained:
        config = TrainConfig(train_source=train_dir, store=store, val_source=val_dir,
                             model=f"test_resnet={pretrained}", recipe="adaptive", epochs=1, warmup_epochs=1,
                             batch_size=4, range_steps=40, lr_range=(1e-4, 1.0), out=out, progress=False, seed=5)
    result = train(config, log=lambda _: None, on_step=on_step)
    # Parameters only: BatchNorm running statistics are per rank (DDP broadcasts rank 0's before each forward).
    weights = {name: tensor.detach().flatten()[:4].tolist() for name, tensor in trainers[0].model.named_parameters()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"batches": batches, "steps": steps[0], "weights": weights, "lr": result.lr}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
