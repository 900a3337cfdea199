"""The Ray engine on a cluster of two nodes started with ``ray start`` on this machine: one node holds a custom
resource standing in for GPUs (one device worker per unit), the other CPUs run the block preparers. Its stores
must be byte-identical to the in-process engine's: built with 2 workers, and killed (SIGKILL of the driver) with
2 workers then resumed with 1. (And on a local instance: a preparer SIGKILLed mid-build is replaced.) The cluster's processes are started in their own session and stopped by their ids at the end."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from reinforce_loaders import format as fmt

from reinforce.build import BuildConfig, run_build
from reinforce.build.engine import DEVICE_RESOURCE_VARIABLE

from conftest import IMAGE_SIZE
from test_build import kill_once_a_block_is_done

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = "fake_gpu"
SETTINGS = dict(augment="rrc", image_size=IMAGE_SIZE, num_augmentations=4, top_k=3, seed=7, batch_size=4,
                block_size=4, cpu_threads=1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_command(temp: str, *extra: str) -> list[str]:
    """``ray start --block`` with every port this node listens on chosen free (other Ray instances may run)."""
    ports = {name: free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                                            "object-manager-port")}
    return [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats", "--temp-dir", temp,
            "--node-ip-address", "127.0.0.1", "--object-store-memory", str(200 * 2**20),
            *(f"--{name}={port}" for name, port in ports.items()), *extra]


def start_node(command: list[str], env: dict[str, str], temp: str) -> subprocess.Popen:
    """A ``ray start --block`` process whose output goes to a file in ``temp``: a pipe nobody reads while the
    node runs would fill with its warnings and stop the node mid-build."""
    log = open(Path(temp) / f"node-{len(list(Path(temp).glob('node-*.log')))}.log", "wb")
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log.name  # type: ignore[attr-defined]
    log.close()
    return process


def _node_log(process: subprocess.Popen) -> str:
    return Path(process.log_path).read_text(errors="replace")[-2000:]  # type: ignore[attr-defined]


def wait_for_nodes(address: str, count: int, env: dict[str, str], processes: list[subprocess.Popen]) -> None:
    """Wait until the cluster has ``count`` live nodes; fail at once, with its output, if a node process ended."""
    code = (f"import ray, time; ray.init(address='{address}', log_to_driver=False)\n"
            f"while len([n for n in ray.nodes() if n['Alive']]) < {count}: time.sleep(0.2)")
    checking = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while checking.poll() is None:
        ended = [p for p in processes if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            checking.kill()
            logs = [_node_log(p) for p in ended]
            raise RuntimeError(f"the local Ray cluster did not come up: {logs or 'timed out'}")
        time.sleep(0.2)
    if checking.returncode:
        raise RuntimeError(f"the local Ray cluster did not come up: {checking.stderr.read().decode()[-2000:]}")


def stop(processes: list[subprocess.Popen], temp: str) -> None:
    """Stop the nodes (``ray start --block`` stops what it started on SIGTERM), then anything left of their
    sessions, by process group and by the cluster's own temporary directory."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the node's session: start_new_session made it its own
        except ProcessLookupError:
            pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """The address of a two-node Ray cluster: a head with 2 CPUs, a node with 2 CPUs and 2 units of the stand-in
    device resource."""
    pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The cluster's own token: Ray asks every node and driver for one.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**os.environ, **auth, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "loaders"),
                                                                os.environ.get("PYTHONPATH", "")])}
    processes: list[subprocess.Popen] = []
    try:
        processes.append(start_node(node_command(temp, "--head", f"--port={port}", "--include-dashboard=false",
                                                 "--num-cpus=2"), env, temp))
        wait_for_nodes(address, 1, env, processes)
        processes.append(start_node(node_command(temp, f"--address={address}", "--num-cpus=2",
                                                 f'--resources={{"{STAND_IN}": 2}}'), env, temp))
        wait_for_nodes(address, 2, env, processes)
        yield address, env
    finally:
        stop(processes, temp)


@pytest.fixture(scope="module")
def reference(digits, teacher_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cluster_ref") / "ref.zarr"
    run_build(BuildConfig(source=str(digits[0]), out=str(out), teachers=teacher_weights, **SETTINGS), progress=False)
    return out


def arrays(store: Path) -> dict[str, bytes]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][:]).tobytes() for name in sorted(group.array_keys())}


def cli_build(out: Path, source: Path, teachers: list[str], address: str, workers: int) -> list[str]:
    """The ``reinforce build`` command line of :data:`SETTINGS` on the cluster (each driver is a process of its
    own: Ray reads the cluster's token once per process)."""
    return [sys.executable, "-m", "reinforce.cli", "build", str(source), "--out", str(out), "-A", "4", "-k", "3",
            "--image-size", str(IMAGE_SIZE), "--seed", "7", "--batch-size", "4", "--block-size", "4",
            "--cpu-threads", "1", "--no-progress", "--ray-address", address, "--workers", str(workers),
            *(f"--teacher={spec}" for spec in teachers)]


def test_cluster_build_equals_the_in_process_build(cluster, digits, teacher_weights, reference, tmp_path):
    address, env = cluster
    workers = 2
    out = tmp_path / "cluster.zarr"
    built = subprocess.run(cli_build(out, digits[0], teacher_weights, address, workers), capture_output=True,
                           text=True, timeout=180, env={**env, DEVICE_RESOURCE_VARIABLE: STAND_IN})
    assert built.returncode == 0, built.stderr[-3000:]
    assert f"{workers} workers on cpu ({STAND_IN}), 2 CPU preparers" in built.stdout, built.stdout
    assert arrays(out) == arrays(reference)


def test_cluster_build_killed_and_resumed_equals_the_in_process_build(cluster, digits, teacher_weights, reference,
                                                                      tmp_path):
    """Killed with 2 workers, resumed with 1 (the worker count is not a setting of the store)."""
    address, env = cluster
    out = tmp_path / "killed.zarr"
    args = cli_build(out, digits[0], teacher_weights, address, 2)
    env = {**env, DEVICE_RESOURCE_VARIABLE: STAND_IN}
    kill_once_a_block_is_done(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE), out)
    group = zarr.open_group(str(out), mode="r")
    done = int(np.count_nonzero(group[fmt.BLOCKS_DONE][:]))
    assert not fmt.read_header(group, require_complete=False).complete and 1 <= done < 12
    resumed = subprocess.run(cli_build(out, digits[0], teacher_weights, address, 1), env=env, capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The killed driver's actors live on in the cluster for a moment: one may still finish its block before the
    # resume, so the resume runs at most the blocks left when the driver died, and at least one.
    resumed_blocks = int(re.search(r"over (\d+) blocks", resumed.stdout).group(1))
    assert 1 <= resumed_blocks <= 12 - done, resumed.stdout
    assert f"(Ray (cluster {address}), 1 workers on cpu ({STAND_IN}), 2 CPU preparers)" in resumed.stdout
    assert arrays(out) == arrays(reference)


def test_a_preparer_that_dies_is_replaced_and_its_block_retried(digits, teacher_weights, reference, tmp_path,
                                                                 monkeypatch):
    """A local Ray instance with 1 unit of the stand-in resource and 3 CPUs: 1 device worker, 2 preparers; the
    first preparer is SIGKILLed as soon as it answers, the build still gives the in-process build's bytes."""
    ray = pytest.importorskip("ray")
    import reinforce.build.run

    monkeypatch.setenv(DEVICE_RESOURCE_VARIABLE, STAND_IN)
    engines = []
    make_engine = reinforce.build.run.make_engine
    monkeypatch.setattr(reinforce.build.run, "make_engine", lambda *args: engines.append(make_engine(*args)) or
                        engines[-1])
    killed: list[int] = []

    def kill_first_preparer() -> None:
        deadline = time.monotonic() + 120
        while not (engines and engines[0].preparers) and time.monotonic() < deadline:
            time.sleep(0.01)
        if engines and engines[0].preparers:
            pid = ray.get(engines[0].preparers[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    ray.init(address="local", num_cpus=3, resources={STAND_IN: 1}, include_dashboard=False, log_to_driver=False)
    try:
        killer = threading.Thread(target=kill_first_preparer)
        killer.start()
        summary = run_build(BuildConfig(source=str(digits[0]), out=str(tmp_path / "s.zarr"), teachers=teacher_weights,
                                        workers=1, **SETTINGS), progress=False)
        killer.join()
    finally:
        ray.shutdown()
    assert killed and "1 workers on cpu (fake_gpu), 2 CPU preparers" in summary.engine
    assert summary.retries >= 1
    assert arrays(tmp_path / "s.zarr") == arrays(reference)
