"""Fuzzing ``reinforce import`` (issue 20): valid ml-dr and FKD release files, mutated.

Mutations: bytes of the pickle inside the ``torch.save`` zip flipped, overwritten, cut or inserted; bytes of the
zip itself flipped; the pickle replaced by random programs of the opcodes (and allowed globals) releases use; and
the released structure itself changed (a value replaced by another type, a NaN, a tensor of another shape or
dtype, a stride-0 view) before ``torch.save``.

Property: reading and converting the file either gives records or refuses with a ``ReinforceError`` (an
:class:`~reinforce.importers.ImportFailure` or an ``UntrustedPickleError``); never another exception, a crash, or
more memory than the process had plus 2 GiB (an address-space limit).

CI runs :data:`EXAMPLES` examples per test; a longer run::

    REINFORCE_FUZZ_EXAMPLES=1500 python -m pytest tests/test_fuzz_import.py --hypothesis-seed=20
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_fuzz_store import address_space_limit  # noqa: F401 (a fixture: what the process had plus 2 GiB)
from test_import import write_fkd_release, write_ml_dr_release

from reinforce.importers import _convert_block, fkd, ml_dr
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import ImageSource

EXAMPLES = int(os.environ.get("REINFORCE_FUZZ_EXAMPLES", "40"))
SNIPPETS = [b"]", b"}", b")", b"(", b"N", b"\x88", b"\x89", b"K\x01", b"K\x00", b"J\xff\xff\xff\x7f", b"G\x7f\xf8" + b"\0" * 6,
            b"X\x01\x00\x00\x00a", b"C\x02ab", b"a", b"e", b"s", b"u", b"t", b"l", b"d", b"\x85", b"\x86", b"\x87",
            b"R", b"b", b"q\x00", b"h\x00", b"q\x01", b"h\x01", b"0", b"1", b"2", b"Q",
            b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n",
            b"cnumpy\ndtype\n", b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\nscalar\n",
            b"cnumpy\nndarray\n", b"c_codecs\nencode\n", b"X\x02\x00\x00\x00f8", b"X\x02\x00\x00\x00O8",
            b"X\x07\x00\x00\x00storage", b"X\x01\x00\x00\x000", b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00latin1"]
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=8),
    st.lists(st.integers(-5, 70_000), max_size=6), st.tuples(st.integers(-3, 40), st.integers(-3, 40)),
    st.builds(lambda shape, kind: torch.zeros(shape, dtype=kind), st.lists(st.integers(0, 5), max_size=3),
              st.sampled_from([torch.float16, torch.float32, torch.int64, torch.bool, torch.uint8])),
    st.builds(lambda n: torch.ones(1).expand(n), st.integers(2, 1 << 20)),
    st.builds(lambda shape: np.full(shape, np.nan), st.lists(st.integers(0, 4), max_size=2)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@pytest.fixture(scope="module")
def releases(digits, tmp_path_factory) -> dict:
    """A two-image source, an ml-dr and an FKD release of it, and the plans importing them."""
    root = tmp_path_factory.mktemp("fuzz_import")
    source = root / "source"
    for label, image in enumerate(sorted(Path(digits[0]).rglob("*.png"))[:2]):
        (source / str(label)).mkdir(parents=True)
        shutil.copy(image, source / str(label) / image.name)
    write_ml_dr_release(source, root / "ml-dr")
    write_fkd_release(source, root / "fkd", "crops", True)
    plans = {"ml-dr": ml_dr.plan_import(root / "ml-dr", source, trust_pickle=True, num_classes=10, block_size=16),
             "fkd": fkd.plan_import(root / "fkd", source, trust_pickle=True, image_size=32, num_classes=10,
                                    block_size=16)}
    images = ImageSource.from_folder(source)
    return {"plans": plans, "paths": [images.name_of(i) for i in range(2)], "labels": list(images.targets),
            "root": root, "source": source}


def _rezipped(original: bytes, pickled: bytes) -> bytes:
    """``original`` (a torch.save zip) with its ``data.pkl`` replaced by ``pickled``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, pickled if info.filename.endswith("/data.pkl") else source.read(info))
    return out.getvalue()


def _pickle_of(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["pickle bytes", "zip bytes", "opcodes", "structure"]))
    if kind == "opcodes":
        return kind, b"\x80\x02" + b"".join(draw(st.lists(st.sampled_from(SNIPPETS), max_size=40))) + b"."
    if kind == "structure":
        return kind, (draw(st.lists(st.integers(0, 1000), min_size=1, max_size=6)), draw(ODD_VALUES))
    edits = draw(st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert"]), st.integers(0, 10**6),
                                    st.integers(0, 255)), min_size=1, max_size=4))
    return kind, edits


def _edit(data: bytes, edits: list) -> bytes:
    out = bytearray(data)
    for action, where, value in edits:
        where %= max(len(out), 1)
        if not out:
            out += bytes([value])
        elif action == "flip":
            out[where] ^= 1 << (value % 8)
        elif action == "set":
            out[where] = value
        elif action == "cut":
            del out[where:]
        else:
            out[where:where] = bytes([value])
    return bytes(out)


def _replace_node(tree, path: list[int], value):
    """``tree`` with the node reached by following ``path`` (indices modulo each container's size; it stops where
    it cannot go deeper) replaced by ``value``."""
    def walk(node, depth: int):
        if depth == len(path) or not isinstance(node, (list, tuple, dict)) or not node:
            return value
        if isinstance(node, dict):
            key = list(node)[path[depth] % len(node)]
            return {**node, key: walk(node[key], depth + 1)}
        items = list(node)
        index = path[depth] % len(items)
        items[index] = walk(items[index], depth + 1)
        return type(node)(items)

    return walk(tree, 0)


def _mutated(original_file: str, mutation) -> bytes:
    kind, detail = mutation
    data = Path(original_file).read_bytes()
    if kind == "zip bytes":
        return _edit(data, detail)
    if kind == "pickle bytes":
        return _rezipped(data, _edit(_pickle_of(data), detail))
    if kind == "opcodes":
        return _rezipped(data, detail)
    from reinforce.importers.safe_unpickle import load_pickle

    content = load_pickle(original_file, trust_pickle=True, what="test")
    out = io.BytesIO()
    torch.save(_replace_node(content, *detail), out)
    return out.getvalue()


def _converts_or_refuses(releases, importer: str, mutation, tmp_path: Path) -> None:
    plan = releases["plans"][importer]
    target = tmp_path / ("0.pth.tar" if importer == "ml-dr" else "0.tar")
    target.write_bytes(_mutated(plan.files[0], mutation))
    files = [str(target), plan.files[1]]
    try:
        _, result = _convert_block(plan.header, 0, releases["paths"], releases["labels"], files, plan.reader,
                                    os.getpid())  # in-process: no parent to watch
    except ReinforceError as error:
        event(f"{mutation[0]}: refused ({type(error).__name__})")
        return
    event(f"{mutation[0]}: converted")
    assert result.topk_indices.shape == (2, plan.header.num_augmentations, plan.header.top_k)
    assert np.isfinite(result.topk_probs).all() and np.isfinite(result.aug_params).all()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_a_mutated_ml_dr_file_converts_or_is_refused_with_a_message(releases, address_space_limit, tmp_path,
                                                                    mutation):
    _converts_or_refuses(releases, "ml-dr", mutation, tmp_path)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_a_mutated_fkd_file_converts_or_is_refused_with_a_message(releases, address_space_limit, tmp_path,
                                                                  mutation):
    _converts_or_refuses(releases, "fkd", mutation, tmp_path)


@settings(max_examples=max(EXAMPLES // 2, 10), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_a_mutated_ml_dr_config_plans_or_is_refused_with_a_message(releases, address_space_limit, tmp_path,
                                                                   mutation):
    release = tmp_path / "release"
    if not release.exists():
        shutil.copytree(releases["root"] / "ml-dr", release)
    config = release / ml_dr.CONFIG_NAME
    config.write_bytes(_mutated(str(releases["root"] / "ml-dr" / ml_dr.CONFIG_NAME), mutation))
    try:
        ml_dr.plan_import(release, releases["source"], trust_pickle=True, num_classes=10, block_size=16)
    except ReinforceError:
        pass
