"""Accuracy effect of ``decode="fast"``: the demo's student trained from one store, exact against fast replay.

The demo's data are 32 px PNGs, which fast mode leaves alone, so this writes the same digits (the demo's split)
as JPEGs of ``--jpeg-size`` px (quality 90), builds the demo's store from them (the demo's two teachers, trained
on the 32 px PNGs, ``rrc`` at 32 px, ``--augmentations`` slots, top-5), and trains the demo's student from it
with ``decode="exact"`` and ``decode="fast"``, seed by seed, the two modes back to back. Test images: the demo's
32 px PNG test split. Also reports the share of records fast mode decodes at reduced scale, the mean pixel
difference, and the CPU time of one epoch of loading in each mode.

Usage: ``nice -n 10 python benchmarks/fast_decode_accuracy.py [--seeds 3] [--steps 600] [--jpeg-size 128]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reinforce.build import BuildConfig, run_build
from reinforce.demo import (BATCH_SIZE, IMAGE_SIZE, STUDENT, TEACHER_EPOCHS, TEACHERS, TOP_K, materialize_digits,
                            reinforced_student_job, teacher_job)
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders import jpeg as fast_jpeg
from reinforce_loaders.source import ImageSource

from loader import fast_difference  # benchmarks/loader.py


def write_jpegs(png_dir: Path, out: Path, size: int) -> Path:
    """The PNGs of ``png_dir`` (class folders) resized to ``size`` px (bicubic) and saved as quality-90 JPEGs."""
    for png in sorted(png_dir.glob("*/*.png")):
        target = out / png.parent.name / f"{png.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(png) as image:
            image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(target, quality=90)
    return out


def epoch_cpu(train_dir: Path, store: Path, decode: str, repeats: int = 3) -> float:
    """Median CPU ms per sample of loading one epoch in process (batches of the demo's size)."""
    dataset = ReinforcedDataset(train_dir, store, decode=decode)
    positions = list(range(len(dataset)))
    times = []
    for epoch in range(repeats + 1):
        dataset.set_epoch(epoch)
        began = time.process_time()
        for first in range(0, len(positions), BATCH_SIZE):
            dataset.__getitems__(positions[first:first + BATCH_SIZE])
        if epoch:  # epoch 0 checks fingerprints
            times.append((time.process_time() - began) / len(positions))
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600, help="student SGD steps (the demo's 600)")
    parser.add_argument("--jpeg-size", type=int, default=128)
    parser.add_argument("--augmentations", type=int, default=32)
    parser.add_argument("--root", help="working directory (default: a new temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root or tempfile.mkdtemp(prefix="fast-accuracy-"))
    print(f"# {platform.platform()}, torch {torch.__version__}, fast decoder: "
          + ("libjpeg-turbo (simplejpeg)" if fast_jpeg.available() else "Pillow draft") + f"; work dir {root}")
    png_train, test_dir = materialize_digits(root / "digits", seed=0)
    train_dir = write_jpegs(png_train, root / "jpeg" / "train", args.jpeg_size)
    steps = TEACHER_EPOCHS * (len(ImageSource.from_folder(png_train)) // BATCH_SIZE)
    weights = [root / f"teacher_{number}_{arch}.safetensors" for number, arch in enumerate(TEACHERS)]
    for number, arch in enumerate(TEACHERS):
        top1 = teacher_job(arch, number, png_train, test_dir, weights[number], steps, 0, lambda done: None)
        print(f"teacher {arch}: test top-1 {100 * top1:.2f} %")
    store = root / "store.zarr"
    run_build(BuildConfig(source=str(train_dir), out=str(store),
                          teachers=[f"{arch}={path}" for arch, path in zip(TEACHERS, weights)], augment="rrc",
                          image_size=IMAGE_SIZE, num_augmentations=args.augmentations, top_k=TOP_K, seed=0,
                          batch_size=256, block_size=256, cpu_threads=1, decode_threads=1), progress=False)
    torch.set_num_threads(1)
    difference = fast_difference(train_dir, store, size=IMAGE_SIZE)
    print(f"{args.jpeg_size} px JPEG sources, {IMAGE_SIZE} px crops: {difference['reduced']:.0%} of "
          f"{difference['records']} records decoded at 1/2 scale or less; fast - exact: mean |d| "
          f"{difference['mean_abs']:.2f} levels ({difference['mean_abs_reduced']:.2f} over the reduced ones), "
          f"max {difference['max_abs']:.0f}")
    print("loading, CPU ms/sample in process: " + ", ".join(
        f"{mode} {epoch_cpu(train_dir, store, mode):.3f}" for mode in ("exact", "fast")))
    results: dict[str, list[float]] = {"exact": [], "fast": []}
    for seed in range(args.seeds):
        for mode in results:
            results[mode].append(100 * reinforced_student_job(train_dir, test_dir, store, args.steps, seed,
                                                              lambda done: None, decode=mode))
        print(f"seed {seed}: exact {results['exact'][-1]:.2f}, fast {results['fast'][-1]:.2f}")
    for mode, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{STUDENT} from the store, decode={mode}: top-1 {statistics.mean(values):.2f} +- {spread:.2f} "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    differences = [f - e for e, f in zip(results["exact"], results["fast"])]
    print(f"fast - exact per seed: {', '.join(f'{d:+.2f}' for d in differences)} (mean {np.mean(differences):+.2f})")


if __name__ == "__main__":
    main()
