"""The adaptive recipe end to end: pretrained weights, LR estimation, SGD + SAM, ReduceLROnPlateauV2."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from reinforce.recipes import TrainConfig, TrainError, train


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 1000-class test_resnet checkpoint standing in for ImageNet weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(path))
    return path


def _adaptive(digits, store, out, pretrained, **overrides) -> TrainConfig:
    settings = dict(train_source=str(digits[0]), store=str(store), val_source=str(digits[1]),
                    model=f"test_resnet={pretrained}", recipe="adaptive", epochs=3, warmup_epochs=1, batch_size=8,
                    range_steps=30, out=str(out), progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_adaptive_with_range_test_fine_tunes_from_pretrained_weights(digits, store, tmp_path, pretrained):
    lines = []
    result = train(_adaptive(digits, store, tmp_path / "run", pretrained), log=lines.append)
    assert any("classifier fc re-initialized (zeros) for 10 classes (the weights had 1000)" in line for line in lines)
    assert any(line.startswith("LR range test") for line in lines)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["optimizer"], config["sam"], config["weight_decay"], config["schedule"]) == \
        ("sgd", True, 5e-4, "plateau")
    assert config["lr"] == result.lr and config["lr_search"] == "range"  # the estimate, recorded once it is made
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == result.epochs_run == 3
    assert rows[0]["lr"] == pytest.approx(result.lr)  # 1 warmup epoch: the full LR from the first epoch
    assert 1e-4 <= result.lr <= 0.1


def test_adaptive_tpe_search_and_kd_replacing_the_labels(digits, store, tmp_path, pretrained):
    lines = []
    result = train(_adaptive(digits, store, tmp_path / "run", pretrained, epochs=1, lr_search="tpe", tpe_trials=3,
                             trial_epochs=2, kd_mode="replace"), log=lines.append)
    assert any(line.startswith("TPE over [0.001, 0.01]: 3 trials") for line in lines)
    assert 1e-3 <= result.lr <= 1e-2


def test_adaptive_needs_pretrained_weights(digits, store, tmp_path):
    with pytest.raises(TrainError, match="starts from pretrained weights"):
        train(_adaptive(digits, store, tmp_path / "run", None, model="test_resnet"), log=lambda _: None)
