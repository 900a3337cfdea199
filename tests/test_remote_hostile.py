"""Reading a store over HTTP from a hostile server (issue 20): endless, compressed, trickled, deeply nested and
redirected answers for ``zarr.json`` and a ``records`` shard. Each is a one-line refusal within the caps; what
could allocate runs in a limited child (:mod:`limited_child`)."""

from __future__ import annotations

import shutil

import pytest
from hostile_server import HostileServer, answer, endless, gzip_bomb, redirect, trickle
from limited_child import run_limited

from reinforce.cli import main
from reinforce_loaders import format as fmt
from reinforce_loaders.store import remote

SHARD = "/records/c/0/0/0"


@pytest.fixture()
def served(store, tmp_path):
    root = tmp_path / "served"
    shutil.copytree(store, root / "s.zarr")
    return root


@pytest.mark.slow  # a child process importing torch
def test_endless_answers_are_refused_within_the_caps(served):
    """An endless zarr.json (3 GB, then a raw MemoryError) and an endless records shard from a server that ignores
    Range (2.8 GB read before the error)."""
    with HostileServer(served, {"/a/zarr.json": endless(b'{"zarr_format": 3, "x": "'),
                                f"/s.zarr{SHARD}": endless(filler=bytes(65536))}) as server:
        shutil.copytree(served / "s.zarr", served / "a", dirs_exist_ok=True)
        metadata, shard, verify = run_limited(["open", f"{server.url}/a"], ["read", f"{server.url}/s.zarr"],
                                              ["cli", ["verify", f"{server.url}/s.zarr"]])
    assert metadata["error"] == "RemoteReadError"
    assert f"zarr.json: the server sends more than the {remote.MAX_METADATA_BYTES:,} bytes" in metadata["message"]
    assert shard["error"] == "StoreFormatError" and "ignores Range and sends more than the" in shard["message"]
    assert verify["rc"] in (1, 2) and "RemoteReadError" in verify["stderr"] and "more than the" in verify["stderr"]
    assert len(verify["stderr"].strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["/s.zarr/zarr.json", f"/s.zarr{SHARD}"])
def test_a_compressed_answer_is_refused_not_unpacked(served, where, capsys):
    """aiohttp unpacked a 2.4 MB gzip-encoded zarr.json or shard to 2.5 GB although nothing asked for it."""
    bomb = gzip_bomb(64 << 20, layers=1)
    with HostileServer(served, {where: answer(bomb, headers={"Content-Encoding": "gzip"})}) as server:
        code = main(["verify", f"{server.url}/s.zarr"])
    err = capsys.readouterr().err
    assert code in (1, 2) and "Content-Encoding 'gzip' although identity was asked for: refused" in err, err
    assert "Traceback" not in err


def test_a_trickled_zarr_json_meets_the_deadline(served, monkeypatch):
    """One byte per 0.3 s: each read within aiohttp's timeout, so it ended in a raw TimeoutError after 305 s."""
    monkeypatch.setattr(remote, "REQUEST_DEADLINE", 2.0)
    data = (served / "s.zarr" / "zarr.json").read_bytes()
    with HostileServer(served, {"/s.zarr/zarr.json": trickle(data, 0.3)}) as server:
        with pytest.raises(remote.RemoteReadError, match=r"not received within 2 s .the server sends too slowly"):
            fmt.open_store_group(f"{server.url}/s.zarr")


def test_deep_json_and_redirects_are_refused(served):
    with HostileServer(served) as elsewhere, HostileServer(served) as server:
        server.routes.update({
            "/deep/zarr.json": answer(b"[" * 1500 + b"]" * 1500),
            "/file/zarr.json": redirect("file:///etc/passwd"),
            "/away/zarr.json": redirect(f"{elsewhere.url}/s.zarr/zarr.json"),
            "/here/zarr.json": redirect("/s.zarr/zarr.json")})
        with pytest.raises(remote.RemoteReadError, match="nests arrays or objects more than 64 deep"):
            fmt.open_store_group(f"{server.url}/deep")
        with pytest.raises(remote.RemoteReadError, match="redirects to file:///etc/passwd: refused"):
            fmt.open_store_group(f"{server.url}/file")
        with pytest.raises(remote.RemoteReadError, match=r"redirects to another host \(127.0.0.1:\d+\): refused"):
            fmt.open_store_group(f"{server.url}/away")
        header = fmt.read_header(fmt.open_store_group(f"{server.url}/here"))  # same host: followed
        assert header.num_samples == 45
        followed = fmt.open_store_group(f"{server.url}/away", storage_options={"allow_other_hosts": True})
        assert fmt.read_header(followed).num_samples == 45


def _hostile_copies(store, root):
    """Two stores that passed: every image size 2 x 2 (far smaller than every stored crop box), and 1,000,000
    class names on a 10-class store; and a crop ratio of [0.75, inf]."""
    import zarr
    from range_server import RangeServer  # noqa: F401 (served by the test)
    from test_hostile import edit_header

    tiny = root / "tiny.zarr"
    shutil.copytree(store, tiny)
    zarr.open_group(str(tiny), mode="r+")[fmt.IMAGE_SIZES][:] = 2
    names = root / "names.zarr"
    shutil.copytree(store, names)
    edit_header(names, class_names=["n"] * 1_000_000)
    ratio = root / "ratio.zarr"
    shutil.copytree(store, ratio)
    augmentation = fmt.read_header(fmt.open_store_group(ratio)).augmentation
    augmentation["ops"][0]["ratio"] = [0.75, float("inf")]
    edit_header(ratio, augmentation=augmentation)
    return tiny, names, ratio


def test_stores_whose_sizes_names_or_ratio_are_hostile_fail_verify_and_the_dataset(digits, store, tmp_path, capsys):
    from range_server import RangeServer

    from reinforce_loaders import ReinforcedDataset
    from reinforce_loaders.errors import ReinforceError

    tiny, names, ratio = _hostile_copies(store, tmp_path)
    with RangeServer(tmp_path) as server:
        assert main(["verify", f"{server.url}/tiny.zarr"]) == 1
        err = capsys.readouterr().err
        assert "parameter random_resized_crop.top was not encoded for the 2 x 2 image the store records" in err
        assert main(["verify", f"{server.url}/names.zarr"]) in (1, 2)
        assert "class_names lists 1,000,000 names, more than num_classes=10" in capsys.readouterr().err
        with pytest.raises(ReinforceError, match="class_names lists 1,000,000 names"):
            ReinforcedDataset(digits[0], f"{server.url}/names.zarr")
        with pytest.raises(ReinforceError, match="records 2 x 2|2 x 2"):
            ReinforcedDataset(digits[0], f"{server.url}/tiny.zarr", verify="full")
    assert main(["verify", str(ratio)]) in (1, 2)
    assert "ratio must satisfy" in capsys.readouterr().err


def test_a_source_box_outside_its_recorded_image_size_fails_verify(store):
    """Crop boxes stored exactly (int codecs, as imported stores keep them) are checked against image_sizes."""
    import numpy as np

    from reinforce.errors import VerificationError
    from reinforce.tools.verify import _check_source_boxes

    codec = fmt.read_header(fmt.open_store_group(store)).layout.params
    params = np.array([[[0, 0, 2, 2, 0], [1, 0, 30, 2, 1]]], dtype=np.float64)
    sizes = np.array([[32]]), np.array([[32]])
    _check_source_boxes(codec, params, np.array([7]), *sizes)
    with pytest.raises(VerificationError, match=r"record \(7, 1\): its random_resized_crop box .* = \(1, 0, 30, 2\) "
                                                r"lies outside the 2 x 32 image"):
        _check_source_boxes(codec, params, np.array([7]), np.array([[2]]), np.array([[32]]))
