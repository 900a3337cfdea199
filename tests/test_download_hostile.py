"""``reinforce download`` against a hostile server and into a DEST that holds something (issue 20).

Endless, trickled and doubly gzip-encoded manifests, a file claiming 10^12 bytes, redirects to other hosts and
schemes, manifests of malformed JSON (1,500 deep, a 5,000-digit integer, members of the wrong type, a path that
is both file and folder, a listed ``manifest.json.part``), and a DEST holding README.md, croissant.json and
.ssh/authorized_keys. What could allocate runs in a limited child (:mod:`limited_child`).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hostile_server import HostileServer, answer, endless, gzip_bomb, redirect, trickle
from limited_child import run_limited
from test_download import FAST, assert_same_files, manifest_of, publication  # noqa: F401 (a fixture)

from reinforce.cli import main
from reinforce.share.download import DownloadError, download
from reinforce.share.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, ManifestError

SHA = "0" * 64


def manifest_bytes(files: list[dict] | object, **members) -> bytes:
    data = {"kind": "reinforce-publication", "manifest_version": 1, "store": "s.zarr", "format_name": "reinforce-store",
            "format_version": "2.0", "identity": {}, "files": files, **members}
    return json.dumps(data).encode()


def one_file(size: int = 4, path: str = "s.zarr/zarr.json") -> list[dict]:
    return [{"path": path, "size": size, "sha256": SHA}]


@pytest.mark.slow  # a child process importing torch
def test_endless_and_huge_answers_are_refused_within_the_caps(tmp_path):
    """An endless manifest (2.9 GB then MemoryError), and a file listed with 10^12 bytes and an endless body
    (written until the disk filled): refused at 32 MiB, and before writing (free space), in a limited child."""
    root = tmp_path / "served"
    root.mkdir()
    with HostileServer(root, {"/endless/manifest.json": endless(b'{"kind": "'),
                              "/huge/manifest.json": answer(manifest_bytes(one_file(10**12))),
                              "/huge/s.zarr/zarr.json": endless()}) as server:
        endless_result, huge = run_limited(
            ["download", f"{server.url}/endless", str(tmp_path / "a"), {"retries": 0}],
            ["download", f"{server.url}/huge", str(tmp_path / "b"), {"retries": 0}])
    assert endless_result["error"] == "DownloadError"
    assert f"manifest.json is larger than {MAX_MANIFEST_BYTES:,} bytes: refused" in endless_result["message"]
    assert huge["error"] == "DownloadError" and "needs 1,000,000,000," in huge["message"]
    assert "free: refused before writing" in huge["message"]
    assert not list((tmp_path / "b").rglob("*.part"))


def test_a_file_size_beyond_the_cap_is_refused_at_the_manifest(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / MANIFEST_NAME).write_bytes(manifest_bytes(one_file(10**15)))
    with pytest.raises(ManifestError, match="invalid size 1000000000000000 .at most 1,099,511,627,776 bytes"):
        download(str(root), tmp_path / "copy", FAST)


def test_compressed_and_trickled_manifests_are_refused(tmp_path):
    """``Content-Encoding: gzip, gzip`` (requests unpacked it although identity was asked for: 6.8 KB became
    2.9 GB) and one byte per 0.5 s (each read within the timeout, so it never ended)."""
    root = tmp_path / "served"
    root.mkdir()
    bomb = gzip_bomb(64 << 20)
    assert len(bomb) < 200_000
    with HostileServer(root, {"/gz/manifest.json": answer(bomb, headers={"Content-Encoding": "gzip, gzip"}),
                              "/slow/manifest.json": trickle(manifest_bytes(one_file()), 0.5)}) as server:
        with pytest.raises(DownloadError, match=r"Content-Encoding 'gzip, gzip' although identity was asked"):
            download(f"{server.url}/gz", tmp_path / "a", FAST)
        with pytest.raises(DownloadError, match=r"not received within 2 s .the server sends too slowly"):
            download(f"{server.url}/slow", tmp_path / "b", dataclasses.replace(FAST, deadline=2, retries=0))


def test_redirects_go_to_the_same_host_only_unless_allowed(publication, tmp_path):  # noqa: F811
    with HostileServer(publication) as elsewhere, HostileServer(publication) as server:
        for path in [MANIFEST_NAME] + [entry.path for entry in manifest_of(publication).files]:
            server.routes[f"/away/{path}"] = redirect(f"{elsewhere.url}/{path}")
        server.routes["/file/manifest.json"] = redirect("file:///etc/passwd")
        server.routes["/here/manifest.json"] = redirect(f"/{MANIFEST_NAME}")
        with pytest.raises(DownloadError, match=r"redirects to another host \(127.0.0.1:\d+\): refused; pass "
                                                "--allow-other-hosts"):
            download(f"{server.url}/away", tmp_path / "a", FAST)
        with pytest.raises(DownloadError, match=r"redirects to file:///etc/passwd: refused"):
            download(f"{server.url}/file", tmp_path / "b", FAST)
        with pytest.raises(DownloadError, match="404"):  # followed on the same host: the store is not below /here
            download(f"{server.url}/here", tmp_path / "c", FAST)
        followed = download(f"{server.url}/away", tmp_path / "d",
                            dataclasses.replace(FAST, allow_other_hosts=True, verify=False))
    assert followed.fetched == followed.files


@pytest.mark.parametrize("raw, message", [
    (b"[" * 1500 + b"]" * 1500, "nests arrays or objects more than 16 deep"),
    (manifest_bytes(one_file(), manifest_version=0).replace(b'"manifest_version": 0', b'"manifest_version": '
                                                             + b"7" * 5000), "an integer of 5,000 digits"),
    (manifest_bytes(5), "files is 5, not a list"),
    (manifest_bytes(one_file(), identity=5), "identity is 5, not a JSON object"),
    (manifest_bytes(one_file() + one_file(path="s.zarr/zarr.json/x")), "both as a file and as a folder"),
    (manifest_bytes(one_file() + one_file(path="manifest.json.part")), "'manifest.json.part' has the name of the "
                                                                       "partial file of 'manifest.json'"),
    (manifest_bytes(one_file() + one_file(path="s.zarr/zarr.json.part")), "has the name of the partial file"),
])
def test_malformed_manifests_are_one_line_errors(tmp_path, capsys, raw, message):
    """Each was a raw RecursionError, ValueError, TypeError, IsADirectoryError or a silent success."""
    root = tmp_path / "served"
    root.mkdir()
    (root / MANIFEST_NAME).write_bytes(raw)
    assert main(["download", str(root), str(tmp_path / "copy"), "--no-progress", "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "copy").exists() or not list((tmp_path / "copy").rglob("*"))


def test_a_dest_holding_other_files_is_refused_unless_overwrite(publication, tmp_path, capsys):  # noqa: F811
    dest = tmp_path / "home"
    (dest / ".ssh").mkdir(parents=True)
    mine = {"README.md": b"my notes\n", "croissant.json": b"{}", ".ssh/authorized_keys": b"ssh-ed25519 AAAA me\n"}
    for path, data in mine.items():
        (dest / path).write_bytes(data)
    assert main(["download", str(publication), str(dest), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not empty: 3 file(s) there are not this publication's (first: README.md, which differs" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert all((dest / path).read_bytes() == data for path, data in mine.items())
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(mine)
    assert main(["download", str(publication), str(dest), "--no-progress", "--overwrite"]) == 0
    assert_same_files(publication, dest)  # the publication's README.md and croissant.json replaced mine
    assert (dest / ".ssh/authorized_keys").read_bytes() == mine[".ssh/authorized_keys"]  # never touched
    assert main(["download", str(publication), str(dest), "--no-progress"]) == 2  # authorized_keys is not its
    capsys.readouterr()


def test_an_interrupted_download_into_its_own_dest_resumes_without_overwrite(publication, tmp_path):  # noqa: F811
    dest = tmp_path / "copy"
    download(str(publication), dest, FAST)
    (dest / MANIFEST_NAME).unlink()  # as after a crash: the manifest is written last
    kept = manifest_of(publication).files[0].path
    (dest / kept).rename(dest / (kept + ".part"))
    summary = download(str(publication), dest, FAST)
    assert summary.fetched == 1
    assert_same_files(publication, dest)


def test_free_space_is_checked_before_anything_is_written(publication, tmp_path, monkeypatch):  # noqa: F811
    import shutil

    import reinforce.share.download as module

    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(DownloadError, match=r"needs [\d,]+ more bytes in .*copy, and its disk has 1,000 free"):
        download(str(publication), tmp_path / "copy", FAST)
    assert not list((tmp_path / "copy").rglob("*"))
