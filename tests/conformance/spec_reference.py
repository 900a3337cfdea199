"""An independent reading of ``format_spec.md``: parameter sampling (sections 4.5 and 5) and parameter decoding
(section 4.3), written from the spec's text in plain Python (``math``, integers) without the package's code.

``tests/test_conformance.py`` checks that it reproduces the package bit for bit: if the spec leaves out or
misstates a step, a stranger's implementation (this one) disagrees with the code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

KEY_TAG = 0x5245494E464F5243
PARTNER_STREAM_OFFSET = 65536
POOL_STREAM = 0xFFFFFFFE
OP_COUNT = 14
SIGNED = {1, 2, 3, 4, 5, 6, 7, 8, 9}
NO_MAGNITUDE = {0, 12, 13}
CROPS = ("random_resized_crop", "random_crop", "center_crop")
MIXERS = ("mix", "mixup", "cutmix")


def uniforms(seed: int, sample: int, stream: int, first_block: int, count: int) -> list[float]:
    """Section 5: Philox4x64-10 words of counters (first_block + 1 + t, sample, stream, 0), as (w >> 11) 2^-53."""
    generator = np.random.Philox(key=np.array([seed % 2**64, KEY_TAG], dtype=np.uint64),
                                 counter=np.array([first_block, sample, stream, 0], dtype=np.uint64))
    return [int(word >> 11) * 2.0**-53 for word in generator.random_raw(count)]


def record_uniforms(seed: int, sample: int, slot: int, stream: int) -> list[float]:
    return uniforms(seed, sample, stream, 16 * slot, 64)


def rint(x: float) -> int:
    return round(x)  # Python rounds half to even


def trunc(x: float) -> int:
    return int(x)


# -- section 4.5: one function per op, (arguments, u, H, W) -> parameters ------------------------------------

def random_resized_crop(args: dict, u: list[float], height: int, width: int) -> list[float]:
    scale0, scale1 = args.get("scale", [0.08, 1.0])
    ratio0, ratio1 = args.get("ratio", [0.75, 1.3333333333333333])
    area = height * width
    for t in range(10):
        target = area * (scale0 + u[2 * t] * (scale1 - scale0))
        aspect = math.exp(math.log(ratio0) + u[2 * t + 1] * (math.log(ratio1) - math.log(ratio0)))
        w, h = rint(math.sqrt(target * aspect)), rint(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(trunc(u[20 + 2 * t] * (height - h + 1)), height - h)
            left = min(trunc(u[21 + 2 * t] * (width - w + 1)), width - w)
            return [top, left, h, w]
    r = width / height
    if r < ratio0:
        w, h = width, max(1, min(height, rint(width / ratio0)))
    elif r > ratio1:
        h, w = height, max(1, min(width, rint(height * ratio1)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def random_crop(args: dict, u: list[float], height: int, width: int) -> list[float]:
    side = max(1, rint(args.get("crop_fraction", 0.875) * min(height, width)))
    return [min(trunc(u[0] * (height - side + 1)), height - side), min(trunc(u[1] * (width - side + 1)),
                                                                       width - side), side, side]


def center_crop(args: dict, u: list[float], height: int, width: int) -> list[float]:
    return []


def horizontal_flip(args: dict, u: list[float], height: int, width: int) -> list[float]:
    return [1 if u[0] < args.get("p", 0.5) else 0]


def _signed_op(op: int, bin_: int, negate_draw: float) -> list[float]:
    if op in NO_MAGNITUDE:
        return [op, 0]
    return [op, -bin_ if op in SIGNED and negate_draw < 0.5 else bin_]


def rand_augment(args: dict, u: list[float], height: int, width: int) -> list[float]:
    n, m = args.get("num_ops", 2), args.get("magnitude", 9)
    bins, p, sigma = args.get("num_magnitude_bins", 31), args.get("p", 1.0), args.get("magnitude_std", 0.5)
    out: list[float] = []
    for i in range(n):
        if u[5 * n + i] >= p:
            out += [0, 0]
            continue
        c = u[5 * i:5 * i + 5]
        op = min(trunc(c[0] * 14), 13)
        if sigma == 0:
            bin_ = m
        else:
            z = math.sqrt(-2.0 * math.log(max(1.0 - c[1], 1e-300))) * math.cos(2.0 * math.pi * c[2])
            bin_ = min(max(rint(m + sigma * z), 0), bins - 1)
        out += _signed_op(op, bin_, c[4])
    return out


def augmix(args: dict, u: list[float], height: int, width: int) -> list[float]:
    severity, w, depth = args.get("severity", 3), args.get("width", 3), args.get("depth", -1)
    e = [-math.log1p(-min(u[t], 1 - 2**-53)) for t in range(w + 2)]
    weight0 = e[0] / (e[0] + e[1])
    total = 0.0
    for t in range(2, w + 2):
        total += e[t]
    weights = [weight0] + [e[2 + c] / total * (1 - weight0) for c in range(w)]
    steps: list[float] = []
    for c in range(w):
        base = w + 2 + 16 * c
        chain_depth = depth if depth > 0 else 1 + min(trunc(u[base] * 3), 2)
        for d in range(3):
            if d >= chain_depth:
                steps += [0, 0]
                continue
            cc = u[base + 1 + 5 * d:base + 6 + 5 * d]
            op = 1 + min(trunc(cc[0] * 13), 12)
            steps += _signed_op(op, min(trunc(cc[1] * severity), severity - 1), cc[4])
    return weights + steps


def random_erasing(args: dict, u: list[float], height: int, width: int) -> list[float]:
    if u[0] >= args.get("p", 0.25):
        return [0.0] * 4
    scale0, scale1 = args.get("scale", [0.02, 0.33])
    ratio0, ratio1 = args.get("ratio", [0.3, 3.3])
    for t in range(10):
        area = scale0 + u[1 + 4 * t] * (scale1 - scale0)
        aspect = math.exp(math.log(ratio0) + u[2 + 4 * t] * (math.log(ratio1) - math.log(ratio0)))
        h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if h < 1 and w < 1:
            return [u[3 + 4 * t] * (1 - h), u[4 + 4 * t] * (1 - w), h, w]
    return [0.0] * 4


def beta(v: list[float], alpha: float) -> float:
    if alpha == 1:
        return v[0]
    for t in range(28):
        lx = math.log(max(v[2 * t], 1e-300)) / alpha
        ly = math.log(max(v[2 * t + 1], 1e-300)) / alpha
        top = max(lx, ly)
        ls = top + math.log(math.exp(lx - top) + math.exp(ly - top))
        if ls <= 0:
            return math.exp(lx - ls)
    return 0.5


def partner_pool(seed: int, block_start: int, num_samples: int, size: int) -> list[int]:
    if size >= num_samples:
        return list(range(num_samples))
    chosen: list[int] = []
    first = 0
    while len(chosen) < size:  # the uniforms of the stream from block 0 on, in order
        for value in uniforms(seed, block_start, POOL_STREAM, first, 4):
            candidate = math.floor(value * num_samples)
            if candidate not in chosen and len(chosen) < size:
                chosen.append(candidate)
        first += 1
    return sorted(chosen)


def draw_partner(u1: float, sample: int, pool: list[int]) -> int:
    inside = sample in pool
    n = len(pool) - 1 if inside else len(pool)
    if n < 1:
        return sample
    pick = min(trunc(u1 * n), n - 1)
    if inside and pick >= pool.index(sample):
        pick += 1
    return pool[pick]


def mixer_alphas(name: str, args: dict) -> tuple[float, float, float, float]:
    """(mixup_alpha, cutmix_alpha, p, switch_prob) of a mixer's arguments."""
    if name == "mixup":
        return args.get("alpha", 0.2), 0.0, args.get("p", 1.0), 0.5
    if name == "cutmix":
        return 0.0, args.get("alpha", 1.0), args.get("p", 1.0), 0.5
    return args.get("mixup_alpha", 0.2), args.get("cutmix_alpha", 1.0), args.get("p", 1.0), \
        args.get("switch_prob", 0.5)


def mixer_own(name: str, args: dict, u: list[float], sample: int, pool: list[int]) -> list[float]:
    mixup_alpha, cutmix_alpha, p, switch_prob = mixer_alphas(name, args)
    if u[0] >= p:
        return [-1, 0, 1, 0, 0, 0, 0]
    partner = draw_partner(u[1], sample, pool)
    if cutmix_alpha > 0 and (mixup_alpha == 0 or u[2] < switch_prob):
        cut = math.sqrt(1 - beta(u[8:], cutmix_alpha))
        top, bottom = max(u[3] - cut / 2, 0.0), min(u[3] + cut / 2, 1.0)
        left, right = max(u[4] - cut / 2, 0.0), min(u[4] + cut / 2, 1.0)
        h, w = bottom - top, right - left
        return [partner, 2, 1 - h * w, top, left, h, w]
    return [partner, 1, beta(u[8:], mixup_alpha), 0, 0, 0, 0]


SAMPLERS: dict[str, Callable[[dict, list[float], int, int], list[float]]] = {
    "random_resized_crop": random_resized_crop, "random_crop": random_crop, "center_crop": center_crop,
    "horizontal_flip": horizontal_flip, "rand_augment": rand_augment, "augmix": augmix,
    "random_erasing": random_erasing,
}


def record_params(ops: Sequence[dict[str, Any]], kinds: Sequence[str], seed: int, sample: int, slot: int,
                  sizes: Sequence[tuple[int, int] | None], pool: list[int]) -> list[float]:
    """The parameters of record (sample, slot) for a pipeline's ``augmentation.ops``, rounded per section 5
    (``kinds``: the codec kind of every parameter). ``sizes[i]`` is sample i's (H, W), None if skipped."""
    height, width = sizes[sample]
    out: list[float] = []
    for k, op in enumerate(ops):
        args = {key: value for key, value in op.items() if key != "name"}
        u = record_uniforms(seed, sample, slot, k)
        if op["name"] not in MIXERS:
            out += SAMPLERS[op["name"]](args, u, height, width)
            continue
        own = mixer_own(op["name"], args, u, sample, pool)
        partner = int(own[0])
        if partner >= 0 and sizes[partner] is None:
            own, partner = [-1, 0, 1, 0, 0, 0, 0], -1
        out += own
        for before_k, before in enumerate(ops[:k]):
            before_args = {key: value for key, value in before.items() if key != "name"}
            if partner < 0:  # the partner block is all zeros
                out += [0] * len(SAMPLERS[before["name"]](before_args, [0.5] * 64, 2, 2))
            else:
                v = record_uniforms(seed, sample, slot, PARTNER_STREAM_OFFSET + before_k)
                out += SAMPLERS[before["name"]](before_args, v, *sizes[partner])
    return [float(np.float32(value)) if kind in ("linear", "float16") else float(value)
            for value, kind in zip(out, kinds, strict=True)]


# -- section 4.3: decoding ----------------------------------------------------------------------------------

def decode_params(encodings: Sequence[dict[str, Any]], columns: Sequence[int], height: int, width: int,
                  size: int) -> list[float]:
    """The parameters of one record's stored parameter columns."""
    out, position = [], 0
    for entry in encodings:
        kind = entry.get("kind", "float16")
        q = int(columns[position])
        if kind == "float16":
            out.append(float(np.array([q], dtype=np.uint16).view(np.float16)[0]))
            position += 1
        elif kind == "int":
            width_cols = entry.get("width", 1)
            if width_cols == 2:
                q += 65536 * int(columns[position + 1])
            out.append(float(q + entry.get("offset", 0)))
            position += width_cols
        elif kind == "linear":
            lo, hi, levels = entry.get("lo", 0.0), entry.get("hi", 1.0), entry.get("levels", 255)
            out.append(lo + q * ((hi - lo) / levels))
            position += 1
        else:
            ref = {"source_height": height, "source_width": width, "output": size}[entry.get("ref", "source_height")]
            levels = entry.get("levels", 255)
            g = (2 * q * ref + levels) // (2 * levels)
            out.append(float(max(1, g) if entry.get("start") else g))
            position += 1
    return out
