"""End to end through the command line: build, inspect, verify."""

from __future__ import annotations

import numpy as np
import zarr

from reinforce.cli import main
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders import format as fmt


def test_build_inspect_verify(digits, teacher_weights, tmp_path, capsys):
    out = tmp_path / "store.zarr"
    argv = ["build", str(digits[0]), "--augment", "rrc", "--image-size", "32", "-A", "3", "-k", "4",
            "--out", str(out), "--seed", "3", "--batch-size", "8", "--block-size", "16", "--no-progress"]
    for spec in teacher_weights:
        argv += ["--teacher", spec]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "images 45" in summary and "records 135" in summary and "bytes/record" in summary

    assert main(["inspect", str(out)]) == 0
    described = capsys.readouterr().out
    assert "45 in 3 blocks of 16" in described and "top-4" in described and "test_resnet @32" in described

    assert main(["verify", str(out), "--data", str(digits[0])]) == 0
    assert "verified" in capsys.readouterr().out

    probs = fmt.read_all_records(fmt.open_store_group(out)).probs
    assert probs.shape == (45, 3, 4)
    assert np.all(np.diff(probs, axis=-1) <= 0)
    ds = ReinforcedDataset(digits[0], out, verify="full")
    image, target = ds[44]
    assert image.shape == (3, 32, 32) and target.shape == (10,)


def test_verify_rejects_other_data(store, digits, capsys):
    assert main(["verify", str(store), "--data", str(digits[1])]) == 1
    assert "samples but the store holds" in capsys.readouterr().err


def test_resume_on_complete_store_is_a_no_op(digits, teacher_weights, tmp_path):
    from conftest import build_store

    out = build_store(digits[0], tmp_path / "s.zarr", teacher_weights)
    before = zarr.open_group(str(out), mode="r")[fmt.RECORDS][:]
    build_store(digits[0], out, teacher_weights)
    assert np.array_equal(zarr.open_group(str(out), mode="r")[fmt.RECORDS][:], before)
