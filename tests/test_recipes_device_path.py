"""Feeding a device: the default loader workers (from the machine), where a store's ops after the crop run
(--replay: in the workers, or batched on the device from the workers' crops: the same batches), and a step loop
that reads its losses from the device once per interval."""

from __future__ import annotations

import contextlib

import pytest
import torch
from reinforce_loaders.collate import Crop, Encoded
from safetensors.torch import load_file

from reinforce.recipes import TrainConfig, TrainError, TrainingDiverged, resolve, train
from reinforce.recipes.distributed import default_workers
from reinforce.recipes.loop import Trainer


def _config(digits, store, out, **overrides) -> TrainConfig:
    values = dict(train_source=str(digits[0]), store=str(store) if store else None, model="test_resnet",
                  recipe="usi", epochs=1, batch_size=8, out=str(out), progress=False, seed=1)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def mixing_store(digits, teacher_weights, tmp_path_factory):
    """An rrc+m*+r* store of the digits: crop, flip, RandAugment, erasing and stored MixUp / CutMix."""
    from conftest import build_store

    return build_store(digits[0], tmp_path_factory.mktemp("device-path") / "m.zarr", teacher_weights,
                       augment="rrc+m*+r*", num_augmentations=2)


@pytest.mark.parametrize("cores, processes, expected", [(16, 1, 8), (16, 4, 3), (2, 1, 1), (1, 1, 0), (4, 8, 0)])
def test_default_workers_come_from_the_cores_of_each_process(monkeypatch, cores, processes, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(cores)), raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert default_workers() == expected


def test_workers_and_replay_resolve_from_the_machine_and_bad_values_are_refused(digits, store, monkeypatch):
    config = _config(digits, store, "o")
    assert config.workers is None and config.replay == "auto"
    settings = resolve(config)
    assert settings.workers == default_workers() and settings.replay == "workers"  # on the CPU
    assert resolve(_config(digits, store, "o", workers=3)).workers == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve(_config(digits, store, "o")).replay == "device"
    assert resolve(_config(digits, None, "o", recipe="plain")).replay == "workers"  # no store to replay
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainError, match="--workers -1"):
        resolve(_config(digits, store, "o", workers=-1))
    with pytest.raises(TrainError, match="--replay device replays a store's augmentation.*pass --store"):
        resolve(_config(digits, None, "o", recipe="plain", replay="device"))


@pytest.mark.parametrize("sampler", ["fixed", "multiscale"])  # batches replayed at once, and sample by sample
def test_replay_on_the_device_gives_the_batches_of_the_replay_in_the_workers(digits, mixing_store, tmp_path,
                                                                             monkeypatch, sampler):
    """Also --decode gpu, which hands the device the files undecoded (the digits are PNGs: decoded in the workers,
    the whole replay then batched on the device; JPEGs: tests/test_loader_collate.py)."""
    runs = {"workers": dict(replay="workers"), "device": dict(replay="device"), "gpu": dict(decode="gpu")}
    batches: dict[str, list[torch.Tensor]] = {name: [] for name in runs}
    kinds: dict[str, set[type]] = {name: set() for name in runs}
    prepare = Trainer.prepare

    def recording(self, batch, step):
        name = "gpu" if self.settings.decode == "gpu" else self.settings.replay
        kinds[name].add(type(batch[0]))
        x, labels, soft = prepare(self, batch, step)
        batches[name].append(torch.cat([x.flatten(1), soft], 1))
        return x, labels, soft

    monkeypatch.setattr(Trainer, "prepare", recording)
    for name, options in runs.items():
        warned = (pytest.warns(UserWarning, match="--decode gpu on cpu: each batch's JPEGs are decoded in the trai")
                  if name == "gpu" else contextlib.nullcontext())
        with warned:
            train(_config(digits, mixing_store, tmp_path / name, workers=1, sampler=sampler, **options),
                  log=lambda _: None)
    assert kinds == {"workers": {torch.Tensor}, "device": {Crop}, "gpu": {Encoded}}
    assert len(batches["device"]) == len(batches["workers"]) == len(batches["gpu"]) > 1
    for name in ("device", "gpu"):
        assert all(torch.equal(a, b) for a, b in zip(batches["workers"], batches[name])), name
    a, b, c = (load_file(str(tmp_path / name / "last.safetensors")) for name in runs)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert '"replay": "device"' in (tmp_path / "device" / "config.json").read_text()
    assert '"decode": "gpu"' in (tmp_path / "gpu" / "config.json").read_text()
    with pytest.raises(TrainError, match="--decode gpu decodes and replays on the training device: drop --replay"):
        resolve(_config(digits, mixing_store, "o", decode="gpu", replay="workers"))


def test_losses_are_read_once_per_interval_and_a_divergence_still_names_its_step(digits, store, tmp_path,
                                                                              monkeypatch):
    reads: list[int] = []
    read_losses = Trainer._read_losses

    def counting(self, bar=None):
        reads.append(len(self._pending))
        return read_losses(self, bar)

    monkeypatch.setattr(Trainer, "_read_losses", counting)
    monkeypatch.setattr("reinforce.recipes.loop.READ_EVERY", 2)
    result = train(_config(digits, store, tmp_path / "run", epochs=1, workers=0), log=lambda _: None)
    assert result.epochs_run == 1 and reads[:2] == [2, 2] and max(reads) == 2  # 5 steps: 2, 2, then 1 at the end
    assert sum(reads) == 5

    def poison(trainer, epoch, step):
        if step == 3:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 0 step 3"):
        train(_config(digits, store, tmp_path / "nan", epochs=1, workers=0), log=lambda _: None, on_step=poison)


def test_lr_range_probe_stops_its_loader_workers_before_training(digits, store, tmp_path):
    import gc
    import multiprocessing

    gc.collect()  # loaders of other tests' loops, waiting in reference cycles
    before = len(multiprocessing.active_children())
    children: list[int] = []
    train(_config(digits, store, tmp_path / "run", recipe="adaptive", lr_search="range", range_steps=8,
                  fine_tune=False, workers=1, val_source=str(digits[1])), log=lambda _: None,
          on_step=lambda trainer, epoch, step: children.append(len(multiprocessing.active_children()) - before))
    assert children and max(children) == 1  # the run's own worker; the probe's is gone
    assert len(multiprocessing.active_children()) == before  # and the run's own, once it is over
