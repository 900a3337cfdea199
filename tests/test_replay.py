"""The student replays exactly what the teacher saw, and the same seed gives the same store."""

from __future__ import annotations

import numpy as np
import torch
import zarr

from conftest import IMAGE_SIZE, RecordingTeacher, build_store
from reinforce.build import BuildConfig, run_build
from reinforce.teachers import Ensemble, TeacherMember
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders import format as fmt


def test_student_sees_the_teachers_image(digits, tmp_path):
    torch.manual_seed(0)
    teacher = RecordingTeacher(IMAGE_SIZE)
    member = TeacherMember("recording", teacher, IMAGE_SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = tmp_path / "s.zarr"
    num_augmentations = 5
    run_build(BuildConfig(source=str(digits[0]), out=str(out), augment="rrc", image_size=IMAGE_SIZE,
                          num_augmentations=num_augmentations, top_k=3, seed=11, batch_size=7, block_size=16),
              ensemble=Ensemble([member]), progress=False)
    seen = torch.cat(teacher.seen[1:])  # the first call is the class-count probe
    teacher_uint8 = (seen * 255).round()
    ds = ReinforcedDataset(digits[0], out, transform=lambda image: image)
    diffs = []
    for index in range(len(ds)):
        for slot in range(num_augmentations):
            image, _ = ds.replay(index, slot)
            diff = (image.float() - teacher_uint8[index * num_augmentations + slot]).abs()
            diffs.append((diff.mean().item(), diff.max().item()))
    mean_abs = max(mean for mean, _ in diffs)
    assert mean_abs <= 1.0, f"mean absolute difference {mean_abs} > 1/255"


def test_same_seed_same_bytes_other_seed_other_params(digits, teacher_weights, tmp_path):
    first = build_store(digits[0], tmp_path / "a.zarr", teacher_weights, seed=5)
    second = build_store(digits[0], tmp_path / "b.zarr", teacher_weights, seed=5, batch_size=16)
    third = build_store(digits[0], tmp_path / "c.zarr", teacher_weights, seed=6)
    a, b, c = (zarr.open_group(str(path), mode="r") for path in (first, second, third))
    for name in fmt.PER_SAMPLE_ARRAYS + fmt.PER_RECORD_ARRAYS:
        assert np.array_equal(a[name][:], b[name][:]), name
    params = [fmt.read_all_records(group).params for group in (a, c)]
    assert not np.array_equal(*params)
