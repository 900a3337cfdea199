"""The student replays exactly what the teacher saw, and the same seed gives the same store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from conformance import make_vectors as mv
from conftest import RecordingTeacher, build_store
from reinforce.build import BuildConfig, run_build
from reinforce.build.teachers import Ensemble, TeacherMember
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders import format as fmt

SIZE, OTHER_SIZE = 32, 45
NUM_SLOTS = 3


@pytest.fixture(scope="module")
def varied_source(tmp_path_factory):
    """Eleven structured images of different shapes and one unreadable file (skipped by the build)."""
    return mv.write_source(tmp_path_factory.mktemp("replay_source"))


def recording_member(size: int) -> tuple[RecordingTeacher, TeacherMember]:
    teacher = RecordingTeacher(size)
    return teacher, TeacherMember(f"recording{size}", teacher, size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def first_difference(replayed: torch.Tensor, seen: torch.Tensor, records: list[tuple[int, int]]) -> str:
    differs = (replayed != seen).flatten(1).any(1)
    first = int(torch.nonzero(differs)[0])
    worst = (replayed[first].int() - seen[first].int()).abs().max().item()
    return (f"{int(differs.sum())} of {len(records)} records differ; first: record {records[first]}, "
            f"max difference {worst}")


@pytest.mark.parametrize("case", mv.case_names())
def test_student_replays_the_teachers_pixels_exactly(case, varied_source, tmp_path):
    """Every preset: the uint8 image each teacher member saw at build time (its own input size) is bit-identical
    to the student's replay of the stored record at that size, on sources of many shapes, with a skipped sample,
    micro-batches that straddle samples, and (mixing presets) partners from the block's pool and from other
    blocks."""
    torch.manual_seed(0)
    (small, small_member), (large, large_member) = recording_member(SIZE), recording_member(OTHER_SIZE)
    augment = case
    if case == "rrc/roi_align":
        augment = str(tmp_path / "roi_align.json")
        (tmp_path / "roi_align.json").write_text(json.dumps(mv.roi_align_config()))
    out = tmp_path / "s.zarr"
    run_build(BuildConfig(source=str(varied_source), out=str(out), augment=augment, image_size=SIZE,
                          num_augmentations=NUM_SLOTS, top_k=3, seed=11, batch_size=7, block_size=8,
                          on_bad_image="skip", cpu_threads=1),
              ensemble=Ensemble([small_member, large_member]), progress=False)
    ds = ReinforcedDataset(varied_source, out, transform=lambda image: image)
    records = [(ds.store_index(p), slot) for p in range(len(ds)) for slot in range(NUM_SLOTS)]
    assert len(ds) == len(mv.SHAPES) and len(records) == len(mv.SHAPES) * NUM_SLOTS  # the broken file is skipped
    for teacher, size in ((small, SIZE), (large, OTHER_SIZE)):
        seen = (torch.cat(teacher.seen[1:]) * 255).round().to(torch.uint8)  # seen[0] is the class-count probe
        replayed = torch.stack([ds.replay(index, slot, size)[0] for index, slot in records])
        assert seen.shape == replayed.shape
        assert torch.equal(replayed, seen), f"{case} at {size}: " + first_difference(replayed, seen, records)


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_params(digits, teacher_weights, tmp_path):
    first = build_store(digits[0], tmp_path / "a.zarr", teacher_weights, seed=5)
    second = build_store(digits[0], tmp_path / "b.zarr", teacher_weights, seed=5, batch_size=16)
    third = build_store(digits[0], tmp_path / "c.zarr", teacher_weights, seed=6)
    a, b, c = (zarr.open_group(str(path), mode="r") for path in (first, second, third))
    for name in fmt.PER_SAMPLE_ARRAYS + fmt.PER_RECORD_ARRAYS:
        assert np.array_equal(a[name][:], b[name][:]), name
    params = [fmt.read_all_records(group).params for group in (a, c)]
    assert not np.array_equal(*params)
