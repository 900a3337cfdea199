"""Conformance vectors: every preset's tiny store is byte-identical to the committed vectors.

For each augmentation preset (and ``rrc`` with the roi_align resampler) the build runs over a fixed source
(integer-generated PNGs plus one unreadable file, which the build skips) with a deterministic teacher, and
the test compares with ``tests/conformance/vectors.json``: the header settings, the sha256 of every array's
decoded little-endian bytes, a few decoded records (indices, probabilities, parameters, entropy) and the
sha256 of the uint8 pixels the student replays for them at two resolutions.

Everything is asserted bit-exactly, the probabilities and entropy included. That is sound because the
teacher (``make_vectors.RankTeacher``) turns exact integer pixel sums into probabilities of ``w / 1000``
for distinct integers ``w`` (see the docstring of ``tests/conformance/make_vectors.py``): its output does not
depend on the CPU, the thread count or the torch version beyond float rounding far below the stored
quantization. A real network's logits would, so with one the record bytes could not be compared exactly.

A failure names the case and the array, record or replayed image that differs. If a change of the stored
bytes is intended, raise the format version (``format_spec.md`` section 9) and regenerate the vectors with
``python tests/conformance/make_vectors.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conformance import make_vectors as mv

EXPECTED = json.loads(mv.VECTORS.read_text())["cases"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return mv.write_source(tmp_path_factory.mktemp("conformance_source"))


def test_every_preset_has_vectors():
    assert sorted(EXPECTED) == sorted(mv.case_names()), "regenerate with tests/conformance/make_vectors.py"
    assert all(case["skipped"] == [mv.BROKEN_INDEX] for case in EXPECTED.values())
    assert mv.BROKEN_INDEX not in {sample for sample, _ in mv.REPLAYED}


def test_teacher_probabilities_are_far_from_rounding_boundaries():
    """The premise of exact comparison: tables of distinct weights summing to 1000, entropies not near a level
    boundary, and the teacher's softmax within 1e-6 of ``w / 1000``."""
    teacher = mv.RankTeacher()
    for table in mv.WEIGHT_TABLES:
        assert sum(table) == 1000 and len(set(table)) == len(table)
        entropy = -sum(w / 1000 * math.log(w / 1000) for w in table)
        level = entropy / math.log(mv.NUM_CLASSES) * 63
        assert abs(level - math.floor(level) - 0.5) > 0.05, (table, level)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(0)).float() / 255
    probs = torch.softmax(teacher(images), dim=-1)
    weights = torch.sort(probs * 1000, dim=-1, descending=True).values
    expected = torch.tensor([sorted(mv.WEIGHT_TABLES[int(s)], reverse=True) for s in
                             ((images * 255).round().long() * torch.tensor([1, 2, 3]).view(1, 3, 1, 1))
                             .sum(dim=(1, 2, 3)) % 3], dtype=torch.float32)
    assert (weights - expected).abs().max() < 1e-3


def _differences(case: str, got: dict, want: dict) -> list[str]:
    out = []
    if got["header"] != want["header"]:
        keys = sorted(k for k in set(got["header"]) | set(want["header"])
                      if got["header"].get(k) != want["header"].get(k))
        out.append(f"{case}: header settings differ in {keys}")
    if got["skipped"] != want["skipped"]:
        out.append(f"{case}: skipped samples {got['skipped']} != {want['skipped']}")
    for name in sorted(set(got["arrays"]) | set(want["arrays"])):
        if got["arrays"].get(name) != want["arrays"].get(name):
            out.append(f"{case}: array {name!r} differs: {got['arrays'].get(name)} != {want['arrays'].get(name)}")
    for mine, theirs in zip(got["records"], want["records"], strict=True):
        for field in ("indices", "probs", "params", "entropy"):
            if mine[field] != theirs[field]:
                out.append(f"{case}: record ({mine['sample']}, {mine['slot']}) {field} {mine[field]} != {theirs[field]}")
    for key in sorted(want["pixels"]):
        if got["pixels"].get(key) != want["pixels"][key]:
            out.append(f"{case}: replayed pixels of record {key} differ")
    return out


@pytest.mark.parametrize("case", mv.case_names())
def test_store_matches_conformance_vectors(case, source, tmp_path):
    got = mv.case_vectors(source, mv.build_case(case, source, tmp_path))
    problems = _differences(case, got, EXPECTED[case])
    assert not problems, "conformance vectors differ:\n" + "\n".join(problems)
