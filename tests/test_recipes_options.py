"""`reinforce train` options: --decode (a store replayed in fast mode, refused without one) and --baseline (the
teachers' margin measured against a plain run, refused before training when it is not one)."""

from __future__ import annotations

import pytest
import torch

from reinforce.recipes.cli import add_train_parser, config_from_args
from reinforce.recipes.config import TrainError, resolve
from reinforce.recipes.data import StoreSamples


def parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return config_from_args(parser.parse_args(["train", *argv]))


def test_decode_reaches_the_dataset_and_png_sources_replay_exactly(digits, store):
    config = parse(str(digits[0]), "--store", str(store), "--model", "resnet10t", "--out", "run", "--decode", "fast")
    assert resolve(config)["decode"] == "fast"
    exact, fast = (StoreSamples(str(digits[0]), str(store), decode=mode) for mode in ("exact", "fast"))
    assert fast.dataset.decode == "fast"
    for position in range(4):  # PNG sources: fast mode decodes them in full, like exact mode
        assert torch.equal(exact[position][0], fast[position][0])


def test_decode_fast_without_a_store_is_refused(digits):
    config = parse(str(digits[0]), "--recipe", "plain", "--model", "resnet10t", "--out", "run", "--decode", "fast")
    with pytest.raises(TrainError, match="--decode fast .* pass --store"):
        resolve(config)


def test_baseline_that_is_not_a_finished_run_is_refused_before_training(digits, store, tmp_path):
    from reinforce.recipes.train import train

    config = parse(str(digits[0]), "--store", str(store), "--model", "resnet10t", "--out", str(tmp_path / "run"),
                   "--baseline", str(tmp_path / "no-such-run"))
    assert config.baseline == str(tmp_path / "no-such-run")
    with pytest.raises(TrainError, match="--baseline .*pass the directory of a finished"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_plateau_decay_and_lr_floor_reach_the_config_and_bad_values_are_refused(digits):
    base = (str(digits[0]), "--recipe", "adaptive", "--model", "resnet10t", "--out", "run")
    settings = resolve(parse(*base, "--decay-factor", "0.2", "--min-lr-ratio", "0.01"))
    assert settings["decay_factor"] == 0.2 and settings["min_lr_ratio"] == 0.01
    assert resolve(parse(*base))["min_lr_ratio"] == 1e-3
    for flag, value in (("--min-lr-ratio", "0"), ("--decay-factor", "1.5")):
        with pytest.raises(TrainError, match=f"{flag} .* strictly between 0 and 1"):
            resolve(parse(*base, flag, value))
