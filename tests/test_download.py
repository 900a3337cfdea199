"""reinforce download against real servers on loopback: HTTP with and without Range, faults, SIGKILL, S3 (moto)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from range_server import RangeServer, _Handler
from reinforce_loaders import ReinforcedDataset

from reinforce.share.download import DownloadError, DownloadOptions, cached_store, download
from reinforce.share.manifest import MANIFEST_NAME, Manifest, ManifestError
from reinforce.share.publish import publish
from reinforce.tools.verify import verify_store

FAST = DownloadOptions(progress=False, backoff=0.01, chunk_size=128)


@dataclasses.dataclass
class Seen:
    path: str
    range: str | None


class _FaultyBody:
    """Wraps a handler's output after the headers: drops the connection half way, flips a byte, or trickles."""

    def __init__(self, raw, fault: str) -> None:
        self.raw, self.fault = raw, fault

    def write(self, data: bytes) -> int:
        if self.fault == "drop":
            self.raw.write(data[:len(data) // 2])
            self.fault = "dropped"
        elif self.fault == "corrupt":
            middle = len(data) // 2
            self.raw.write(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
        elif self.fault == "slow":
            for start in range(0, len(data), 64):
                self.raw.write(data[start:start + 64])
                time.sleep(0.02)
        elif self.fault != "dropped":
            self.raw.write(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


class _FaultHandler(_Handler):
    """The Range-honouring handler of range_server, with faults queued per path (or one for every request)."""

    def do_GET(self) -> None:  # noqa: N802
        server = self.server
        server.seen.append(Seen(self.path, self.headers.get("Range")))  # type: ignore[attr-defined]
        queue = server.faults.get(self.path, [])  # type: ignore[attr-defined]
        self._fault = queue.pop(0) if queue else server.every  # type: ignore[attr-defined]
        if self._fault == "500":
            self.send_error(500)
            return
        super().do_GET()

    def end_headers(self) -> None:
        super().end_headers()
        if getattr(self, "_fault", None) in ("drop", "corrupt", "slow"):
            self.close_connection = True
            self.wfile = _FaultyBody(self.wfile, self._fault)


class FaultServer(RangeServer):
    """``faults[path]``: faults for the next requests of ``path`` ("500", "drop", "corrupt", "slow");
    ``every``: a fault for every other request; ``seen``: (path, Range header) of every GET."""

    def __init__(self, root: Path, faults: dict[str, list[str]] | None = None, every: str | None = None) -> None:
        super().__init__(root)
        self.httpd.RequestHandlerClass = functools.partial(_FaultHandler, directory=str(root))
        self.httpd.faults = faults or {}  # type: ignore[attr-defined]
        self.httpd.every = every  # type: ignore[attr-defined]
        self.httpd.seen = []  # type: ignore[attr-defined]

    @property
    def seen(self) -> list[Seen]:
        return self.httpd.seen  # type: ignore[attr-defined]

    def set_every(self, fault: str | None) -> None:
        self.httpd.every = fault  # type: ignore[attr-defined]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class PlainServer:
    """``python -m http.server`` on loopback: ignores Range, always answers 200 with the whole file."""

    def __init__(self, root: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self) -> PlainServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def publication(store, digits, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("publication")
    publish(store, str(dest), source=digits[0])
    return dest


def manifest_of(publication: Path) -> Manifest:
    return Manifest.from_bytes((publication / MANIFEST_NAME).read_bytes())


def largest_store_file(publication: Path) -> str:
    manifest = manifest_of(publication)
    return max((e for e in manifest.files if e.path.startswith(manifest.store)), key=lambda e: e.size).path


def assert_same_files(publication: Path, dest: Path) -> None:
    for entry in manifest_of(publication).files:
        assert (dest / entry.path).read_bytes() == (publication / entry.path).read_bytes(), entry.path
    assert not list(dest.rglob("*.part"))


def test_download_verifies_and_rerun_only_rechecks(publication, tmp_path):
    dest = tmp_path / "copy"
    with FaultServer(publication) as server:
        summary = download(server.url, dest, FAST)
        assert summary.fetched == summary.files == len(manifest_of(publication).files)
        assert any(line.startswith("records:") for line in summary.verified)
        assert_same_files(publication, dest)
        before = len(server.seen)
        again = download(server.url, dest, FAST)
        assert again.fetched == 0 and again.bytes_fetched == 0
        assert [seen.path for seen in server.seen[before:]] == [f"/{MANIFEST_NAME}"]


def test_a_damaged_file_in_place_is_fetched_again(publication, tmp_path):
    dest = tmp_path / "copy"
    with FaultServer(publication) as server:
        download(server.url, dest, FAST)
        damaged = dest / largest_store_file(publication)
        damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
        summary = download(server.url, dest, FAST)
    assert summary.fetched == 1
    assert_same_files(publication, dest)


def test_connection_dropped_mid_file_resumes_with_a_range(publication, tmp_path):
    path = largest_store_file(publication)
    with FaultServer(publication, faults={f"/{path}": ["drop"]}) as server:
        summary = download(server.url, tmp_path / "copy", FAST)
    ranges = [seen.range for seen in server.seen if seen.path == f"/{path}"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert summary.retries == 1
    assert_same_files(publication, tmp_path / "copy")


@pytest.mark.parametrize("fault, recovered, message", [("500", 2, "gave up after 2 attempts.*500"),
                                                       ("corrupt", 1, "sha256 differs")])
def test_server_errors_and_corrupted_bytes_are_retried_then_given_up(publication, tmp_path, fault, recovered,
                                                                     message):
    """500 twice, or a flipped byte (caught by sha256), is retried and ends verified; a fault that persists
    ends in a clear error and no file in place."""
    path = largest_store_file(publication)
    with FaultServer(publication, faults={f"/{path}": [fault] * recovered}) as server:
        summary = download(server.url, tmp_path / "copy", FAST)
    assert summary.retries == recovered
    assert [seen.range for seen in server.seen if seen.path == f"/{path}"] == [None] * (recovered + 1)
    assert_same_files(publication, tmp_path / "copy")
    with FaultServer(publication, faults={f"/{path}": [fault] * 10}) as server:
        with pytest.raises(DownloadError, match=message):
            download(server.url, tmp_path / "bad", dataclasses.replace(FAST, retries=1))
    assert not (tmp_path / "bad" / path).exists() and not (tmp_path / "bad" / (path + ".part")).exists()


@pytest.mark.parametrize("honours_range", [True, False])
@pytest.mark.parametrize("partial", ["good", "wrong"])
def test_partial_files_are_continued_or_restarted(publication, tmp_path, honours_range, partial):
    """A kept .part is continued with a Range request; a server that ignores Range sends the whole file, which
    replaces it; a .part with wrong bytes fails the sha256 check and is fetched again from zero."""
    dest = tmp_path / "copy"
    path = largest_store_file(publication)
    (dest / path).parent.mkdir(parents=True)
    whole = (publication / path).read_bytes()
    (dest / (path + ".part")).write_bytes(whole[:len(whole) // 2] if partial == "good" else b"\xff" * 100)
    with (FaultServer(publication) if honours_range else PlainServer(publication)) as server:
        summary = download(server.url, dest, FAST)
    assert summary.retries == (1 if honours_range and partial == "wrong" else 0)
    if honours_range:
        assert [seen.range for seen in server.seen if seen.path == f"/{path}"][0] is not None
    assert_same_files(publication, dest)


@pytest.mark.slow  # two CLI processes (each imports torch)
def test_killed_download_resumes_its_partial_file(publication, tmp_path):
    """SIGKILL mid-file, then the same command again: the .part is continued with a Range request."""
    dest = tmp_path / "copy"
    with FaultServer(publication, every="slow") as server:
        command = [sys.executable, "-m", "reinforce.cli", "download", server.url, str(dest), "--workers", "1",
                   "--chunk-size", "64", "--no-progress"]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        partial: list[Path] = []
        while not partial and time.monotonic() < deadline and child.poll() is None:
            partial = [p for p in dest.rglob("*.part") if p.stat().st_size >= 64] if dest.exists() else []
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert partial, "the download finished or failed before a partial file appeared"
        kept = {p: p.stat().st_size for p in dest.rglob("*.part")}
        assert any(0 < size for size in kept.values())
        server.set_every(None)
        before = len(server.seen)
        rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "verified" in rerun.stdout
    resumed = {seen.path: seen.range for seen in server.seen[before:]}
    for part, size in kept.items():
        if size:
            relative = part.relative_to(dest).as_posix().removesuffix(".part")
            assert resumed[f"/{relative}"] == f"bytes={size}-"
    assert_same_files(publication, dest)


def _tampered(publication: Path, tmp_path: Path, path: str) -> Path:
    """A copy of the publication whose manifest lists one more file at ``path``."""
    root = tmp_path / "tampered"
    root.mkdir()
    data = json.loads((publication / MANIFEST_NAME).read_text())
    data["files"].append({"path": path, "size": 4, "sha256": "0" * 64})
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/passwd", "store.zarr/../../x", "a\\b", "C:/x", "a//b"])
def test_unsafe_manifest_paths_are_refused_before_writing(publication, tmp_path, path):
    root = _tampered(publication, tmp_path, path)
    dest = tmp_path / "copy"
    with pytest.raises(ManifestError, match="refused|invalid|absolute|component"):
        download(str(root), dest, FAST)
    assert not dest.exists()


def test_symlink_in_destination_is_refused_before_writing(publication, tmp_path):
    dest = tmp_path / "copy"
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    store_dir = manifest_of(publication).store
    (dest / store_dir).symlink_to(outside, target_is_directory=True)
    with FaultServer(publication) as server:
        with pytest.raises(ManifestError, match="symlink"):
            download(server.url, dest, FAST)
    assert list(outside.iterdir()) == [] and sorted(p.name for p in dest.iterdir()) == [store_dir]


@pytest.fixture
def s3_options():
    """fsspec options of a bucket ``pubs`` on a local S3 server (moto)."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "test", "secret": "test",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket="pubs")
    yield options
    server.stop()


@pytest.mark.slow  # a local S3 server
def test_publish_to_and_download_from_s3(store, digits, tmp_path, s3_options):
    """publish to s3:// and download from it, against a local S3 server (moto)."""
    summary = publish(store, "s3://pubs/digits", source=digits[0], storage_options=s3_options)
    result = download("s3://pubs/digits", tmp_path / "copy",
                      dataclasses.replace(FAST, storage_options=s3_options, chunk_size=1 << 20))
    assert result.fetched == len(summary.manifest.files)
    assert verify_store(result.store, digits[0], quick=True)
    local = tmp_path / "local"
    publish(store, str(local), source=digits[0])
    for entry in summary.manifest.files:
        assert (tmp_path / "copy" / entry.path).read_bytes() == (local / entry.path).read_bytes()


def _epoch_bytes(dataset: ReinforcedDataset, server: RangeServer, epoch: int) -> tuple[int, list]:
    before = len(server.log)
    dataset.set_epoch(epoch)
    targets = [dataset[index][1] for index in range(len(dataset))]
    return sum(request.bytes for request in server.log[before:]), targets


def test_local_cache_fetches_each_remote_range_once(publication, digits, tmp_path):
    """Streaming through cached_store: a cycle of A epochs reads each range once, a later run reads only the root
    metadata, and the samples equal those of the plain remote store."""
    store_dir = manifest_of(publication).store
    with RangeServer(publication) as server:
        url = f"{server.url}/{store_dir}"
        plain = ReinforcedDataset(digits[0], url, target="sparse")
        cached = ReinforcedDataset(digits[0], cached_store(url, tmp_path / "cache"), target="sparse")
        cycle = plain.header.num_augmentations
        for epoch in range(2 * cycle):
            plain_bytes, plain_targets = _epoch_bytes(plain, server, epoch)
            cached_bytes, cached_targets = _epoch_bytes(cached, server, epoch)
            assert plain_bytes > 0 and (cached_bytes == 0) == (epoch >= cycle)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                       for a, b in zip(plain_targets, cached_targets))
        before = len(server.log)
        again = ReinforcedDataset(digits[0], cached_store(url, tmp_path / "cache"), target="sparse")
        assert [r.path for r in server.log[before:]] == [f"/{store_dir}/zarr.json"]
        assert _epoch_bytes(again, server, 0)[0] == 0


def test_stores_sharing_a_cache_directory_never_serve_each_others_objects(store, tmp_path):
    """A train and a val store streamed through one cache_dir: each URL has its own folder (the cache used to
    key objects by their path in the store alone, so the second store read the first one's chunks)."""
    import zarr
    from reinforce_loaders import format as fmt

    served = tmp_path / "served"
    shutil.copytree(store, served / "a.zarr")
    shutil.copytree(store, served / "b.zarr")  # same root metadata, other labels
    labels = zarr.open_group(str(served / "b.zarr"), mode="r+")[fmt.LABELS]
    original = labels[:]
    labels[:] = (original + 1) % 10
    with RangeServer(served) as server:
        groups = {name: zarr.open_group(store=cached_store(f"{server.url}/{name}.zarr", tmp_path / "cache"),
                                        mode="r") for name in ("b", "a")}
        b_first, a_after = groups["b"][fmt.LABELS][:], groups["a"][fmt.LABELS][:]
    assert np.array_equal(a_after, original) and np.array_equal(b_first, (original + 1) % 10)


def test_an_interrupted_download_stops_fetching_at_once(publication, tmp_path, monkeypatch):
    """Ctrl-C (or a failed file) used to wait for every queued file to be fetched before it took effect."""
    import reinforce.share.download

    fetch, fetched = reinforce.share.download._Downloader.fetch, []

    def interrupted(self, entry):
        fetched.append(entry.path)
        if len(fetched) == 2:
            raise KeyboardInterrupt
        return fetch(self, entry)

    monkeypatch.setattr(reinforce.share.download._Downloader, "fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download(str(publication), tmp_path / "copy", dataclasses.replace(FAST, workers=1))
    assert len(manifest_of(publication).files) > 10 and len(fetched) == 2  # no queued file starts after the failure


def test_a_part_file_linked_outside_dest_is_refused_and_the_target_left_alone(publication, tmp_path):
    dest, outside = tmp_path / "copy", tmp_path / "outside.txt"
    outside.write_bytes(b"precious data\n")
    path = dest / largest_store_file(publication)
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".part").symlink_to(outside)
    with pytest.raises(ManifestError, match=r"\.part is a symlink in the destination; refused"):
        download(str(publication), dest, FAST)
    assert outside.read_bytes() == b"precious data\n"


def test_a_second_download_into_the_same_dest_is_refused_while_the_first_runs(publication, tmp_path):
    import fcntl

    dest = tmp_path / "copy"
    with open(tmp_path / ".copy.download.lock", "a") as held:  # as a first download holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DownloadError, match="another download into .*copy is running"):
            download(str(publication), dest, FAST)
    download(str(publication), dest, FAST)  # once it has ended
    assert_same_files(publication, dest)
    assert not (tmp_path / ".copy.download.lock").exists()


def test_a_url_without_a_manifest_says_to_pass_the_publication_root(publication, tmp_path):
    store_dir = manifest_of(publication).store
    with pytest.raises(DownloadError, match=r"no publication there. Pass the publication's root .*not the \.zarr"):
        download(str(publication / store_dir), tmp_path / "a", FAST)
    with RangeServer(publication) as server, pytest.raises(DownloadError, match=r"\(404\): no publication there"):
        download(f"{server.url}/{store_dir}", tmp_path / "b", FAST)
