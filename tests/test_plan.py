"""The resolved build plan, one source of defaults, the driver/worker split, and what a build tells its user."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from reinforce_loaders import format as fmt

from conftest import IMAGE_SIZE
from reinforce.build import BuildConfig, run_build
from reinforce.cli import build_parser, main
from reinforce.build.plan import DEFAULT_IMAGE_SIZE, config_defaults, resolve_plan
from reinforce.build.teachers import TeacherError, create_ensemble, state_dict_sha256
from reinforce.build.writer import BlockSink, StoreWriter

ROOT = Path(__file__).resolve().parents[1]


def cli_build(source, out, teachers, *extra) -> int:
    argv = ["build", str(source), "-A", "2", "-k", "3", "--out", str(out), "--no-progress", "--block-size", "16",
            "--cpu-threads", "1"]
    for spec in teachers:
        argv += ["--teacher", spec]
    return main(argv + list(extra))


def test_cli_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["build", "src", "--teacher", "t", "-A", "3", "-k", "2", "--out", "o"])
    config = BuildConfig.from_mapping(vars(args))
    assert config == BuildConfig(source="src", out="o", teachers=["t"], num_augmentations=3, top_k=2)
    for name, default in config_defaults().items():
        if name not in ("teachers", "num_augmentations", "top_k"):
            assert getattr(args, name) == default, name


def test_engine_and_build_modules_do_not_import_each_other():
    code = ("import sys, reinforce.build.engine; assert 'reinforce.build.run' not in sys.modules, 'engine imports build'; "
            "import reinforce.build.blocks, reinforce.build.plan; assert 'reinforce.build.run' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "loaders")])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_plan_resolves_every_open_setting(digits, teacher_weights):
    from reinforce_loaders.source import open_source

    config = BuildConfig(source=str(digits[0]), out="relative.zarr", teachers=teacher_weights, num_augmentations=4,
                         top_k=3, cpu_threads=1)
    plan = resolve_plan(config, open_source(config.source), create_ensemble(teacher_weights))
    assert plan.config.out == os.path.abspath("relative.zarr") and plan.config.image_size == DEFAULT_IMAGE_SIZE
    assert plan.block_size == fmt.recommended_block_size(4) == plan.config.block_size
    assert (plan.precision, plan.cpu_threads, plan.num_classes, plan.class_vocabulary_size) == ("fp32", 1, 10, 0)
    header = plan.header
    assert header.compute == {"batch_size": 256, "precision": "fp32", "channels_last": True, "compile": False,
                              "device_type": "cpu", "cpu_threads": 1}
    assert header.param_encodings == fmt.pipeline_param_encodings(plan.pipeline())
    assert header.augmentation == plan.pipeline().config() and header.augmentation["size"] == DEFAULT_IMAGE_SIZE
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.precision = "bf16"  # type: ignore[misc]


def test_timm_teacher_is_built_once_and_not_probed(teacher_weights, monkeypatch):
    import timm

    built = []
    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a[0]) or original(*a, **k))
    ensemble = create_ensemble(teacher_weights)
    assert built == ["test_resnet", "test_efficientnet"]
    forwards = []
    for member in ensemble.members:
        member.module.register_forward_hook(lambda *_: forwards.append(1))
    assert ensemble.num_classes == 10 and not forwards
    first = ensemble.members[0]
    # Size from the weights' metadata, mean/std from timm's config of test_resnet, resolved by timm.
    assert (first.input_size, first.mean, first.std) == (32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert first.data_config["interpolation"] and first.data_config["crop_pct"]


def test_worker_sink_never_cleans_the_store_only_the_driver_does(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    header = fmt.read_header(zarr.open_group(str(copy), mode="r"))
    in_flight = copy / fmt.RECORDS / "c" / "0.0.0.1234.partial"  # a sibling worker's write in progress
    in_flight.parent.mkdir(parents=True, exist_ok=True)
    in_flight.write_bytes(b"half a shard")
    BlockSink.open(copy, header)
    assert in_flight.exists()
    StoreWriter.create_or_resume(copy, header)
    assert not in_flight.exists()


def three_class_source(digits, tmp_path) -> Path:
    source = tmp_path / "three"
    for name in ("0", "1", "2"):
        shutil.copytree(digits[0] / name, source / name)
    return source


def test_teacher_with_other_class_count_is_refused_unless_asked(digits, teacher_weights, tmp_path, capsys):
    source = three_class_source(digits, tmp_path)
    assert cli_build(source, tmp_path / "s.zarr", teacher_weights, "--image-size", "32") == 2
    err = capsys.readouterr().err
    assert "teachers predict 10 classes but the dataset has 3 class folders" in err
    assert "--teacher-classes all" in err and not (tmp_path / "s.zarr").exists()
    assert cli_build(source, tmp_path / "s.zarr", teacher_weights, "--image-size", "32",
                     "--teacher-classes", "all") == 0
    assert fmt.read_header(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")).num_classes == 10


def test_json_augmentation_size_is_used_and_a_conflicting_image_size_refused(digits, teacher_weights, tmp_path,
                                                                              capsys):
    config = tmp_path / "aug.json"
    config.write_text(json.dumps({"size": 40, "ops": [{"name": "random_resized_crop"},
                                                      {"name": "horizontal_flip"}]}))
    assert cli_build(digits[0], tmp_path / "a.zarr", teacher_weights, "--augment", str(config)) == 0
    assert fmt.read_header(zarr.open_group(str(tmp_path / "a.zarr"), mode="r")).augmentation["size"] == 40
    capsys.readouterr()
    assert cli_build(digits[0], tmp_path / "b.zarr", teacher_weights, "--augment", str(config),
                     "--image-size", "32") == 2
    assert "--image-size 32 differs from the size 40 in the augmentation config" in capsys.readouterr().err
    assert cli_build(digits[0], tmp_path / "c.zarr", teacher_weights, "--augment", str(config),
                     "--image-size", "40") == 0


def test_progress_counts_images_within_a_block(digits, teacher_weights, tmp_path, monkeypatch):
    """One block of 45 images: the bar moves with every micro-batch instead of sitting at 0 until the end."""
    import reinforce.build.run

    updates = []

    class Bar:
        def __init__(self, total, unit, **_):
            assert unit == "img"
            updates.append(("total", total))
            self.format_dict = {}

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return None

        def update(self, n):
            updates.append(("update", n))

        def set_postfix_str(self, _, refresh=True):
            return None

    monkeypatch.setattr(reinforce.build.run, "tqdm", Bar)
    run_build(BuildConfig(source=str(digits[0]), out=str(tmp_path / "s.zarr"), teachers=teacher_weights,
                          image_size=IMAGE_SIZE, num_augmentations=4, top_k=3, batch_size=16, block_size=64,
                          cpu_threads=1), report=lambda line: None)
    assert updates[0] == ("total", 45)
    steps = [n for kind, n in updates[1:] if kind == "update" and n]
    assert len(steps) == -(-45 * 4 // 16)  # one per micro-batch of 16 records
    assert sum(steps) == pytest.approx(45)


def test_rerunning_a_finished_build_says_it_is_complete(digits, teacher_weights, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert cli_build(digits[0], out, teacher_weights, "--image-size", "32") == 0
    first = capsys.readouterr().out
    assert first.startswith(f"built {out}: images 45  records 90")
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert cli_build(digits[0], out, teacher_weights, "--image-size", "32") == 0
    again = capsys.readouterr().out
    assert "already complete, nothing to do" in again and "images/s" not in again
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_summary_bytes_per_record_agree_with_inspect(digits, teacher_weights, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    summary = run_build(BuildConfig(source=str(digits[0]), out=str(out), teachers=teacher_weights,
                                    image_size=IMAGE_SIZE, num_augmentations=2, top_k=3, block_size=16,
                                    cpu_threads=1), progress=False)
    assert f"{summary.data_bytes_per_record:.2f} bytes/record in data files (as `reinforce inspect` counts)" \
        in str(summary)
    assert main(["inspect", str(out)]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total (data files)"))
    assert total.split()[-2] == f"{summary.data_bytes:,}" and total.split()[-1] == f"{summary.data_bytes_per_record:.2f}"
    assert summary.store_bytes > summary.data_bytes


def test_run_build_prints_its_summary_when_showing_progress(digits, teacher_weights, tmp_path, capsys):
    run_build(BuildConfig(source=str(digits[0]), out=str(tmp_path / "s.zarr"), teachers=teacher_weights,
                          image_size=IMAGE_SIZE, num_augmentations=2, top_k=3, block_size=16, cpu_threads=1))
    assert f"built {tmp_path / 's.zarr'}: images 45  records 90" in capsys.readouterr().out


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "refused"])
def test_teacher_without_local_weights_fails_at_once_offline(digits, tmp_path, monkeypatch, capsys, offline):
    """No hub retries: timm is never asked for pretrained weights that are not cached and cannot be fetched."""
    import timm

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: the connection is refused
    original = timm.create_model

    def no_download(*args, **kwargs):
        assert not kwargs.get("pretrained"), "timm was asked to download"
        return original(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    assert cli_build(digits[0], tmp_path / "s.zarr", ["test_resnet"]) == 2
    err = capsys.readouterr().err
    assert "not in the local cache" in err and "--teacher test_resnet=PATH.safetensors" in err
    assert ("HF_HUB_OFFLINE is set" in err) if offline == "HF_HUB_OFFLINE" else ("127.0.0.1:9 cannot be reached" in err)
    assert len(err.strip().splitlines()) == 1


def test_teacher_settings_out_of_range_are_named(digits, teacher_weights, tmp_path, capsys):
    weights = teacher_weights[0].split("=", 1)[1]
    from safetensors.torch import load_file, save_file

    zero_std = tmp_path / "zero_std.safetensors"
    save_file(load_file(weights), str(zero_std), metadata={"std": json.dumps([0, 0.5, 0.5])})
    with pytest.raises(TeacherError, match=r"teacher test_resnet: std \(0.0, 0.5, 0.5\) must be positive"):
        create_ensemble([f"test_resnet={zero_std}"])
    cases = {("--teacher-std", "0,0.5,0.5"): "--teacher-std must be positive",
             ("--teacher-mean", "0.5,0.5"): "--teacher-mean needs 3 finite values",
             ("--teacher-input-size", "0"): "--teacher-input-size 0 is out of range",
             ("--image-size", "100000"): "--image-size 100000 is out of range: use 1 to 4096",
             ("--seed", "-1"): "--seed -1 is out of range",
             ("--seed", str(2**64)): f"--seed {2**64} is out of range"}
    for flags, message in cases.items():
        assert cli_build(digits[0], tmp_path / "s.zarr", teacher_weights, *flags) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "s.zarr").exists()


def test_binary_augmentation_file_is_refused(digits, teacher_weights, tmp_path, capsys):
    binary = tmp_path / "aug.json"
    binary.write_bytes(bytes(range(256)))
    assert cli_build(digits[0], tmp_path / "s.zarr", teacher_weights, "--augment", str(binary)) == 2
    assert f"augmentation config {binary} is not a UTF-8 text file" in capsys.readouterr().err


def test_derived_params_store_reads_like_the_column_store(digits, teacher_weights, tmp_path):
    settings = dict(source=str(digits[0]), teachers=teacher_weights, image_size=IMAGE_SIZE, augment="rrc+mix",
                    num_augmentations=4, top_k=3, block_size=16, cpu_threads=1)
    columns = run_build(BuildConfig(out=str(tmp_path / "c.zarr"), **settings), progress=False)
    derived = run_build(BuildConfig(out=str(tmp_path / "d.zarr"), param_storage="derived", **settings),
                        progress=False)
    assert derived.data_bytes < columns.data_bytes
    read = [fmt.read_all_records(fmt.open_store_group(tmp_path / name)) for name in ("c.zarr", "d.zarr")]
    for field in ("indices", "probs", "params", "entropy"):
        assert (getattr(read[0], field) == getattr(read[1], field)).all(), field
    assert fmt.read_header(fmt.open_store_group(tmp_path / "d.zarr")).derives_params


def test_cached_pretrained_teacher_loads_offline_from_the_cache(tmp_path, monkeypatch):
    """timm's pretrained weights already in the Hugging Face cache are read from it, with no network at all."""
    import timm
    from safetensors.torch import save_file

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    model = timm.create_model("test_resnet", num_classes=1000)
    save_file(model.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: pytest.fail("network used"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    member = create_ensemble(["test_resnet"]).members[0]
    assert member.num_classes == 1000 and member.weights is None
    assert member.weights_sha256 == state_dict_sha256(model)  # the cached file's weights
    assert member.input_size == 160  # timm's pretrained config of test_resnet.r160_in1k
