"""The ``reinforce`` command line: build, inspect, verify, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reinforce_loaders.augment import PRESETS
from reinforce_loaders.errors import ReinforceError

from . import __version__


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reinforce", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reinforce {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="reinforce an image dataset into a store")
    build.add_argument("source", help="ImageFolder-layout directory: SOURCE/CLASS/IMAGE")
    build.add_argument("--teacher", action="append", required=True, metavar="ARCH[=WEIGHTS]",
                       help="ensemble member: a timm architecture, with local .safetensors/state_dict weights "
                            "(else timm's pretrained weights); repeat for an ensemble")
    build.add_argument("--augment", default="rrc", metavar="PRESET|CONFIG.json",
                       help=f"augmentation preset ({', '.join(PRESETS)}) or a JSON pipeline config file")
    build.add_argument("--image-size", type=int, default=224, help="side of the augmented images (default 224)")
    build.add_argument("--num-augmentations", "-A", type=int, required=True, help="stored augmentations per image")
    build.add_argument("--top-k", "-k", type=int, required=True, help="teacher probabilities kept per record")
    build.add_argument("--out", required=True, help="store directory to create, or to resume")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--batch-size", type=int, default=256, help="records per teacher forward pass")
    build.add_argument("--block-size", type=int, default=256, help="samples per block, the unit of work and resume")
    build.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    build.add_argument("--decode-threads", type=int, default=4)
    build.add_argument("--teacher-input-size", type=int, help="override every member's input size")
    build.add_argument("--teacher-mean", type=_floats, help="override every member's mean, e.g. 0.5,0.5,0.5")
    build.add_argument("--teacher-std", type=_floats, help="override every member's std, e.g. 0.5,0.5,0.5")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    inspect = commands.add_parser("inspect", help="print what a store holds")
    inspect.add_argument("store")

    verify = commands.add_parser("verify", help="check a store for completeness and consistency with its data")
    verify.add_argument("store")
    verify.add_argument("--data", help="source directory the store was built from; checks counts, labels, "
                                       "sizes and fingerprints")

    demo = commands.add_parser("demo", help="teachers, store and two students on scikit-learn's digits")
    demo.add_argument("--workdir", help="where to keep the data, weights and store (default: a temporary dir)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ReinforceError as error:
        print(f"reinforce {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reinforce {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        from .build import BuildConfig, run_build

        config = BuildConfig(
            source=args.source, out=args.out, teachers=args.teacher, augment=args.augment,
            image_size=args.image_size, num_augmentations=args.num_augmentations, top_k=args.top_k,
            seed=args.seed, batch_size=args.batch_size, block_size=args.block_size, device=args.device,
            decode_threads=args.decode_threads, teacher_input_size=args.teacher_input_size,
            teacher_mean=args.teacher_mean, teacher_std=args.teacher_std,
        )
        summary = run_build(config, progress=not args.no_progress)
        print(f"built {args.out}: {summary}")
        return 0
    if args.command == "inspect":
        from .report import describe_store

        print(describe_store(args.store))
        return 0
    if args.command == "verify":
        from .report import VerificationError, verify_store

        try:
            for line in verify_store(args.store, args.data):
                print(f"ok  {line}")
        except VerificationError as error:
            print(f"reinforce verify: FAILED: {error}", file=sys.stderr)
            return 1
        print(f"{args.store}: verified")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(workdir=args.workdir, seed=args.seed)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
