"""Command-line parsers and runners of ``reinforce publish``, ``download`` and ``import``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from reinforce_loaders.errors import ReinforceError

PUBLISHING_COMMANDS = ("publish", "download", "import")


def _storage_options(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--storage-options must be a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--storage-options must be a JSON object")
    return value


def add_publishing_parsers(commands: Any) -> None:
    publish = commands.add_parser("publish", help="copy a store with its manifest, source manifest, dataset card "
                                                  "and Croissant metadata to a directory or fsspec URL")
    publish.add_argument("store")
    publish.add_argument("dest", help="local directory, s3://bucket/prefix or any fsspec URL")
    publish.add_argument("--data", help="source directory the store was built from: writes the source manifest "
                                        "(paths, sizes, sha256) and a replay picture")
    publish.add_argument("--pretty-name", default="", help="dataset name in the card")
    publish.add_argument("--license", default="other", help="license identifier for the card (default: other)")
    publish.add_argument("--source-dataset", action="append", help="source_datasets entry of the card (repeat)")
    publish.add_argument("--url", default="", help="where the publication will be served (for the metadata)")
    publish.add_argument("--no-grid", action="store_true", help="no replay picture")
    publish.add_argument("--storage-options", type=_storage_options, help="fsspec options as JSON")

    download = commands.add_parser("download", help="fetch a published store: parallel, resumable, checked")
    download.add_argument("url", help="the publication: http(s)://..., s3://..., or a local directory")
    download.add_argument("dest")
    download.add_argument("--workers", type=int, default=4, help="files fetched at once (default 4)")
    download.add_argument("--retries", type=int, default=5, help="tries per file after the first (default 5)")
    download.add_argument("--chunk-size", type=int, default=1 << 20,
                          help="bytes per read and write (default 1 MiB); a killed download keeps what it wrote")
    download.add_argument("--no-verify", action="store_true", help="skip `reinforce verify` at the end")
    download.add_argument("--overwrite", action="store_true",
                          help="download into a DEST that holds other files: the publication's files there are "
                               "replaced (files it does not list are never touched); without it such a DEST is refused")
    download.add_argument("--allow-other-hosts", action="store_true",
                          help="follow HTTP redirects to other hosts (by default only to the same host)")
    download.add_argument("--no-progress", action="store_true")
    download.add_argument("--storage-options", type=_storage_options, help="fsspec options as JSON")
    _add_import_parser(commands)


def _add_import_parser(commands: Any) -> None:
    importer = commands.add_parser("import", help="convert a store released in another format")
    formats = importer.add_subparsers(dest="format", required=True)
    for name, what in (("ml-dr", "apple/ml-dr reinforced data: {index}.pth.tar files and config.pth.tar"),
                       ("fkd", "FKD soft labels: one .tar file per image, mirroring the ImageFolder layout")):
        sub = formats.add_parser(name, help=what)
        sub.add_argument("dir", help="directory of the released files")
        sub.add_argument("--data", required=True, help="the source ImageFolder the files were made from")
        sub.add_argument("--out", required=True, help="store directory to create, or to resume")
        sub.add_argument("--trust-pickle", action="store_true",
                         help="read the files, which are Python pickles, through a restricted unpickler")
        sub.add_argument("--workers", type=int, default=2, help="parallel processes (joblib; default 2)")
        sub.add_argument("--num-classes", type=int, help="classes the teacher predicts (default: the source's)")
        sub.add_argument("--image-size", type=int, default=224, help="augmented image side (default 224)")
        sub.add_argument("--block-size", type=int, help="samples per block (default: the build's rule)")
        sub.add_argument("--no-progress", action="store_true")


def run_publishing_command(args: argparse.Namespace) -> int:
    if args.command == "publish":
        from .publish import CardInfo, publish

        info = CardInfo(pretty_name=args.pretty_name, license=args.license, url=args.url,
                        source_datasets=tuple(args.source_dataset or ("original",)))
        summary = publish(args.store, args.dest, source=args.data, info=info, grid=not args.no_grid,
                          storage_options=args.storage_options)
        print(f"published {args.store} to {summary.dest}: {summary.files} files, {summary.bytes:,} bytes")
        return 0
    if args.command == "download":
        from .download import DownloadOptions, download

        options = DownloadOptions(workers=args.workers, retries=args.retries, chunk_size=args.chunk_size, verify=not args.no_verify,
                                  progress=not args.no_progress, storage_options=args.storage_options,
                                  overwrite=args.overwrite, allow_other_hosts=args.allow_other_hosts)
        summary = download(args.url, args.dest, options)
        for line in summary.verified:
            print(f"ok  {line}")
        print(f"{summary.store}: {summary.fetched} of {summary.files} files fetched ({summary.bytes_fetched:,} bytes, "
              f"{summary.retries} retries) in {summary.seconds:.1f} s" + (", verified" if summary.verified else ""))
        return 0
    if args.command == "import":
        from ..importers import run_import

        summary = run_import(args)
        print(summary)
        return 0
    raise ReinforceError(f"unknown command {args.command}")
