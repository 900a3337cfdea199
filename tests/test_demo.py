"""The demo's whole path, shrunk: digits -> teachers -> store -> two students, with progress on every stage."""

import re

import pytest
import torch
from reinforce_loaders.errors import ReinforceError
from safetensors.torch import load_file

from reinforce.demo import run_demo

SMALL = dict(seed=0, teacher_epochs=3, student_steps=6, num_augmentations=2, per_class=12)
JOB_LABELS = ("teacher resnet10t", "teacher resnet14t", "student, plain labels", "student, reinforced store")


def _finished_bars(stderr: str) -> dict[str, str]:
    """``{description: "done/total"}`` of every tqdm bar that reached 100 %."""
    return dict(re.findall(r"([^\r\n|]+?): 100%\|[^|\r\n]*\| (\d+/\d+)", stderr))


def test_demo_reports_every_stage_and_ends_with_a_table(tmp_path, capsys):
    lines = []
    results = run_demo(workdir=str(tmp_path), log=lines.append, jobs=2, **SMALL)
    bars = _finished_bars(capsys.readouterr().err)
    assert set(results) == {"teacher_0_resnet10t", "teacher_1_resnet14t", "plain", "reinforced", "store_bytes",
                            "bytes_per_record"}
    assert all(0.0 <= results[key] <= 1.0 for key in ("plain", "reinforced", "teacher_0_resnet10t"))
    assert (tmp_path / "digits-train.reinforce.zarr" / "zarr.json").exists()
    # A line per stage with the elapsed time; a progress bar per training, counted in steps, and the build's.
    stages = [line for line in lines if re.match(r"\[\d/4\] +\d+ s  \S", line)]
    assert [line[:5] for line in stages] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    teacher_steps = 3 * (90 // 64)
    assert {label: bars.get(label) for label in JOB_LABELS} == {
        "teacher resnet10t": f"{teacher_steps}/{teacher_steps}", "teacher resnet14t": f"{teacher_steps}/{teacher_steps}",
        "student, plain labels": "6/6", "student, reinforced store": "6/6"}
    assert len(set(bars) - set(JOB_LABELS)) == 1  # the build's bar
    table = "\n".join(lines[-7:])
    assert "test accuracy" in table and "reinforced store" in table
    assert f"{results['bytes_per_record']:.2f} bytes/record" in table
    assert re.search(r"demo finished in \d+ s wall, \d+ s CPU", lines[-1])


def test_demo_results_do_not_depend_on_worker_processes(tmp_path, capsys):
    one = run_demo(workdir=str(tmp_path / "one"), log=lambda line: None, jobs=1, **SMALL)
    two = run_demo(workdir=str(tmp_path / "two"), log=lambda line: None, jobs=2, **SMALL)
    assert one == two
    for name in ("teacher_0_resnet10t.safetensors", "teacher_1_resnet14t.safetensors"):
        first, second = (load_file(tmp_path / run / name) for run in ("one", "two"))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_demo_refuses_no_worker_processes(tmp_path):
    with pytest.raises(ReinforceError, match="--jobs must be at least 1"):
        run_demo(workdir=str(tmp_path), jobs=0)
    assert not any(tmp_path.iterdir())


def test_demo_trains_on_the_gpu_when_there_is_one_and_without_loader_workers_on_the_cpu(tmp_path, monkeypatch):
    import reinforce.demo as demo

    seen = []
    monkeypatch.setattr(demo, "train", lambda config, **_: seen.append(config))
    monkeypatch.setattr(demo, "_epochs_for", lambda steps, train_dir: 1)
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        demo._train_run(tmp_path, tmp_path / "run", 1, lambda steps: None, model="m", recipe="plain")
    assert [(config.device, config.workers) for config in seen] == [("cpu", 0), ("cuda", None)]
