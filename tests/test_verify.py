"""`reinforce verify` and `reinforce inspect` on sound and damaged stores."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_format import _shard, synthetic_header, write_store

from reinforce.cli import main
from reinforce_loaders import format as fmt


def test_verify_passes_on_built_store(store, digits, capsys):
    assert main(["verify", str(store), "--data", str(digits[0])]) == 0
    out = capsys.readouterr().out
    assert "records:" in out and "source: 45 samples match" in out and "verified" in out


def test_inspect_shows_layout_sizes_and_bytes_per_record(store, capsys):
    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    for text in ("records", "(16, 1, 12)", "(16, 4, 12)", "bytes/record", "record row", "topk_probs [3:6)",
                 "random_resized_crop.top:relative", "total (data files)"):
        assert text in out, text


@pytest.mark.parametrize("defect, message", [
    ("corrupt", "damaged"),
    ("truncate", "damaged or truncated"),
    ("missing_shard", r"record \(16, 0\) is missing"),
    ("missing_labels", "label of sample 0 is -1"),
    ("incomplete", "build has not finished"),
    ("bad_probs", r"record \(3, 2\) has probability drops larger than its top-1 probability"),
    ("repeated_class", r"record \(4, 1\) repeats a class index"),
    ("class_out_of_range", r"record \(5, 0\) has a class index outside \[0, "),
    ("entropy", r"record \(6, 3\) has an entropy above log\(num_classes\)"),
    ("duplicate_vocabulary", "class vocabulary of sample 17 is invalid"),
    ("missing_vocabulary", "class vocabulary of sample 0 is missing"),
    ("emptied_vocabulary_entry", r"record \(\d+, \d\) refers to an empty class vocabulary entry"),
])
def test_verify_fails_naming_the_defect(tmp_path, capsys, defect, message):
    header = synthetic_header(vocabulary=16 if "vocabulary" in defect else 0)
    path = tmp_path / "s.zarr"
    write_store(path, header, blocks=[0, 1] if defect == "incomplete" else None)
    if defect == "corrupt":
        shard = _shard(path, 1)
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif defect == "truncate":
        shard = _shard(path, 2)
        shard.write_bytes(shard.read_bytes()[:-100])
    elif defect == "missing_shard":
        _shard(path, 1).unlink()
    elif defect == "missing_labels":
        (path / fmt.LABELS / "c" / "0").unlink()
    elif defect in ("duplicate_vocabulary", "emptied_vocabulary_entry"):
        group = fmt.open_store_group(path, mode="r+")
        vocabulary = group[fmt.CLASS_VOCABULARY][16:32]
        if defect == "duplicate_vocabulary":
            vocabulary[1, 1] = vocabulary[1, 0]
        else:
            vocabulary[:, 1:] = 0xFFFF  # records that use positions >= 1 now point at padding
        group[fmt.CLASS_VOCABULARY][16:32] = vocabulary
    elif defect == "missing_vocabulary":
        (path / fmt.CLASS_VOCABULARY / "c" / "0" / "0").unlink()
    elif defect == "bad_probs":
        group = fmt.open_store_group(path, mode="r+")
        rows = group[fmt.RECORDS][0:16]
        rows[3, 2, header.top_k + 1] = header.prob_scale  # a drop larger than the top-1 probability
        group[fmt.RECORDS][0:16] = rows
    elif defect in ("repeated_class", "class_out_of_range", "entropy"):
        group = fmt.open_store_group(path, mode="r+")
        rows = group[fmt.RECORDS][0:16]
        classes = header.layout.columns["topk_indices"]
        if defect == "repeated_class":
            rows[4, 1, classes.start + 1] = rows[4, 1, classes.start]
        elif defect == "class_out_of_range":
            rows[5, 0, classes.start] = header.num_classes
        else:
            rows[6, 3, header.layout.columns["teacher_entropy"].start] = header.entropy_levels + 1
        group[fmt.RECORDS][0:16] = rows
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err
    assert any(part in err for part in message.split("|")) or __import__("re").search(message, err), err


def test_verify_catches_a_store_not_matching_its_source(store, digits, tmp_path, capsys):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    group = fmt.open_store_group(copy, mode="r+")
    fingerprints = group[fmt.FINGERPRINTS][:16]
    fingerprints[5] ^= np.uint64(1)
    group[fmt.FINGERPRINTS][:16] = fingerprints
    assert main(["verify", str(copy), "--data", str(digits[0])]) == 1
    assert "source sample 5" in capsys.readouterr().err
