"""The build's overlapped pipeline: host work runs while the teachers do, the bytes stay those of a serial build.

Overlap is checked by the order of recorded events, never by timing: a teacher that must see the next
micro-batch's augmentation begin before it may return only finishes promptly when the two really run at once
(a serial build makes it wait out its bound and the test then fails on the recorded order).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from reinforce_loaders.augment import AugmentPipeline

import reinforce.build.blocks
from reinforce.build import BuildConfig, BuildError, run_build
from reinforce.build.plan import default_cpu_threads, default_decode_threads
from reinforce.build.teachers import Ensemble, TeacherMember
from reinforce.build.writer import BlockSink

from conftest import IMAGE_SIZE

SETTINGS = dict(augment="rrc", image_size=IMAGE_SIZE, num_augmentations=4, top_k=3, seed=7, batch_size=16,
                block_size=8, cpu_threads=1, teacher_classes="all")
MICRO_BATCHES = 12
"""45 images in 6 blocks (5 of 8 images, one of 5), 4 records each, 16 records a micro-batch: 2 per block."""
BOUND = 20.0
"""Seconds a waiting step gives up after (only reached when the steps it waits for do not overlap it)."""


class Events:
    """An ordered log of what the build's threads did, and waits for an entry to appear in it."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.changed = threading.Condition()

    def add(self, kind: str, number: int) -> None:
        with self.changed:
            self.log.append((kind, number))
            self.changed.notify_all()

    def count(self, kind: str) -> int:
        return sum(1 for entry in self.log if entry[0] == kind)

    def wait_for(self, predicate) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout=BOUND)


class WaitingTeacher(torch.nn.Module):
    """A 10-class teacher whose forward on micro-batch n logs its begin and end, and in between waits for
    ``until(n)`` to hold in the event log (at most :data:`BOUND` seconds)."""

    def __init__(self, events: Events, until) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 10)
        self.events, self.until = events, until
        self.calls = 0
        self.timeouts: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        number = self.calls
        self.calls += 1
        self.events.add("teacher-begin", number)
        if not self.events.wait_for(lambda: self.until(number)):
            self.timeouts.append(number)
        self.events.add("teacher-end", number)
        return self.linear(x.mean(dim=(2, 3))) * 20


def ensemble_of(module: torch.nn.Module) -> Ensemble:
    return Ensemble([TeacherMember("waiting", module, input_size=IMAGE_SIZE, mean=(0.5, 0.5, 0.5),
                                   std=(0.25, 0.25, 0.25), num_classes=10)])


def build(source: Path, out: Path, ensemble: Ensemble, **overrides) -> None:
    run_build(BuildConfig(source=str(source), out=str(out), **{**SETTINGS, **overrides}), ensemble=ensemble,
              progress=False)


def arrays(store: Path) -> dict[str, bytes]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][:]).tobytes() for name in sorted(group.array_keys())}


@pytest.fixture
def events(monkeypatch) -> Events:
    """The event log, with every augmentation call logged as it begins."""
    log = Events()
    apply_batch = AugmentPipeline.apply_batch

    def logged(self, *args, **kwargs):
        log.add("augment-begin", log.count("augment-begin"))
        return apply_batch(self, *args, **kwargs)

    monkeypatch.setattr(AugmentPipeline, "apply_batch", logged)
    return log


def test_the_next_micro_batch_is_augmented_while_the_teachers_run(digits, events, tmp_path):
    """Teacher n returns only once micro-batch n+1's augmentation has begun, across block boundaries too."""
    teacher = WaitingTeacher(events, lambda n: n + 1 >= MICRO_BATCHES or events.count("augment-begin") > n + 1)
    build(digits[0], tmp_path / "s.zarr", ensemble_of(teacher))
    assert teacher.calls == MICRO_BATCHES
    assert teacher.timeouts == [], f"teachers waited for an augmentation that ran only after them: {events.log}"
    for n in range(MICRO_BATCHES - 1):
        assert events.log.index(("augment-begin", n + 1)) < events.log.index(("teacher-end", n))


def test_two_micro_batches_are_augmented_at_once(digits, events, tmp_path, monkeypatch):
    """The augmentation of micro-batch n returns only once that of n+1 has begun (two helper threads at work:
    one slow augmentation, as when it coincides with a block's decoding, does not hold up the next)."""
    apply_batch = AugmentPipeline.apply_batch  # already the logging one
    late: list[int] = []

    def waiting(self, *args, **kwargs):
        number = events.count("augment-begin")
        out = apply_batch(self, *args, **kwargs)
        if number + 1 < MICRO_BATCHES and not events.wait_for(lambda: events.count("augment-begin") > number + 1):
            late.append(number)
        return out

    monkeypatch.setattr(AugmentPipeline, "apply_batch", waiting)
    build(digits[0], tmp_path / "s.zarr", ensemble_of(WaitingTeacher(events, lambda n: True)))
    assert late == [], f"augmentations that ran alone: {late}; {events.log}"


def test_a_block_is_written_while_the_teachers_run_on_the_next(digits, events, tmp_path, monkeypatch):
    """Writing block b (encoding, compressing, writing) waits for the teachers to finish the last micro-batch of
    block b+1 (micro-batch 2b+3): that only happens if the write runs beside the device stage. (The last block
    has no block after it.)"""
    teacher = WaitingTeacher(events, lambda n: True)
    write_block = BlockSink.write_block
    late: list[int] = []

    def waiting_write(self, block, result):
        events.add("write-begin", block)
        if block < 5 and not events.wait_for(lambda: ("teacher-end", 2 * block + 3) in events.log):
            late.append(block)
        write_block(self, block, result)
        events.add("write-end", block)

    monkeypatch.setattr(BlockSink, "write_block", waiting_write)
    build(digits[0], tmp_path / "s.zarr", ensemble_of(teacher))
    assert late == [], f"blocks written with the teachers idle: {late}; {events.log}"
    assert [block for kind, block in events.log if kind == "write-end"] == list(range(6))


@pytest.mark.parametrize("augment", ["rrc", "rrc+mix"])
def test_overlapped_and_serial_builds_give_the_same_bytes(digits, teacher_weights, tmp_path, monkeypatch, augment):
    """Micro-batches augmented in the helper thread, blocks written in the writer thread: the arrays are those of
    the build that does every step in series (``MICRO_BATCHES_AHEAD = 0``)."""
    settings = dict(teachers=teacher_weights, augment=augment, teacher_classes="dataset")
    build(digits[0], tmp_path / "overlapped.zarr", None, **settings)
    monkeypatch.setattr(reinforce.build.blocks, "MICRO_BATCHES_AHEAD", 0)
    build(digits[0], tmp_path / "serial.zarr", None, **settings)
    assert arrays(tmp_path / "overlapped.zarr") == arrays(tmp_path / "serial.zarr")


@pytest.mark.parametrize("where", ["teacher", "augmentation"])
def test_device_out_of_memory_names_a_smaller_batch_size(digits, tmp_path, monkeypatch, where):
    """torch.cuda.OutOfMemoryError in the teachers (this thread) or in the augmentation (the helper thread)."""
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if where == "teacher":
        monkeypatch.setattr(Ensemble, "probs", out_of_memory)
    else:
        monkeypatch.setattr(AugmentPipeline, "apply_batch", out_of_memory)
    with pytest.raises(BuildError, match="ran out of memory on a micro-batch of 16 records: try --batch-size 8"):
        build(digits[0], tmp_path / "s.zarr", ensemble_of(torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10))))


def test_several_gpus_in_one_process_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    config = BuildConfig(source=str(tmp_path), out=str(tmp_path / "s.zarr"), device="cuda")
    with pytest.raises(BuildError, match=r"4 GPUs.*--workers 4 .*--ray-address.*--device cuda:0"):
        config.validate()
    BuildConfig(source=str(tmp_path), out=str(tmp_path / "s.zarr"), device="cuda:1").validate()
    BuildConfig(source=str(tmp_path), out=str(tmp_path / "s.zarr"), device="cuda", workers=4).validate()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config.validate()


def test_thread_defaults_follow_the_device_and_the_cores():
    assert default_decode_threads("cpu", 16) == 4
    assert default_decode_threads("cuda", 16) == 14
    assert default_decode_threads("cuda", 2) == 4
    assert default_cpu_threads("cpu", 16) == 8 and default_cpu_threads("cpu", 2) == 2
    assert default_cpu_threads("cuda", 16) == 1


def test_top_k_stable_is_the_stable_sorts_first_k():
    """The top-k by unique integer keys equals a stable descending sort's first k, ties (and zeros, and -0.0)
    ordered by class index."""
    from reinforce.build.blocks import top_k_stable

    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        probs = torch.softmax(torch.randn(16, 1000, generator=generator) * (trial % 7), dim=-1)
        if trial % 3 == 0:
            probs = (probs * 50).round() / 50  # many ties, many zeros
        if trial % 5 == 0:
            probs[:, ::2] = -0.0
        values, classes = torch.sort(probs, dim=-1, descending=True, stable=True)
        top_values, top_classes = top_k_stable(probs, 5)
        assert torch.equal(top_classes, classes[:, :5]), trial
        assert torch.equal(top_values, values[:, :5] + 0.0), trial
