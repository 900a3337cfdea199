"""Replay fidelity: the build path (apply_batch over many records) equals the student path (apply, one record)
bit for bit, per op and per preset, with 1 or 4 threads, and on CUDA against the CPU; the resamplers and
RandAugment's ops agree with independent implementations (PIL, a hand-computed area average, torchvision's
functional ops) up to the rounding rules of format_spec.md 4.5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms.v2 import functional as F

from reinforce_loaders.augment import (PRESETS, AugmentPipeline, AugMix, CenterCrop, CutMix, HorizontalFlip, Mix, MixUp,
                                       RandAugment, RandomCrop, RandomErasing, RandomResizedCrop, make_pipeline)
from reinforce_loaders.augment.color import OP_NAMES, apply_op


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    """Natural photos shipped with scikit-learn, at a few sizes and aspect ratios, plus a noisy small one."""
    photos = [torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous() for image in load_sample_images().images]
    torch.manual_seed(0)
    return [F.resize(photos[0], [107, 160], antialias=True), F.resize(photos[1], [96, 96], antialias=True),
            photos[1][:, 100:190, 50:400].contiguous(), torch.randint(0, 256, (3, 23, 41), dtype=torch.uint8)]


def records(pipeline: AugmentPipeline, images: list[torch.Tensor], slots: int = 12, seed: int = 0):
    """(images per record, params as the store holds them, partner images) for ``slots`` records of every image."""
    shapes = [tuple(image.shape[1:]) for image in images]
    params = np.concatenate([
        pipeline.sample_slots(seed, i, slots, *shapes[i], num_samples=len(images), partner_size=lambda p: shapes[p])
        for i in range(len(images))])
    sizes = np.array([shapes[i] for i in range(len(images)) for _ in range(slots)])
    params = pipeline.param_layout.quantize(params, sizes[:, 0], sizes[:, 1])
    per_record = [images[i] for i in range(len(images)) for _ in range(slots)]
    partners = pipeline.partner_indices(params)
    partner_images = None if partners is None else [images[p] if p >= 0 else None for p in partners]
    return per_record, params, partner_images


def batched_and_single(pipeline, per_record, params, partner_images, size=None, device="cpu"):
    """(all records through one apply_batch on ``device``, each record through apply on the CPU), uint8."""
    moved = {id(image): image.to(device) for image in per_record}
    batched = pipeline.apply_batch([moved[id(image)] for image in per_record], params, size,
                                   None if partner_images is None else
                                   [None if p is None else p.to(device) for p in partner_images]).cpu()
    single = torch.stack([
        pipeline.apply(image, row, size, None if partner_images is None else partner_images[r])
        for r, (image, row) in enumerate(zip(per_record, params))])
    return batched, single


def assert_identical(batched: torch.Tensor, single: torch.Tensor, what) -> None:
    differs = (batched != single).flatten(1).any(1)
    assert not differs.any(), (f"{what}: {int(differs.sum())} of {len(differs)} records differ, first "
                               f"{int(torch.nonzero(differs)[0])}, max {(batched.int() - single.int()).abs().max()}")


OPS_UNDER_TEST = {
    "random_resized_crop": [RandomResizedCrop()],
    "random_resized_crop_roi_align": [RandomResizedCrop(resample="roi_align"), HorizontalFlip(),
                                      RandAugment(magnitude=15, magnitude_std=3.0)],
    "random_crop": [RandomCrop()],
    "center_crop": [CenterCrop()],
    "horizontal_flip": [RandomResizedCrop(), HorizontalFlip()],
    "rand_augment": [RandomResizedCrop(), RandAugment(num_ops=2, magnitude=15, magnitude_std=3.0)],
    "augmix": [RandomResizedCrop(), AugMix()],
    "random_erasing": [RandomResizedCrop(), RandomErasing(p=0.5)],
    "mixup": [RandomResizedCrop(), HorizontalFlip(), MixUp(alpha=1.0)],
    "cutmix": [RandomResizedCrop(), HorizontalFlip(), CutMix(alpha=1.0)],
}


@pytest.mark.parametrize("name", sorted(OPS_UNDER_TEST))
def test_fidelity_per_op(images, name):
    pipeline = AugmentPipeline(OPS_UNDER_TEST[name], 48)
    assert_identical(*batched_and_single(pipeline, *records(pipeline, images)), name)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size", [40, pytest.param(72, marks=pytest.mark.slow)])
def test_fidelity_per_preset(images, preset, size):
    pipeline = make_pipeline(preset, 56)
    assert_identical(*batched_and_single(pipeline, *records(pipeline, images, slots=8, seed=3), size=size),
                     (preset, size))


@pytest.mark.parametrize("op_id", range(1, len(OP_NAMES)))
def test_each_rand_augment_op_is_batch_invariant_and_does_something(images, op_id):
    batch = torch.stack([F.resize(image, [40, 40], antialias=True) for image in images])
    magnitudes = torch.tensor([30.0, -17.0, 4.0, -30.0], dtype=torch.float64)
    together = apply_op(batch, op_id, magnitudes, 31)
    alone = torch.cat([apply_op(batch[r:r + 1], op_id, magnitudes[r:r + 1], 31) for r in range(len(batch))])
    assert together.dtype == torch.uint8 and together.shape == batch.shape
    assert torch.equal(together, alone), OP_NAMES[op_id]
    assert not torch.equal(together[:3], batch[:3]), OP_NAMES[op_id]


def _torchvision_rand_augment_ops(magnitude: float, height: int, width: int) -> dict:
    """torchvision's functional op for each RandAugment op at signed bin ``magnitude`` of 31 (its RandAugment's
    magnitude tables: shear 0.3, translate 150/331 of the side, rotate 30 degrees, enhance 0.9, posterize
    8 - bin/7.5 bits rounded, solarize 255 * (1 - fraction))."""
    fraction, sign = abs(magnitude) / 30, (1.0 if magnitude >= 0 else -1.0)
    shear = float(np.degrees(np.arctan(sign * 0.3 * fraction)))
    return {
        "shear_x": lambda x: F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0], shear=[shear, 0.0]),
        "shear_y": lambda x: F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0], shear=[0.0, shear]),
        "translate_x": lambda x: F.affine(x, angle=0.0, translate=[int(sign * 150 / 331 * width * fraction), 0],
                                          scale=1.0, shear=[0.0, 0.0]),
        "translate_y": lambda x: F.affine(x, angle=0.0, translate=[0, int(sign * 150 / 331 * height * fraction)],
                                          scale=1.0, shear=[0.0, 0.0]),
        "rotate": lambda x: F.rotate(x, sign * 30.0 * fraction),
        "posterize": lambda x: F.posterize(x, int(round(8 - abs(magnitude) / 7.5))),
        "solarize": lambda x: F.solarize(x, 255.0 * (1 - fraction)),
        "autocontrast": F.autocontrast,
        "equalize": F.equalize,
        "brightness": lambda x: F.adjust_brightness(x, 1 + sign * 0.9 * fraction),
        "color": lambda x: F.adjust_saturation(x, 1 + sign * 0.9 * fraction),
        "contrast": lambda x: F.adjust_contrast(x, 1 + sign * 0.9 * fraction),
        "sharpness": lambda x: F.adjust_sharpness(x, 1 + sign * 0.9 * fraction),
    }


BLENDS = ("brightness", "color", "contrast", "sharpness")
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def _near_tie(name: str, magnitude: float, height: int, width: int) -> np.ndarray:
    """Output pixels whose exact (binary64) source coordinate lies within 1e-3 of a half-pixel tie, where
    torchvision's float32 grid picks either neighbour."""
    from reinforce_loaders.augment.color import _geometric_matrix

    m = _geometric_matrix(name, int(magnitude), 31, height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    xc, yc = x - width / 2 + 0.5, y - height / 2 + 0.5
    sx, sy = m[0] * xc + m[1] * yc + m[2] + width / 2 - 0.5, m[3] * xc + m[4] * yc + m[5] + height / 2 - 0.5
    return (np.abs(sx - np.floor(sx) - 0.5) < 1e-3) | (np.abs(sy - np.floor(sy) - 0.5) < 1e-3)


@pytest.mark.parametrize("shape", [(48, 48), (40, 56)])
@pytest.mark.parametrize("magnitude", [20.0, -13.0, 30.0, 1.0])
def test_rand_augment_ops_follow_torchvision(images, shape, magnitude):
    """Each op agrees with torchvision's functional op at the same magnitude, up to the rounding rules the spec
    fixes for exactness: affine warps pick the same source pixel except at half-pixel ties (where ours rounds
    up and torchvision's float32 grid goes either way); blends (integer grey, integer mean, rounding half up
    where torchvision truncates) and autocontrast (an exact floor where torchvision's float32 may land below
    an integer) are within 1 of torchvision's."""
    image = F.resize(images[0], list(shape), antialias=True)[None]
    rounded_differently = set()
    for name, reference in _torchvision_rand_augment_ops(magnitude, *shape).items():
        ours = apply_op(image, OP_NAMES.index(name), torch.tensor([magnitude], dtype=torch.float64), 31).int()
        difference = ours - reference(image).int()
        if name in BLENDS or name == "autocontrast":
            assert difference.abs().max() <= 1, (name, difference.min(), difference.max())
            if difference.any():
                rounded_differently.add(name)
        elif name in GEOMETRIC:
            differs = difference.abs().amax(dim=(0, 1)).numpy() > 0
            ties = _near_tie(name, magnitude, *shape)
            assert not (differs & ~ties).any(), (name, int((differs & ~ties).sum()))
        else:
            assert not difference.any(), (name, int((difference != 0).sum()), difference.abs().max())
    assert rounded_differently & set(BLENDS)  # the rounding rule does matter on a natural image


def test_antialias_crop_resample_matches_pil(images):
    """The default resampler (whole-pixel box, antialiased bilinear) agrees with an independent implementation,
    PIL's BILINEAR resize of the cropped box, within 1 on 8-bit values. On a noise image a box off by one pixel
    or with swapped axes would differ by tens."""
    generator = torch.Generator().manual_seed(1)
    for shape in ((57, 83), (120, 90), (23, 41)):
        image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=generator)
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        for size in (16, 50, 101):
            pipeline = AugmentPipeline([RandomResizedCrop()], size)
            for row in pipeline.sample_slots(3, 0, 6, *shape):
                top, left, height, width = (int(v) for v in row)
                ours = pipeline.apply(image, row).permute(1, 2, 0).numpy().astype(np.int64)
                box = (left, top, left + width, top + height)
                reference = np.asarray(pil.crop(box).resize((size, size), Image.BILINEAR)).astype(np.int64)
                assert np.abs(ours - reference).max() <= 1, (shape, size, box)


def _roi_align_reference(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """format_spec.md's roi_align resample, written out in float64: ``size`` x ``size`` bins over the box, each
    the mean of a ceil(bin) x ceil(bin) grid of bilinear samples at pixel-centre coordinates (aligned)."""
    channels, height, width = image.shape
    top, left, box_h, box_w = box
    bin_h, bin_w = box_h / size, box_w / size
    grid_h, grid_w = int(np.ceil(bin_h)), int(np.ceil(bin_w))

    def taps(start: float, extent: float, bins: float, grid: int, limit: int):
        """(lower index, upper index, upper weight) of every sample coordinate along one axis."""
        coords = (start - 0.5 + bins * np.arange(size)[:, None] + (np.arange(grid)[None] + 0.5) * bins / grid)
        coords = np.maximum(coords, 0.0)  # the box lies inside the image: no sample falls beyond -1 or the side
        low = np.floor(coords).astype(np.int64)
        at_edge = low >= limit - 1
        low = np.where(at_edge, limit - 1, low)
        coords = np.where(at_edge, low, coords)
        return low, np.where(at_edge, low, low + 1), coords - low

    y0, y1, ly = taps(top, box_h, bin_h, grid_h, height)
    x0, x1, lx = taps(left, box_w, bin_w, grid_w, width)
    values = image.astype(np.float64)

    def gather(ys, xs):  # (C, size, grid_h, size, grid_w)
        return values[:, ys[:, :, None, None], xs[None, None]]

    sampled = (gather(y0, x0) * ((1 - ly)[:, :, None, None] * (1 - lx)[None, None])
               + gather(y0, x1) * ((1 - ly)[:, :, None, None] * lx[None, None])
               + gather(y1, x0) * (ly[:, :, None, None] * (1 - lx)[None, None])
               + gather(y1, x1) * (ly[:, :, None, None] * lx[None, None]))
    return sampled.mean(axis=(2, 4))


def test_roi_align_integer_downscale_is_the_area_average():
    """An integer downscale (2 x 3 source pixels per output pixel) is the mean of each block within the
    fixed-point weights' rounding (1 level, rarely): checked against a hand computation, on a box that is
    neither square nor at the origin, through the pipeline (so the (top, left, height, width) -> roi mapping
    is covered), for RandomResizedCrop and RandomCrop. A box off by one pixel differs by tens on noise."""
    generator = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 12, 18), dtype=torch.uint8, generator=generator)
    for op, box, size in ((RandomResizedCrop(resample="roi_align"), (2, 4, 8, 12), 4),
                          (RandomResizedCrop(resample="roi_align"), (0, 0, 12, 18), 6),
                          (RandomCrop(resample="roi_align"), (3, 5, 6, 6), 3)):
        top, left, height, width = box
        block_h, block_w = height // size, width // size
        blocks = image[:, top:top + height, left:left + width].to(torch.int64)
        sums = blocks.view(3, size, block_h, size, block_w).sum(dim=(2, 4))
        mean = sums.double() / (block_h * block_w)
        expected = torch.floor(mean + 0.5)  # ties up, as the spec rounds
        ours = AugmentPipeline([op], size).apply(image, list(box)).double()
        # Weights of 1/3 are 5461 / 2^14, a hair low: an exact tie (mean k + 1/2) may round down.
        tie = (mean - torch.floor(mean) - 0.5).abs() < 1e-9
        assert (ours - expected).abs().max() <= 1 and not ((ours != expected) & ~tie).any(), (op.name, box)
        if block_h * block_w in (1, 2, 4):  # weights 1/2 and 1/4 are exact in 2^-14: so is the mean
            assert torch.equal(ours, expected), (op.name, box)
        np.testing.assert_allclose(_roi_align_reference(image.numpy(), box, size), sums.double().numpy()
                                   / (block_h * block_w), atol=1e-9)


def test_roi_align_identity_and_enlargement_follow_the_spec():
    """At one source pixel per output pixel roi_align copies the box exactly; when enlarging (and at
    non-integer ratios) it matches roi_align's formula in float64 (``_roi_align_reference``) within the
    rounding of the fixed-point weights."""
    generator = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=generator)
    crop = RandomResizedCrop(resample="roi_align")
    assert torch.equal(AugmentPipeline([crop], 7).apply(image, [5, 11, 7, 7]), image[:, 5:12, 11:18])
    for box, size in (((3, 2, 5, 9), 13), ((0, 0, 20, 30), 64), ((17, 25, 3, 5), 11), ((1, 3, 17, 23), 10)):
        ours = AugmentPipeline([crop], size).apply(image, list(box)).numpy().astype(np.int64)
        reference = _roi_align_reference(image.numpy(), box, size)
        difference = np.abs(ours - np.round(reference))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (box, size, difference.max())


@pytest.mark.slow
def test_replay_at_another_resolution_shows_the_same_content(images):
    """Stored parameters are resolution independent: replaying at 96 then shrinking to 48 ~ replaying at 48."""
    for preset in ("rrc+ra/re", "rrc+m*+r*", "cropflip"):
        pipeline = make_pipeline(preset, 48)
        per_record, params, partners = records(pipeline, images, slots=6)
        for r in range(0, len(per_record), 5):
            partner = None if partners is None else partners[r]
            small = pipeline.apply(per_record[r], params[r], 48, partner).float()
            large = F.resize(pipeline.apply(per_record[r], params[r], 96, partner), [48, 48], antialias=True).float()
            assert (small - large).abs().mean() < 16.0, preset


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", sorted(PRESETS) + ["roi_align"])
def test_fidelity_cuda_build_vs_cpu_student(images, preset):
    """The replay's arithmetic is integer (format_spec.md 4.5): a CUDA build's batch equals the CPU student's
    one-at-a-time replay byte for byte."""
    pipeline = (make_pipeline(preset, 64) if preset in PRESETS else
                AugmentPipeline(OPS_UNDER_TEST["random_resized_crop_roi_align"], 64))
    batched, single = batched_and_single(pipeline, *records(pipeline, images, slots=8), device="cuda")
    difference = (batched.int() - single.int()).abs()
    assert difference.max() == 0, (preset, int((difference > 0).sum()), int(difference.max()))


CUSTOM = [RandomResizedCrop(scale=(0.3, 1.0)), HorizontalFlip(0.3),
          RandAugment(num_ops=3, magnitude=20, magnitude_std=6.0, p=0.8), AugMix(severity=8, width=2),
          RandomErasing(p=0.7, value=[3, 200, 90]), Mix(mixup_alpha=1.0, cutmix_alpha=0.5, switch_prob=0.4)]


@pytest.mark.parametrize("preset", sorted(PRESETS) + ["custom"])
def test_replay_is_the_same_with_1_and_4_threads(images, preset):
    """The same records replayed batched with 1 and with 4 torch threads give identical bytes (integer
    arithmetic: no reduction order can change a byte)."""
    pipeline = AugmentPipeline(CUSTOM, 48) if preset == "custom" else make_pipeline(preset, 48)
    per_record, params, partners = records(pipeline, images, slots=6, seed=7)
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 4):
            torch.set_num_threads(threads)
            out[threads] = pipeline.apply_batch(per_record, params, None, partners)
    finally:
        torch.set_num_threads(before)
    assert_identical(out[1], out[4], (preset, "1 vs 4 threads"))


def test_custom_pipeline_batched_equals_one_at_a_time(images):
    """Every op at once, with non-default arguments: the batch equals the records replayed one by one."""
    pipeline = AugmentPipeline(CUSTOM, 44)
    assert_identical(*batched_and_single(pipeline, *records(pipeline, images, slots=10, seed=9)), "custom")


@pytest.mark.parametrize("preset", ["rrc+m*+r*", "custom"])
def test_device_path_without_host_syncs_equals_the_cpu_path(images, preset, monkeypatch):
    """Off the CPU, flip and the mixers compute every record and select with torch.where (no host sync); that
    path, forced here on the CPU, gives the bytes of the CPU's row-selecting path."""
    from reinforce_loaders.augment import geometric, mixing

    pipeline = AugmentPipeline(CUSTOM, 40) if preset == "custom" else make_pipeline(preset, 40)
    per_record, params, partners = records(pipeline, images, slots=8, seed=4)
    cpu = pipeline.apply_batch(per_record, params, None, partners)
    calls = []

    def device_like(mask):
        calls.append(len(mask))
        return None

    monkeypatch.setattr(geometric, "selected_rows", device_like)
    monkeypatch.setattr(mixing, "selected_rows", device_like)
    assert_identical(pipeline.apply_batch(per_record, params, None, partners), cpu, preset)
    assert calls  # the device path ran
