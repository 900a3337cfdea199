"""reinforce import: releases in other formats, generated here from their public format descriptions."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reinforce.cli import main
from reinforce.importers import ImportFailure, convert
from reinforce.importers import ml_dr
from reinforce.importers.safe_unpickle import UntrustedPickleError, load_pickle
from reinforce.tools.verify import verify_store
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders import format as fmt
from reinforce_loaders.source import ImageSource

RECORDS, TOP_K, CLASSES, SIZE = 4, 3, 10, 32


def _draw_record(rng: np.random.Generator, height: int, width: int) -> dict:
    """One ml-dr-like record: its ops' own parameters and an unordered sparse top-k."""
    h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
    crop = (np.int64(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, np.int64(w))
    erase_h, erase_w = int(rng.integers(1, SIZE // 2)), int(rng.integers(1, SIZE // 2))
    erase = None if rng.random() < 0.5 else (int(rng.integers(0, SIZE - erase_h)), int(rng.integers(0, SIZE - erase_w)),
                                             erase_h, erase_w)
    rand_augment = [(int(rng.integers(0, 14)), int(rng.integers(-30, 31))) for _ in range(2)]
    logits = rng.normal(size=CLASSES) * 3
    probs = np.exp(logits) / np.exp(logits).sum()
    ids = np.argpartition(-probs, TOP_K)[:TOP_K]
    rng.shuffle(ids)
    return {"ops": {"random_resized_crop": crop, "random_horizontal_flip": bool(rng.random() < 0.5),
                    "rand_augment": rand_augment, "random_erase": erase},
            "prob": (torch.tensor(probs[ids], dtype=torch.float16), torch.tensor(ids))}


def _params(ops: dict, layout: str):
    if layout == "dict":
        return {name: (value, None) for name, value in ops.items()}
    values = [ops[name] for name in ml_dr.OP_ORDER]
    return [(value, None) for value in values] if layout == "pairs" else values


def write_ml_dr_release(source: Path, root: Path, layout: str = "list", mixing: bool = False) -> list[list[dict]]:
    """Files as the ml-dr release describes them: torch.save (pickle protocol 4) of (index, [record, ...]) per
    sample and config.pth.tar. Returns the records (ops and prob) of each sample."""
    root.mkdir(parents=True)
    augmentation = {"uint8": {"enable": True}, "random_resized_crop": {"enable": True, "size": SIZE},
                    "random_horizontal_flip": {"enable": True, "p": 0.5}, "rand_augment": {"enable": True, "p": 1.0},
                    "to_tensor": {"enable": True}, "random_erase": {"enable": True, "p": 0.25},
                    "mixup": {"enable": mixing, "alpha": 0.2}}
    config = {"reinforce": {"num_samples": RECORDS, "topk": TOP_K, "compress": layout != "dict", "joblib": False,
                            "image_augmentation": augmentation}}
    torch.save(config, root / "config.pth.tar", pickle_protocol=4)
    rng = np.random.default_rng(0)
    truth = []
    images = ImageSource.from_folder(source)
    for index in range(len(images)):
        with Image.open(images.name_of(index)) as image:
            width, height = image.size
        drawn = [_draw_record(rng, height, width) for _ in range(RECORDS)]
        records = [{"params": _params(record["ops"], layout), "prob": record["prob"]} for record in drawn]
        shard = root / f"{index % 3:02d}"
        shard.mkdir(exist_ok=True)
        torch.save((index, records), shard / f"{index}.pth.tar", pickle_protocol=4)
        truth.append(drawn)
    return truth


def import_ml_dr(release: Path, source: Path, out: Path, workers: int = 1):
    plan = ml_dr.plan_import(release, source, trust_pickle=True, block_size=16)
    return convert(plan, out, workers=workers, progress=False)


@pytest.mark.parametrize("layout", ["list", "pairs", "dict"])
def test_ml_dr_release_imports_exactly_and_verifies(digits, tmp_path, layout):
    truth = write_ml_dr_release(digits[0], tmp_path / "release", layout)
    summary = import_ml_dr(tmp_path / "release", digits[0], tmp_path / "imported.zarr")
    assert summary.samples == len(truth) and summary.blocks_written == 3
    assert any(line.startswith("source:") for line in verify_store(tmp_path / "imported.zarr", digits[0]))
    group = fmt.open_store_group(tmp_path / "imported.zarr")
    header = fmt.read_header(group)
    assert header.provenance["imported_from"] == "apple/ml-dr"
    assert "approximate" in header.provenance["replay_fidelity"]
    decoded = fmt.read_all_records(group, header)
    names = header.layout.params.names
    for index, records in enumerate(truth):
        for slot, record in enumerate(records):
            params = dict(zip(names, decoded.params[index, slot]))
            ops = record["ops"]
            assert [params[f"random_resized_crop.{k}"] for k in ("top", "left", "height", "width")] == \
                [int(v) for v in ops["random_resized_crop"]]
            assert params["horizontal_flip.flip"] == float(ops["random_horizontal_flip"])
            assert [params[f"rand_augment.{k}"] for k in ("op0", "magnitude0", "op1", "magnitude1")] == \
                [float(v) for pair in ops["rand_augment"] for v in pair]
            erase = ops["random_erase"] or (0, 0, 0, 0)
            assert [round(params[f"random_erasing.{k}"] * SIZE) for k in ("top", "left", "height", "width")] == \
                list(erase)
            values, ids = (part.float().numpy() for part in record["prob"])
            order = np.lexsort((ids, -values))
            np.testing.assert_array_equal(decoded.indices[index, slot], ids[order])
            np.testing.assert_allclose(decoded.probs[index, slot], values[order], atol=5e-4 + 1e-6)
    dataset = ReinforcedDataset(digits[0], tmp_path / "imported.zarr", target="sparse")
    image, (indices, _) = dataset.replay(5, 2)
    assert image.shape == (3, SIZE, SIZE) and indices.tolist() == decoded.indices[5, 2].tolist()


def test_parallel_resumed_import_equals_a_sequential_one(digits, tmp_path):
    release = tmp_path / "release"
    write_ml_dr_release(digits[0], release)
    import_ml_dr(release, digits[0], tmp_path / "sequential.zarr")
    victim = next(release.rglob("40.pth.tar"))
    kept = victim.read_bytes()
    victim.write_bytes(kept[:100])  # a truncated download: sample 40 is in the last block
    with pytest.raises(UntrustedPickleError, match="not a readable"):
        import_ml_dr(release, digits[0], tmp_path / "resumed.zarr")
    assert fmt.open_store_group(tmp_path / "resumed.zarr")[fmt.BLOCKS_DONE][:].tolist() == [1, 1, 0]
    victim.write_bytes(kept)
    summary = import_ml_dr(release, digits[0], tmp_path / "resumed.zarr", workers=2)
    assert summary.blocks_written == 1
    for name in ("records", "labels", "fingerprints", "image_sizes"):
        a = fmt.read_array(fmt.open_store_group(tmp_path / "sequential.zarr"), name)
        b = fmt.read_array(fmt.open_store_group(tmp_path / "resumed.zarr"), name)
        np.testing.assert_array_equal(a, b)


def test_import_without_trust_pickle_is_refused_and_explained(digits, tmp_path, capsys):
    write_ml_dr_release(digits[0], tmp_path / "release")
    out = tmp_path / "out.zarr"
    code = main(["import", "ml-dr", str(tmp_path / "release"), "--data", str(digits[0]), "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 2 and "--trust-pickle" in error and "run any code" in error
    assert not out.exists()
    code = main(["import", "ml-dr", str(tmp_path / "release"), "--data", str(digits[0]), "--out", str(out),
                 "--trust-pickle", "--workers", "1", "--no-progress", "--block-size", "16"])
    assert code == 0 and "imported 45 samples" in capsys.readouterr().out


class _Payload:
    """Unpickling this runs ``exec``: what a malicious release file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_restricted_unpickler_refuses_code_and_admits_the_release_types(tmp_path):
    marker = tmp_path / "ran"
    for protocol in (2, 4):
        torch.save((0, [{"params": _Payload(marker), "prob": ()}]), tmp_path / "evil.pth.tar",
                   pickle_protocol=protocol)
        with pytest.raises(UntrustedPickleError, match="exec, which a released file never needs"):
            load_pickle(tmp_path / "evil.pth.tar", trust_pickle=True, what="test")
    assert not marker.exists()
    content = (3, [{"params": [np.int64(5), np.arange(3), (1.5, None)], "prob": (torch.ones(2, dtype=torch.float16),
                                                                               torch.tensor([1, 0]))}])
    torch.save(content, tmp_path / "ok.pth.tar", pickle_protocol=4)
    loaded = load_pickle(tmp_path / "ok.pth.tar", trust_pickle=True, what="test")
    assert loaded[0] == 3 and loaded[1][0]["params"][0] == 5 and loaded[1][0]["prob"][0].dtype == torch.float16
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        load_pickle(tmp_path / "ok.pth.tar", trust_pickle=False, what="test")


def test_mixing_release_and_missing_files_are_refused(digits, tmp_path):
    write_ml_dr_release(digits[0], tmp_path / "mixing", mixing=True)
    with pytest.raises(ImportFailure, match="mixup"):
        ml_dr.plan_import(tmp_path / "mixing", digits[0], trust_pickle=True)
    write_ml_dr_release(digits[0], tmp_path / "partial")
    os.remove(next((tmp_path / "partial").rglob("7.pth.tar")))
    with pytest.raises(ImportFailure, match="1 of 45 samples have no file.*first: sample 7"):
        ml_dr.plan_import(tmp_path / "partial", digits[0], trust_pickle=True)
    write_ml_dr_release(digits[0], tmp_path / "whole")
    other = tmp_path / "other"
    shutil.copytree(digits[0], other)
    Image.new("RGB", (8, 8)).save(sorted(other.rglob("*.png"))[0])
    with pytest.raises(ImportFailure, match="outside the 8x8 source image"):
        import_ml_dr(tmp_path / "whole", other, tmp_path / "x.zarr")


def write_fkd_release(source: Path, root: Path, layout: str, half: bool) -> list[list[tuple]]:
    """FKD-like files, ROOT/CLASS/STEM.tar: per crop its box as fractions of the image, a flip flag and the
    top-k probabilities followed by their class ids as floats. Returns (box in pixels, flip, ids, values)."""
    rng = np.random.default_rng(1)
    images = ImageSource.from_folder(source)
    truth = []
    for index in range(len(images)):
        path = Path(images.name_of(index))
        with Image.open(path) as image:
            width, height = image.size
        crops, sample = [], []
        for record in _draw_fkd_crops(rng, height, width):
            box, flip, ids, values = record
            coords = torch.tensor([box[0] / height, box[1] / width, box[2] / height, box[3] / width])
            label = torch.tensor(np.concatenate([values, ids]), dtype=torch.float16 if half else torch.float32)
            crops.append((coords, torch.tensor(flip), label))
            sample.append(record)
        content = [list(column) for column in zip(*crops)] if layout == "lists" else crops
        target = root / path.parent.name / (path.stem + ".tar")
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(content, target)
        truth.append(sample)
    return truth


def _draw_fkd_crops(rng: np.random.Generator, height: int, width: int) -> list[tuple]:
    out = []
    for _ in range(RECORDS):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
        logits = rng.normal(size=CLASSES) * 3
        probs = np.exp(logits) / np.exp(logits).sum()
        ids = rng.permutation(np.argpartition(-probs, TOP_K)[:TOP_K])
        out.append((box, bool(rng.random() < 0.5), ids.astype(np.float64), probs[ids]))
    return out


@pytest.mark.parametrize("layout, half", [("crops", False), ("lists", True)])
def test_fkd_release_imports_and_verifies(digits, tmp_path, layout, half):
    from reinforce.importers import fkd

    truth = write_fkd_release(digits[0], tmp_path / "fkd", layout, half)
    plan = fkd.plan_import(tmp_path / "fkd", digits[0], trust_pickle=True, image_size=SIZE, block_size=16)
    convert(plan, tmp_path / "fkd.zarr", progress=False)
    assert any(line.startswith("source:") for line in verify_store(tmp_path / "fkd.zarr", digits[0]))
    group = fmt.open_store_group(tmp_path / "fkd.zarr")
    decoded = fmt.read_all_records(group)
    for index, sample in enumerate(truth):
        for slot, (box, flip, ids, values) in enumerate(sample):
            assert decoded.params[index, slot].tolist() == [*map(float, box), float(flip)]
            stored = torch.tensor(values, dtype=torch.float16).float().numpy() if half else values
            order = np.lexsort((ids, -stored))
            np.testing.assert_array_equal(decoded.indices[index, slot], ids[order])
            np.testing.assert_allclose(decoded.probs[index, slot], stored[order], atol=5e-4 + 1e-6)
    if half:  # half-precision class ids are exact only up to 2048
        with pytest.raises(ImportFailure, match="float16, exact only up to 2048"):
            fkd.read_sample(plan.files[0], 0, 32, 32, num_classes=5000, trust_pickle=True)
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        fkd.plan_import(tmp_path / "fkd", digits[0], trust_pickle=False)
