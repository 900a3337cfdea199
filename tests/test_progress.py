"""Progress bars written to a log (not a terminal) redraw once a minute, not ten times a second."""

from __future__ import annotations

import io
import itertools
import os

import pytest
import tqdm.std as tqdm_std
from tqdm import tqdm

from reinforce.build import run_build
from reinforce.share.download import DownloadOptions, download
from reinforce.build.plan import BuildConfig
from reinforce.progress import LOG_INTERVAL_SECONDS, bar_options
from reinforce.share.publish import publish
from reinforce.recipes import TrainConfig, train


@pytest.fixture()
def clock(monkeypatch):
    """tqdm's clock, advancing one second per reading: every step of a bar looks a second apart."""
    seconds = itertools.count()
    monkeypatch.setattr(tqdm_std, "time", lambda: float(next(seconds)))


def test_bar_options_leave_a_terminal_alone_and_slow_a_log_down():
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert bar_options(terminal) == {}
    os.close(leader)
    assert bar_options(io.StringIO())["mininterval"] == LOG_INTERVAL_SECONDS


def test_a_bar_in_a_log_draws_a_line_per_interval(clock):
    def draws(**options) -> int:
        log = io.StringIO()
        with tqdm(total=600, file=log, desc="steps", **options) as bar:
            for _ in range(600):
                bar.update()
        return log.getvalue().count("steps")

    plain, ours = draws(), draws(**bar_options(io.StringIO()))
    assert plain > 300  # tqdm's own defaults: a draw per step a second apart
    assert 4 <= ours <= 25  # a few hundred seconds at one draw a minute, and the first and last


def test_reinforce_train_writes_few_bar_lines_into_a_log(digits, store, tmp_path, clock, capsys):
    config = TrainConfig(train_source=str(digits[0]), store=str(store), val_source=str(digits[1]),
                         model="test_resnet", recipe="usi", epochs=2, batch_size=4, out=str(tmp_path / "run"),
                         progress=True, seed=1)
    train(config, log=lambda line: None)
    err = capsys.readouterr().err
    bar_lines = err.count("epoch 1/2")  # 11 steps an epoch, each a few seconds apart
    assert 1 <= bar_lines <= 3, bar_lines


def test_reinforce_build_writes_few_bar_lines_into_a_log(digits, teacher_weights, tmp_path, clock, capsys):
    config = BuildConfig(source=str(digits[0]), out=str(tmp_path / "s.zarr"), teachers=teacher_weights,
                         image_size=32, num_augmentations=2, top_k=3, batch_size=4, block_size=8, cpu_threads=1)
    run_build(config, report=lambda line: None)
    bar_lines = capsys.readouterr().err.count("reinforce build")  # 12 micro-batches, a few seconds apart
    assert 1 <= bar_lines <= 3, bar_lines


def test_reinforce_download_writes_few_bar_lines_into_a_log(store, digits, tmp_path, clock, capsys):
    publish(store, str(tmp_path / "publication"), source=digits[0])
    download(str(tmp_path / "publication"), tmp_path / "copy",
             DownloadOptions(progress=True, workers=1, chunk_size=256))  # hundreds of chunks, seconds apart
    bar_lines = capsys.readouterr().err.count("reinforce download")  # ~5 minutes of 263 chunks
    assert 1 <= bar_lines <= 10, bar_lines
