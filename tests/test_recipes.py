"""reinforce train: the run directory, resume, and clear errors, on the digits store (tiny timm models, 32 px)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from reinforce.cli import main
from reinforce.recipes import TrainConfig, TrainError, TrainingDiverged, train


def _config(digits, store, out, **overrides) -> TrainConfig:
    settings = dict(train_source=str(digits[0]), store=str(store) if store else None, val_source=str(digits[1]),
                    model="test_resnet", recipe="usi", epochs=2, batch_size=8, out=str(out), progress=False, seed=1,
                    workers=0)  # loading in the test process: no worker start-up per run (workers: their own test)
    settings.update(overrides)
    return TrainConfig(**settings)


def _quiet(*_):
    pass


def test_train_cli_writes_a_usable_run_directory(digits, store, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", str(digits[0]), "--store", str(store), "--val", str(digits[1]), "--model", "test_resnet",
            "--recipe", "usi", "--epochs", "2", "--batch-size", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "teacher top-1" in printed and "epoch 2/2" in printed
    config = json.loads((out / "config.json").read_text())
    assert (config["recipe"], config["lr"], config["weight_decay"], config["alpha_kd"], config["test_crop"]) == \
        ("usi", 2e-3, 2e-2, 5.0, 0.95)
    # resolved values only: the store's size, test_resnet's normalization, the EMA decay adapted to the 10 steps
    assert (config["image_size"], config["mean"], config["ema_decay"]) == (32, [0.5, 0.5, 0.5], 0.9)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    for key in ("train_loss", "val_top1", "val_top5", "val_ece", "lr", "images_per_s", "ema_top1"):
        assert all(row[key] is not None for row in rows), key
    # one-cycle: the LR at the end of the last epoch is far below the peak
    assert rows[-1]["lr"] < 0.2 * 2e-3
    weights = load_file(str(out / "best.safetensors"))
    assert weights["fc.weight"].shape[0] == 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["kind"] == "held-out"  # the store records its teacher files, which exist here
    assert (out / "checkpoint.pt").is_file() and (out / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("recipe,extra", [("usi", {"mixup": 0.4, "cutmix": 1.0}), ("plain", {})])
def test_interrupted_and_resumed_run_equals_uninterrupted(digits, store, tmp_path, recipe, extra):
    store_arg = store if recipe == "usi" else None
    whole = train(_config(digits, store_arg, tmp_path / "whole", recipe=recipe, **extra), log=_quiet)

    def interrupt(trainer, epoch, step):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    parted = _config(digits, store_arg, tmp_path / "parted", recipe=recipe, **extra)
    with pytest.raises(KeyboardInterrupt):
        train(parted, log=_quiet, on_step=interrupt)
    assert (tmp_path / "parted" / "checkpoint.pt").is_file()  # Ctrl-C left a resumable checkpoint
    resumed = train(_config(digits, store_arg, tmp_path / "parted", recipe=recipe, resume=True, **extra),
                    log=_quiet)

    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "parted" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(line) for line in (tmp_path / "parted" / "metrics.jsonl").read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    strip = ("epoch_seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in whole_rows]
    assert resumed.best_top1 == whole.best_top1


def test_ctrl_c_inside_a_step_checkpoints_after_that_step_and_resumes_exactly(digits, store, tmp_path,
                                                                              monkeypatch):
    import os
    import signal

    from reinforce.recipes import Trainer

    extra = {"mixup": 0.4, "cutmix": 1.0}
    whole = train(_config(digits, store, tmp_path / "whole", **extra), log=_quiet)
    optimize, calls, lines = Trainer.optimize, [], []

    def interrupted_inside(self, *args, **kwargs):
        loss = optimize(self, *args, **kwargs)
        calls.append(self.progress.global_step)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the update, before the LR and EMA steps
        return loss

    monkeypatch.setattr(Trainer, "optimize", interrupted_inside)
    with pytest.raises(KeyboardInterrupt):
        train(_config(digits, store, tmp_path / "parted", **extra), log=lines.append)
    monkeypatch.setattr(Trainer, "optimize", optimize)
    assert any("interrupted at epoch 0 step 3: checkpoint written" in line for line in lines), lines
    train(_config(digits, store, tmp_path / "parted", resume=True, **extra), log=_quiet)
    a, b = load_file(str(tmp_path / "whole" / "last.safetensors")), load_file(str(tmp_path / "parted" /
                                                                                     "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.epochs_run == 2


def test_resume_with_a_changed_recipe_names_the_field(digits, store, tmp_path):
    train(_config(digits, store, tmp_path / "run", epochs=1), log=_quiet)
    with pytest.raises(TrainError, match=r"alpha_kd was 5\.0, now 2\.0"):
        train(_config(digits, store, tmp_path / "run", epochs=1, alpha_kd=2.0, resume=True), log=_quiet)
    with pytest.raises(TrainError, match="not empty.*--resume"):
        train(_config(digits, store, tmp_path / "run", epochs=1), log=_quiet)


def test_resume_with_another_number_of_processes_is_refused(digits, store, tmp_path):
    train(_config(digits, store, tmp_path / "run", epochs=1), log=_quiet)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["world_size"] == 1
    torch.save({**state, "world_size": 2}, checkpoint)  # as if written under torchrun --nproc-per-node 2
    with pytest.raises(TrainError, match=r"written by a run of 2 process\(es\) and this run has 1.*"
                                         r"--nproc-per-node 2"):
        train(_config(digits, store, tmp_path / "run", epochs=1, resume=True), log=_quiet)


def test_model_with_another_class_count_is_refused(digits, store, tmp_path):
    import timm

    model = timm.create_model("test_resnet", num_classes=7)
    with pytest.raises(TrainError, match="predicts 7 classes but the store/training data has 10"):
        train(_config(digits, store, tmp_path / "run"), model=model, log=_quiet)


def test_weights_with_another_class_count_are_refused_unless_fine_tuning(digits, store, tmp_path):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "r.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(path))
    with pytest.raises(TrainError, match="predict 1000 classes but the training data has 10.*--fine-tune"):
        train(_config(digits, store, tmp_path / "run", model=f"test_resnet={path}"), log=_quiet)
    lines = []
    train(_config(digits, store, tmp_path / "tuned", model=f"test_resnet={path}", fine_tune=True, epochs=1),
          log=lines.append)
    assert "classifier fc re-initialized (zeros) for 10 classes (the weights had 1000)" in lines


def test_validation_set_with_other_class_names_is_refused(digits, store, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(digits[1], val)
    (val / "3").rename(val / "three")
    with pytest.raises(TrainError, match=r"classes differ.*missing \['3'\].*unknown \['three'\]"):
        train(_config(digits, store, tmp_path / "run", val_source=str(val)), log=_quiet)


def test_store_built_with_an_empty_class_trains_and_validates_with_that_class(digits, teacher_weights, tmp_path):
    from conftest import build_store
    from reinforce_loaders.errors import SourceError

    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    shutil.copytree(digits[0], train_dir)
    shutil.copytree(digits[1], val_dir)
    for folder in (train_dir / "5", val_dir / "5"):
        for image in folder.iterdir():
            image.unlink()
    store = build_store(train_dir, tmp_path / "store.zarr", teacher_weights[:1], num_augmentations=2,
                        allow_empty_classes=True)
    result = train(_config((train_dir, val_dir), store, tmp_path / "run", epochs=1), log=_quiet)
    assert result.epochs_run == 1 and result.last_top1 is not None
    assert load_file(str(tmp_path / "run" / "last.safetensors"))["fc.weight"].shape[0] == 10  # class 5 kept
    (val_dir / "5").rename(val_dir / "five")  # the empty folder still takes part in the class check
    with pytest.raises(TrainError, match=r"classes differ.*missing \['5'\].*unknown \['five'\]"):
        train(_config((train_dir, val_dir), store, tmp_path / "renamed", epochs=1), log=_quiet)
    with pytest.raises(SourceError, match="holds no images"):  # plain has no store naming the empty class
        train(_config((train_dir, val_dir), None, tmp_path / "plain", recipe="plain", epochs=1), log=_quiet)
    (val_dir / "five").rename(val_dir / "5")
    kept = train(_config((train_dir, val_dir), None, tmp_path / "plain-kept", recipe="plain", epochs=1,
                         allow_empty_classes=True), log=_quiet)  # reinforce train --allow-empty-classes
    assert kept.epochs_run == 1
    assert load_file(str(tmp_path / "plain-kept" / "last.safetensors"))["fc.weight"].shape[0] == 10


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(digits, store, tmp_path):
    def poison(trainer, epoch, step):
        if (epoch, step) == (1, 1):
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1 step 1.*checkpoint.*kept.*Lower --lr"):
        train(_config(digits, store, out), log=_quiet, on_step=poison)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["step_in_epoch"] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_plain_recipe_refuses_a_store_and_usi_needs_soft_targets(digits, store, tmp_path):
    with pytest.raises(TrainError, match="--recipe plain trains on hard labels only"):
        train(_config(digits, store, tmp_path / "a", recipe="plain"), log=_quiet)
    with pytest.raises(TrainError, match="--recipe usi needs soft targets"):
        train(_config(digits, None, tmp_path / "b"), log=_quiet)


def test_online_teacher_sees_the_students_pixels_and_leaves_them_alone(digits, teacher_weights, tmp_path,
                                                                          monkeypatch):
    from reinforce.recipes import Trainer

    checked = []
    prepare = Trainer.prepare

    def checking(self, batch, step):
        images = batch[0].clone()
        x, labels, soft = prepare(self, batch, step)
        # the student's input is its own augmented batch, normalized, untouched by the teacher's preprocessing
        assert torch.allclose(x, (images.float() - self.mean) / self.std)
        assert soft.shape == (len(labels), 10) and torch.allclose(soft.sum(-1), torch.ones(len(labels)))
        checked.append(step)
        return x, labels, soft

    monkeypatch.setattr(Trainer, "prepare", checking)
    import reinforce.recipes.distill as distill
    import reinforce.build.teachers as teachers_module

    builds = []
    create = teachers_module.create_ensemble

    def counting(specs, **kwargs):
        builds.append(list(specs))
        return create(specs, **kwargs)

    monkeypatch.setattr(teachers_module, "create_ensemble", counting)
    monkeypatch.setattr(distill, "create_ensemble", counting)
    # Two members at one input size: each must get its own copy of the batch.
    teachers = [teacher_weights[0], teacher_weights[0]]
    result = train(_config(digits, None, tmp_path / "run", teachers=teachers, image_size=32, epochs=1,
                           kd_only=True), log=_quiet)
    assert checked
    assert builds == [teachers]  # built once: the held-out figure uses the training ensemble
    assert result.teacher["kind"] == "held-out" and result.teacher["top1"] is not None
    # a random-weight teacher is not clearly stronger than the student, which the run says
    assert any("points better than the student" in w for w in result.warnings) or \
        result.teacher["top1"] - result.best_top1 >= 5


def test_ensemble_probs_equal_each_members_own_on_uint8_and_leave_float_input_alone(teacher_weights):
    from reinforce.evaluation import ensemble_probs
    from reinforce.build.teachers import create_ensemble

    ensemble = create_ensemble([teacher_weights[0], teacher_weights[0]])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    floats = images.float()
    expected = ensemble.members[0].probs(images)
    assert torch.allclose(ensemble_probs(ensemble, floats), expected, atol=1e-6)
    assert torch.equal(floats, images.float())


def test_multiscale_sampler_and_entropy_curriculum_train_from_the_store(digits, store, tmp_path, monkeypatch):
    from reinforce.recipes import Trainer

    shapes = []
    prepare = Trainer.prepare

    def recording(self, batch, step):
        shapes.append(tuple(batch[0].shape))
        return prepare(self, batch, step)

    monkeypatch.setattr(Trainer, "prepare", recording)
    policies = []
    result = train(_config(digits, store, tmp_path / "run", epochs=3, sampler="multiscale", curriculum="easy"),
                   log=_quiet, on_step=lambda trainer, epoch, step: policies.append(trainer.train_set))
    assert result.epochs_run == 3
    sizes = {shape[-1] for shape in shapes}
    assert len(sizes) > 1 and sizes <= {16, 24, 32, 40, 48}
    for batch, side, *_ in ((s[0], s[-1]) for s in shapes):
        assert batch == max(1, 8 * 32 ** 2 // side ** 2)  # batch size inversely proportional to pixels
    # epoch 0 of the easy curriculum replays each sample's lowest-entropy record
    data = policies[0]
    dataset = data.dataset
    for index in (0, 17, 44):
        entropies = [dataset.teacher_entropy(index, slot) for slot in range(dataset.header.num_augmentations)]
        assert data.slot_policy(index, 0) == min(range(len(entropies)), key=entropies.__getitem__)


def test_multiscale_sampler_with_mixup_trains_on_even_batches(digits, tmp_path, monkeypatch):
    from reinforce.recipes import Trainer

    sizes = []
    prepare = Trainer.prepare

    def recording(self, batch, step):
        sizes.append(len(batch[0]))
        return prepare(self, batch, step)

    monkeypatch.setattr(Trainer, "prepare", recording)
    result = train(_config(digits, None, tmp_path / "run", recipe="plain", epochs=2, sampler="multiscale",
                           mixup=0.4, image_size=32), log=_quiet)
    assert result.epochs_run == 2 and sizes and all(size % 2 == 0 for size in sizes), sizes


def test_results_do_not_depend_on_the_worker_count(digits, store, tmp_path):
    for workers in (0, 2):
        train(_config(digits, store, tmp_path / f"w{workers}", epochs=2, workers=workers, mixup=0.4), log=_quiet)
    a, b = (load_file(str(tmp_path / f"w{w}" / "last.safetensors")) for w in (0, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
