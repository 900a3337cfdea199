"""Training throughput of ``reinforce train`` by forward precision and memory format, side by side.

The same plain run (``--recipe plain``, one epoch, digits written at ``--size`` px, no validation) is repeated
with ``--precision fp32``, ``--precision bf16`` and ``--precision bf16 --channels-last``, interleaved ``--repeats``
times so that load from other work falls on every variant; each run's images/s comes from its metrics line. The
figure is the median images/s per variant and its ratio to fp32. ``--accuracy-epochs N`` also trains each
variant for N epochs per seed with the test split as validation and prints the last top-1 (mean ± sd).

    PYTHONPATH=.:loaders .venv/bin/python benchmarks/train_precision.py --out /tmp/precision \
        [--device cuda] [--model resnet50] [--size 224] [--batch-size 128] [--per-class 60] [--repeats 3] \
        [--accuracy-epochs 15 --seeds 0 1 2]

On the CPU, ``--precision auto`` keeps fp32: this shows what bf16 would cost there. On a GPU, ``auto`` is bf16.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from reinforce.demo import materialize_digits
from reinforce.recipes import TrainConfig, train

VARIANTS = {"fp32": dict(precision="fp32"), "bf16": dict(precision="bf16"),
            "bf16 + channels-last": dict(precision="bf16", channels_last=True)}


def images_per_second(out: Path, data: Path, args: argparse.Namespace, **variant) -> float:
    shutil.rmtree(out, ignore_errors=True)
    train(TrainConfig(train_source=str(data), model=args.model, recipe="plain", epochs=1, warmup_epochs=0,
                      batch_size=args.batch_size, image_size=args.size, out=str(out), progress=False, ema=False,
                      device=args.device, workers=args.workers, threads=args.threads, **variant),
          log=lambda _: None)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=20, help="train images per class (10 classes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--accuracy-epochs", type=int, default=0,
                        help="also train each variant this many epochs per seed and print its test top-1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    train_dir, test_dir = materialize_digits(args.out / "digits", size=args.size, per_class=args.per_class)
    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, variant in VARIANTS.items():
            speeds[name].append(images_per_second(args.out / "run", train_dir, args, **variant))
            print(f"repeat {repeat} {name}: {speeds[name][-1]:.1f} images/s", flush=True)
    if args.accuracy_epochs:
        print(f"\naccuracy after {args.accuracy_epochs} epochs (plain, top-1 on the test split, seeds "
              f"{args.seeds}):\n")
        print("| variant | top-1 (mean ± sd) | per seed |\n| --- | ---: | --- |")
        for name, variant in VARIANTS.items():
            scores = []
            for seed in args.seeds:
                out = args.out / f"accuracy-{name.replace(' ', '')}-{seed}"
                shutil.rmtree(out, ignore_errors=True)
                scores.append(train(TrainConfig(
                    train_source=str(train_dir), val_source=str(test_dir), model=args.model, recipe="plain",
                    epochs=args.accuracy_epochs, batch_size=args.batch_size, image_size=args.size, out=str(out),
                    progress=False, device=args.device, workers=args.workers, threads=args.threads, seed=seed,
                    **variant), log=lambda _: None).last_top1)
            print(f"| {name} | {statistics.mean(scores):.2f} ± {statistics.stdev(scores) if len(scores) > 1 else 0:.2f} "
                  f"| {', '.join(f'{v:.2f}' for v in scores)} |", flush=True)
    base = statistics.median(speeds["fp32"])
    print(f"\n{args.model} at {args.size} px, batch {args.batch_size}, {10 * args.per_class} images, device "
          f"{args.device}; median of {args.repeats} one-epoch runs\n")
    print("| variant | images/s (median) | runs | vs fp32 |\n| --- | ---: | --- | ---: |")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
