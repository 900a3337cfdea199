"""``reinforce download URL DEST``: fetch a published store, resumably and verified.

The publication's ``manifest.json`` is read first and every path in it checked (relative, no ``..``, no
symlink on the way, inside DEST) before anything is written. Then several files are fetched at once. Each is
written to ``PATH.part``, which survives the process: a re-run (even after ``kill -9``) continues it with an HTTP
``Range`` request (or from zero when the server ignores ranges). Connection errors and 5xx answers are retried
with exponential backoff. A finished ``.part`` whose sha256 differs from the manifest's is discarded and fetched
again; only a correct file is renamed into place. Files already in place are re-hashed, so re-running is a
no-op that re-checks. The download ends with ``reinforce verify`` on the store.

http(s) goes through ``requests`` (ranges, status codes); every other URL (``s3://``, local paths, ...) through
fsspec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from reinforce_loaders.errors import ReinforceError
from tqdm import tqdm
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, WrapperStore

from .manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest, check_destination, hash_files,
                       sha256_file)
from ..progress import bar_options

PART_SUFFIX = ".part"
MAX_REDIRECTS = 5
T = TypeVar("T")


class DownloadError(ReinforceError):
    """A download could not complete: a file kept failing, a server answered 4xx, or a file is not what the
    manifest says."""


def _missing_message(what: str, path: str) -> str:
    if path == MANIFEST_NAME:  # usually a wrong URL, not a damaged publication
        return (f"{what}: no publication there. Pass the publication's root (the folder holding {MANIFEST_NAME}, "
                "not the .zarr store inside it) and check the URL; a publication being written has no manifest "
                "until its last step")
    return f"{what}: the publication is incomplete; ask its owner to publish again"


class _Abandoned(Exception):
    """A fetch ended early because the download as a whole is being abandoned."""


class RetryableError(Exception):
    """A transient failure (connection dropped, timeout, 5xx): the request is tried again after a pause."""


@dataclasses.dataclass(frozen=True)
class DownloadOptions:
    workers: int = 4
    retries: int = 5
    backoff: float = 0.5
    """First pause in seconds; doubled after each failure of the same file (with jitter), up to ``max_backoff``."""
    max_backoff: float = 30.0
    timeout: float = 60.0
    chunk_size: int = 1 << 20
    """Bytes per read and write: a killed download keeps what it wrote, in steps of this size."""
    progress: bool = True
    verify: bool = True
    storage_options: dict[str, Any] | None = None
    overwrite: bool = False
    """Replace the publication's files in a DEST that holds other versions of them (or other files: those are
    never touched). Without it a download into a DEST holding anything but this publication's files refuses."""
    allow_other_hosts: bool = False
    """Follow HTTP redirects to other hosts (by default only redirects to http(s) on the same host are)."""
    deadline: float = 300.0
    """Seconds one request may take in all (besides ``timeout``, which bounds each read), plus the file's size
    over ``min_rate``: a server trickling bytes is retried, then given up, instead of holding the download."""
    min_rate: float = 16 * 1024
    """Bytes per second a file's deadline allows for its size."""


@dataclasses.dataclass
class DownloadSummary:
    dest: Path
    store: Path
    files: int
    fetched: int
    bytes_fetched: int
    retries: int
    seconds: float
    verified: list[str]


# ----------------------------------------------------------------------------------------------------------
# Transports: "give me the bytes of PATH from OFFSET on"
# ----------------------------------------------------------------------------------------------------------

class HttpTransport:
    """http(s) with ``requests``: a thread-local session per worker, ``Range: bytes=OFFSET-`` to resume."""

    def __init__(self, base: str, options: DownloadOptions) -> None:
        import requests

        self._requests = requests
        self.base = base.rstrip("/")
        self.options = options
        self._local = threading.local()

    def _session(self) -> Any:
        if not hasattr(self._local, "session"):
            self._local.session = self._requests.Session()
        return self._local.session

    def open(self, path: str, offset: int, seconds: float) -> tuple[int, Iterator[bytes]]:
        """(first byte offset the stream starts at, chunks), all received within ``seconds``. A server that
        ignores Range starts at 0. Bytes come as sent: a Content-Encoding (gzip, ...) is refused, not unpacked;
        redirects are followed to http(s) on the same host only (unless ``allow_other_hosts``)."""
        url = f"{self.base}/{path}"
        headers = {"Range": f"bytes={offset}-", "Accept-Encoding": "identity"} if offset else {
            "Accept-Encoding": "identity"}
        end = time.monotonic() + seconds
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self._session().get(url, headers=headers, stream=True, timeout=self.options.timeout,
                                               allow_redirects=False)
            except self._requests.RequestException as error:
                raise RetryableError(f"{url}: {error}") from None
            if response.status_code not in (301, 302, 303, 307, 308):
                break
            target = urllib.parse.urljoin(url, response.headers.get("Location", ""))
            response.close()
            check_redirect(url, target, self.options.allow_other_hosts)
            url = target
        else:
            raise DownloadError(f"{self.base}/{path}: more than {MAX_REDIRECTS} redirects: refused")
        status = response.status_code
        if status >= 500 or status == 429:
            response.close()
            raise RetryableError(f"{url}: server answered {status}")
        if status == 404:
            response.close()
            raise DownloadError(_missing_message(f"{url} is not on the server (404)", path))
        if status not in (200, 206):
            response.close()
            raise DownloadError(f"{url}: server answered {status}")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise DownloadError(f"{url}: the server sends it with Content-Encoding {encoding[:40]!r} although "
                                "identity was asked for: refused (a compressed answer can unpack to far more than "
                                "the manifest says)")
        start = 0
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""), url)
            if start != offset:
                response.close()
                raise RetryableError(f"{url}: asked for bytes from {offset}, got a range from {start}")
        return start, self._chunks(response, url, end, seconds)

    def _chunks(self, response: Any, url: str, end: float, seconds: float) -> Iterator[bytes]:
        import urllib3

        try:
            while chunk := response.raw.read1(self.options.chunk_size, decode_content=False):
                yield chunk
                if time.monotonic() > end:
                    raise RetryableError(f"{url}: not received within {seconds:.0f} s (the server sends too "
                                         "slowly)")
        except (self._requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            raise RetryableError(f"{url}: connection lost ({type(error).__name__})") from None
        finally:
            response.close()


def check_redirect(source: str, target: str, allow_other_hosts: bool) -> None:
    """Refuse (:class:`DownloadError`) a redirect from ``source`` to anything but http(s), from https to http,
    or, unless ``allow_other_hosts``, to another host or port."""
    before, after = urllib.parse.urlsplit(source), urllib.parse.urlsplit(target)
    if after.scheme not in ("http", "https") or (before.scheme == "https" and after.scheme == "http"):
        raise DownloadError(f"{source} redirects to {target[:200]}: refused (only redirects to http(s), never "
                            "from https to http, are followed)")
    if not allow_other_hosts and (before.hostname, before.port) != (after.hostname, after.port):
        raise DownloadError(f"{source} redirects to another host ({after.netloc[:100]}): refused; pass "
                            "--allow-other-hosts to follow it if you trust where it leads")


def _content_range_start(value: str, url: str) -> int:
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        raise RetryableError(f"{url}: 206 answer with a malformed Content-Range {value!r}") from None


class FsspecTransport:
    """Any fsspec filesystem (s3, gcs, local, ...): open, seek to the offset, read chunks."""

    def __init__(self, url: str, options: DownloadOptions) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url, **(options.storage_options or {}))
        self.root = self.root.rstrip("/")
        self.options = options

    def open(self, path: str, offset: int, seconds: float) -> tuple[int, Iterator[bytes]]:
        location = f"{self.root}/{path}"
        try:
            handle = self.fs.open(location, "rb", block_size=self.options.chunk_size)
            handle.seek(offset)
        except FileNotFoundError:
            raise DownloadError(_missing_message(f"{location} does not exist", path)) from None
        except (OSError, TimeoutError) as error:
            raise RetryableError(f"{location}: {error}") from None
        return offset, self._chunks(handle, location, time.monotonic() + seconds, seconds)

    def _chunks(self, handle: Any, location: str, end: float, seconds: float) -> Iterator[bytes]:
        try:
            while chunk := handle.read(self.options.chunk_size):
                yield chunk
                if time.monotonic() > end:
                    raise RetryableError(f"{location}: not received within {seconds:.0f} s (too slow)")
        except FileNotFoundError:
            raise DownloadError(f"{location} disappeared during the download") from None
        except (OSError, TimeoutError) as error:
            raise RetryableError(f"{location}: {error}") from None
        finally:
            handle.close()


Transport = HttpTransport | FsspecTransport


def make_transport(url: str, options: DownloadOptions) -> Transport:
    if url.startswith(("http://", "https://")):
        return HttpTransport(url, options)
    return FsspecTransport(url, options)


# ----------------------------------------------------------------------------------------------------------
# The download
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Downloader:
    transport: Transport
    dest: Path
    options: DownloadOptions
    bar: tqdm
    retries: int = 0
    bytes_fetched: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set when the download is abandoned (Ctrl-C, an error elsewhere): fetches end at their next chunk."""

    def with_retries(self, what: str, action: Callable[[], T]) -> T:
        """``action()``, retried on :class:`RetryableError` with exponential backoff and jitter."""
        for attempt in range(self.options.retries + 1):
            try:
                return action()
            except RetryableError as error:
                if attempt == self.options.retries:
                    raise DownloadError(f"{what}: gave up after {attempt + 1} attempts; last error: {error}. "
                                        "Run the same command again to resume") from None
                with self._lock:
                    self.retries += 1
                pause = min(self.options.backoff * 2 ** attempt, self.options.max_backoff)
                time.sleep(pause * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    def read_all(self, path: str, limit: int) -> bytes:
        """The whole of ``path``, refused past ``limit`` bytes (an endless answer stops there)."""
        def fetch() -> bytes:
            _, chunks = self.transport.open(path, 0, self.options.deadline)
            data = bytearray()
            with contextlib.closing(chunks):
                for chunk in chunks:
                    data += chunk
                    if len(data) > limit:
                        raise DownloadError(f"{path} is larger than {limit:,} bytes: refused (no publication's "
                                            "is; the URL serves something else)")
            return bytes(data)

        return self.with_retries(path, fetch)

    def fetch(self, entry: FileEntry) -> None:
        """Fetch one file into place: resume its ``.part``, check sha256, rename."""
        final = self.dest / entry.path
        part = final.with_name(final.name + PART_SUFFIX)
        final.parent.mkdir(parents=True, exist_ok=True)

        def attempt() -> None:
            self._resume(entry, part)
            if sha256_file(part) != entry.sha256:
                self.bar.update(-entry.size)
                part.unlink()
                raise RetryableError(f"{entry.path}: sha256 differs from the manifest's (corrupted in transit); "
                                     "fetching it again")
            os.replace(part, final)

        self.with_retries(entry.path, attempt)

    def _resume(self, entry: FileEntry, part: Path) -> None:
        offset = part.stat().st_size if part.exists() else 0
        if offset > entry.size:
            offset = 0
        if offset == entry.size and entry.size > 0:
            return
        start, chunks = self.transport.open(entry.path, offset,
                                            self.options.deadline + (entry.size - offset) / self.options.min_rate)
        if start < offset:
            self.bar.update(start - offset)  # the server ignores Range: those bytes come again
        with open(part, "r+b" if part.exists() else "wb") as handle:
            handle.seek(start)
            handle.truncate()
            written = start
            for chunk in chunks:
                if self.stop.is_set():  # what was written stays in the .part for the next run
                    raise _Abandoned
                written += len(chunk)
                if written > entry.size:
                    raise DownloadError(f"{entry.path}: the server sends more than the manifest's {entry.size} "
                                        "bytes: the publication changed; run the download again from an empty DEST")
                handle.write(chunk)
                self._count(len(chunk))
        if written < entry.size:
            raise RetryableError(f"{entry.path}: the transfer ended at byte {written} of {entry.size}")

    def _count(self, size: int) -> None:
        self.bar.update(size)
        with self._lock:
            self.bytes_fetched += size


def _in_place(dest: Path, entries: list[FileEntry]) -> list[bool]:
    """Whether each entry's final file is present with the right size and sha256 (re-hashed every run)."""
    present = [(dest / entry.path).is_file() and (dest / entry.path).stat().st_size == entry.size for entry in entries]
    candidates = [dest / entry.path for entry, ok in zip(entries, present) if ok]
    digests = iter(hash_files(candidates))
    return [ok and next(digests) == entry.sha256 for entry, ok in zip(entries, present)]


def _partial_bytes(dest: Path, entry: FileEntry) -> int:
    part = dest / (entry.path + PART_SUFFIX)
    return min(part.stat().st_size, entry.size) if part.is_file() else 0


def _existing_files(dest: Path) -> list[str]:
    """Paths (relative, ``/``-separated) of every file and symlink below ``dest``; symlinks are not followed."""
    found = []
    for folder, dirs, files in os.walk(dest):
        relative = Path(folder).relative_to(dest)
        found += [(relative / name).as_posix() for name in files]
        found += [(relative / name).as_posix() for name in dirs if (Path(folder) / name).is_symlink()]
    return sorted(found)


def _refuse_foreign_files(dest: Path, manifest: Manifest, raw: bytes, done: list[bool], overwrite: bool) -> None:
    """Refuse a DEST holding anything but this publication's files: the files of a complete or interrupted
    download of it (a listed file already correct, a ``.part``), or, when DEST's manifest is this one (the
    same publication downloaded before), its listed files however damaged. ``overwrite`` allows the rest (a
    listed path is then replaced; a path the publication does not list is never touched)."""
    if overwrite or not dest.is_dir():
        return
    kept = dest / MANIFEST_NAME
    same = kept.is_file() and kept.stat().st_size == len(raw) and kept.read_bytes() == raw
    listed = {entry.path for entry in manifest.files}
    allowed = {entry.path for entry, ok in zip(manifest.files, done) if ok or same}
    allowed |= {path + PART_SUFFIX for path in listed} | ({MANIFEST_NAME} if same else set())
    foreign = [path for path in _existing_files(dest) if path not in allowed]
    if foreign:
        replaced = [path for path in foreign if path in listed or path == MANIFEST_NAME]
        first = replaced[0] if replaced else foreign[0]
        what = "differs from the publication's file of that name" if replaced else "is not part of the publication"
        raise DownloadError(f"{dest} is not empty: {len(foreign)} file(s) there are not this publication's "
                            f"(first: {first}, which {what}); refused, nothing written. Download into an empty "
                            "directory, or pass --overwrite to replace the publication's files there (files it does "
                            "not list are never touched)")


def _check_free_space(dest: Path, pending: list[FileEntry], manifest_bytes: int) -> None:
    needed = sum(entry.size - _partial_bytes(dest, entry) for entry in pending) + manifest_bytes
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise DownloadError(f"the publication needs {needed:,} more bytes in {dest}, and its disk has {free:,} "
                            "free: refused before writing; free some space or download elsewhere")


def download(url: str, dest: str | os.PathLike[str], options: DownloadOptions = DownloadOptions()) -> DownloadSummary:
    """Download the publication at ``url`` into ``dest`` (see the module docstring)."""
    try:
        return _download(url, dest, options)
    except OSError as error:  # the disk filled up, a folder is not writable, ...
        raise DownloadError(f"writing into {dest} failed ({error.strerror or error}"
                            f"{': ' + str(error.filename) if error.filename else ''})") from None


def _download(url: str, dest: str | os.PathLike[str], options: DownloadOptions) -> DownloadSummary:
    began = time.perf_counter()
    url = url.removesuffix("/" + MANIFEST_NAME).rstrip("/")
    dest = Path(dest)
    transport = make_transport(url, options)
    with contextlib.ExitStack() as stack, tqdm(
            total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="reinforce download",
            disable=not options.progress, dynamic_ncols=True, **bar_options()) as bar:
        downloader = _Downloader(transport, dest, options, bar)
        raw = downloader.read_all(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        manifest = Manifest.from_bytes(raw)
        check_destination(dest, manifest.files + [FileEntry(MANIFEST_NAME, len(raw), "0" * 64)],
                          companions=(PART_SUFFIX,))
        dest.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_destination_lock(dest))
        done = _in_place(dest, manifest.files)
        _refuse_foreign_files(dest, manifest, raw, done, options.overwrite)
        pending = [entry for entry, ok in zip(manifest.files, done) if not ok]
        _check_free_space(dest, pending, len(raw))
        for entry in pending:
            stale = dest / entry.path
            if stale.is_file():  # present but wrong: it is fetched again
                stale.unlink()
        bar.reset(total=sum(entry.size for entry in pending))
        bar.update(sum(_partial_bytes(dest, entry) for entry in pending))
        # Largest files first, so the last worker does not start a big file when the others are done.
        pending.sort(key=lambda entry: -entry.size)
        def fetch_unless_stopped(entry: FileEntry) -> None:
            # The stop is set by the failing worker itself: the main thread notices a failure only when it
            # reaches that file's future, and queued files must not start meanwhile.
            if downloader.stop.is_set():
                return
            try:
                downloader.fetch(entry)
            except BaseException:
                downloader.stop.set()
                raise

        with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
            futures = [pool.submit(fetch_unless_stopped, entry) for entry in pending]
            try:
                for future in futures:
                    future.result()
            except BaseException as error:  # Ctrl-C or a file that failed: stop the rest now, not after every file
                downloader.stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                # A file listed before the failed one may have been abandoned by the stop: report the failure.
                failures = [f.exception() for f in futures if f.done() and not f.cancelled()]
                cause = next((e for e in failures if e is not None and not isinstance(e, _Abandoned)), None)
                if cause is not None and cause is not error:
                    raise cause from None
                raise
    staged = dest / (MANIFEST_NAME + PART_SUFFIX)
    staged.write_bytes(raw)
    os.replace(staged, dest / MANIFEST_NAME)
    store = dest / manifest.store
    verified: list[str] = []
    if options.verify:
        from ..tools.verify import verify_store

        verified = verify_store(store)
    return DownloadSummary(dest=dest, store=store, files=len(manifest.files), fetched=len(pending),
                           bytes_fetched=downloader.bytes_fetched, retries=downloader.retries,
                           seconds=time.perf_counter() - began, verified=verified)


# ----------------------------------------------------------------------------------------------------------
# A local cache for streaming from a remote store
# ----------------------------------------------------------------------------------------------------------

def _range_name(byte_range: ByteRequest | None) -> str:
    if byte_range is None:
        return "all"
    if isinstance(byte_range, RangeByteRequest):
        return f"{byte_range.start}-{byte_range.end}"
    if isinstance(byte_range, OffsetByteRequest):
        return f"{byte_range.offset}-"
    if isinstance(byte_range, SuffixByteRequest):
        return f"-{byte_range.suffix}"
    raise TypeError(f"unknown byte range {byte_range!r}")


@contextlib.contextmanager
def _destination_lock(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock on downloading into ``dest`` (a file beside it, ``.<name>.download.lock``): two
    downloads into one DEST (every rank of a job at start-up, a second run while the first goes on) would write
    the same ``.part`` files and rename them from under each other."""
    import fcntl

    path = dest.parent / f".{dest.name}.download.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"another download into {dest} is running (it holds {path}): wait for it to end, "
                                "or download into another directory") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: a later download creates and locks a new one


class RangeCacheStore(WrapperStore[Store]):
    """A read-only zarr store wrapper that keeps every object and byte range read from ``store`` as a file
    under ``cache_dir`` and serves it from there afterwards (see :func:`cached_store`)."""

    def __init__(self, store: Store, cache_dir: str | os.PathLike[str]) -> None:
        super().__init__(store)
        self.cache_dir = Path(cache_dir)

    def __reduce__(self) -> tuple[Any, ...]:  # DataLoader workers get their own copy
        return RangeCacheStore, (self._store, self.cache_dir)

    def _path(self, key: str, byte_range: ByteRequest | None) -> Path:
        return self.cache_dir / "objects" / key / _range_name(byte_range)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        path = self._path(key, byte_range)
        if key == "zarr.json" and byte_range is None:
            return await self._refresh_root(path, prototype)
        if path.is_file():
            return prototype.buffer.from_bytes(path.read_bytes())
        value = await self._store.get(key, prototype, byte_range)
        if value is not None:
            _write_atomically(path, value.to_bytes())
        return value

    async def _refresh_root(self, path: Path, prototype: BufferPrototype) -> Buffer | None:
        """The root metadata, always fetched: if it changed, the store was re-published and the cache is stale."""
        value = await self._store.get("zarr.json", prototype)
        if value is not None and (not path.is_file() or path.read_bytes() != value.to_bytes()):
            shutil.rmtree(self.cache_dir / "objects", ignore_errors=True)
            _write_atomically(path, value.to_bytes())
        return value


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{PART_SUFFIX}")
    staged.write_bytes(data)
    os.replace(staged, path)


def cached_store(url: str, cache_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 ) -> RangeCacheStore:
    """A read-only zarr store over the remote store at ``url`` that keeps every object and byte range it reads
    in ``cache_dir`` (shared by this run, later runs and other processes).

    Pass it as the ``store`` of :class:`~reinforce_loaders.ReinforcedDataset`: an epoch then fetches only what no
    earlier epoch or run fetched. Only the root ``zarr.json`` is fetched at every opening; if it changed (the
    store was re-published), the cache is emptied first. Each URL has its own folder in ``cache_dir`` (named by
    a hash of the URL), so stores sharing one ``cache_dir`` (a train and a val store) never serve each other's
    objects.
    """
    if url.startswith(("http://", "https://")):  # bounded reads, same-host redirects (reinforce_loaders)
        from reinforce_loaders.store.remote import http_store

        remote: Store = http_store(url, read_only=True, storage_options=storage_options or {})
    else:
        remote = FsspecStore.from_url(url, storage_options=storage_options, read_only=True)
    folder = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return RangeCacheStore(remote, Path(cache_dir) / folder)
