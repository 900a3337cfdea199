"""Fuzzing a valid store (issue 10): random mutations of its header, its arrays' metadata and its chunks.

Property: ``reinforce verify --data`` fails with a message (exit 1 or 2, no traceback), or it passes and the
loader then serves every sample with a valid target; whatever verify says, the loader either refuses with a
ReinforceError or serves valid samples. Never a raw exception, a hang or unbounded memory: the test runs under
an address-space limit of what the process had plus 2 GiB.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reinforce.cli import main
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders import format as fmt
from reinforce_loaders.errors import ReinforceError

JSON_VALUES = st.one_of(
    st.integers(-2**70, 2**70), st.integers(-3, 70), st.floats(allow_nan=False), st.text(max_size=12),
    st.booleans(), st.none(), st.lists(st.integers(-2, 40), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
HEADER_PATHS = [(name,) for name in fmt.HEADER_MEMBERS] + [
    ("augmentation", "size"), ("augmentation", "ops"), ("augmentation", "param_names"),
    ("param_encodings", 0), ("param_encodings", 0, "kind"), ("provenance", "skipped"), ("teachers", 0)]
ARRAY_PATHS = [("shape", 0), ("shape",), ("data_type",), ("fill_value",), ("chunk_grid", "configuration",
               "chunk_shape", 0), ("codecs", 0, "name"), ("codecs", 1), ("codecs", 0, "configuration", "chunk_shape", 1),
               ("codecs", 0, "configuration", "codecs", 2, "configuration", "typesize")]
ZARR_WRITES = {fmt.LABELS: (-5, 20), fmt.IMAGE_SIZES: (0, 70_000), fmt.FINGERPRINTS: (0, 2**64 - 1),
               fmt.RECORDS: (0, 65_535), fmt.BLOCKS_DONE: (0, 255)}


def _set(tree, path, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["header", "array_metadata", "flip", "truncate", "zarr_write"]))
    if kind == "header":
        return kind, draw(st.sampled_from(HEADER_PATHS)), draw(JSON_VALUES)
    if kind == "array_metadata":
        return kind, (draw(st.sampled_from(sorted(ZARR_WRITES))), draw(st.sampled_from(ARRAY_PATHS))), draw(JSON_VALUES)
    if kind == "zarr_write":
        name = draw(st.sampled_from(sorted(ZARR_WRITES)))
        return kind, name, (draw(st.integers(0, 10**6)), draw(st.integers(*ZARR_WRITES[name])))
    return kind, draw(st.integers(0, 10**6)), draw(st.integers(1, 255))


def apply(path: Path, mutation) -> None:
    kind, where, value = mutation
    root = path / "zarr.json"
    if kind in ("header", "array_metadata"):
        document = json.loads(root.read_text())
        tree = (document["attributes"][fmt.ATTRS_KEY] if kind == "header"
                else document["consolidated_metadata"]["metadata"][where[0]])
        with contextlib.suppress(KeyError, IndexError, TypeError):
            _set(tree, where if kind == "header" else where[1], value)
        root.write_text(json.dumps(document))
    elif kind == "zarr_write":
        array = zarr.open_group(str(path), mode="r+")[where]
        position, number = value
        flat = np.unravel_index(position % array.size, array.shape)
        array[flat] = np.array(number).astype(array.dtype)
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
        victim = files[where % len(files)]
        data = bytearray(victim.read_bytes())
        if kind == "flip":
            data[(where // len(files)) % len(data)] ^= value
        else:
            del data[(where // len(files)) % len(data):]
        victim.write_bytes(bytes(data))


def served_samples_are_valid(source: Path, store: Path) -> bool:
    """True if the loader served every sample validly, False if it refused with a ReinforceError."""
    try:
        ds = ReinforcedDataset(source, store, verify="lazy")
        samples = ds.__getitems__(list(range(len(ds))))
    except ReinforceError:
        return False
    for image, target in samples:
        assert image.shape == (3, ds.resolution, ds.resolution) and 0 <= float(image.min()) <= float(image.max()) <= 1
        assert target.shape == (ds.num_classes,) and torch.isfinite(target).all()
        assert float(target.min()) >= 0 and abs(float(target.sum()) - 1) < 1e-3
    return True


@pytest.fixture(scope="module")
def address_space_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_a_mutated_store_is_refused_with_a_message_or_serves_valid_records(digits, store, tmp_path,
                                                                           address_space_limit, mutation):
    copy = tmp_path / "fuzzed.zarr"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store, copy)
    apply(copy, mutation)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        verified = main(["verify", str(copy), "--data", str(digits[0])])
    assert verified in (0, 1, 2), verified
    if verified:
        assert "error" in err.getvalue() or "FAILED" in err.getvalue(), err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()) as out:
        inspected = main(["inspect", str(copy)])
    assert inspected in (0, 2) and out.getvalue().replace("\n", "").isprintable(), inspected
    served = served_samples_are_valid(digits[0], copy)
    assert served or not verified == 0, f"verify passed a store the loader refuses: {mutation}"
