"""The demo alone and beside CPU burners: wall time, CPU time (user + sys of it and its workers), largest silence.

    PYTHONPATH=.:loaders .venv/bin/python benchmarks/demo_load.py --burners 0 2 -- --jobs 2
    PYTHONPATH=.:loaders .venv/bin/python benchmarks/demo_load.py --small --burners 0 2

Each run is ``python -m reinforce.cli demo ARGS`` in a fresh work directory (``--small``: a fifth of the
work, through ``run_demo``'s keyword arguments), with ``--burners`` processes spinning on the CPU beside it
for the whole run. Reported: when the demo first wrote to its output (interpreter start and imports), and the
longest time between two of its writes after that.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

SMALL = "from reinforce.demo import run_demo; import sys; run_demo(workdir=sys.argv[1], jobs=int(sys.argv[2]), " \
        "teacher_epochs=5, student_steps=120, num_augmentations=8)"


def _burn() -> None:
    while True:
        pass


def measure(command: list[str], burners: int, log_path: str) -> dict[str, float]:
    """Run ``command`` beside ``burners`` spinning processes; its wall, CPU and largest output silence."""
    spinning = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(burners)]
    for process in spinning:
        process.start()
    began = time.perf_counter()
    first = last = None
    silence = 0.0
    try:
        with open(log_path, "wb") as log:
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            while chunk := os.read(child.stdout.fileno(), 1 << 16):
                now = time.perf_counter()
                first = first if first is not None else now - began
                silence, last = max(silence, now - (last or now)), now
                log.write(chunk)
            _, status, usage = os.wait4(child.pid, 0)  # the demo's and its workers' CPU, not the burners'
    finally:
        for process in spinning:
            process.kill()
    wall = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"the demo failed (exit {os.waitstatus_to_exitcode(status)}); its output is in {log_path}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "first": first or wall, "silence": silence,
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burners", type=int, nargs="+", default=[0, 2], help="burner counts to run beside it")
    parser.add_argument("--small", action="store_true", help="a fifth of the work (5 teacher epochs, 120 student "
                                                             "steps, 8 augmentations)")
    parser.add_argument("--jobs", type=int, default=2, help="the demo's --jobs")
    parser.add_argument("demo_args", nargs="*", help="more arguments of `reinforce demo` (after --)")
    args = parser.parse_args()
    rows = []
    for burners in args.burners:
        workdir = tempfile.mkdtemp(prefix=f"demo-load-{burners}-")
        if args.small:
            command = [sys.executable, "-c", SMALL, workdir, str(args.jobs)]
        else:
            command = [sys.executable, "-m", "reinforce.cli", "demo", "--workdir", workdir, "--jobs", str(args.jobs),
                       *args.demo_args]
        result = measure(command, burners, os.path.join(workdir, "output.log"))
        rows.append((burners, result))
        print(f"burners {burners}: wall {result['wall']:.0f} s, CPU {result['cpu']:.0f} s, first output after "
              f"{result['first']:.1f} s, then silences of at most {result['silence']:.1f} s, load average at the "
              f"end {result['load']:.1f}  ({workdir})", flush=True)
    base = rows[0][1]
    for burners, result in rows[1:]:
        print(f"beside {burners} burners / beside {rows[0][0]}: CPU x{result['cpu'] / base['cpu']:.2f}, "
              f"wall x{result['wall'] / base['wall']:.2f}")


if __name__ == "__main__":
    main()
