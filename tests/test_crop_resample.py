"""The crop resampler's two implementations (format_spec.md 4.5.1): the CPU's per-record passes in binary32 /
binary64 (on contiguous images and on decoded ones, ``[C, H, W]`` views of ``[H, W, C]`` memory) and the
device path's batched integer passes, forced here on the CPU, agree bit for bit with the spec's reading in
numpy (tests/conformance/spec_reference.py) on random boxes: up- and downscales, boxes of one pixel, outputs
of side 1, boxes at the image's edges, both resamplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conformance import spec_reference as ref
from reinforce_loaders.augment import geometric


def random_cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        height, width = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        image = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        h, w = int(rng.integers(1, height - top + 1)), int(rng.integers(1, width - left + 1))
        size = int(rng.choice([1, 2, 5, 16, 31, h, w, 3 * max(h, w)]))
        yield image, (top, left, h, w), size


@pytest.mark.parametrize("decoded", [False, True])
@pytest.mark.parametrize("resample", ["antialias", "roi_align"])
def test_cpu_passes_equal_the_spec_reading(resample, decoded):
    for image, box, size in random_cases(1, 150):
        expected = ref.crop(image.numpy(), box, size, resample)
        if decoded:
            image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        out = geometric.resample_box(image, box, size, resample)
        assert out.is_contiguous() and np.array_equal(out.numpy(), expected), (box, size)


@pytest.mark.parametrize("resample", ["antialias", "roi_align"])
def test_batched_integer_path_equals_the_cpu_path(resample):
    """All records of mixed sources and sizes in one call, also in chunks of a few records, and with sources
    repeated (concatenated once), give the per-record CPU bytes."""
    cases = list(random_cases(2, 60))
    images = [image for image, _, _ in cases]
    for size in (1, 9, 40):
        boxes = [box for _, box, _ in cases]
        single = torch.stack([geometric.resample_box(image, box, size, resample)
                              for image, box in zip(images, boxes)])
        assert torch.equal(geometric._resample_batch(images, boxes, size, resample), single), size
        assert torch.equal(geometric._resample_batch(images, boxes, size, resample, budget=3 * size * 80), single)
    shared = [images[0]] * 5 + [images[1]] * 3
    boxes = [geometric.clamp_box(box, *images[0].shape[-2:]) for _, box, _ in cases[:5]] + \
            [geometric.clamp_box(box, *images[1].shape[-2:]) for _, box, _ in cases[5:8]]
    single = torch.stack([geometric.resample_box(image, box, 12, resample) for image, box in zip(shared, boxes)])
    assert torch.equal(geometric._resample_batch(shared, boxes, 12, resample), single)


def test_a_photo_sized_crop_equals_the_spec_reading():
    """A 224 crop of a 375 x 500 image, the student's case, through both paths."""
    generator = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=generator)
    for box, resample in (((20, 31, 340, 449), "antialias"), ((100, 7, 150, 120), "antialias"),
                          ((3, 40, 371, 421), "roi_align")):
        expected = ref.crop(image.numpy(), box, 224, resample)
        assert np.array_equal(geometric.resample_box(image, box, 224, resample).numpy(), expected), box
        assert np.array_equal(geometric._resample_batch([image], [box], 224, resample)[0].numpy(), expected), box
