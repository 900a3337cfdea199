"""Bad input: a clear message naming the problem and what to do, and nothing written is lost."""

from __future__ import annotations

import shutil

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
