"""The build engines: determinism across workers, kill-and-resume, faults, refused settings (CPU, local Ray)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from reinforce.tools.verify import verify_store
from reinforce_loaders import ReinforcedDataset, make_pipeline
import pytest
import torch
import zarr
from reinforce_loaders import format as fmt
from reinforce_loaders import rng
from reinforce_loaders.errors import SourceError, StoreFormatError

import reinforce.build.run
from reinforce.build import BuildConfig, BuildError, run_build
from reinforce.build.teachers import Ensemble, TeacherMember, create_ensemble

from conftest import IMAGE_SIZE

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(augment="rrc", image_size=IMAGE_SIZE, num_augmentations=4, top_k=3, seed=7, batch_size=16,
                block_size=8, cpu_threads=1)


def build(source: Path, out: Path, teachers, ensemble: Ensemble | None = None, **overrides):
    config = BuildConfig(source=str(source), out=str(out), teachers=teachers, **{**SETTINGS, **overrides})
    return run_build(config, ensemble=ensemble, progress=False)


def arrays(store: Path) -> dict[str, bytes]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][:]).tobytes() for name in sorted(group.array_keys())}


def assert_same_arrays(store: Path, reference: Path) -> None:
    got, expected = arrays(store), arrays(reference)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if got[name] != expected[name]]
    assert not different, f"arrays differ from the reference build: {different}"


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance with 2 CPUs for every test of this module (it takes seconds to start)."""
    ray = pytest.importorskip("ray")
    # Test-only modules (the fault-injecting teachers below) travel to the workers by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(digits, teacher_weights, tmp_path_factory) -> Path:
    """The uninterrupted in-process build every other build here must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    build(digits[0], out, teacher_weights)
    return out


def test_two_workers_equal_one_process(ray_session, digits, teacher_weights, reference, tmp_path):
    summary = build(digits[0], tmp_path / "ray.zarr", teacher_weights, workers=2)
    assert summary.engine.startswith("Ray") and summary.blocks_written == 6
    assert_same_arrays(tmp_path / "ray.zarr", reference)


def test_two_workers_equal_one_process_with_mixing(ray_session, digits, teacher_weights, tmp_path):
    """Partner pools, partner decoding and mixing give the same bytes whichever worker computes a block."""
    build(digits[0], tmp_path / "ray.zarr", teacher_weights, augment="rrc+mix", workers=2)
    build(digits[0], tmp_path / "local.zarr", teacher_weights, augment="rrc+mix")
    assert_same_arrays(tmp_path / "ray.zarr", tmp_path / "local.zarr")


class KillsItsProcess(torch.nn.Module):
    """Wraps a teacher; in a worker process (not the driver), its forward SIGKILLs the process while ``marker``
    holds a positive count, decrementing it."""

    def __init__(self, inner: torch.nn.Module, marker: str) -> None:
        super().__init__()
        self.inner = inner
        self.marker = marker
        self.driver = os.getpid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = Path(self.marker)
        left = int(path.read_text()) if path.exists() else 0
        if left > 0 and os.getpid() != self.driver:
            path.write_text(str(left - 1))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


def killing_ensemble(teacher_weights, marker: Path, kills: int) -> Ensemble:
    marker.write_text(str(kills))
    members = create_ensemble(teacher_weights).members
    first = members[0]
    wrapped = TeacherMember(name=first.name, module=KillsItsProcess(first.module, str(marker)),
                            input_size=first.input_size, mean=first.mean, std=first.std)
    return Ensemble([wrapped, *members[1:]])


def test_killed_worker_block_is_retried(ray_session, digits, teacher_weights, reference, tmp_path):
    ensemble = killing_ensemble(teacher_weights, tmp_path / "kills", kills=1)
    summary = build(digits[0], tmp_path / "store.zarr", teacher_weights, ensemble=ensemble, workers=2)
    assert (tmp_path / "kills").read_text() == "0"
    assert summary.retries >= 1
    assert_same_arrays(tmp_path / "store.zarr", reference)


def test_block_that_keeps_killing_its_worker_fails_after_bounded_retries(ray_session, digits, teacher_weights,
                                                                           tmp_path):
    ensemble = killing_ensemble(teacher_weights, tmp_path / "kills", kills=100)
    # Blocks 0 and 1 share the first worker; whichever dies twice first (each retry runs alone) is named.
    with pytest.raises(BuildError, match=r"block [01] \(samples (0\.\.7|8\.\.15)\) failed 2 times.*worker died"):
        build(digits[0], tmp_path / "store.zarr", teacher_weights, ensemble=ensemble, workers=1, max_retries=1)
    assert int((tmp_path / "kills").read_text()) == 98
    header = fmt.read_header(zarr.open_group(str(tmp_path / "store.zarr"), mode="r"), require_complete=False)
    assert not header.complete


@pytest.fixture
def bad_source(digits, tmp_path) -> tuple[Path, Path]:
    """A copy of the digits train split with one file that is not an image, and that file."""
    source = tmp_path / "bad_source"
    shutil.copytree(digits[0], source)
    bad = sorted((source / "3").iterdir())[1]
    bad.write_bytes(b"this is not a PNG")
    return source, bad


@pytest.mark.parametrize("workers", [None, 2])
def test_unreadable_image_fails_by_default(ray_session, bad_source, teacher_weights, tmp_path, workers):
    source, bad = bad_source
    with pytest.raises(SourceError, match=f"cannot read image {bad}.*--on-bad-image skip"):
        build(source, tmp_path / "store.zarr", teacher_weights, workers=workers)


def test_unreadable_image_is_skipped_and_listed(bad_source, teacher_weights, reference, tmp_path):
    source, bad = bad_source
    summary = build(source, tmp_path / "store.zarr", teacher_weights, on_bad_image="skip")
    index = sorted(str(p) for p in source.rglob("*.png")).index(str(bad))
    assert [(s.index, s.path) for s in summary.skipped] == [(index, str(bad))]
    assert str(bad) in str(summary)
    group = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")
    header = fmt.read_header(group)
    assert header.complete and header.provenance["skipped"] == [{"index": index, "path": str(bad)}]
    assert tuple(group[fmt.IMAGE_SIZES][index]) == fmt.SKIPPED_IMAGE_SIZE
    assert group[fmt.FINGERPRINTS][index] == 0 and group[fmt.LABELS][index] == 3
    # Samples in other blocks are untouched by the skip.
    ref = zarr.open_group(str(reference), mode="r")
    block = index // SETTINGS["block_size"]
    others = np.r_[0:block * 8, (block + 1) * 8:45]
    for name in (fmt.RECORDS, fmt.FINGERPRINTS, fmt.IMAGE_SIZES):
        np.testing.assert_array_equal(group[name][:][others], ref[name][:][others])
    # The store verifies (the skip is listed), and the student's dataset leaves the sample out.
    lines = verify_store(tmp_path / "store.zarr", source)
    assert any("1 skipped at build" in line for line in lines)
    dataset = ReinforcedDataset(source, tmp_path / "store.zarr", verify="full")
    assert len(dataset) == 44 and dataset.store_index(index) == index + 1
    _, target = dataset[index]
    assert target.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_unreadable_mixing_partner_leaves_records_unmixed(bad_source, teacher_weights, tmp_path):
    source, bad = bad_source
    index = sorted(str(p) for p in source.rglob("*.png")).index(str(bad))
    build(source, tmp_path / "store.zarr", teacher_weights, augment="rrc+mix", num_augmentations=8,
          on_bad_image="skip")
    group = fmt.open_store_group(tmp_path / "store.zarr")
    header = fmt.read_header(group)
    pipeline = make_pipeline("rrc+mix", SETTINGS["image_size"])
    stored = fmt.read_all_records(group).params
    # The records whose partner draw is the unreadable image (drawn again here with every image readable,
    # from the pool of the record's block).
    block = header.block_size
    drew_bad = [(i, j) for i in range(header.num_samples) if i != index
                for j, row in enumerate(pipeline.sample_slots(
                    header.seed, i, 8, 32, 32, num_samples=45, partner_size=lambda p: (32, 32),
                    partner_pool=rng.partner_pool(header.seed, i // block * block, 45, block)))
                if pipeline.partner_indices(row[None])[0] == index]
    assert drew_bad, "the test needs a record that draws the unreadable image as its partner"
    for i, j in drew_bad:
        assert pipeline.partner_indices(stored[i, j][None])[0] == -1
    partners = pipeline.partner_indices(stored.reshape(-1, stored.shape[-1]))
    assert (partners >= 0).sum() > len(drew_bad) and index not in partners
    assert len(ReinforcedDataset(source, tmp_path / "store.zarr", verify="full")) == 44


def test_mixing_partners_come_from_the_block_pool(digits, teacher_weights, tmp_path):
    """Each block decodes at most block_size partner images: its records mix only with its pool's samples."""
    build(digits[0], tmp_path / "store.zarr", teacher_weights, augment="rrc+mix", num_augmentations=8)
    group = fmt.open_store_group(tmp_path / "store.zarr")
    header = fmt.read_header(group)
    partners = make_pipeline("rrc+mix", SETTINGS["image_size"]).partner_indices(fmt.read_all_records(group).params)
    used = set()
    for block in range(header.num_blocks):
        start, stop = header.block_range(block)
        pool = rng.partner_pool(header.seed, start, header.num_samples, header.block_size)
        mixed = partners[start:stop] >= 0
        assert mixed.any()
        assert np.isin(partners[start:stop][mixed], pool).all()
        assert (partners[start:stop] != np.arange(start, stop)[:, None]).all()  # never itself
        used |= set(partners[start:stop][mixed].tolist())
    assert len(used) > header.block_size  # pools differ between blocks


def test_partner_pool_is_a_keyed_sorted_sample_of_distinct_indices():
    pool = rng.partner_pool(5, 4096, 1_281_167, 4096)
    assert len(pool) == 4096 and (np.diff(pool) > 0).all() and 0 <= pool[0] and pool[-1] < 1_281_167
    np.testing.assert_array_equal(pool, rng.partner_pool(5, 4096, 1_281_167, 4096))
    assert len(np.intersect1d(pool, rng.partner_pool(5, 8192, 1_281_167, 4096))) < 100
    np.testing.assert_array_equal(rng.partner_pool(5, 0, 10, 16), np.arange(10))
    small = rng.partner_pool(1, 0, 20, 19)  # 19 distinct of 20 needs several rounds of draws
    assert len(np.unique(small)) == 19


def test_different_settings_on_resume_are_refused(digits, teacher_weights, reference, tmp_path):
    out = tmp_path / "store.zarr"
    shutil.copytree(reference, out)
    for change in ({"batch_size": 8}, {"cpu_threads": 2}, {"precision": "bf16"}, {"seed": 8}):
        with pytest.raises(StoreFormatError, match="different settings.*" + next(iter(change))):
            build(digits[0], out, teacher_weights, **change)
    build(digits[0], out, teacher_weights)  # the same settings resume (here: nothing left to do)
    assert_same_arrays(out, reference)


def test_out_of_memory_names_a_batch_size(digits, teacher_weights, tmp_path, monkeypatch):
    def out_of_memory(self, images_by_size):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Ensemble, "probs", out_of_memory)
    with pytest.raises(BuildError, match="ran out of memory on a micro-batch of 16 records: try --batch-size 8"):
        build(digits[0], tmp_path / "store.zarr", teacher_weights)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reinforce.cli", "build", *args]


def kill_once_a_block_is_done(process: subprocess.Popen, out: Path) -> None:
    """SIGKILL the build ``process`` as soon as one block of the store ``out`` is marked done."""
    done_dir = out / fmt.BLOCKS_DONE / "c"
    deadline = time.monotonic() + 120
    # A flag file is complete once renamed from zarr's temporary "*.partial" file.
    while not (done_dir.exists() and any(p.suffix != ".partial" for p in done_dir.iterdir())):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_of_the_driver_then_resume_gives_identical_arrays(digits, teacher_weights, tmp_path):
    out = tmp_path / "killed.zarr"
    args = [str(digits[0]), "--out", str(out), "-A", "4", "-k", "3", "--image-size", str(IMAGE_SIZE), "--seed", "7",
            "--batch-size", "1", "--block-size", "2", "--cpu-threads", "1", "--no-progress",
            *(f"--teacher={spec}" for spec in teacher_weights)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "loaders"),
                                                        os.environ.get("PYTHONPATH", "")])}
    kill_once_a_block_is_done(subprocess.Popen(_cli(*args), env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE), out)
    group = zarr.open_group(str(out), mode="r")
    header = fmt.read_header(group, require_complete=False)
    done = int(np.count_nonzero(group[fmt.BLOCKS_DONE][:]))
    assert not header.complete and 1 <= done < header.num_blocks
    resumed = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.rglob("*.partial"))  # writes cut short by the kill are cleaned up
    assert f"over {header.num_blocks - done} blocks" in resumed.stdout
    fresh = tmp_path / "fresh.zarr"
    build(digits[0], fresh, teacher_weights, batch_size=1, block_size=2)
    assert_same_arrays(out, fresh)


def test_reinforce_loaders_and_cli_do_not_import_ray():
    code = ("import sys, reinforce_loaders, reinforce.cli, reinforce.build.run, reinforce.build.engine, reinforce.tools.verify; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "loaders")])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_ray_workers_report_progress_within_a_block(ray_session, digits, teacher_weights, tmp_path, monkeypatch):
    """One block on one worker: the driver hears of its records while it runs, not only when it ends."""
    import reinforce.build.engine

    monkeypatch.setattr(reinforce.build.engine, "PROGRESS_SECONDS", 0.01)
    heard = []
    config = BuildConfig(source=str(digits[0]), out=str(tmp_path / "s.zarr"), teachers=teacher_weights,
                         **{**SETTINGS, "block_size": 64, "workers": 1})
    monkeypatch.setattr(reinforce.build.run, "tqdm", _recording_bar(heard))
    run_build(config, progress=False)
    steps = [n for n in heard if n]
    assert sum(steps) == pytest.approx(45) and max(steps) < 45, steps


def _recording_bar(heard: list[float]):
    class Bar:
        format_dict: dict = {}

        def __init__(self, **_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return None

        def update(self, n):
            heard.append(n)

        def set_postfix_str(self, _, refresh=True):
            return None

    return Bar


def test_teacher_member_leaves_a_float_input_alone():
    import torch

    from reinforce.build.teachers import TeacherMember

    member = TeacherMember("id", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)),
                           input_size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = torch.full((2, 3, 4, 4), 255.0)
    member.probs(images)
    member.probs(images)
    assert (images == 255.0).all()


def test_val_records_the_teachers_held_out_accuracy_for_every_user_of_the_store(digits, teacher_weights, reference,
                                                                                tmp_path, capsys):
    from reinforce.cli import main
    from reinforce.share.publish import CARD_NAME, publish
    from reinforce.evaluation import EvalSamples, held_out_top1
    from reinforce.recipes.distill import teacher_report

    out = tmp_path / "s.zarr"
    build(digits[0], out, teacher_weights, val_source=str(digits[1]))
    header = fmt.read_header(fmt.open_store_group(out))
    ensemble = create_ensemble(teacher_weights)
    size = max(ensemble.input_sizes)
    expected, _ = held_out_top1(ensemble, lambda s: torch.utils.data.DataLoader(EvalSamples(str(digits[1]), s, 0.875),
                                                                                batch_size=7))
    assert header.provenance["teacher_accuracy"] == pytest.approx(expected, abs=1e-4)
    assert header.provenance["teacher_accuracy_on"] == {"split": digits[1].name, "images": 15, "size": size,
                                                        "crop": 0.875}
    assert_same_arrays(out, reference)  # the score is provenance: the arrays are the build's without --val
    # inspect, the dataset card and a student's run all say it; the student needs no teacher weights for it
    assert main(["inspect", str(out)]) == 0
    assert f"top-1 {expected:.2f} % on 15 held-out images of {digits[1].name} at {size} px" in capsys.readouterr().out
    publish(str(out), str(tmp_path / "pub"), source=digits[0])
    assert f"Top-1 of the ensemble: **{expected:.2f} %**" in (tmp_path / "pub" / CARD_NAME).read_text()
    report = teacher_report(header, None, [], None)
    assert (report.kind, report.top1) == ("store", pytest.approx(expected, abs=1e-4))


def test_val_with_other_classes_is_refused_before_anything_is_built(digits, teacher_weights, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(digits[1], val)
    (val / "0").rename(val / "zero")
    with pytest.raises(BuildError, match=r"--val .*class"):
        build(digits[0], tmp_path / "s.zarr", teacher_weights, val_source=str(val))
    assert not (tmp_path / "s.zarr").exists()
