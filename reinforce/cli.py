"""The ``reinforce`` command line: build, inspect, verify, train, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reinforce_loaders.augment import PRESETS
from reinforce_loaders.errors import ReinforceError

from . import __version__
from .share.cli import PUBLISHING_COMMANDS, add_publishing_parsers, run_publishing_command


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reinforce", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reinforce {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_build_parser(commands)

    inspect = commands.add_parser("inspect", help="print what a store holds")
    inspect.add_argument("store")
    inspect.add_argument("--data", help="source directory the store was built from (needed by --grid)")
    inspect.add_argument("--grid", metavar="PNG", help="also draw a few samples with stored records replayed, "
                                                       "captioned with the teacher's top classes")

    verify = commands.add_parser("verify", help="check a store for completeness and consistency with its data")
    verify.add_argument("store")
    verify.add_argument("--data", help="source directory the store was built from; checks counts, labels, "
                                       "sizes and fingerprints")
    verify.add_argument("--quick", action="store_true",
                        help="with --data: check the source's names, sizes and sha256 against the source manifest "
                             "beside the store (written by publish) instead of decoding every image")
    add_publishing_parsers(commands)

    demo = commands.add_parser("demo", help="teachers, store and two students on scikit-learn's digits")
    demo.add_argument("--workdir", help="where to keep the data, weights and store (default: a temporary dir)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, the trainings and the store (default 0)")
    demo.add_argument("--jobs", type=int, help="worker processes for the trainings, one torch thread each (default: "
                                               "2, or 1 on a single core); the results do not depend on it")

    from .recipes.cli import add_train_parser
    add_train_parser(commands)
    return parser


def _add_build_parser(commands: argparse._SubParsersAction) -> None:
    """The ``build`` command; its defaults are :class:`~reinforce.build.plan.BuildConfig`'s (declared once, there)."""
    from .build.plan import BAD_IMAGE_POLICIES, MAX_IMAGE_SIZE, PRECISIONS, TEACHER_CLASSES, config_defaults

    build = commands.add_parser("build", help="reinforce an image dataset into a store")
    build.add_argument("source", help="ImageFolder-layout directory: SOURCE/CLASS/IMAGE")
    build.add_argument("--teacher", dest="teachers", action="append", required=True, metavar="ARCH[=WEIGHTS]",
                       help="ensemble member: a timm architecture, with local .safetensors/state_dict weights "
                            "(else timm's pretrained weights); repeat for an ensemble")
    build.add_argument("--teacher-classes", choices=TEACHER_CLASSES,
                       help="how the teachers' classes relate to the dataset's: 'dataset' (default) refuses "
                            "teachers whose class count differs from the dataset's; 'all' keeps the teachers' "
                            "label space on purpose (e.g. ImageNet teachers on a subset)")
    build.add_argument("--augment", metavar="PRESET|CONFIG.json",
                       help=f"augmentation preset ({', '.join(PRESETS)}) or a JSON pipeline config file "
                            "(default %(default)s)")
    build.add_argument("--image-size", type=int,
                       help="side of the augmented images, 1 to %d (default: the JSON config's \"size\", else "
                            "224; given with a config whose size differs, the build refuses)" % MAX_IMAGE_SIZE)
    build.add_argument("--num-augmentations", "-A", type=int, required=True, help="stored augmentations per image")
    build.add_argument("--top-k", "-k", type=int, required=True, help="teacher probabilities kept per record")
    build.add_argument("--out", required=True, help="store directory to create, or to resume")
    build.add_argument("--val", dest="val_source", metavar="VAL_SOURCE",
                       help="held-out images in the source's class folders: the teachers' top-1 on them (at their "
                            "input size, center crop 0.875) is recorded in the store's header, so that every user "
                            "of the store can check the teachers are clearly stronger than their student")
    build.add_argument("--seed", type=int,
                       help="seed of every augmentation and mixing draw: the same seed and settings give the "
                            "same store; 0 <= seed < 2**64 (default %(default)s)")
    build.add_argument("--batch-size", type=int,
                       help="records per teacher forward pass; fixed for a store, as it can change the bytes "
                            "(default %(default)s)")
    build.add_argument("--block-size", type=int,
                       help="samples per block, the unit of work and resume (default: 256 to 4096 by "
                            "--num-augmentations, so an epoch's shard-index reads stay small; see format_spec.md)")
    build.add_argument("--class-vocabulary", type=int, metavar="V",
                       help="store top-k indices as positions in a per-image vocabulary of its V most frequent "
                            "classes (default 32 when there are more than 64 classes and A x K >= 512, else "
                            "0 = plain class indices)")
    build.add_argument("--prob-scale", type=int, metavar="Q",
                       help="probabilities are stored as round(p * Q), error <= 0.5/Q, 500 < Q < 65535 (default "
                            "%(default)s: 5e-4; 512 keeps it under 1e-3 for ~1 byte/record less)")
    build.add_argument("--derived-params", dest="param_storage", action="store_const", const="derived",
                       help="store no augmentation parameters: readers re-derive them from the seed and check a "
                            "per-block digest (since format 1.1; fewer bytes per record, see format_spec.md)")
    build.add_argument("--device", help="cpu, cuda or cuda:N (default %(default)s)")
    build.add_argument("--decode-threads", type=int,
                       help="threads decoding source images, per worker (default: 4 with --device cpu; with a GPU "
                            "the worker's cores less 2, at least 4)")
    build.add_argument("--teacher-input-size", type=int,
                       help="override every member's input size, 1 to %d" % MAX_IMAGE_SIZE)
    build.add_argument("--teacher-mean", type=_floats, help="override every member's mean, e.g. 0.5,0.5,0.5")
    build.add_argument("--teacher-std", type=_floats, help="override every member's std, e.g. 0.5,0.5,0.5")
    build.add_argument("--precision", choices=PRECISIONS,
                       help="teacher arithmetic (autocast); auto (default): bf16 on CUDA, fp32 on CPU")
    build.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="run the teachers in channels_last memory format (default on)")
    build.add_argument("--compile", action="store_true", help="torch.compile every teacher")
    build.add_argument("--allow-empty-classes", action="store_true",
                       help="keep a class folder without images as a class without samples (refused by default, "
                            "as torchvision's ImageFolder refuses it: every later class's label would shift)")
    build.add_argument("--max-image-pixels", type=int, metavar="N",
                       help="refuse source images of more than N pixels as unreadable (decompression bombs; they "
                            "follow --on-bad-image); default Pillow's 89,478,485, 0 for no limit")
    build.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES,
                       help="an unreadable source image stops the build (fail, the default) or is recorded as "
                            "skipped in the store and the summary (skip)")
    engine = build.add_argument_group(
        "engine", "default: every block in this process. --workers N: a local Ray instance with N workers; "
                  "--ray-address: join a running Ray cluster (the source and --out must be on a filesystem "
                  "every node sees; the teachers are sent from here). Every engine gives the same bytes")
    engine.add_argument("--workers", type=int, help="Ray block workers (default with --ray-address: as many as "
                                                    "the cluster's CPUs, or GPUs with --device cuda, allow)")
    engine.add_argument("--ray-address", metavar="auto|HOST:PORT", help="join this Ray cluster")
    engine.add_argument("--cpu-threads", type=int,
                        help="torch threads per worker and CPUs a Ray worker reserves (default: with --device cpu "
                             "this machine's cores up to 8, as they change the bytes and are fixed for a store; "
                             "else 1)")
    engine.add_argument("--max-retries", type=int,
                        help="times a block whose worker died is retried before the build fails (default "
                             "%(default)s)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(**{name: value for name, value in config_defaults().items() if name != "teachers"})


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

        run_build(BuildConfig.from_mapping(vars(args)), progress=not args.no_progress, report=print)
        return 0
    if args.command == "inspect":
        from .tools.inspect import describe_store

        print(describe_store(args.store))
        if args.grid:
            from .tools.grid import replay_grid

            if not args.data:
                raise ReinforceError("inspect --grid replays records from the source images: pass --data SOURCE")
            print(f"wrote {replay_grid(args.store, args.data, args.grid)}")
        return 0
    if args.command == "verify":
        from .errors import VerificationError
        from .tools.verify import verify_store

        try:
            for line in verify_store(args.store, args.data, quick=args.quick):
                print(f"ok  {line}")
        except VerificationError as error:
            print(f"reinforce verify: FAILED: {error}", file=sys.stderr)
            return 1
        print(f"{args.store}: verified")
        return 0
    if args.command in PUBLISHING_COMMANDS:
        return run_publishing_command(args)
    if args.command == "train":
        from .recipes.cli import run_from_args

        return run_from_args(args)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(workdir=args.workdir, seed=args.seed, jobs=args.jobs)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
