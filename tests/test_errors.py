"""Bad input: a clear message naming the problem and what to do, and nothing written is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from PIL import Image

from reinforce.cli import main
from reinforce_loaders import ReinforcedDataset, SourceMismatchError, StoreFormatError
from reinforce_loaders import format as fmt


def _build(source, out, teachers, *extra):
    argv = ["build", str(source), "-A", "2", "-k", "3", "--image-size", "32", "--out", str(out), "--no-progress"]
    for spec in teachers:
        argv += ["--teacher", spec]
    return main(argv + list(extra))


def test_missing_source(teacher_weights, tmp_path, capsys):
    assert _build(tmp_path / "nope", tmp_path / "s.zarr", teacher_weights) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "ROOT/CLASS/IMAGE" in err
    assert not (tmp_path / "s.zarr").exists()


def test_empty_folder(teacher_weights, tmp_path, capsys):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    assert _build(tmp_path / "empty", tmp_path / "s.zarr", teacher_weights) == 2
    assert "holds no images" in capsys.readouterr().err


def test_unreadable_image(digits, teacher_weights, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(digits[0], source)
    victim = sorted((source / "3").iterdir())[0]
    victim.write_bytes(b"this is not a png")
    assert _build(source, tmp_path / "s.zarr", teacher_weights) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and victim.name in err and "Remove or replace" in err


def test_unknown_teacher_arch(digits, tmp_path, capsys):
    assert _build(digits[0], tmp_path / "s.zarr", ["resnet_does_not_exist"]) == 2
    err = capsys.readouterr().err
    assert "unknown teacher architecture 'resnet_does_not_exist'" in err and "timm model name" in err


def test_no_pretrained_weights_offline_says_how_to_pass_local_ones(digits, tmp_path, capsys, monkeypatch):
    import timm

    def refuse(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise RuntimeError("no network")
        return original(*args, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", refuse)
    assert _build(digits[0], tmp_path / "s.zarr", ["test_resnet"]) == 2
    assert "--teacher test_resnet=PATH.safetensors" in capsys.readouterr().err


def test_weights_that_do_not_fit(digits, teacher_weights, tmp_path, capsys):
    weights = teacher_weights[0].split("=", 1)[1]
    assert _build(digits[0], tmp_path / "s.zarr", [f"test_efficientnet={weights}"]) == 2
    assert "do not fit timm architecture 'test_efficientnet'" in capsys.readouterr().err


def test_source_that_does_not_match_the_store(digits, store, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(digits[0], other)
    victim = sorted((other / "0").iterdir())[1]
    with Image.open(victim) as image:
        image.convert("L").point(lambda v: 255 - v).save(victim)
    ds = ReinforcedDataset(other, store)
    with pytest.raises(SourceMismatchError, match=rf"source sample 1 \(.*{victim.name}\) differs"):
        ds[1]
    with pytest.raises(SourceMismatchError, match="source sample 1 "):
        ReinforcedDataset(other, store, verify="full")
    with pytest.raises(SourceMismatchError, match="has 15 samples but the store was built from 45"):
        ReinforcedDataset(digits[1], store)
    assert main(["verify", str(store), "--data", str(other)]) == 1


def test_newer_major_format_version_is_rejected(digits, store, tmp_path, capsys):
    copy = tmp_path / "newer.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    attrs = group.attrs[fmt.ATTRS_KEY]
    major = fmt.FORMAT_VERSION[0] + 1
    group.attrs[fmt.ATTRS_KEY] = {**attrs, "format_version": f"{major}.0"}
    zarr.consolidate_metadata(str(copy))
    with pytest.raises(StoreFormatError, match=f"format version {major}.0 is not supported.*upgrade"):
        ReinforcedDataset(digits[0], copy)
    assert main(["inspect", str(copy)]) == 2
    assert "upgrade reinforce-loaders" in capsys.readouterr().err


def test_different_settings_on_existing_store_are_refused(digits, teacher_weights, store, tmp_path, capsys):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    before = sorted(path.stat().st_mtime_ns for path in copy.rglob("*") if path.is_file())
    assert _build(digits[0], copy, teacher_weights, "--seed", "99") == 2
    assert "different settings" in capsys.readouterr().err
    assert sorted(path.stat().st_mtime_ns for path in copy.rglob("*") if path.is_file()) == before


def test_out_that_is_not_a_store_is_refused(digits, teacher_weights, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert _build(digits[0], out, teacher_weights) == 2
    assert "is not a reinforce store" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_out_that_is_a_file_or_broken_link_or_garbage_is_refused_untouched(digits, teacher_weights, tmp_path,
                                                                          capsys):
    regular = tmp_path / "file.zarr"
    regular.write_text("keep me")
    assert _build(digits[0], regular, teacher_weights) == 2
    assert "is a file, not a store directory" in capsys.readouterr().err and regular.read_text() == "keep me"
    link = tmp_path / "link.zarr"
    link.symlink_to(tmp_path / "nowhere")
    assert _build(digits[0], link, teacher_weights) == 2
    assert "is a broken symbolic link" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    garbage = tmp_path / "garbage.zarr"
    garbage.mkdir()
    (garbage / "zarr.json").write_bytes(b"\x00{not json")
    assert _build(digits[0], garbage, teacher_weights) == 2
    err = capsys.readouterr().err
    assert "is not a reinforce store this version can resume" in err and "Traceback" not in err
    assert (garbage / "zarr.json").read_bytes() == b"\x00{not json"


def test_out_through_a_symlink_to_a_directory_is_built_there(digits, teacher_weights, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "real")
    assert _build(digits[0], tmp_path / "link.zarr", teacher_weights, "--block-size", "16") == 0
    assert fmt.read_header(zarr.open_group(str(tmp_path / "real"), mode="r")).complete


def test_read_only_output_directory(digits, teacher_weights, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anyway: refuse as the kernel would for others
        real_open = os.open

        def read_only(path, *args, **kwargs):
            if str(path).startswith(str(parent)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    try:
        assert _build(digits[0], parent / "s.zarr", teacher_weights) == 2
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert "Permission denied" in err and "choose a writable location" in err and not list(parent.iterdir())


def test_store_creation_that_fails_leaves_nothing_and_can_be_retried(digits, teacher_weights, tmp_path, capsys,
                                                                    monkeypatch):
    real = zarr.Group.create_array
    calls = []

    def disk_full(self, name, **spec):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, **spec)

    monkeypatch.setattr(zarr.Group, "create_array", disk_full)
    out = tmp_path / "s.zarr"
    assert _build(digits[0], out, teacher_weights, "--block-size", "16") == 2
    assert "cannot create the store --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half store, no temporary, no lock
    monkeypatch.setattr(zarr.Group, "create_array", real)
    assert _build(digits[0], out, teacher_weights, "--block-size", "16") == 0


def test_a_second_build_of_the_same_store_refuses_while_the_first_runs(digits, teacher_weights, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
    assert _build(digits[0], out, teacher_weights, "--block-size", "16") == 2
    err = capsys.readouterr().err
    assert f"is being built by another process (process {os.getpid()} on {socket.gethostname()}" in err
    assert str(lock) in err and not out.exists() and lock.exists()


def test_a_lock_left_by_a_dead_build_is_taken_over(digits, teacher_weights, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "s.zarr.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    assert _build(digits[0], tmp_path / "s.zarr", teacher_weights, "--block-size", "16") == 0
    assert not lock.exists()


def test_resume_with_an_image_removed_names_where(digits, teacher_weights, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(digits[0], source)
    out = tmp_path / "s.zarr"
    assert _build(source, out, teacher_weights, "--block-size", "16") == 0
    files = sorted(str(p) for p in source.rglob("*.png"))
    removed = Path(files[20])
    removed.unlink()
    capsys.readouterr()
    assert _build(source, out, teacher_weights, "--block-size", "16") == 2
    err = capsys.readouterr().err
    assert "was built from 45 samples but" in err and "has 44 (1 fewer)" in err
    assert f"they part at sample 20: the source's {files[21]} (after {files[19]})" in err
