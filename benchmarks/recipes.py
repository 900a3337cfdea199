"""The training recipes side by side on real data (scikit-learn digits at 32 px), several seeds, equal epochs.

1. A teacher (timm resnet10t) is trained with ``--recipe plain`` on the whole train split; its run's best
   weights teach a store (``rrc``, ``-A`` augmentations per image, top-5) of the first ``--per-class`` train
   images of each class, the training set of both tables (small, so that the runs fit a shared 2-core box).
2. ``--table scratch`` (student ``--student``, ``--epochs`` epochs): plain; usi from the store (CE + 5 KL);
   with ``--kd-only``, usi from the store with the KL term only; usi with the teacher online (run every step on
   the student's own augmentation).
3. ``--table finetune`` (ImageNet tf_efficientnet_lite0 from the PyPI package, the ``bench`` extra): a
   fixed-schedule fine-tune (plain + --fine-tune, one-cycle) vs adaptive (SGD + SAM, LR range test,
   ReduceLROnPlateauV2, early stop) with labels, and with the store.

    PYTHONPATH=.:loaders nice -n 10 .venv/bin/python benchmarks/recipes.py --out /tmp/recipes-bench \
        [--seeds 0 1 2] [--epochs 8] [--per-class 32] [--table scratch|finetune|both] [--threads 1]

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


def prepare(out: Path, teacher_epochs: int, augmentations: int, per_class: int) -> tuple[Path, Path, str, Path]:
    """Digits at 32 px, a resnet10t teacher trained on the whole train split, and a store of the first
    ``per_class`` train images of each class (0: all of them). Finished steps are reused."""
    train_dir, test_dir = materialize_digits(out / "digits", size=SIZE, seed=0) if not (out / "digits").exists() \
        else (out / "digits" / "train", out / "digits" / "test")
    teacher = _run("teacher_resnet10t", out, train_source=str(train_dir), val_source=str(test_dir),
                   model="resnet10t", recipe="plain", epochs=teacher_epochs, mean=HALF, std=HALF, seed=100)
    spec = f"resnet10t={out / 'teacher_resnet10t' / 'best.safetensors'}"
    subset = train_dir
    if per_class:
        subset = out / f"digits-{per_class}" / "train"
        if not subset.exists():
            for folder in sorted(train_dir.iterdir()):
                (subset / folder.name).mkdir(parents=True)
                for image in sorted(folder.iterdir())[:per_class]:
                    shutil.copy(image, subset / folder.name / image.name)
    store = out / f"digits-{per_class or 'all'}-A{augmentations}.zarr"
    # Builds, resumes an interrupted build, or finds the store complete.
    run_build(BuildConfig(source=str(subset), out=str(store), teachers=[spec], augment="rrc", image_size=SIZE,
                          num_augmentations=augmentations, top_k=5, seed=0, batch_size=256, block_size=256),
              progress=False)
    print(f"teacher resnet10t ({teacher_epochs} epochs, plain, whole train split): test top-1 {teacher['top1']:.2f} "
          f"(EMA {teacher['ema_top1']:.2f})")
    return subset, test_dir, spec, store


def scratch_table(out: Path, seeds: list[int], epochs: int, student: str, batch: int, data: tuple,
                  kd_only: bool) -> list[dict]:
    train_dir, test_dir, spec, store = data
    common = dict(train_source=str(train_dir), val_source=str(test_dir), model=student, epochs=epochs, mean=HALF,
                  std=HALF, batch_size=batch)
    variants = {
        "plain": dict(recipe="plain"),
        "usi, store": dict(recipe="usi", store=str(store), teacher_weights=[spec]),
        "usi, store, KL only": dict(recipe="usi", store=str(store), teacher_weights=[spec], kd_only=True),
        "usi, online teacher": dict(recipe="usi", teachers=[spec]),
    }
    chosen = {key: extra for key, extra in variants.items() if kd_only or "KL only" not in key}
    return [dict(_run(f"{key.replace(', ', '_').replace(' ', '-')}_seed{seed}", out, seed=seed, **common, **extra),
                 variant=key, seed=seed) for seed in seeds for key, extra in chosen.items()]


def finetune_table(out: Path, seeds: list[int], epochs: int, batch: int, data: tuple,
                   range_steps: int) -> list[dict]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from imagenet_teacher import lite_weights

    train_dir, test_dir, spec, store = data
    lite0 = lite_weights(out / "imagenet")[0].partition("=")[2]
    common = dict(train_source=str(train_dir), val_source=str(test_dir), model=f"tf_efficientnet_lite0={lite0}",
                  epochs=epochs, warmup_epochs=1, batch_size=batch)
    variants = {
        "fixed fine-tune (plain, one-cycle)": dict(recipe="plain", fine_tune=True),
        "adaptive, labels": dict(recipe="adaptive", patience=2, range_steps=range_steps),
        "adaptive, store (CE + 5 KL)": dict(recipe="adaptive", patience=2, range_steps=range_steps, store=str(store),
                                            teacher_weights=[spec]),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--student", default="test_efficientnet")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("-A", "--augmentations", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=32, help="train images per class (0: all 1,347)")
    parser.add_argument("--table", choices=("scratch", "finetune", "both"), default="scratch",
                        help="finetune needs the bench extra; two invocations with one --out may run in parallel")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--range-steps", type=int, default=30, help="adaptive: steps of the LR range test")
    parser.add_argument("--kd-only", action="store_true", help="also usi from the store with the KL term only")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.out, args.teacher_epochs, args.augmentations, args.per_class)
    images = f"{args.per_class} images per class" if args.per_class else "the whole train split"
    results = {}
    if args.table in ("scratch", "both"):
        results["scratch"] = scratch_table(args.out, args.seeds, args.epochs, args.student, args.batch_size, data,
                                           args.kd_only)
        print(f"\nFrom scratch: {args.student} on {images}, {args.epochs} epochs, seeds {args.seeds}\n")
        print(markdown(results["scratch"]))
    if args.table in ("finetune", "both"):
        results["finetune"] = finetune_table(args.out, args.seeds, args.finetune_epochs, args.batch_size, data,
                                             args.range_steps)
        print(f"\nFine-tuning ImageNet tf_efficientnet_lite0 on {images}, at most {args.finetune_epochs} epochs, "
              f"seeds {args.seeds}\n")
        print(markdown(results["finetune"]))
    seeds = "-".join(map(str, args.seeds))
    (args.out / f"results-{args.table}-seeds{seeds}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
