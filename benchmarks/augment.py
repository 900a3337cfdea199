"""Augmentation benchmark: batched application (the build path) vs per-image application (the student path).

For every preset and op, on the same records (photo-sized sources shipped with scikit-learn, several crops
per source as in a build), in one run:

* speed: ``apply_batch`` over all records at once vs ``apply`` record by record (median of repeats; ratio);
* fidelity: mean and max absolute difference between the two, on the uint8 scale (bounds: 1 and 8);
* ops after the crop (``--after-crop``): every preset's flip, RandAugment, AugMix, erasing and mixing replayed
  batched on crops already at the output size (as ``replay_crops`` does), in CPU ms per sample, optionally side
  by side with an earlier reinforce_loaders (``--baseline DIR``: a folder holding a copy of the package renamed
  ``reinforce_loaders_old``, e.g. ``git archive HEAD~1 loaders/reinforce_loaders``), in one run, interleaved;
* crop (``--crop``): the exact crop resampler (``resample_box``, format_spec.md 4.5.1) on 375 x 500 photos, one
  record at a time as the student's CPU loader replays it, against torchvision's uint8 antialiased
  ``resized_crop`` of the same box to the same size and, with ``--baseline DIR``, the earlier package's
  resampler, interleaved crop by crop, CPU ms per crop (medians); boxes drawn by ``RandomResizedCrop`` and the
  whole image; on a device (``--device cuda``) also the batched path, all records in one call;
* loader: ``ReinforcedDataset`` throughput on stores built with and without a mixing preset, i.e. the cost of
  decoding and augmenting the MixUp / CutMix partner (``--loader-images 0`` skips it).

Usage: ``python benchmarks/augment.py [--device cuda] [--records-per-image 32] [--size 224]``;
``python benchmarks/augment.py --after-crop [--baseline DIR] [--batch 64] [--device cuda]``;
``python benchmarks/augment.py --crop [--baseline DIR] [--records-per-image 32] [--device cuda]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_sample_images

from reinforce_loaders import ReinforcedDataset
from reinforce_loaders.augment import (PRESETS, AugmentPipeline, AugMix, CutMix, HorizontalFlip, MixUp, RandAugment,
                                       RandomCrop, RandomErasing, RandomResizedCrop, make_pipeline)

OPS = {
    "random_resized_crop": lambda: [RandomResizedCrop()],
    "random_resized_crop_antialias": lambda: [RandomResizedCrop(resample="antialias")],
    "random_crop": lambda: [RandomCrop()],
    "horizontal_flip": lambda: [RandomResizedCrop(), HorizontalFlip()],
    "rand_augment": lambda: [RandomResizedCrop(), RandAugment()],
    "augmix": lambda: [RandomResizedCrop(), AugMix()],
    "random_erasing": lambda: [RandomResizedCrop(), RandomErasing(p=0.5)],
    "mixup": lambda: [RandomResizedCrop(), MixUp(alpha=1.0)],
    "cutmix": lambda: [RandomResizedCrop(), CutMix(alpha=1.0)],
}


def source_images(count: int) -> list[torch.Tensor]:
    """ImageNet-like sources: crops of the two scikit-learn photos at varied sizes around 400 x 500."""
    photos = [torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous() for image in load_sample_images().images]
    generator = np.random.default_rng(0)
    out = []
    for i in range(count):
        photo = photos[i % 2]
        h, w = int(generator.integers(300, 427)), int(generator.integers(300, 640))
        top, left = int(generator.integers(0, 428 - h)), int(generator.integers(0, 641 - w))
        out.append(photo[:, top:top + h, left:left + w].contiguous())
    return out


def make_records(pipeline: AugmentPipeline, images: list[torch.Tensor], per_image: int):
    shapes = [tuple(image.shape[1:]) for image in images]
    params = np.concatenate([
        pipeline.sample_slots(0, i, per_image, *shapes[i], num_samples=len(images), partner_size=lambda p: shapes[p])
        for i in range(len(images))])
    sizes = np.array([shapes[i] for i in range(len(images)) for _ in range(per_image)])
    params = pipeline.param_layout.quantize(params, sizes[:, 0], sizes[:, 1])  # as stored
    per_record = [i for i in range(len(images)) for _ in range(per_image)]
    partners = pipeline.partner_indices(params)
    return per_record, params, partners


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def compare(pipeline: AugmentPipeline, images: list[torch.Tensor], per_image: int, device: str, repeats: int):
    indices, params, partners = make_records(pipeline, images, per_image)
    on_device = [image.to(device) for image in images]
    batch_images = [on_device[i] for i in indices]
    batch_partners = None if partners is None else [on_device[p] if p >= 0 else None for p in partners]

    def batched() -> torch.Tensor:
        out = pipeline.apply_batch(batch_images, params, None, batch_partners)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    def single() -> torch.Tensor:
        return torch.stack([pipeline.apply(images[i], params[r], None, None if partners is None or partners[r] < 0
                                           else images[partners[r]]) for r, i in enumerate(indices)])

    difference = (batched().cpu().float() - single().float()).abs()
    times: dict[str, list[float]] = {"batched": [], "single": []}
    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
        times["batched"].append(median_seconds(batched, 1))
        times["single"].append(median_seconds(single, 1))
    t_batch, t_single = (statistics.median(times[key]) for key in ("batched", "single"))
    return {"records": len(indices), "batched_ms": 1e3 * t_batch, "per_image_ms": 1e3 * t_single,
            "speedup": t_single / t_batch, "mean_abs_diff": difference.mean().item(),
            "max_abs_diff": difference.max().item()}


def after_crop(images: list[torch.Tensor], size: int, batch: int, device: str, repeats: int,
               baseline: str | None) -> dict[str, dict[str, float]]:
    """ms per sample of the ops after the crop of each preset with such ops, on ``batch`` records whose crops
    (own and partner) are already at ``size`` x ``size`` on ``device``: this version and, with ``baseline``, the
    earlier package, interleaved; CPU process time on the CPU, wall time (synchronized) on a device."""
    import sys

    pipelines: dict[str, Any] = {"now": make_pipeline}
    if baseline:
        sys.path.insert(0, baseline)
        from reinforce_loaders_old.augment import make_pipeline as old_make_pipeline

        pipelines["baseline"] = old_make_pipeline
    out: dict[str, dict[str, float]] = {}
    for preset in ("rrc+mix", "rrc+ra/re", "rrc+m*+r*", "rrc+augmix"):
        pipeline = make_pipeline(preset, size)
        indices, params, partners = make_records(pipeline, images, -(-batch // len(images)))
        indices, params = indices[:batch], params[:batch].copy()
        partners = None if partners is None else partners[:batch]
        own = slice(*pipeline._own[0])
        crops = pipeline.ops[0].apply_sources([images[i] for i in indices], torch.from_numpy(params[:, own]), size)
        params[:, own] = (0, 0, size, size)
        partner_crops = None
        if partners is not None:
            mixed = [r for r in range(batch) if partners[r] >= 0]
            theirs = slice(*pipeline._partner[0])
            cropped = pipeline.ops[0].apply_sources([images[partners[r]] for r in mixed],
                                                    torch.from_numpy(params[mixed, theirs]), size)
            params[mixed, theirs] = (0, 0, size, size)
            partner_crops = [None] * batch
            for r, crop in zip(mixed, cropped.to(device)):
                partner_crops[r] = crop
        crops_on = list(crops.to(device))
        made = {name: make(preset, size) for name, make in pipelines.items()}
        clock = time.process_time if device == "cpu" else time.perf_counter
        seconds: dict[str, list[float]] = {name: [] for name in made}
        for _ in range(repeats + 1):  # the first round warms up (tables, allocator) and is not counted
            for name, replay in made.items():
                began = clock()
                replay.apply_batch(crops_on, params, size, partner_crops)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[name].append(clock() - began)
        out[preset] = {name: 1e3 * statistics.median(values[1:]) / batch for name, values in seconds.items()}
    return out


def photo_sources(count: int, height: int = 375, width: int = 500) -> list[torch.Tensor]:
    """``count`` different ``height`` x ``width`` cuts of the scikit-learn photos (427 x 640), ``[C, H, W]``
    views of ``[H, W, C]`` memory, as the loader's JPEG decoders return them."""
    photos = [torch.from_numpy(image.copy()) for image in load_sample_images().images]
    return [photos[i % 2][13 * i:13 * i + height, 29 * i:29 * i + width].contiguous().permute(2, 0, 1)
            for i in range(count)]


def crop_speed(size: int, per_image: int, repeats: int, baseline: str | None, device: str,
               ) -> dict[str, dict[str, float]]:
    """Median CPU ms per crop, one record at a time (each crop timed alone, the candidates interleaved crop by
    crop): RandomResizedCrop boxes of 375 x 500 photos and the whole photo, to ``size``, on decoded images
    (``[H, W, C]`` memory) and on contiguous ``[C, H, W]`` copies. On a device: wall ms per record of the
    batched crop of all records in one call (synchronized), and the baseline's."""
    import sys

    from torchvision.transforms.v2 import functional as F

    from reinforce_loaders.augment import geometric

    decoded = photo_sources(4)
    pipeline = AugmentPipeline([RandomResizedCrop()], size)
    indices, params, _ = make_records(pipeline, decoded, per_image)
    boxes = [tuple(int(v) for v in row) for row in params]
    old = None
    if baseline:
        sys.path.insert(0, baseline)
        from reinforce_loaders_old.augment import geometric as old
    out: dict[str, dict[str, float]] = {}
    if device == "cpu":
        layouts = {"decoded HWC": decoded, "contiguous CHW": [image.contiguous() for image in decoded]}
        for label, cases, resample, layout in (
                ("rrc boxes", list(zip(indices, boxes)), "antialias", "decoded HWC"),
                ("rrc boxes", list(zip(indices, boxes)), "antialias", "contiguous CHW"),
                ("whole photo", [(i, (0, 0, 375, 500)) for i in range(len(decoded))] * 8, "antialias", "decoded HWC"),
                ("whole photo", [(i, (0, 0, 375, 500)) for i in range(len(decoded))] * 8, "antialias",
                 "contiguous CHW"),
                ("rrc boxes", list(zip(indices, boxes)), "roi_align", "decoded HWC")):
            images = layouts[layout]
            candidates = {"now": lambda image, box: geometric.resample_box(image, box, size, resample)}
            if resample == "antialias":
                candidates["torchvision"] = lambda image, box: F.resized_crop(image, *box, [size, size],
                                                                               antialias=True)
            if old is not None:
                candidates["baseline"] = lambda image, box: old.resample_box(image, box, size, resample)
            seconds: dict[str, list[float]] = {name: [] for name in candidates}
            for round_ in range(repeats + 1):  # the first round warms up (taps, allocator), not counted
                for index, box in cases:
                    for name, crop in candidates.items():
                        began = time.process_time()
                        crop(images[index], box)
                        if round_:
                            seconds[name].append(time.process_time() - began)
            out[f"{label}, {layout}, {resample}"] = {name: 1e3 * statistics.median(values)
                                                     for name, values in seconds.items()}
        return out
    on_device = [image.to(device) for image in decoded]
    batch = [on_device[i] for i in indices]
    boxes_t = torch.tensor(boxes, dtype=torch.float64)
    for resample in ("antialias", "roi_align"):
        candidates = {"now": lambda: geometric.crop_resize(batch, boxes_t, size, resample)}
        if old is not None:
            candidates["baseline"] = lambda: old.crop_resize(batch, boxes_t, size, resample)
        seconds = {name: [] for name in candidates}
        for round_ in range(repeats + 1):
            for name, crop in candidates.items():
                torch.cuda.synchronize()
                began = time.perf_counter()
                crop()
                torch.cuda.synchronize()
                if round_:
                    seconds[name].append(time.perf_counter() - began)
        out[f"batch of {len(batch)}, {resample}"] = {name: 1e3 * statistics.median(values) / len(batch)
                                                     for name, values in seconds.items()}
    return out


def loader_overhead(images: int, repeats: int) -> dict[str, dict[str, float]]:
    """Samples/s of ReinforcedDataset (one process) per preset, on JPEG sources of ImageNet-like size, and of a
    torchvision ImageFolder with RandomResizedCrop + flip (standard training, no store) as the baseline."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file
    from torchvision import datasets
    from torchvision.transforms import v2

    from reinforce.build import BuildConfig, run_build

    root = Path(tempfile.mkdtemp(prefix="augment-bench-"))
    for i, image in enumerate(source_images(images)):
        folder = root / "data" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.jpg", quality=90)
    torch.manual_seed(0)
    weights = root / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(weights),
              metadata={"input_size": json.dumps(32)})
    antialias = root / "rrc_antialias.json"
    antialias.write_text(json.dumps({"ops": [{"name": "random_resized_crop", "resample": "antialias"},
                                             {"name": "horizontal_flip"}]}))
    loaders: dict[str, object] = {}
    for preset, augment in (("rrc", "rrc"), ("rrc antialias", str(antialias)), ("rrc+ra/re", "rrc+ra/re"),
                            ("rrc+mix", "rrc+mix"), ("rrc+m*+r*", "rrc+m*+r*")):
        out = root / f"{preset.replace('/', '_').replace(' ', '_')}.zarr"
        run_build(BuildConfig(source=str(root / "data"), out=str(out), teachers=[f"test_resnet={weights}"],
                              augment=augment, image_size=224, num_augmentations=2, top_k=3, batch_size=64,
                              block_size=64), progress=False)
        loaders[preset] = ReinforcedDataset(root / "data", out)
        loaders[preset][0]  # open the store

    # Baseline: standard training's loader with the same kind of augmentation and no store.
    loaders["torchvision rrc"] = datasets.ImageFolder(str(root / "data"), transform=v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True)]))

    def epoch(ds) -> None:
        for index in range(len(ds)):
            ds[index]

    seconds: dict[str, list[float]] = {preset: [] for preset in loaders}
    for _ in range(repeats):  # interleaved presets
        for preset, ds in loaders.items():
            seconds[preset].append(median_seconds(lambda: epoch(ds), 1))
    results = {preset: {"samples_per_s": images / statistics.median(times)} for preset, times in seconds.items()}
    for preset, base in (("rrc", "torchvision rrc"), ("rrc antialias", "torchvision rrc"), ("rrc+mix", "rrc"), ("rrc+m*+r*", "rrc+ra/re")):
        results[preset]["overhead_vs_" + base] = results[base]["samples_per_s"] / results[preset]["samples_per_s"] - 1
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=8, help="distinct source images")
    parser.add_argument("--records-per-image", type=int, default=32, help="slots of each image in the batch")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-images", type=int, default=64, help="0 skips the loader measurement")
    parser.add_argument("--only", nargs="*", help="presets / ops to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared box)")
    parser.add_argument("--after-crop", action="store_true", help="only the ops after the crop, batched")
    parser.add_argument("--baseline", help="folder holding an earlier package as reinforce_loaders_old")
    parser.add_argument("--batch", type=int, default=64, help="records per batch with --after-crop")
    parser.add_argument("--crop", action="store_true", help="only the crop resampler, against torchvision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}")
    if args.crop:
        print(f"# crop resampling of 375 x 500 photos to {args.size}, {4 * args.records_per_image} RandomResizedCrop "
              f"boxes and 32 whole photos, {'CPU ms per crop, one at a time' if args.device == 'cpu' else 'ms per record'}"
              f", median over {args.repeats} interleaved rounds")
        for case, result in crop_speed(args.size, args.records_per_image, args.repeats, args.baseline,
                                       args.device).items():
            ratios = "".join(f"  now/{name} {result['now'] / result[name]:.2f}" for name in ("torchvision", "baseline")
                             if name in result)
            print(f"{case:40s} " + "  ".join(f"{name} {value:.3f}" for name, value in result.items()) + ratios,
                  flush=True)
        return
    images = source_images(args.images)
    if args.after_crop:
        print(f"# ops after the crop, batch {args.batch}, output {args.size}, ms per sample, median of "
              f"{args.repeats} interleaved runs ({'CPU time' if args.device == 'cpu' else 'wall time'})")
        for preset, result in after_crop(images, args.size, args.batch, args.device, args.repeats,
                                         args.baseline).items():
            ratio = f"  now/baseline {result['now'] / result['baseline']:.2f}" if "baseline" in result else ""
            print(f"{preset:12s} " + "  ".join(f"{name} {value:.3f}" for name, value in result.items()) + ratio,
                  flush=True)
        return
    print(f"# {args.images} sources, {args.records_per_image} records each, output {args.size}, "
          f"median of {args.repeats}")
    print(f"{'pipeline':24s} {'records':>7s} {'batched ms':>10s} {'per-image ms':>12s} {'speedup':>7s} "
          f"{'mean |d|':>8s} {'max |d|':>7s}   (|d| on the uint8 scale)")
    rows = [(f"op {name}", lambda ops=ops: AugmentPipeline(ops(), args.size)) for name, ops in OPS.items()]
    rows += [(f"preset {name}", lambda name=name: make_pipeline(name, args.size)) for name in PRESETS]
    for label, make in rows:
        if args.only and label.split(" ", 1)[1] not in args.only:
            continue
        r = compare(make(), images, args.records_per_image, args.device, args.repeats)
        print(f"{label:24s} {r['records']:7d} {r['batched_ms']:10.1f} {r['per_image_ms']:12.1f} "
              f"{r['speedup']:7.2f} {r['mean_abs_diff']:8.4f} {r['max_abs_diff']:7.1f}", flush=True)
    if args.loader_images:
        print(f"# ReinforcedDataset, {args.loader_images} JPEG sources (~300-430 x 300-640), output 224, "
              f"one process, median of {args.repeats} epochs")
        for preset, r in loader_overhead(args.loader_images, args.repeats).items():
            extra = "  ".join(f"{key} {value:+.1%}" for key, value in r.items() if key.startswith("overhead"))
            print(f"{preset:16s} {r['samples_per_s']:8.1f} samples/s  {extra}")


if __name__ == "__main__":
    main()
