"""Manifests of a published store: every file with its size and sha256, and the source images it was built from.

A publication directory holds the store (``NAME.zarr/...``) and, beside it, ``manifest.json`` (this module's
:class:`Manifest`: relative path, size and sha256 of every other file, the format version and the store's
identity) and ``source-manifest.jsonl`` (one JSON object per source sample: relative path, label, file size,
sha256 of the file and the store's pixel fingerprint). A downloader checks files against the first; ``reinforce
verify --quick`` checks a copy of the source images against the second without decoding them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from reinforce_loaders import format as fmt
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import ImageSource
from reinforce_loaders.store.remote import json_depth

MANIFEST_NAME = "manifest.json"
SOURCE_MANIFEST_NAME = "source-manifest.jsonl"
MANIFEST_KIND = "reinforce-publication"
MANIFEST_VERSION = 1
HASH_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 32 << 20
"""Largest ``manifest.json`` read (one of ImageNet-1k's stores in blocks of 1,024 samples lists 7,519 files in
about 1 MB)."""
MAX_JSON_DEPTH = 16
"""Deepest nesting of arrays and objects in a manifest (a publication's is 3 deep)."""
MAX_JSON_INTEGER_DIGITS = 40
MAX_FILE_SIZE = 1 << 40
"""Largest size a manifest may give one file (a store's largest files are shards of at most 1 GiB)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ReinforceError):
    """A manifest is malformed or unsafe (a path that would leave the destination), or does not fit its files."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths: Sequence[str | os.PathLike[str]], threads: int | None = None) -> Iterator[str]:
    """sha256 of each path, in order, hashed by a thread pool (hashlib releases the GIL on large buffers)."""
    threads = threads or min(8, os.cpu_count() or 1)
    window: collections.deque[Future[str]] = collections.deque()
    # A bounded window of submitted files, so a caller that stops at the first mismatch does not wait for all.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for path in paths:
            window.append(pool.submit(sha256_file, path))
            if len(window) >= 4 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One published file: its path relative to the publication root (``/``-separated), size and sha256."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def safe_relative_path(path: Any) -> PurePosixPath:
    """``path`` as a relative POSIX path that stays below its root, or :class:`ManifestError`.

    Refused: non-strings, empty paths, absolute paths (``/x``, ``C:\\x``, ``\\\\host``), backslashes, ``.``
    or ``..`` components, and NUL characters.
    """
    if not isinstance(path, str) or not path:
        raise ManifestError(f"manifest entry path {path!r} is not a non-empty string")
    if "\\" in path or "\0" in path or re.match(r"^[A-Za-z]:", path):
        raise ManifestError(f"manifest entry path {path!r} has a backslash, NUL or drive letter: refused")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ManifestError(f"manifest entry path {path!r} is absolute: refused (entries must be relative)")
    if any(part in ("..", ".") for part in path.split("/")) or "" in path.split("/"):
        raise ManifestError(f"manifest entry path {path!r} has an empty, '.' or '..' component: refused")
    return pure


def check_destination(dest: Path, entries: Iterable[FileEntry], companions: Sequence[str] = ()) -> None:
    """Refuse (before anything is written) an entry that would land outside ``dest``, go through a symlink, or
    replace a directory (or need a directory where a file is); ``companions`` are suffixes of files written
    beside an entry (a download's ``.part``), checked too, and no entry may have the name of another's
    companion (a listed ``manifest.json.part`` would be the downloader's own staging file)."""
    root = dest.resolve()
    entries = list(entries)
    names = {entry.path for entry in entries}
    for entry in entries:
        relative = safe_relative_path(entry.path)
        target = dest.joinpath(*relative.parts)
        for suffix in companions:
            if entry.path + suffix in names:
                raise ManifestError(f"manifest entry {entry.path + suffix!r} has the name of the partial file of "
                                    f"{entry.path!r} (the downloader writes it there): refused")
        parents = [dest.joinpath(*relative.parts[:depth]) for depth in range(1, len(relative.parts))]
        written = parents + [target] + [target.with_name(target.name + suffix) for suffix in companions]
        for path in written:
            if path.is_symlink():
                raise ManifestError(f"manifest entry {entry.path!r}: {path} is a symlink in the destination; "
                                    "refused (remove it or download to an empty directory)")
        for path in parents:
            if path.exists() and not path.is_dir():
                raise ManifestError(f"manifest entry {entry.path!r} needs the directory {path}, which is a file in "
                                    "the destination: refused (download to an empty directory)")
        if target.is_dir():
            raise ManifestError(f"manifest entry {entry.path!r} is a file, but {target} is a directory in the "
                                "destination: refused (download to an empty directory)")
        if not target.resolve().is_relative_to(root):
            raise ManifestError(f"manifest entry {entry.path!r} resolves outside {dest}: refused")


@dataclasses.dataclass
class Manifest:
    """``manifest.json`` of a publication: what a downloader fetches and checks."""

    store: str
    """Directory of the store, relative to the publication root."""
    format_version: str
    identity: dict[str, Any]
    files: list[FileEntry]
    source_manifest: str | None = None
    tool: str = ""
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": MANIFEST_KIND, "manifest_version": MANIFEST_VERSION, "store": self.store,
                "format_name": fmt.FORMAT_NAME, "format_version": self.format_version, "identity": self.identity,
                "source_manifest": self.source_manifest, "tool": self.tool, "created": self.created,
                "files": [entry.to_json() for entry in self.files]}

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and validate a manifest (every path checked with :func:`safe_relative_path`)."""
        if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
            raise ManifestError(f"not a reinforce publication manifest (kind must be {MANIFEST_KIND!r})")
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise ManifestError(f"manifest version {data.get('manifest_version')!r} is not supported (this tool "
                                f"reads {MANIFEST_VERSION}): upgrade reinforce")
        if not isinstance(data.get("format_version"), str):
            raise ManifestError(f"the manifest's format_version {_shown(data.get('format_version'))} is not a string")
        fmt.check_format_version(data["format_version"])
        for member, kind in (("files", list), ("identity", dict)):
            if not isinstance(data.get(member), (kind, type(None))):
                raise ManifestError(f"the manifest's {member} is {_shown(data.get(member))}, not a "
                                    f"{'list' if kind is list else 'JSON object'}")
        files, seen = [], set()
        for item in data.get("files") or []:
            if not isinstance(item, dict):
                raise ManifestError(f"manifest file entry {item!r:.100} is not an object")
            path = str(safe_relative_path(item.get("path")))
            size, digest = item.get("size"), item.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
                raise ManifestError(f"manifest entry {path!r} has an invalid size {_shown(size)} (at most "
                                    f"{MAX_FILE_SIZE:,} bytes)")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise ManifestError(f"manifest entry {path!r} has an invalid sha256 {_shown(digest)}")
            if path in seen or path == MANIFEST_NAME:
                raise ManifestError(f"manifest lists {path!r} twice or lists itself")
            seen.add(path)
            files.append(FileEntry(path, size, digest))
        if not files:
            raise ManifestError("the manifest lists no files")
        folders = {str(parent) for path in seen for parent in PurePosixPath(path).parents}
        both = sorted(seen & folders)
        if both:
            raise ManifestError(f"the manifest lists {both[0]!r} both as a file and as a folder of other files")
        store = str(safe_relative_path(data.get("store")))
        if not any(entry.path.startswith(store + "/") for entry in files):
            raise ManifestError(f"the manifest's store {store!r} has no files in the manifest")
        source = data.get("source_manifest")
        if source is not None and str(safe_relative_path(source)) not in seen:
            raise ManifestError(f"the manifest's source manifest {source!r} is not among its files")
        return cls(store=store, format_version=str(data["format_version"]), identity=dict(data.get("identity") or {}),
                   files=files, source_manifest=source, tool=str(data.get("tool", "")),
                   created=str(data.get("created", "")))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse ``manifest.json``'s bytes: at most :data:`MAX_MANIFEST_BYTES`, nested at most
        :data:`MAX_JSON_DEPTH` deep, integers of at most :data:`MAX_JSON_INTEGER_DIGITS` digits."""
        return cls.from_json(bounded_json(raw, "the manifest", MAX_MANIFEST_BYTES))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INTEGER_DIGITS:
        raise ManifestError(f"it holds an integer of {len(text.lstrip('-')):,} digits (at most "
                            f"{MAX_JSON_INTEGER_DIGITS} are read)")
    return int(text)


def bounded_json(raw: bytes, what: str, limit: int) -> Any:
    """``raw`` parsed as JSON, refusing (:class:`ManifestError`, naming ``what``) more than ``limit`` bytes,
    nesting deeper than :data:`MAX_JSON_DEPTH`, over-long integers and invalid text."""
    if len(raw) > limit:
        raise ManifestError(f"{what} is larger than {limit:,} bytes: refused")
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ManifestError(f"{what} nests arrays or objects more than {MAX_JSON_DEPTH} deep: refused")
    try:
        return json.loads(raw, parse_int=_bounded_int)
    except ManifestError as error:
        raise ManifestError(f"{what} is refused: {error}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ManifestError(f"{what} is not valid JSON ({str(error)[:200]})") from None


def settings_sha256(header: fmt.StoreHeader) -> str:
    """sha256 of the header's settings (canonical JSON): equal for stores built the same way."""
    canonical = json.dumps(header.settings(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def store_identity(header: fmt.StoreHeader, store_files: Sequence[FileEntry], store_dir: str) -> dict[str, Any]:
    """What identifies a store: its settings hash, a hash over its files' hashes, and the headline numbers."""
    listing = "".join(f"{entry.path.removeprefix(store_dir + '/')}\t{entry.sha256}\n"
                      for entry in sorted(store_files, key=lambda e: e.path))
    return {"settings_sha256": settings_sha256(header),
            "content_sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "num_samples": header.num_samples, "num_classes": header.num_classes,
            "num_augmentations": header.num_augmentations, "top_k": header.top_k, "seed": header.seed,
            "created": header.provenance.get("created")}


# ----------------------------------------------------------------------------------------------------------
# Source manifest
# ----------------------------------------------------------------------------------------------------------

def relative_source_paths(source: ImageSource, root: str | os.PathLike[str]) -> list[str]:
    """The source's sample files relative to ``root``, ``/``-separated, in sample order."""
    return [Path(os.path.relpath(source.name_of(i), root)).as_posix() for i in range(len(source))]


def write_source_manifest(root: str | os.PathLike[str], header: fmt.StoreHeader, labels: np.ndarray,
                          fingerprints: np.ndarray, out: str | os.PathLike[str]) -> int:
    """Write the source manifest of the ImageFolder ``root`` for a store; returns the number of samples.

    Refuses a source whose count or labels differ from the store's (it is not the source the store was built
    from). Files are hashed in parallel.
    """
    from ..errors import VerificationError

    source = ImageSource.from_folder(root)
    if len(source) != header.num_samples:
        raise VerificationError(f"source {root} has {len(source)} images but the store holds {header.num_samples} "
                                "samples: pass the directory the store was built from")
    mismatch = np.flatnonzero(np.asarray(source.targets) != labels)
    if len(mismatch):
        first = int(mismatch[0])
        raise VerificationError(f"source sample {first} ({source.name_of(first)}) has label {source.targets[first]}, "
                                f"the store has {int(labels[first])}: pass the directory the store was built from")
    paths = [source.name_of(i) for i in range(len(source))]
    relative = relative_source_paths(source, root)
    with open(out, "w", encoding="utf-8") as handle:
        for index, digest in enumerate(hash_files(paths)):
            line = {"index": index, "path": relative[index], "label": int(labels[index]),
                    "size": os.path.getsize(paths[index]), "sha256": digest,
                    "fingerprint": f"{int(fingerprints[index]):016x}"}
            handle.write(json.dumps(line, separators=(",", ":")) + "\n")
    return len(paths)


def read_source_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a source manifest, checked for the fields :func:`check_source` needs."""
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                row = json.loads(line)
                if row.get("index") != number or not {"path", "size", "sha256", "fingerprint"} <= set(row):
                    raise ManifestError(f"source manifest {path} line {number + 1} is malformed")
                safe_relative_path(row["path"])
                rows.append(row)
    except FileNotFoundError:
        raise ManifestError(f"no source manifest at {path}: `reinforce publish` writes one beside the store "
                            "(source-manifest.jsonl); without it, check the source with `verify --data` "
                            "(decodes every image)") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"source manifest {path} is not JSON lines ({error})") from None
    return rows


def find_source_manifest(store: str | os.PathLike[str]) -> Path:
    """Where a publication keeps the source manifest of ``store``: beside the store directory."""
    return Path(str(store)).resolve().parent / SOURCE_MANIFEST_NAME


def check_source(root: str | os.PathLike[str], rows: list[dict[str, Any]], fingerprints: np.ndarray,
                 threads: int | None = None) -> list[str]:
    """Check an ImageFolder copy against a source manifest without decoding: names and order, sizes, hashes.

    ``fingerprints`` are the store's: a manifest that is not this store's is refused. Raises
    ``VerificationError`` naming the first differing file.
    """
    from ..errors import VerificationError

    if len(rows) != len(fingerprints):
        raise VerificationError(f"the source manifest lists {len(rows)} samples, the store holds {len(fingerprints)}: "
                                "it belongs to another store")
    stored = np.array([int(row["fingerprint"], 16) for row in rows], dtype=np.uint64)
    if not np.array_equal(stored, fingerprints):
        first = int(np.argmax(stored != fingerprints))
        raise VerificationError(f"the source manifest's fingerprint of sample {first} differs from the store's: "
                                "the manifest belongs to another store")
    source = ImageSource.from_folder(root)
    relative = relative_source_paths(source, root)
    for index, row in enumerate(rows):
        if index >= len(relative):
            raise VerificationError(f"source {root} lacks {row['path']} (sample {index}; it has only "
                                    f"{len(relative)} images): the copy is partial")
        if relative[index] != row["path"]:
            raise VerificationError(f"source sample {index} is {relative[index]}, the store was built from "
                                    f"{row['path']}: a file is missing, extra or renamed")
    if len(relative) > len(rows):
        raise VerificationError(f"source {root} has {len(relative) - len(rows)} images more than the store "
                                f"(first extra: {relative[len(rows)]})")
    paths = [source.name_of(i) for i in range(len(source))]
    for index, (path, row) in enumerate(zip(paths, rows)):
        size = os.path.getsize(path)
        if size != row["size"]:
            raise VerificationError(f"source file {row['path']} (sample {index}) has {size} bytes, the store's source "
                                    f"had {row['size']}: the file differs (truncated or re-encoded)")
    for index, digest in enumerate(hash_files(paths, threads)):
        if digest != rows[index]["sha256"]:
            raise VerificationError(f"source file {rows[index]['path']} (sample {index}) differs from the one the "
                                    "store was built from (sha256 mismatch, same size)")
    return [f"source: {len(rows)} files match the source manifest's names, sizes and sha256 (quick check, no "
            "decoding)"]


# ----------------------------------------------------------------------------------------------------------
# Croissant (MLCommons) JSON-LD
# ----------------------------------------------------------------------------------------------------------

CROISSANT_CONFORMS_TO = "http://mlcommons.org/croissant/1.0"
_CR_KEYS = ("column", "extract", "field", "fileObject", "fileProperty", "fileSet", "format", "includes",
            "isLiveDataset", "jsonPath", "key", "md5", "parentField", "path", "recordSet", "references", "regex",
            "repeated", "replace", "samplingRate", "separator", "source", "subField", "transform", "citeAs",
            "equivalentProperty")
SOURCE_FIELDS = (("index", "sc:Integer"), ("path", "sc:Text"), ("label", "sc:Integer"), ("size", "sc:Integer"),
                 ("sha256", "sc:Text"), ("fingerprint", "sc:Text"))


def croissant_context() -> dict[str, Any]:
    """The standard ``@context`` of Croissant 1.0 documents."""
    context: dict[str, Any] = {"@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
                               "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
                               "dct": "http://purl.org/dc/terms/", "conformsTo": "dct:conformsTo",
                               "data": {"@id": "cr:data", "@type": "@json"},
                               "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
                               "examples": {"@id": "cr:examples", "@type": "@json"}}
    context.update({key: f"cr:{key}" for key in _CR_KEYS})
    return context


def _encoding_format(path: str) -> str:
    suffixes = {".json": "application/json", ".jsonl": "application/jsonlines", ".md": "text/markdown",
                ".png": "image/png"}
    return suffixes.get(PurePosixPath(path).suffix, "application/octet-stream")


def croissant_metadata(header: fmt.StoreHeader, entries: Sequence[FileEntry], store_dir: str, info: Any,
                       card_name: str) -> dict[str, Any]:
    """Croissant JSON-LD of a publication: every file as a ``FileObject`` (relative ``contentUrl``, size,
    sha256) and the source manifest as a record set of the source images."""
    name = info.pretty_name or f"{store_dir} (reinforced)"
    distribution = [{"@type": "cr:FileObject", "@id": entry.path, "name": entry.path, "contentUrl": entry.path,
                     "contentSize": f"{entry.size} B", "encodingFormat": _encoding_format(entry.path),
                     "sha256": entry.sha256} for entry in entries]
    metadata: dict[str, Any] = {
        "@context": croissant_context(), "@type": "sc:Dataset", "name": name,
        "description": (f"Reinforced dataset (reinforce-store {header.format_version}): {header.num_augmentations} "
                        f"stored augmentations per image of {header.num_samples} source images, each with the "
                        f"teacher ensemble's top-{header.top_k} of {header.num_classes} class probabilities. The "
                        f"store is the Zarr v3 directory {store_dir}/; see {card_name}."),
        "conformsTo": CROISSANT_CONFORMS_TO, "license": info.license, "url": info.url or card_name,
        "version": f"{header.format_version}.0", "datePublished": str(header.provenance.get("created", ""))[:10],
        "keywords": ["dataset reinforcement", "knowledge distillation", "soft labels"],
        "distribution": distribution,
    }
    if not metadata["datePublished"]:
        del metadata["datePublished"]
    if any(entry.path == SOURCE_MANIFEST_NAME for entry in entries):
        metadata["recordSet"] = [{
            "@type": "cr:RecordSet", "@id": "source_images", "name": "source_images",
            "description": "The source images the store was built from, in sample order (not included).",
            "field": [{"@type": "cr:Field", "@id": f"source_images/{field}", "name": field, "dataType": kind,
                       "source": {"fileObject": {"@id": SOURCE_MANIFEST_NAME}, "extract": {"column": field}}}
                      for field, kind in SOURCE_FIELDS],
        }]
    return metadata
