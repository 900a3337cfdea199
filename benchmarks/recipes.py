"""The training recipes side by side on real data (scikit-learn digits at 32 px), several seeds, equal epochs.

1. The teachers (``--teacher ARCH=WEIGHTS``, repeatable: an ensemble; by default a timm resnet10t trained here
   with ``--recipe plain`` on the whole train split, its best weights) teach a store (``rrc``, ``-A``
   augmentations per image, top-5) of the first ``--per-class`` train images of each class, the training set of
   both tables (small, so that the runs fit a shared 2-core box).
2. ``--table scratch`` (student ``--student``, ``--epochs`` epochs): plain; usi from the store (CE + 5 KL);
   usi with the teachers online (run every step on the student's own augmentation); with ``--kd-only`` also
   both usi variants with the KL term only (the DR paper's loss). ``--timing-pairs N`` also alternates N short
   store and online runs and prints their epoch seconds side by side.
3. ``--table finetune`` (ImageNet tf_efficientnet_lite0 from the PyPI package, the ``bench`` extra): a
   fixed-schedule fine-tune (plain + --fine-tune, one-cycle) vs adaptive (SGD + SAM, LR range test,
   ReduceLROnPlateauV2, early stop) with labels, and with the store.

    PYTHONPATH=.:loaders nice -n 10 .venv/bin/python benchmarks/recipes.py --out /tmp/recipes-bench \
        [--seeds 0 1 2] [--epochs 8] [--per-class 32] [--table scratch|finetune|both|none] [--threads 1] \
        [--teacher ARCH=WEIGHTS ...] [-A 16] [--timing-pairs 3 --timing-epochs 3]

Variants run interleaved (seed by seed), so that load from other work on the machine falls on all of them.
Prints one markdown table per part (top-1 on the 450-image test split: mean ± sd over seeds, last epoch) and
writes every run directory and ``results-TABLE.json`` under OUT.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from reinforce.build import BuildConfig, run_build
from reinforce.demo import materialize_digits
from reinforce.recipes import TrainConfig, train

SIZE = 32
HALF = (0.5, 0.5, 0.5)


def _run(name: str, out: Path, **settings) -> dict:
    """Train one configuration (or reuse a finished run) and return its figures."""
    run_dir = out / name
    if not (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        began = time.perf_counter()
        train(TrainConfig(out=str(run_dir), progress=False, image_size=SIZE, **settings), log=lambda _: None)
        (run_dir / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - began}))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    last = rows[-1]
    return {"name": name, "top1": last["val_top1"], "ema_top1": last.get("ema_top1"),
            "epochs": len(rows), "epoch_seconds": statistics.median(r["epoch_seconds"] for r in rows),
            "wall": json.loads((run_dir / "wall.json").read_text())["seconds"],
            "curve": [max(v for v in (r["val_top1"], r.get("ema_top1")) if v is not None) for r in rows],
            "teacher": summary["teacher"], "warnings": summary["warnings"]}


def prepare(out: Path, teacher_epochs: int, augmentations: int, per_class: int,
            teachers: list[str]) -> tuple[Path, Path, list[str], Path]:
    """Digits at 32 px, the teachers (``teachers`` as ``ARCH=WEIGHTS``, else a resnet10t trained here on the whole
    train split), and a store of the first ``per_class`` train images of each class (0: all of them) built from
    all the teachers. Finished steps are reused."""
    train_dir, test_dir = materialize_digits(out / "digits", size=SIZE, seed=0) if not (out / "digits").exists() \
        else (out / "digits" / "train", out / "digits" / "test")
    specs = list(teachers)
    if not specs:
        teacher = _run("teacher_resnet10t", out, train_source=str(train_dir), val_source=str(test_dir),
                       model="resnet10t", recipe="plain", epochs=teacher_epochs, mean=HALF, std=HALF, seed=100)
        specs = [f"resnet10t={out / 'teacher_resnet10t' / 'best.safetensors'}"]
        print(f"teacher resnet10t ({teacher_epochs} epochs, plain, whole train split): test top-1 "
              f"{teacher['top1']:.2f} (EMA {teacher['ema_top1']:.2f})")
    subset = train_dir
    if per_class:
        subset = out / f"digits-{per_class}" / "train"
        if not subset.exists():
            for folder in sorted(train_dir.iterdir()):
                (subset / folder.name).mkdir(parents=True)
                for image in sorted(folder.iterdir())[:per_class]:
                    shutil.copy(image, subset / folder.name / image.name)
    names = "+".join(spec.partition("=")[0] for spec in specs)
    store = out / f"digits-{per_class or 'all'}-A{augmentations}-{names}.zarr"
    # Builds, resumes an interrupted build, or finds the store complete.
    run_build(BuildConfig(source=str(subset), out=str(store), teachers=specs, augment="rrc", image_size=SIZE,
                          num_augmentations=augmentations, top_k=5, seed=0, batch_size=256, block_size=256),
              progress=False)
    return subset, test_dir, specs, store


def scratch_table(out: Path, seeds: list[int], epochs: int, student: str, batch: int, data: tuple,
                  kd_only: bool, online: bool = True) -> list[dict]:
    train_dir, test_dir, specs, store = data
    common = dict(train_source=str(train_dir), val_source=str(test_dir), model=student, epochs=epochs, mean=HALF,
                  std=HALF, batch_size=batch)
    variants = {
        "plain": dict(recipe="plain"),
        "usi, store": dict(recipe="usi", store=str(store), teacher_weights=specs),
        "usi, store, KL only": dict(recipe="usi", store=str(store), teacher_weights=specs, kd_only=True),
        "usi, online teacher": dict(recipe="usi", teachers=specs),
        "usi, online teacher, KL only": dict(recipe="usi", teachers=specs, kd_only=True),
    }
    chosen = {key: extra for key, extra in variants.items()
              if (kd_only or "KL only" not in key) and (online or "online" not in key)}
    return [dict(_run(f"{key.replace(', ', '_').replace(' ', '-')}_seed{seed}", out, seed=seed, **common, **extra),
                 variant=key, seed=seed) for seed in seeds for key, extra in chosen.items()]


def side_by_side_timing(out: Path, pairs: int, epochs: int, student: str, batch: int, data: tuple) -> dict:
    """Store and online usi runs of ``epochs`` epochs alternated ``pairs`` times (so that both see the same load
    from other work): every training epoch's seconds (validation excluded) of each mode."""
    train_dir, test_dir, specs, store = data
    common = dict(train_source=str(train_dir), val_source=str(test_dir), model=student, epochs=epochs, mean=HALF,
                  std=HALF, batch_size=batch, recipe="usi")
    modes = {"store": dict(store=str(store)), "online": dict(teachers=specs)}
    seconds: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    for pair in range(pairs):
        for mode, extra in modes.items():
            run_dir = out / f"timing_{mode}_{pair}"
            _run(run_dir.name, out, seed=pair, **common, **extra)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            seconds[mode].append([row["epoch_seconds"] for row in rows])
    return seconds


def timing_text(seconds: dict[str, list[list[float]]]) -> str:
    """Per-pair epoch seconds, the medians and the store/online ratio (overall and per pair)."""
    lines = []
    for mode, runs in seconds.items():
        lines.append(f"{mode}: " + " / ".join(", ".join(f"{value:.2f}" for value in run) for run in runs))
    store = statistics.median(v for run in seconds["store"] for v in run)
    online = statistics.median(v for run in seconds["online"] for v in run)
    per_pair = [statistics.median(a) / statistics.median(b) for a, b in zip(seconds["store"], seconds["online"])]
    lines.append(f"median epoch: store {store:.2f} s, online {online:.2f} s; store/online {store / online:.3f} "
                 f"(per pair {min(per_pair):.3f}-{max(per_pair):.3f})")
    return "\n".join(lines)


def finetune_table(out: Path, seeds: list[int], epochs: int, batch: int, data: tuple,
                   range_steps: int) -> list[dict]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from imagenet_teacher import lite_weights

    train_dir, test_dir, specs, store = data
    lite0 = lite_weights(out / "imagenet")[0].partition("=")[2]
    common = dict(train_source=str(train_dir), val_source=str(test_dir), model=f"tf_efficientnet_lite0={lite0}",
                  epochs=epochs, warmup_epochs=1, batch_size=batch)
    variants = {
        "fixed fine-tune (plain, one-cycle)": dict(recipe="plain", fine_tune=True),
        "adaptive, labels": dict(recipe="adaptive", patience=2, range_steps=range_steps),
        "adaptive, store (CE + 5 KL)": dict(recipe="adaptive", patience=2, range_steps=range_steps, store=str(store),
                                            teacher_weights=specs),
    }
    return [dict(_run(f"ft_{key.split(' ')[0].strip(',')}{'_store' if 'store' in key else ''}_seed{seed}", out,
                      seed=seed, **common, **extra), variant=key, seed=seed)
            for seed in seeds for key, extra in variants.items()]


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def markdown(results: list[dict]) -> str:
    lines = ["| variant | top-1 (last epoch) | EMA top-1 | epochs | s/epoch (median) | wall s | teacher top-1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        ema = [r["ema_top1"] for r in runs if r["ema_top1"] is not None]
        teacher = runs[0]["teacher"]
        teacher_text = "-" if teacher["top1"] is None else f"{teacher['top1']:.2f} ({teacher['kind']})"
        lines.append(
            f"| {variant} | {_mean_sd([r['top1'] for r in runs])} | {_mean_sd(ema) if ema else '-'} | "
            f"{_mean_sd([r['epochs'] for r in runs])} | {statistics.median(r['epoch_seconds'] for r in runs):.1f} | "
            f"{statistics.mean(r['wall'] for r in runs):.0f} | {teacher_text} |")
    return "\n".join(lines)


def against_baseline(results: list[dict], baseline: str = "plain") -> str:
    """Each variant's per-seed top-1 minus the baseline's (same seed): mean, sd, wins; next to the seed sds."""
    by_seed = {(r["variant"], r["seed"]): r["top1"] for r in results}
    seeds = sorted({r["seed"] for r in results})
    base = [by_seed[(baseline, seed)] for seed in seeds]
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        if variant == baseline:
            continue
        mine = [by_seed[(variant, seed)] for seed in seeds]
        gains = [a - b for a, b in zip(mine, base)]
        lines.append(f"{variant} - {baseline}: {_mean_sd(gains)} points per seed ({sum(g > 0 for g in gains)}/"
                     f"{len(gains)} seeds better; seed sd {statistics.stdev(mine):.2f} vs {statistics.stdev(base):.2f}"
                     f"; per seed {', '.join(f'{g:+.2f}' for g in gains)})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--student", default="test_efficientnet")
    parser.add_argument("--teacher", action="append", default=[], metavar="ARCH=WEIGHTS",
                        help="the store's teachers (repeatable; the online mode runs the same ones); "
                             "default: a resnet10t trained here for --teacher-epochs")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("-A", "--augmentations", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=32, help="train images per class (0: all 1,347)")
    parser.add_argument("--timing-pairs", type=int, default=0,
                        help="also time usi store vs online side by side: this many alternated pairs of runs")
    parser.add_argument("--timing-epochs", type=int, default=3)
    parser.add_argument("--table", choices=("scratch", "finetune", "both", "none"), default="scratch",
                        help="finetune needs the bench extra; two invocations with one --out may run in parallel")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--range-steps", type=int, default=30, help="adaptive: steps of the LR range test")
    parser.add_argument("--kd-only", action="store_true", help="also usi from the store with the KL term only")
    parser.add_argument("--no-online", action="store_true", help="skip the online-teacher rows (more seeds for less)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.out, args.teacher_epochs, args.augmentations, args.per_class, args.teacher)
    images = f"{args.per_class} images per class" if args.per_class else "the whole train split"
    results = {}
    if args.table in ("scratch", "both"):
        results["scratch"] = scratch_table(args.out, args.seeds, args.epochs, args.student, args.batch_size, data,
                                           args.kd_only, not args.no_online)
        print(f"\nFrom scratch: {args.student} on {images}, {args.epochs} epochs, seeds {args.seeds}\n")
        print(markdown(results["scratch"]))
        if len(args.seeds) > 1:
            print("\n" + against_baseline(results["scratch"]))
    if args.table in ("finetune", "both"):
        results["finetune"] = finetune_table(args.out, args.seeds, args.finetune_epochs, args.batch_size, data,
                                             args.range_steps)
        print(f"\nFine-tuning ImageNet tf_efficientnet_lite0 on {images}, at most {args.finetune_epochs} epochs, "
              f"seeds {args.seeds}\n")
        print(markdown(results["finetune"]))
    if args.timing_pairs:
        results["timing"] = side_by_side_timing(args.out, args.timing_pairs, args.timing_epochs, args.student,
                                                args.batch_size, data)
        print(f"\nEpoch seconds, usi store vs online, {args.timing_pairs} alternated pairs of {args.timing_epochs} "
              f"epochs\n")
        print(timing_text(results["timing"]))
    seeds = "-".join(map(str, args.seeds))
    (args.out / f"results-{args.table}-seeds{seeds}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
