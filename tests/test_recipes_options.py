"""`reinforce train` options: --decode (a store replayed in fast mode, refused without one), --baseline (the
teachers' margin measured against a plain run, refused before training when it is not one), the plateau
schedule's decay and floor, --device and --precision."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reinforce.recipes import TrainConfig, TrainError, resolve, train
from reinforce.recipes.cli import add_train_parser
from reinforce.recipes.data import StoreSamples


def parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return TrainConfig.from_mapping(vars(parser.parse_args(["train", *argv])))


def test_decode_reaches_the_dataset_and_png_sources_replay_exactly(digits, store):
    config = parse(str(digits[0]), "--store", str(store), "--model", "resnet10t", "--out", "run", "--decode", "fast")
    assert resolve(config).decode == "fast"
    exact, fast = (StoreSamples(str(digits[0]), str(store), decode=mode) for mode in ("exact", "fast"))
    assert fast.dataset.decode == "fast"
    for position in range(4):  # PNG sources: fast mode decodes them in full, like exact mode
        assert torch.equal(exact[position][0], fast[position][0])


def test_decode_fast_without_a_store_is_refused(digits):
    config = parse(str(digits[0]), "--recipe", "plain", "--model", "resnet10t", "--out", "run", "--decode", "fast")
    with pytest.raises(TrainError, match="--decode fast .* pass --store"):
        resolve(config)


def test_baseline_that_is_not_a_finished_run_is_refused_before_training(digits, store, tmp_path):

    config = parse(str(digits[0]), "--store", str(store), "--model", "resnet10t", "--out", str(tmp_path / "run"),
                   "--baseline", str(tmp_path / "no-such-run"))
    assert config.baseline == str(tmp_path / "no-such-run")
    with pytest.raises(TrainError, match="--baseline .*pass the directory of a finished"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_plateau_decay_and_lr_floor_reach_the_config_and_bad_values_are_refused(digits):
    base = (str(digits[0]), "--recipe", "adaptive", "--model", "resnet10t", "--out", "run")
    settings = resolve(parse(*base, "--decay-factor", "0.2", "--min-lr-ratio", "0.01"))
    assert settings.decay_factor == 0.2 and settings.min_lr_ratio == 0.01
    assert resolve(parse(*base)).min_lr_ratio == 1e-3
    for flag, value in (("--min-lr-ratio", "0"), ("--decay-factor", "1.5")):
        with pytest.raises(TrainError, match=f"{flag} .* strictly between 0 and 1"):
            resolve(parse(*base, flag, value))


@pytest.mark.parametrize("plain_top1, kd_only, expect", [
    (50.0, False, "note"),      # teachers 10 points above a plain student, CE + KD: try KL alone
    (50.0, True, None),         # already KL only: nothing to suggest
    (57.0, True, "warning"),    # 3 points: KL only is risky, said before training
])
def test_baseline_margin_is_reported_before_training(digits, store, tmp_path, monkeypatch, plain_top1, kd_only,
                                                    expect):
    import importlib
    import json

    from reinforce.recipes.distill import TeacherReport

    train_module = importlib.import_module("reinforce.recipes.train")
    monkeypatch.setattr(train_module, "measure_teachers",
                        lambda *args: TeacherReport(60.0, "held-out", "scripted for the test"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "summary.json").write_text(json.dumps({"best_top1": plain_top1}))
    logged: list[str] = []
    result = train_module.train(TrainConfig(
        train_source=str(digits[0]), store=str(store), val_source=str(digits[1]), model="test_resnet", recipe="usi",
        epochs=1, batch_size=8, out=str(tmp_path / "run"), progress=False, kd_only=kd_only,
        baseline=str(tmp_path / "plain")), log=logged.append)
    started = next(i for i, line in enumerate(logged) if line.startswith("usi: "))
    notes = [i for i, line in enumerate(logged) if line.startswith("note: ")]
    warned = [i for i, line in enumerate(logged) if line.startswith("WARNING: ")]
    if expect == "note":
        assert len(result.notes) == 1 and "+10.00 points better than the plain student" in result.notes[0]
        assert "--kd-only" in result.notes[0] and notes and notes[0] < started and not result.warnings
    elif expect == "warning":
        assert len(result.warnings) == 1 and "+3.00 points" in result.warnings[0]
        assert "--kd-only is risky" in result.warnings[0] and warned and warned[0] < started and not result.notes
    else:
        assert not result.notes and not result.warnings and not notes
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["notes"] == result.notes and summary["warnings"] == result.warnings


def test_device_auto_takes_cuda_when_present_and_cuda_without_it_is_refused(monkeypatch):
    from reinforce.recipes.distributed import resolve_device

    assert parse("src", "--model", "resnet10t", "--out", "run").device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(TrainError, match="--device cuda:1 was asked for but CUDA is not available here"):
        resolve_device("cuda:1")
    with pytest.raises(TrainError, match="--device gpu: not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"


def test_bf16_precision_runs_the_forward_passes_under_autocast_and_keeps_fp32_weights(digits, store, tmp_path):
    from reinforce.recipes.factories import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None and autocast_dtype("fp32", torch.device("cpu")) is None
    seen = []

    def record(trainer, epoch, step):
        if not seen:
            out = trainer.net(torch.zeros(2, 3, 32, 32))  # outside autocast: fp32
            with trainer.autocast():
                seen.append((trainer.net(torch.zeros(2, 3, 32, 32)).dtype, out.dtype,
                             next(trainer.model.parameters()).dtype))

    logged: list[str] = []
    result = train(TrainConfig(train_source=str(digits[0]), store=str(store), val_source=str(digits[1]),
                               model="test_resnet", recipe="usi", epochs=1, batch_size=8, out=str(tmp_path / "run"),
                               progress=False, precision="bf16"), log=logged.append, on_step=record)
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)]
    assert result.best_top1 is not None and any("(bf16 autocast)" in line for line in logged)
    config = parse(str(digits[0]), "--store", "s", "--model", "m", "--out", "o")
    assert config.precision == "auto"
    with pytest.raises(TrainError, match="--precision fp16: use one of auto, fp32, bf16"):
        resolve(dataclasses.replace(config, precision="fp16"))  # from Python: the CLI's choices refuse it first


def test_channels_last_trains_the_same_student_in_the_other_memory_format(digits, store, tmp_path):
    import json


    formats = []

    def record(trainer, epoch, step):
        if step == 1:
            conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
            formats.append(conv.weight.is_contiguous(memory_format=torch.channels_last))

    losses = []
    for channels_last in (False, True):
        out = tmp_path / f"run-{channels_last}"
        train(TrainConfig(train_source=str(digits[0]), store=str(store), model="test_resnet", recipe="usi", epochs=1,
                          batch_size=8, out=str(out), progress=False, channels_last=channels_last),
              log=lambda _: None, on_step=record)
        losses.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["train_loss"])
    assert formats == [False, True]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_ddp_on_cuda_joins_nccl_for_gradients_and_gloo_for_cpu_collectives(monkeypatch):
    import torch.distributed as dist

    from reinforce.recipes import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("backend", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    world = distributed.init_world("cuda")
    # The loop's all_sum/broadcast/barrier run on CPU tensors and objects: NCCL alone cannot carry them.
    assert calls == [("set_device", 1), ("backend", "cpu:gloo,cuda:nccl")]
    assert distributed.device_for("cuda", world) == torch.device("cuda", 1)
    calls.clear()
    distributed.init_world("cpu")
    assert calls == [("backend", "gloo")]


def test_the_train_cli_is_generated_from_train_config_and_keeps_its_defaults(digits):
    import argparse

    parser = argparse.ArgumentParser()
    train_parser = add_train_parser(parser.add_subparsers(dest="command"))
    destinations = [action.dest for action in train_parser._actions if action.dest != "help"]
    assert destinations == [field.name for field in dataclasses.fields(TrainConfig)]  # one option per field, in order
    parsed = parse(str(digits[0]), "--model", "m", "--out", "o")
    assert parsed == TrainConfig(train_source=str(digits[0]), model="m", out="o")  # every default declared once
    flags = parse(str(digits[0]), "--model", "m", "--out", "o", "--val", "v", "--teacher", "a=1", "--teacher", "b=2",
                  "--no-ema", "--no-progress", "--lr-range", "0.01,0.1", "--mean", "0.5,0.5,0.5", "--kd-only")
    assert (flags.val_source, flags.teachers, flags.ema, flags.progress, flags.lr_range, flags.mean, flags.kd_only) \
        == ("v", ["a=1", "b=2"], False, False, (0.01, 0.1), (0.5, 0.5, 0.5), True)
    text = train_parser.format_help()
    assert "(default 5)" in text and "(usi/plain default 2e-3; adaptive: estimated)" in text and "(usi/plain 0.95)" \
        in text and "(1e-3: three decays" in text


def test_settings_are_frozen_and_carry_every_config_field(digits, store):
    settings = resolve(TrainConfig(train_source=str(digits[0]), store=str(store), model="m", out="o"))
    config_fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert config_fields <= {field.name for field in dataclasses.fields(settings)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0
    assert (settings.lr, settings.optimizer, settings.sam, settings.image_size) == (2e-3, "adamw", False, None)
    assert not settings.is_complete  # the image size, normalization and EMA decay come from the data and the run
    with pytest.raises(AssertionError, match="resolved settings only"):
        from reinforce.recipes.run import RunDirectory

        RunDirectory("never-written").record(settings)


def test_batch_mixing_is_refused_on_a_store_whose_records_already_mix(digits, teacher_weights, tmp_path):
    from conftest import build_store

    mixing = build_store(digits[0], tmp_path / "mix.zarr", teacher_weights, augment="rrc+mix", num_augmentations=2)
    config = TrainConfig(train_source=str(digits[0]), store=str(mixing), model="test_resnet", epochs=1, batch_size=8,
                         out=str(tmp_path / "run"), progress=False, mixup=0.2)
    with pytest.raises(TrainError, match="records are mixed already.*drop --mixup and --cutmix"):
        train(config, log=lambda _: None)
