"""The demo's whole path, shrunk: digits -> teachers -> store -> two students."""

from reinforce.demo import run_demo


def test_demo_runs_end_to_end(tmp_path):
    lines = []
    results = run_demo(workdir=str(tmp_path), seed=0, log=lines.append, teacher_epochs=2, student_steps=6,
                       num_augmentations=2, per_class=12)
    assert set(results) == {"teacher_0_resnet10t", "teacher_1_resnet14t", "plain", "reinforced"}
    assert all(0.0 <= value <= 1.0 for value in results.values())
    assert (tmp_path / "digits-train.reinforce.zarr" / "zarr.json").exists()
    assert any("test accuracy" in line for line in lines)
