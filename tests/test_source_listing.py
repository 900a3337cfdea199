"""Listing an ImageFolder source (issue 10.4): symbolic link loops, hidden entries, empty classes, and a store
placed inside its own source."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reinforce.cli import main
from reinforce_loaders import ImageSource, ReinforcedDataset
from reinforce_loaders.errors import SourceError


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture()
def tree(tmp_path) -> Path:
    """brick: 2 images (one in a subfolder), stone: 1, wood: 1."""
    root = tmp_path / "src"
    _image(root / "brick" / "a.png", 1)
    _image(root / "brick" / "sub" / "b.png", 2)
    _image(root / "stone" / "c.png", 3)
    _image(root / "wood" / "d.png", 4)
    return root


def _listing(source: ImageSource) -> list[tuple[str, int]]:
    return [(os.path.relpath(source.name_of(i), source.description), source.targets[i]) for i in range(len(source))]


PLAIN = [("brick/a.png", 0), ("brick/sub/b.png", 0), ("stone/c.png", 1), ("wood/d.png", 2)]


@pytest.mark.parametrize("link, target", [("brick/loop", ".."), ("brick/self", "."), ("brick/sub/up", "../.."),
                                          ("brick/other", "../wood"), ("stone/back", "../brick")])
def test_links_to_a_folder_already_listed_are_skipped_with_a_notice(tree, link, target):
    (tree / link).symlink_to(target, target_is_directory=True)
    with pytest.warns(RuntimeWarning, match=f"source folder {tree / link} was already listed"):
        source = ImageSource.from_folder(tree)
    assert _listing(source) == PLAIN


def test_a_link_to_a_folder_outside_the_source_is_followed(tree, tmp_path):
    _image(tmp_path / "elsewhere" / "e.png", 5)
    (tree / "stone" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert _listing(ImageSource.from_folder(tree)) == PLAIN[:3] + [("stone/more/e.png", 1), ("wood/d.png", 2)]


def test_hidden_entries_are_skipped_at_every_depth(tree):
    _image(tree / "brick" / ".thumbs" / "x.png", 9)
    _image(tree / "brick" / "sub" / ".deeper" / "y.png", 9)
    _image(tree / "brick" / "sub" / ".z.png", 9)
    _image(tree / ".cache" / "w.png", 9)
    assert _listing(ImageSource.from_folder(tree)) == PLAIN


def test_an_empty_class_is_refused_unless_kept_on_purpose(tree):
    (tree / "clay").mkdir()
    _image(tree / "clay" / ".hidden.png", 9)
    with pytest.raises(SourceError, match=f"class folder {tree / 'clay'} holds no images.*ImageFolder.*"
                                          "allow_empty_classes=True; --allow-empty-classes of reinforce build and reinforce"):
        ImageSource.from_folder(tree)
    source = ImageSource.from_folder(tree, allow_empty_classes=True)
    assert source.classes == ["brick", "clay", "stone", "wood"]
    assert _listing(source) == [("brick/a.png", 0), ("brick/sub/b.png", 0), ("stone/c.png", 2), ("wood/d.png", 3)]


def _build(source, out, teachers, *extra):
    argv = ["build", str(source), "-A", "2", "-k", "3", "--image-size", "32", "--out", str(out), "--no-progress",
            "--block-size", "16", "--cpu-threads", "1"]
    for spec in teachers:
        argv += ["--teacher", spec]
    return main(argv + list(extra))


def test_build_of_a_messy_folder_lists_each_image_once_and_keeps_an_empty_class_only_when_asked(
        digits, teacher_weights, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(digits[0], source)
    for image in (source / "9").iterdir():
        image.unlink()
    (source / "0" / "loop").symlink_to("..", target_is_directory=True)
    _image(source / "1" / ".thumbs" / "x.png", 9)
    out = tmp_path / "s.zarr"
    assert _build(source, out, teacher_weights) == 2
    err = capsys.readouterr().err
    assert f"class folder {source / '9'} holds no images" in err and "--allow-empty-classes" in err
    assert not out.exists()
    with pytest.warns(RuntimeWarning, match="already listed"):
        assert _build(source, out, teacher_weights, "--allow-empty-classes") == 0
    expected = len(list(digits[0].rglob("*.png"))) - len(list((digits[0] / "9").iterdir()))
    with pytest.warns(RuntimeWarning, match="already listed"):
        ds = ReinforcedDataset(source, out, verify="full")
    assert len(ds) == expected and ds.classes == [str(c) for c in range(10)]
    with pytest.warns(RuntimeWarning, match="already listed"):
        assert main(["verify", str(out), "--data", str(source)]) == 0


def test_a_store_inside_its_source_or_a_source_inside_the_store_is_refused(digits, teacher_weights, tmp_path,
                                                                           capsys):
    source = tmp_path / "src"
    shutil.copytree(digits[0], source)
    assert _build(source, source / "s.zarr", teacher_weights) == 2
    assert f"--out {source / 's.zarr'} is inside the source folder {source}" in capsys.readouterr().err
    assert _build(source, source, teacher_weights) == 2
    assert "is inside the source folder" in capsys.readouterr().err
    assert _build(source, tmp_path, teacher_weights) == 2
    assert f"the source folder {source} is inside --out {tmp_path}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in digits[0].iterdir())


def test_path_list_keeps_paths_outside_python_strings_and_returns_them_unchanged(tmp_path):
    from reinforce_loaders.source import PathList

    names = [str(tmp_path / "a" / "b.jpg"), "/données/ü/c.png", "relative/d.JPEG", ""]
    paths = PathList(names)
    assert len(paths) == 4 and list(paths) == names and paths[-2] == names[-2] and paths[1:3] == names[1:3]
    assert paths._bytes.dtype == np.uint8  # shared pages in forked workers, not per-worker string copies
    with pytest.raises(IndexError, match="out of range for 4 paths"):
        paths[4]
