"""`reinforce train --decode`: the recipes replay a store in fast mode when asked, and refuse it without one."""

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
