"""reinforce publish: manifest, source manifest, dataset card, Croissant metadata, replay grid; verify --quick."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from reinforce.cli import main
from reinforce.share.manifest import (MANIFEST_NAME, SOURCE_MANIFEST_NAME, Manifest, ManifestError, settings_sha256,
                                sha256_file)
from reinforce.share.publish import CARD_NAME, CROISSANT_NAME, GRID_NAME, CardInfo, PublishError, publish
from reinforce.errors import VerificationError
from reinforce.tools.verify import verify_store
from reinforce_loaders import format as fmt


@pytest.fixture(scope="module")
def published(store, digits, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("published")
    publish(store, str(dest), source=digits[0],
            info=CardInfo(pretty_name="Digits, reinforced", license="cc-by-4.0", source_datasets=("digits",)))
    return dest


def test_manifest_lists_every_file_with_size_and_sha256(published, store):
    manifest = Manifest.from_bytes((published / MANIFEST_NAME).read_bytes())
    on_disk = {p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()}
    assert {entry.path for entry in manifest.files} == on_disk - {MANIFEST_NAME}
    for entry in manifest.files:
        assert (published / entry.path).stat().st_size == entry.size
        assert sha256_file(published / entry.path) == entry.sha256
    header = fmt.read_header(fmt.open_store_group(store))
    assert manifest.store == store.name and manifest.format_version == header.format_version
    assert manifest.identity["settings_sha256"] == settings_sha256(header)
    assert manifest.identity["num_samples"] == header.num_samples
    assert manifest.source_manifest == SOURCE_MANIFEST_NAME
    store_files = [p for p in store.rglob("*") if p.is_file()]
    assert all((published / store.name / p.relative_to(store)).read_bytes() == p.read_bytes() for p in store_files)


def test_source_manifest_has_paths_sizes_hashes_and_the_store_fingerprints(published, store, digits):
    rows = [json.loads(line) for line in (published / SOURCE_MANIFEST_NAME).read_text().splitlines()]
    fingerprints = fmt.read_array(fmt.open_store_group(store), fmt.FINGERPRINTS)
    assert [row["index"] for row in rows] == list(range(len(fingerprints)))
    for row, fingerprint in zip(rows, fingerprints):
        file = digits[0] / row["path"]
        assert file.stat().st_size == row["size"] and sha256_file(file) == row["sha256"]
        assert int(row["fingerprint"], 16) == int(fingerprint)


def test_dataset_card_follows_the_hugging_face_convention(published, store):
    text = (published / CARD_NAME).read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "cc-by-4.0" and meta["pretty_name"] == "Digits, reinforced"
    assert meta["task_categories"] == ["image-classification"]
    assert meta["annotations_creators"] == ["machine-generated"]
    assert meta["source_datasets"] == ["digits"] and meta["size_categories"] == ["n<1K"]
    assert "dataset-reinforcement" in meta["tags"]
    header = fmt.read_header(fmt.open_store_group(store))
    for teacher in header.teachers:
        assert teacher["name"] in body and teacher["weights_sha256"] in body
    assert f"| stored augmentations per sample (A) | {header.num_augmentations} |" in body
    assert f"top-{header.top_k} of {header.num_classes} classes" in body
    assert "random_resized_crop" in body and "bytes per record" in body
    assert "ReinforcedDataset(" in body and "reinforce download" in body and f"]({GRID_NAME})" in body


def test_croissant_metadata_validates_and_loads_the_source_records(published):
    mlc = pytest.importorskip("mlcroissant")
    dataset = mlc.Dataset(jsonld=published / CROISSANT_NAME)
    assert not dataset.metadata.issues.errors
    records = list(dataset.records("source_images"))
    rows = [json.loads(line) for line in (published / SOURCE_MANIFEST_NAME).read_text().splitlines()]
    assert [r["source_images/path"].decode() for r in records] == [row["path"] for row in rows]
    metadata = json.loads((published / CROISSANT_NAME).read_text())
    manifest = Manifest.from_bytes((published / MANIFEST_NAME).read_bytes())
    described = {item["contentUrl"]: item["sha256"] for item in metadata["distribution"]}
    assert {entry.path: entry.sha256 for entry in manifest.files if entry.path != CROISSANT_NAME} == described


def test_replay_grid_is_a_picture_of_samples_by_records(published, store):
    with Image.open(published / GRID_NAME) as picture:
        assert picture.format == "PNG"
        assert picture.width > 4 * 128 and picture.height > 4 * 128
        colors = picture.convert("L").getextrema()
    assert colors[0] < 50 and colors[1] > 200


def test_inspect_grid_from_the_command_line(store, digits, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["inspect", str(store), "--data", str(digits[0]), "--grid", str(out)]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    assert main(["inspect", str(store), "--grid", str(out)]) == 2
    assert "pass --data" in capsys.readouterr().err


def copy_of_source(digits, tmp_path) -> Path:
    copy = tmp_path / "train"
    shutil.copytree(digits[0], copy)
    return copy


def test_verify_quick_passes_on_an_identical_copy(published, digits, tmp_path, capsys):
    store = published / Manifest.from_bytes((published / MANIFEST_NAME).read_bytes()).store
    copy = copy_of_source(digits, tmp_path)
    lines = verify_store(store, copy, quick=True)
    assert any("match the source manifest" in line for line in lines)
    assert main(["verify", str(store), "--data", str(copy), "--quick"]) == 0
    assert "quick check, no decoding" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    ("flip", "{name} \\(sample 3\\) differs .*sha256"),
    ("truncate", "{name} \\(sample 3\\) has \\d+ bytes"),
    ("remove", "source sample 3 is {next}, the store was built from {name}"),
    ("extra", "1 images more than the store"),
])
def test_verify_quick_names_the_first_differing_file(published, digits, tmp_path, damage, message):
    store = published / Manifest.from_bytes((published / MANIFEST_NAME).read_bytes()).store
    copy = copy_of_source(digits, tmp_path)
    files = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*.png"))
    target = copy / files[3]
    data = target.read_bytes()
    if damage == "flip":
        target.write_bytes(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
    elif damage == "truncate":
        target.write_bytes(data[:-10])
    elif damage == "remove":
        target.unlink()
    else:
        shutil.copy(target, copy / "9" / "9999.png")
    with pytest.raises(VerificationError, match=message.format(name=files[3], next=files[4])):
        verify_store(store, copy, quick=True)


def test_verify_quick_refuses_a_missing_or_foreign_source_manifest(published, store, vocabulary_store, digits,
                                                                   tmp_path):
    with pytest.raises(ManifestError, match="no source manifest"):
        verify_store(store, digits[0], quick=True)
    with pytest.raises(VerificationError, match="pass --data"):
        verify_store(store, quick=True)
    foreign = tmp_path / "foreign.zarr"
    shutil.copytree(vocabulary_store, foreign)
    shutil.copy(published / SOURCE_MANIFEST_NAME, tmp_path / SOURCE_MANIFEST_NAME)
    rows = (tmp_path / SOURCE_MANIFEST_NAME).read_text().splitlines()
    first = json.loads(rows[0])
    first["fingerprint"] = f"{int(first['fingerprint'], 16) ^ 1:016x}"
    (tmp_path / SOURCE_MANIFEST_NAME).write_text("\n".join([json.dumps(first)] + rows[1:]) + "\n")
    with pytest.raises(VerificationError, match="belongs to another store"):
        verify_store(foreign, digits[0], quick=True)


def test_publish_refuses_a_source_with_other_labels_and_writes_nothing(store, digits, tmp_path):
    copy = copy_of_source(digits, tmp_path)
    (copy / "0" / "0010.png").rename(copy / "1" / "0000.png")
    dest = tmp_path / "dest"
    with pytest.raises(VerificationError, match="has label"):
        publish(store, str(dest), source=copy)
    assert not (dest / MANIFEST_NAME).exists()


def test_publish_refuses_an_incomplete_store(store, tmp_path):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    (partial / "records" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(VerificationError):
        publish(partial, str(tmp_path / "dest"))
    leftover = tmp_path / "leftover.zarr"
    shutil.copytree(store, leftover)
    (leftover / "labels" / "c" / "0.abc.partial").write_bytes(b"x")
    with pytest.raises(PublishError, match="leftover of an interrupted write"):
        publish(leftover, str(tmp_path / "dest2"))
    assert not (tmp_path / "dest" / MANIFEST_NAME).exists() and not (tmp_path / "dest2" / MANIFEST_NAME).exists()


def test_a_re_publish_that_fails_half_way_leaves_no_manifest_of_the_old_files(store, tmp_path, monkeypatch):
    import reinforce.share.publish

    dest = tmp_path / "dest"
    publish(store, str(dest), grid=False)
    assert (dest / MANIFEST_NAME).is_file()

    def failing(fs, root, files):
        raise PublishError("copying failed (a dropped connection)")

    monkeypatch.setattr(reinforce.share.publish, "_upload", failing)
    with pytest.raises(PublishError, match="dropped connection"):
        publish(store, str(dest), grid=False, info=CardInfo(pretty_name="a new card"))
    assert not (dest / MANIFEST_NAME).exists()  # no manifest vouching for files that were being replaced


def test_a_store_published_through_a_symlink_or_as_dot_keeps_its_own_name(store, tmp_path, monkeypatch):
    link = tmp_path / "latest.zarr"
    link.symlink_to(store, target_is_directory=True)
    monkeypatch.chdir(store)
    for given, dest in ((link, tmp_path / "via-link"), (Path("."), tmp_path / "via-dot")):
        manifest = publish(given, str(dest), grid=False).manifest
        assert manifest.store == store.name
        assert all(entry.path.startswith(store.name + "/") for entry in manifest.files
                   if entry.path not in (CARD_NAME, CROISSANT_NAME))
        assert (dest / store.name / "zarr.json").is_file()


def test_publish_and_download_from_the_command_line(store, digits, tmp_path, capsys):
    dest = tmp_path / "pub"
    assert main(["publish", str(store), str(dest), "--data", str(digits[0]), "--no-grid"]) == 0
    assert not (dest / GRID_NAME).exists() and (dest / MANIFEST_NAME).exists()
    assert main(["download", str(dest), str(tmp_path / "copy"), "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out
    with pytest.raises(ManifestError):
        Manifest.from_json({"kind": "reinforce-publication", "manifest_version": 1, "format_version": "2.0",
                            "store": "s", "files": [{"path": "s/../x", "size": 1, "sha256": "0" * 64}]})
