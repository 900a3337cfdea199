"""``reinforce publish STORE DEST``: copy a complete store with its manifest, source manifest, card and metadata.

DEST is a local directory or any fsspec URL (``s3://bucket/prefix``, ...). It receives::

    NAME.zarr/...             the store, file for file
    source-manifest.jsonl     per sample: relative path, label, file size, sha256, pixel fingerprint (with --data)
    replays.png               a few samples with stored records replayed (with --data)
    README.md                 dataset card (Hugging Face YAML header)
    croissant.json            Croissant JSON-LD describing the same files
    manifest.json             every file above with size and sha256, format version, store identity

``manifest.json`` is written last, so a DEST that has it holds a complete publication.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from reinforce_loaders import format as fmt
from reinforce_loaders.errors import ReinforceError

from .. import __version__
from .manifest import (MANIFEST_NAME, SOURCE_MANIFEST_NAME, FileEntry, Manifest, croissant_metadata, hash_files,
                       store_identity, write_source_manifest)
from ..tools.verify import verify_store

GRID_NAME = "replays.png"
CARD_NAME = "README.md"
CROISSANT_NAME = "croissant.json"


class PublishError(ReinforceError):
    """The store cannot be published as asked (incomplete, not local, stray files, unreachable destination)."""


@dataclasses.dataclass(frozen=True)
class CardInfo:
    """What the dataset card and Croissant metadata say beyond the store itself."""

    pretty_name: str = ""
    license: str = "other"
    source_datasets: tuple[str, ...] = ("original",)
    url: str = ""


@dataclasses.dataclass
class PublishSummary:
    dest: str
    files: int
    bytes: int
    manifest: Manifest


def store_files(store: Path) -> list[Path]:
    """Every file of a local store directory, sorted; refuses symlinks and zarr's leftover ``*.partial`` files."""
    if not store.is_dir():
        raise PublishError(f"{store} is not a local store directory: publish from the directory `reinforce build` "
                           "wrote (download a remote store first)")
    files = []
    for path in sorted(store.rglob("*")):
        if path.is_symlink():
            raise PublishError(f"{path} is a symlink: publish a store of plain files")
        if path.name.endswith(".partial"):
            raise PublishError(f"{path} is a leftover of an interrupted write: re-run the build to finish the store")
        if path.is_file():
            files.append(path)
    return files


def entries_for(paths: Sequence[Path], root: Path) -> list[FileEntry]:
    """:class:`FileEntry` of each path (relative to ``root``), hashed in parallel."""
    return [FileEntry(path.relative_to(root).as_posix(), path.stat().st_size, digest)
            for path, digest in zip(paths, hash_files(paths))]


def size_category(num_samples: int) -> str:
    """Hugging Face ``size_categories`` value of a dataset of ``num_samples`` samples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
    return next((label for limit, label in bounds if num_samples < limit), "100M<n<1B")


def bytes_per_record(header: fmt.StoreHeader, entries: Sequence[FileEntry], store_dir: str) -> float:
    data = sum(e.size for e in entries if e.path.startswith(f"{store_dir}/{fmt.RECORDS}/")
               and not e.path.endswith("zarr.json"))
    return data / (header.num_samples * header.num_augmentations)


def _card_front_matter(header: fmt.StoreHeader, info: CardInfo, name: str) -> list[str]:
    """The YAML header of the Hugging Face dataset card convention."""
    meta = {"license": info.license, "pretty_name": name, "task_categories": ["image-classification"],
            "annotations_creators": ["machine-generated"], "source_datasets": list(info.source_datasets),
            "size_categories": [size_category(header.num_samples)],
            "tags": ["dataset-reinforcement", "knowledge-distillation", "soft-labels", "zarr", "reinforce-store"]}
    return ["---", *json_as_yaml(meta), "---", ""]


def _card_training(header: fmt.StoreHeader, store_dir: str) -> list[str]:
    return ["## Train a student", "", "```bash", "reinforce download URL_OF_THIS_DIRECTORY reinforced/", "```", "",
            "```python", "from reinforce_loaders import ReinforcedDataset",
            f"dataset = ReinforcedDataset(\"path/to/source/train\", \"reinforced/{store_dir}\", "
            f"resolution={header.augmentation['size']})",
            "# a torch Dataset of (image, soft target): use it in a DataLoader; call dataset.set_epoch(e) each epoch",
            "```", ""]


def _card_contents(header: fmt.StoreHeader, entries: Sequence[FileEntry], store_dir: str) -> list[str]:
    store_entries = [e for e in entries if e.path.startswith(store_dir + "/")]
    indices = (f"per-sample vocabulary of {header.class_vocabulary_size}" if header.class_vocabulary_size
               else "class ids")
    return ["## Contents", "", "| | |", "| --- | --- |",
            f"| samples | {header.num_samples:,} in {header.num_blocks} blocks of {header.block_size} |",
            f"| stored augmentations per sample (A) | {header.num_augmentations} |",
            f"| probabilities per record (K) | top-{header.top_k} of {header.num_classes} classes |",
            f"| probability precision | round(p x {header.prob_scale}), error <= {0.5 / header.prob_scale:.1e} |",
            f"| class indices | {indices} |",
            f"| bytes per record (records array) | {bytes_per_record(header, entries, store_dir):.2f} |",
            f"| store size | {sum(e.size for e in store_entries):,} bytes in {len(store_entries)} files |",
            f"| seed | {header.seed} |", ""]


def _card_teachers_and_augmentation(header: fmt.StoreHeader) -> list[str]:
    teachers = [f"| {t['name']} | {t['input_size']} | {t.get('mean')} / {t.get('std')} | `{t['weights_sha256']}` |"
                for t in header.teachers]
    ops = [f"- `{op['name']}`: " + ", ".join(f"{k}={v}" for k, v in op.items() if k != "name")
           for op in header.augmentation["ops"]]
    recorded = fmt.recorded_teacher_accuracy(header.provenance)
    accuracy = ([f"Top-1 of the ensemble: **{recorded[0]:.2f} %** on {recorded[1]}. Distil only into students "
                 "it beats clearly: `reinforce train` warns below a 5-point margin.", ""] if recorded else
                ["The store records no held-out accuracy of its teachers (`reinforce build --val` records one).", ""])
    return ["## Teachers", "", "| architecture | input size | mean / std | weights sha256 |", "| --- | --- | --- | --- |",
            *teachers, "", *accuracy, "## Augmentation", "", f"Output size {header.augmentation['size']}; ops in order:", "",
            *ops, ""]


def _card_provenance(header: fmt.StoreHeader) -> list[str]:
    keys = ("tool", "created", "device", "torch", "zarr", "python", "batch_size", "imported_from",
            "replay_fidelity", "teacher_entropy")
    return ["## Provenance", "", *(f"- {key}: {header.provenance[key]}" for key in keys if key in header.provenance),
            ""]


def _card_checking(store_dir: str, has_source_manifest: bool) -> list[str]:
    source = (f" `{SOURCE_MANIFEST_NAME}` lists the source images (relative path, size, sha256, pixel fingerprint): "
              f"`reinforce verify reinforced/{store_dir} --data path/to/source/train --quick` checks your copy "
              "without decoding it." if has_source_manifest else "")
    return ["## Checking your copy", "",
            f"`{MANIFEST_NAME}` lists every file with its size and sha256; `reinforce download` checks them.{source} "
            f"`{CROISSANT_NAME}` describes the files as MLCommons Croissant metadata.", ""]


def dataset_card(header: fmt.StoreHeader, entries: Sequence[FileEntry], store_dir: str, info: CardInfo,
                 has_source_manifest: bool, has_grid: bool) -> str:
    """The ``README.md`` dataset card: YAML header (Hugging Face convention) and what a user needs to train."""
    name = info.pretty_name or f"{store_dir} (reinforced)"
    summary = (f"A reinforced dataset (store format `reinforce-store` {header.format_version}): for each of "
               f"{header.num_samples:,} source images, {header.num_augmentations} stored augmentations, each with "
               f"the teacher ensemble's top-{header.top_k} probabilities. The images themselves are not included: "
               "train with your own copy of the source dataset.")
    lines = [*_card_front_matter(header, info, name), f"# {name}", "", summary, "",
             *([f"![Stored records replayed]({GRID_NAME})", ""] if has_grid else []),
             *_card_training(header, store_dir), *_card_contents(header, entries, store_dir),
             *_card_teachers_and_augmentation(header), *_card_provenance(header),
             *_card_checking(store_dir, has_source_manifest)]
    return "\n".join(lines)


def json_as_yaml(mapping: dict[str, Any]) -> list[str]:
    """YAML lines of a flat mapping of strings and string lists (JSON scalars are valid YAML)."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, list):
            out.append(f"{key}:")
            out.extend(f"- {json.dumps(item)}" for item in value)
        else:
            out.append(f"{key}: {json.dumps(value)}")
    return out


def _destination(dest: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(dest, **(storage_options or {}))
    except (ImportError, ValueError) as error:
        raise PublishError(f"cannot open destination {dest}: {error}") from None


def _upload(fs: fsspec.AbstractFileSystem, root: str, files: Sequence[tuple[Path, str]]) -> None:
    """Copy local files to ``root/relative`` on ``fs`` (fsspec batches and parallelizes remote puts)."""
    remote = [f"{root.rstrip('/')}/{relative}" for _, relative in files]
    if isinstance(fs, LocalFileSystem):
        for parent in sorted({os.path.dirname(path) for path in remote}):
            os.makedirs(parent, exist_ok=True)
    try:
        fs.put([str(local) for local, _ in files], remote)
    except OSError as error:
        raise PublishError(f"copying to {root} failed: {error}") from error


def _stage(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _stage_source_files(store: Path, group: Any, header: fmt.StoreHeader, source: str | os.PathLike[str],
                        grid: bool, staging: Path) -> list[Path]:
    """The source manifest and (with ``grid``) the replay picture, written into ``staging``."""
    labels = fmt.read_array(group, fmt.LABELS)
    fingerprints = fmt.read_array(group, fmt.FINGERPRINTS)
    write_source_manifest(source, header, labels, fingerprints, staging / SOURCE_MANIFEST_NAME)
    staged = [staging / SOURCE_MANIFEST_NAME]
    if grid:
        from ..tools.grid import replay_grid

        staged.append(replay_grid(store, source, staging / GRID_NAME))
    return staged


def publish(store: str | os.PathLike[str], dest: str, *, source: str | os.PathLike[str] | None = None,
            info: CardInfo = CardInfo(), grid: bool = True, storage_options: dict[str, Any] | None = None,
            ) -> PublishSummary:
    """Publish a complete local store to ``dest`` (see the module docstring); returns what was written."""
    store = Path(store).resolve()  # through a symlink or ".", the files must sit under the store's own name
    group = fmt.open_store_group(store)
    header = fmt.read_header(group)
    verify_store(store)
    fs, root = _destination(dest, storage_options)
    store_dir = store.resolve().name
    files = store_files(store)
    entries = entries_for(files, store.parent)
    uploads = list(zip(files, [entry.path for entry in entries]))
    with tempfile.TemporaryDirectory(prefix="reinforce-publish-") as staging_dir:
        staging = Path(staging_dir)
        extra = [] if source is None else _stage_source_files(store, group, header, source, grid, staging)
        card = dataset_card(header, entries, store_dir, info, source is not None, grid and source is not None)
        extra.append(_stage(staging / CARD_NAME, card))
        entries += entries_for(extra, staging)
        croissant = croissant_metadata(header, entries, store_dir, info, CARD_NAME)
        extra.append(_stage(staging / CROISSANT_NAME, json.dumps(croissant, indent=1)))
        entries += entries_for(extra[-1:], staging)
        manifest = Manifest(store=store_dir, format_version=header.format_version,
                            identity=store_identity(header, entries[:len(files)], store_dir), files=entries,
                            source_manifest=SOURCE_MANIFEST_NAME if source is not None else None,
                            tool=f"reinforce {__version__}",
                            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        _stage(staging / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=1))
        # A manifest in DEST vouches for a complete publication: an earlier one goes before any file is
        # replaced, so an upload that fails half way leaves no manifest describing files that have changed.
        try:
            if fs.exists(f"{root}/{MANIFEST_NAME}"):
                fs.rm(f"{root}/{MANIFEST_NAME}")
        except OSError as error:
            raise PublishError(f"cannot remove the earlier {MANIFEST_NAME} from {root}: {error}") from error
        _upload(fs, root, uploads + [(path, path.name) for path in extra])
        _upload(fs, root, [(staging / MANIFEST_NAME, MANIFEST_NAME)])
    return PublishSummary(dest=dest, files=len(entries) + 1, bytes=manifest.total_bytes, manifest=manifest)
