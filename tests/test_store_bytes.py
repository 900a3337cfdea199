"""Stores are byte-identical to the ones recorded in ``tests/data/store_hashes.json``.

The hashes were recorded from the code before the layout of issue 19 (the house move), so a refactoring that
changes any byte of any array of any preset fails here. An intended change of bytes (a new op arithmetic, a new
format version) re-records them with ``python tests/test_store_bytes.py --record`` and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from reinforce_loaders.augment.pipeline import PRESETS

HASHES = Path(__file__).parent / "data" / "store_hashes.json"
CASES = [(preset, False) for preset in PRESETS] + [("rrc+ra/re", True)]


def case_name(preset: str, derived: bool) -> str:
    return preset + (" derived" if derived else "")


def array_hashes(store: Path) -> dict[str, str]:
    """sha256 of each array's chunk files (path and bytes, in path order); metadata documents are left out
    because they hold the build's provenance (versions, host)."""
    hashes = {}
    for array in sorted(path for path in store.iterdir() if path.is_dir()):
        digest = hashlib.sha256()
        for chunk in sorted(path for path in array.rglob("*") if path.is_file() and path.name != "zarr.json"):
            digest.update(str(chunk.relative_to(array)).encode() + b"\0")
            digest.update(chunk.read_bytes())
        hashes[array.name] = digest.hexdigest()
    return hashes


def build_case(digits, teacher_weights, root: Path, preset: str, derived: bool) -> dict[str, str]:
    from conftest import build_store

    out = root / (preset.replace("/", "_").replace("*", "s").replace("+", "_") + ("_derived" if derived else "")
                  + ".zarr")
    build_store(digits[0], out, teacher_weights, augment=preset, param_storage="derived" if derived else "columns",
                cpu_threads=1)
    return array_hashes(out)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "derived"), CASES, ids=[case_name(*case) for case in CASES])
def test_store_arrays_are_byte_identical_to_the_recorded_ones(digits, teacher_weights, tmp_path, preset, derived):
    recorded = json.loads(HASHES.read_text())[case_name(preset, derived)]
    assert build_case(digits, teacher_weights, tmp_path, preset, derived) == recorded


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    import conftest

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)

        class Factory:
            def mktemp(self, name: str) -> Path:
                path = root / name
                path.mkdir()
                return path

        digits = conftest.materialize_digits(Factory().mktemp("digits"), per_class=6, seed=0)
        teachers = conftest.teacher_weights.__wrapped__(Factory())
        result = {case_name(p, d): build_case(digits, teachers, root, p, d) for p, d in CASES}
    HASHES.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(result)} stores in {HASHES}")
