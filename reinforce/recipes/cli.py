"""``reinforce train``: the subcommand's arguments and how they become a :class:`TrainConfig`."""

from __future__ import annotations

import argparse
from typing import Any

from .config import PRECISIONS, RECIPES, TrainConfig


def _pair(text: str) -> tuple[float, float]:
    low, high = (float(part) for part in text.split(","))
    return low, high


def _triple(text: str) -> tuple[float, float, float]:
    values = tuple(float(part) for part in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("give three comma-separated numbers, e.g. 0.5,0.5,0.5")
    return values


def add_train_parser(commands: Any) -> argparse.ArgumentParser:
    train = commands.add_parser(
        "train", help="train a student from a store (usi), fine-tune adaptively (adaptive), or a baseline (plain)",
        description="Train a student. Recipe defaults are filled in and written to OUT/config.json. Runs under "
                    "torchrun for DDP (gloo on CPU; NCCL for gradients and gloo for metrics on CUDA).")
    train.add_argument("train_source", help="ImageFolder directory of the training images (the store's source)")
    train.add_argument("--store", help="reinforced store of TRAIN_SOURCE (offline soft targets)")
    train.add_argument("--val", help="ImageFolder directory of validation images (same class folders)")
    train.add_argument("--model", required=True, metavar="ARCH[=WEIGHTS]",
                       help="timm architecture of the student, with optional local weights to start from")
    train.add_argument("--recipe", choices=tuple(RECIPES), default="usi",
                       help="usi: CE + KD from --store or online --teacher (paper 002); adaptive: fine-tuning with "
                            "an estimated LR, plateau decays and early stop (paper 000); plain: hard labels, the "
                            "baseline (default %(default)s)")
    train.add_argument("--out", required=True, help="run directory (config, metrics, weights, checkpoint)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--fine-tune", action="store_true", default=None,
                       help="start from --model's weights with a new classifier for these classes (adaptive: always)")
    train.add_argument("--teacher", action="append", default=[], metavar="ARCH=WEIGHTS",
                       help="online teacher run every step on the student's augmentation (usi online; repeat)")
    train.add_argument("--teacher-weights", action="append", default=[], metavar="ARCH=WEIGHTS",
                       help="the store's teachers, only to report their accuracy on --val (repeat)")
    train.add_argument("--allow-empty-classes", action="store_true",
                       help="keep a TRAIN_SOURCE class folder without images as a class without samples")
    train.add_argument("--baseline", metavar="PLAIN_RUN_DIR",
                       help="a finished --recipe plain run: the teachers' margin over its best top-1 is checked "
                            "before training (default: against this run's own student, after it)")
    train.add_argument("--epochs", type=int, help="epochs (maximum for adaptive); default: the recipe's")
    train.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    train.add_argument("--lr", type=float, help="peak LR (usi/plain default 2e-3; adaptive: estimated)")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--warmup-epochs", type=float)
    train.add_argument("--image-size", type=int, help="training resolution (default: the store's, else 224)")
    train.add_argument("--decode", choices=("exact", "fast"), default="exact",
                       help="with --store: 'fast' decodes JPEGs at reduced scale where the stored crop allows "
                            "(faster on large images; pixels differ slightly, targets do not)")
    train.add_argument("--mean", type=_triple, help="input normalization mean (default: the model's)")
    train.add_argument("--std", type=_triple, help="input normalization std (default: the model's)")
    kd = train.add_argument_group("distillation")
    kd.add_argument("--alpha-kd", type=float, default=5.0, help="weight of the KL term next to CE (default 5)")
    kd.add_argument("--kd-only", action="store_true", help="KL to the teacher only, no hard-label CE (alpha = inf)")
    kd.add_argument("--temperature", type=float, default=1.0)
    kd.add_argument("--kd-mode", choices=("join", "replace"), default="join",
                    help="adaptive with --store: soft targets join the CE (default) or replace it")
    kd.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha (0: off; a mixing store mixes itself)")
    kd.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    kd.add_argument("--no-ema", dest="ema", action="store_false", default=None, help="no model EMA")
    kd.add_argument("--ema-decay", type=float, help="default: adapted to the run's length")
    kd.add_argument("--test-crop", type=float, help="validation center-crop ratio (usi/plain 0.95)")
    adaptive = train.add_argument_group("adaptive")
    adaptive.add_argument("--lr-search", choices=("none", "range", "tpe"), help="adaptive default: range")
    adaptive.add_argument("--lr-range", type=_pair, default=(1e-3, 1e-2), metavar="LOW,HIGH")
    adaptive.add_argument("--range-steps", type=int, default=100, help="steps of the LR range test")
    adaptive.add_argument("--tpe-trials", type=int, default=15)
    adaptive.add_argument("--trial-epochs", type=int, default=6)
    adaptive.add_argument("--patience", type=int, default=5)
    adaptive.add_argument("--decay-factor", type=float, default=0.1, help="LR multiplier of each plateau decay")
    adaptive.add_argument("--min-lr-ratio", type=float, default=1e-3,
                          help="the LR floor, as a fraction of the initial LR; the early stop waits for it "
                               "(1e-3: three decays of 0.1; raise it for short runs)")
    adaptive.add_argument("--sam-rho", type=float, default=0.05)
    sampling = train.add_argument_group("sampling")
    sampling.add_argument("--sampler", choices=("fixed", "multiscale"), default="fixed",
                          help="multiscale: a resolution and batch size per step (paper 003)")
    sampling.add_argument("--curriculum", choices=("none", "easy", "hard"), default="none",
                          help="draw each epoch's stored records from an entropy window (paper 001, C.4)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    train.add_argument("--device", default="auto",
                       help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default %(default)s)")
    train.add_argument("--channels-last", action="store_true",
                       help="channels-last memory format for the student (faster convolutions on GPUs with bf16)")
    train.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="forward passes in bf16 autocast, or fp32; auto: bf16 on a CUDA device that supports "
                            "it, else fp32 (default %(default)s)")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    return train


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        train_source=args.train_source, store=args.store, val_source=args.val, model=args.model, recipe=args.recipe,
        out=args.out, resume=args.resume, fine_tune=args.fine_tune, teachers=args.teacher,
        teacher_weights=args.teacher_weights, baseline=args.baseline, allow_empty_classes=args.allow_empty_classes,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, image_size=args.image_size, decode=args.decode, mean=args.mean, std=args.std,
        alpha_kd=args.alpha_kd, kd_only=args.kd_only, temperature=args.temperature, kd_mode=args.kd_mode,
        mixup=args.mixup, cutmix=args.cutmix, ema=args.ema, ema_decay=args.ema_decay, test_crop=args.test_crop,
        lr_search=args.lr_search, lr_range=args.lr_range, range_steps=args.range_steps, tpe_trials=args.tpe_trials,
        trial_epochs=args.trial_epochs, patience=args.patience, decay_factor=args.decay_factor,
        min_lr_ratio=args.min_lr_ratio, sam_rho=args.sam_rho, sampler=args.sampler,
        curriculum=args.curriculum, seed=args.seed, workers=args.workers, device=args.device,
        channels_last=args.channels_last, precision=args.precision, threads=args.threads, progress=not args.no_progress,
    )


def run_from_args(args: argparse.Namespace) -> int:
    from .train import train

    train(config_from_args(args))  # warnings are printed as they arise and kept in OUT/summary.json
    return 0
