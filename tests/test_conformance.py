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

import numpy as np
import pytest
import torch

from conformance import make_vectors as mv
from reinforce_loaders.augment import PRESETS

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
    # Header members the vectors do not know are minor-version additions (format_spec.md section 9).
    keys = sorted(key for key in want["header"] if got["header"].get(key, "(absent)") != want["header"][key])
    if keys:
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


# -- the spec's text, read by a stranger (tests/conformance/spec_reference.py) -------------------------------

SPEC_CONFIGS = {
    **{preset: None for preset in PRESETS},
    "custom-a": [{"name": "random_crop", "crop_fraction": 0.6},
                 {"name": "rand_augment", "num_ops": 3, "magnitude": 12, "num_magnitude_bins": 21, "p": 0.7,
                  "magnitude_std": 0.0},
                 {"name": "mixup", "alpha": 0.4, "p": 0.8},
                 {"name": "random_erasing", "p": 0.9, "scale": [0.1, 0.5], "ratio": [0.5, 2.0],
                  "value": [10, 20, 30]}],
    "custom-b": [{"name": "random_resized_crop", "scale": [0.5, 0.9], "ratio": [0.5, 2.0]},
                 {"name": "augmix", "severity": 6, "width": 2, "depth": 2},
                 {"name": "cutmix", "alpha": 0.5, "p": 0.6}],
    "custom-c": [{"name": "center_crop", "crop_fraction": 1.0}, {"name": "horizontal_flip", "p": 0.3},
                 {"name": "mix", "mixup_alpha": 1.0, "cutmix_alpha": 0.3, "p": 0.9, "switch_prob": 0.3}],
}
KNOWN_BUGS: dict[str, str] = {}
# Samples of many shapes (one 1 x 1, one very wide) and one skipped sample (None); blocks of 4 samples.
SPEC_SIZES = [(37, 53), (1, 1), (480, 360), (23, 700), None, (64, 64), (12, 5), (300, 299), (2, 90), (55, 41)]
SPEC_BLOCK = 4


def _pipeline(name):
    from reinforce_loaders.augment import AugmentPipeline, make_pipeline

    config = SPEC_CONFIGS[name]
    return make_pipeline(name, 64) if config is None else AugmentPipeline.from_config({"size": 64, "ops": config})


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name]))
                                  if name in KNOWN_BUGS else name for name in sorted(SPEC_CONFIGS)])
def test_spec_sampling_reproduces_the_pipeline(name):
    """Sections 4.5 and 5 sampled by an independent implementation of their text give every parameter of every
    record bit for bit, partner pools, partner blocks and a skipped partner included."""
    from conformance import spec_reference as ref
    from reinforce_loaders import format as fmt
    from reinforce_loaders import rng

    pipeline = _pipeline(name)
    kinds = [entry["kind"] for entry in fmt.pipeline_param_encodings(pipeline)]
    ops = pipeline.config()["ops"]
    seed, slots, count = 20_000_000_003, 5, len(SPEC_SIZES)
    for start in range(0, count, SPEC_BLOCK):
        pool = ref.partner_pool(seed, start, count, SPEC_BLOCK)
        assert pool == rng.partner_pool(seed, start, count, SPEC_BLOCK).tolist(), start
        samples = [i for i in range(start, min(start + SPEC_BLOCK, count)) if SPEC_SIZES[i] is not None]
        got = pipeline.sample_block(seed, samples, slots, [SPEC_SIZES[i][0] for i in samples],
                                    [SPEC_SIZES[i][1] for i in samples], num_samples=count,
                                    partner_size=lambda p: SPEC_SIZES[p], partner_pool=np.array(pool))
        for row, sample in enumerate(samples):
            for slot in range(slots):
                expected = ref.record_params(ops, kinds, seed, sample, slot, SPEC_SIZES, pool)
                assert got[row, slot].tolist() == expected, (name, sample, slot, [
                    (pipeline.param_names[p], a, b) for p, (a, b) in enumerate(zip(got[row, slot], expected))
                    if a != b])


def test_spec_decoding_reproduces_the_reader(source, tmp_path):
    """Section 4.3 decoded by an independent implementation gives the reader's parameters for every record of
    a mixing store (relative, int of width 1 and 2, linear columns, a skipped sample)."""
    import zarr

    from conformance import spec_reference as ref
    from reinforce_loaders import format as fmt

    store = mv.build_case("rrc+m*+r*", source, tmp_path)
    group = zarr.open_group(str(store), mode="r")
    header = fmt.read_header(group)
    decoded = fmt.read_all_records(group, header).params
    rows = np.asarray(group[fmt.RECORDS][:])[..., 2 * header.top_k:-1]
    sizes = np.asarray(group[fmt.IMAGE_SIZES][:])
    for sample in range(header.num_samples):
        for slot in range(header.num_augmentations):
            expected = ref.decode_params(header.param_encodings, rows[sample, slot].tolist(), *sizes[sample],
                                         header.augmentation["size"])
            assert decoded[sample, slot].tolist() == expected, (sample, slot)


def test_spec_parameter_tables_are_the_ops():
    """Appendix A of format_spec.md is exactly what tests/conformance/spec_tables.py generates from the ops."""
    from conformance import spec_tables

    assert spec_tables.spec_section(spec_tables.SPEC.read_text()) == spec_tables.generated_tables(), \
        "format_spec.md's Appendix A is stale: run python tests/conformance/spec_tables.py"


REQUIRED_MEMBERS = ("format_name", "format_version", "num_samples", "num_classes", "top_k", "num_augmentations",
                    "seed", "block_size", "augmentation", "param_encodings", "teachers", "prob_scale",
                    "entropy_levels")
READER_DEFAULTS_INSTEAD: set[str] = set()


@pytest.fixture(scope="module")
def header_attrs(source, tmp_path_factory):
    import zarr

    from reinforce_loaders import format as fmt

    store = mv.build_case("rrc", source, tmp_path_factory.mktemp("header"))
    return zarr.open_group(str(store), mode="r").attrs.asdict()[fmt.ATTRS_KEY]


@pytest.mark.parametrize("member", [
    pytest.param(member, marks=pytest.mark.xfail(
        strict=True, reason="reinforce_loaders 0.1 defaults this member (format_spec.md section 2, note)"))
    if member in READER_DEFAULTS_INSTEAD else member for member in REQUIRED_MEMBERS])
def test_reader_rejects_a_header_without_a_required_member(header_attrs, member):
    from reinforce_loaders import format as fmt
    from reinforce_loaders.errors import StoreFormatError

    attrs = {key: value for key, value in header_attrs.items() if key != member}
    with pytest.raises(StoreFormatError) as raised:
        fmt.StoreHeader.from_attrs({fmt.ATTRS_KEY: attrs}).layout  # noqa: B018 (the layout parses the rest)
    assert member in str(raised.value) or member in ("format_name", "format_version"), str(raised.value)


def test_reader_defaults_the_defaulted_members(header_attrs):
    from reinforce_loaders import format as fmt

    attrs = {key: value for key, value in header_attrs.items()
             if key not in ("complete", "class_vocabulary_size", "compute", "fingerprint", "class_names",
                            "provenance")}
    header = fmt.StoreHeader.from_attrs({fmt.ATTRS_KEY: attrs})
    assert (header.complete, header.class_vocabulary_size, header.compute, header.class_names,
            header.provenance) == (False, 0, {}, None, {})
    # An encoding without "kind" is float16.
    kindless = fmt.StoreHeader.from_attrs({fmt.ATTRS_KEY: {**attrs, "param_encodings": [
        {"param": name} for name in header.augmentation["param_names"]]}}).layout.params
    assert [codec.kind for codec in kindless.codecs] == ["float16"] * len(header.augmentation["param_names"])


def test_spec_worked_examples_hold():
    """The numbers format_spec.md states as examples: section 5's check value, section 10's slots of epochs 0-7,
    crop decoding and class vocabulary."""
    from reinforce_loaders import format as fmt
    from reinforce_loaders import rng
    from reinforce_loaders.augment import make_pipeline

    assert rng.uniforms(7, 5, 0, 16 * 2, 4).tolist() == [0.9777304513388557, 0.8393233043537409,
                                                         0.5978092956946731, 0.1225314870033547]
    assert [rng.epoch_slot(7, epoch, 4) for epoch in range(8)] == [0, 3, 2, 1, 1, 3, 0, 2]
    pipeline = make_pipeline("rrc", 32)
    header = fmt.StoreHeader(num_samples=1, num_classes=10, top_k=3, num_augmentations=4, seed=7, block_size=16,
                             augmentation=pipeline.config(), teachers=[],
                             param_encodings=fmt.pipeline_param_encodings(pipeline), class_vocabulary_size=4)
    params = header.layout.params.decode(np.array([32, 48, 223, 183, 0]), np.array(32), np.array(32))
    assert params.tolist() == [4, 6, 28, 23, 0]
    indices = np.array([[5, 2, 9], [2, 5, 7], [2, 9, 5], [2, 1, 3]])
    vocabulary = fmt.class_vocabulary(indices[None], 4, header.fill_value)[0]
    assert vocabulary.tolist() == [2, 5, 9, 1]
    assert fmt.encode_indices(header, indices, vocabulary).tolist() == [[1, 0, 2], [0, 1, 11], [0, 2, 1], [0, 3, 7]]


# -- replay: the spec's pixel arithmetic, read by a stranger ------------------------------------------------

def _replay_sources() -> list[np.ndarray]:
    """Noise sources of several shapes (one 1 x 1, one thin) and a smooth gradient, uint8 [3, H, W]."""
    generator = np.random.default_rng(11)
    shapes = [(37, 53), (64, 64), (90, 41), (1, 1), (3, 120), (130, 97)]
    out = [generator.integers(0, 256, (3, *shape), dtype=np.uint8) for shape in shapes]
    y, x = np.mgrid[0:70, 0:80]
    out.append(np.stack([x * 3, y * 3, (x + y) * 2]).clip(0, 255).astype(np.uint8))
    return out


def _replay_records(pipeline, sources, slots, seed):
    shapes = [source.shape[1:] for source in sources]
    params = np.concatenate([pipeline.sample_slots(seed, i, slots, *shapes[i], num_samples=len(sources),
                                                   partner_size=lambda p: shapes[p]) for i in range(len(sources))])
    sizes = np.array([shapes[i] for i in range(len(sources)) for _ in range(slots)])
    params = pipeline.param_layout.quantize(params, sizes[:, 0], sizes[:, 1])
    owners = [i for i in range(len(sources)) for _ in range(slots)]
    partners = pipeline.partner_indices(params)
    return owners, params, partners


REPLAY_CONFIGS = {**SPEC_CONFIGS, "custom-d": [
    {"name": "random_resized_crop", "resample": "roi_align"}, {"name": "horizontal_flip"},
    {"name": "rand_augment", "num_ops": 4, "magnitude": 20, "num_magnitude_bins": 31, "magnitude_std": 9.0},
    {"name": "random_erasing", "p": 1.0, "value": 77}]}


@pytest.mark.parametrize("name", sorted(REPLAY_CONFIGS))
def test_spec_replay_reproduces_the_pipeline(name):
    """Section 4.5's replay, written independently from its text (integer numpy, dense filter matrices, per-op
    functions), gives every record's pixels bit for bit: crops of sources of many shapes at two sides, every
    op after the crop, MixUp / CutMix with the partner's own crop."""
    from conformance import spec_reference as ref
    from reinforce_loaders.augment import AugmentPipeline, make_pipeline

    config = REPLAY_CONFIGS[name]
    pipeline = make_pipeline(name, 40) if config is None else AugmentPipeline.from_config({"size": 40, "ops": config})
    ops = pipeline.config()["ops"]
    sources = _replay_sources()
    owners, params, partners = _replay_records(pipeline, sources, slots=6, seed=5)
    tensors = [torch.from_numpy(source) for source in sources]
    for size in (40, 23):
        got = pipeline.apply_batch([tensors[i] for i in owners], params, size,
                                   None if partners is None else [tensors[p] if p >= 0 else None for p in partners])
        for r, owner in enumerate(owners):
            partner = None if partners is None or partners[r] < 0 else sources[partners[r]]
            expected = ref.replay(ops, params[r].tolist(), size, sources[owner], partner)
            differs = got[r].numpy() != expected
            assert not differs.any(), (name, size, r, params[r].tolist(), int(differs.sum()),
                                       int(np.abs(got[r].numpy().astype(int) - expected).max()))
    if name == "custom-d":  # the test covers every RandAugment op, signed bins of both signs included
        columns = [k for k, param in enumerate(pipeline.param_names) if param.startswith("rand_augment.op")]
        assert set(params[:, columns].ravel().tolist()) == set(range(14))
        assert (params[:, [k + 1 for k in columns]] < 0).any()
