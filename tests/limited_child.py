"""Run reinforce's commands and readers on hostile inputs in a child process whose memory is limited and measured.

A reader that allocated what a crafted file claims would fail in the child with MemoryError (the address space is
limited to what the child had after importing torch plus :data:`EXTRA_ADDRESS_SPACE`, or the ``extra_address_space``
a caller passes) instead of the named refusal the tests assert; a reader that crashed (a segfault) or printed a
traceback fails the test too. The child reports its peak resident memory, which the tests keep below
:data:`MAX_PEAK_RSS` (importing torch alone takes ~0.9 GB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXTRA_ADDRESS_SPACE = 2 << 30
MAX_PEAK_RSS = 1_500_000_000

_CHILD = r"""
import contextlib, dataclasses, io, json, resource, sys
import torch  # what the commands import anyway, measured before the limit is set
from reinforce.cli import main
from reinforce_loaders.errors import ReinforceError

used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[1]), resource.RLIM_INFINITY))
for action, *args in json.loads(sys.argv[2]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if action == "cli":
                result = {"rc": main(args[0])}
            elif action == "dataset":
                from reinforce_loaders import ReinforcedDataset
                ds = ReinforcedDataset(args[0], args[1])
                if len(args) > 2:
                    ds.record(*args[2])
                result = {"error": None}
            elif action == "load":
                from reinforce.importers.safe_unpickle import load_pickle
                load_pickle(args[0], trust_pickle=True, what="test files")
                result = {"error": None}
            elif action == "download":
                from reinforce.share.download import DownloadOptions, download
                download(args[0], args[1], DownloadOptions(progress=False, verify=False, **args[2]))
                result = {"error": None}
            elif action == "open":
                from reinforce_loaders import format as fmt
                fmt.read_header(fmt.open_store_group(args[0]))
                result = {"error": None}
            elif action == "read":
                from reinforce_loaders import format as fmt
                group = fmt.open_store_group(args[0])
                fmt.read_block_slot(group, fmt.read_header(group), 0, 0)
                result = {"error": None}
            else:
                raise SystemExit(f"unknown action {action}")
    except ReinforceError as error:
        result = {"error": type(error).__name__, "message": str(error)}
    result["stderr"] = err.getvalue()
    print(json.dumps(result), flush=True)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child of a large pytest process would report
# its parent's size at the fork
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": peak * 1024}), flush=True)
"""


def run_limited(*actions: list[Any], extra_address_space: int = EXTRA_ADDRESS_SPACE,
                timeout: float = 240) -> list[dict[str, Any]]:
    """Run ``actions`` in one child whose address space may grow by ``extra_address_space`` after its imports:
    ``["cli", argv]``, ``["dataset", source, store(, (index, slot))]`` (a ``ReinforcedDataset``, and that record),
    ``["load", path]`` (a pickle through the importers' reader), ``["download", url, dest, options]``,
    ``["open", store]`` (open it and read its header), ``["read", store]`` (also block 0, slot 0). One result per
    action (``rc``, or ``error`` and ``message``, and ``stderr``). A crash, a raw traceback or a peak RSS over
    :data:`MAX_PEAK_RSS` fails the calling test."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "loaders"), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(extra_address_space), json.dumps(actions, default=str)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"child exited {done.returncode}: {done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    *results, peak = lines
    assert peak["peak_rss"] < MAX_PEAK_RSS, f"peak RSS {peak['peak_rss']:,} bytes"
    for result in results:
        assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    return results
