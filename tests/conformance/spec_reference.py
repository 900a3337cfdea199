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


# -- section 4.5: replay, integer and fixed-point pixel arithmetic -------------------------------------------
# Images are numpy uint8 [3, height, width]; every function returns a new image. Integer arithmetic is Python's
# or numpy int64 (exact); binary64 steps are Python floats, evaluated in the order the spec writes them.

FIX = 65536  # 2^16


def fix(v: float) -> int:
    return math.floor(v * FIX + 0.5)


def round16(acc: np.ndarray) -> np.ndarray:
    return np.clip((acc + FIX // 2) >> 16, 0, 255).astype(np.uint8)


def _axis_antialias(n: int, size: int) -> np.ndarray:
    """Dense int64 [size, n] weights of the antialias filter along one axis of a box of n pixels."""
    out = np.zeros((size, n), dtype=np.int64)
    scale = n / size
    spread = max(scale, 1.0)
    for i in range(size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - spread + 0.5), 0), min(int(center + spread + 0.5), n)
        raw = [max(0.0, 1.0 - abs((x - center + 0.5) / spread)) for x in range(lo, hi)]
        total = 0.0
        for value in raw:
            total += value
        for x, value in zip(range(lo, hi), raw):
            out[i, x] = math.floor(value / total * 16384 + 0.5)
    return out


def _axis_roi_align(start: int, n: int, limit: int, size: int) -> np.ndarray:
    """Dense int64 [size, limit] weights of the roi_align filter along one axis (source indices absolute)."""
    grid = -(-n // size)
    bin_size = n / size
    out = np.zeros((size, limit), dtype=np.int64)
    for i in range(size):
        acc: dict[int, float] = {}
        for g in range(grid):
            y = (start - 0.5) + i * bin_size + (g + 0.5) * bin_size / grid
            if y < -1 or y > limit:
                continue
            y = max(y, 0.0)
            y0 = math.floor(y)
            if y0 >= limit - 1:
                y0 = y1 = limit - 1
                y = float(y0)
            else:
                y1 = y0 + 1
            ly = y - y0
            acc[y0] = acc.get(y0, 0.0) + (1 - ly) / grid
            acc[y1] = acc.get(y1, 0.0) + ly / grid
        for index, value in acc.items():
            out[i, index] = math.floor(value * 16384 + 0.5)
    return out


def crop(image: np.ndarray, box: Sequence[int], size: int, resample: str) -> np.ndarray:
    _, height, width = image.shape
    top, left = min(int(box[0]), height - 1), min(int(box[1]), width - 1)
    h, w = min(max(int(box[2]), 1), height - top), min(max(int(box[3]), 1), width - left)
    if resample == "antialias":
        wy = np.zeros((size, height), dtype=np.int64)
        wx = np.zeros((size, width), dtype=np.int64)
        wy[:, top:top + h] = _axis_antialias(h, size)
        wx[:, left:left + w] = _axis_antialias(w, size)
    else:
        wy, wx = _axis_roi_align(top, h, height, size), _axis_roi_align(left, w, width, size)
    pixels = image.astype(np.int64)
    acc = wy @ (pixels @ wx.T)  # int64: exact
    return np.clip((acc + 2**27) >> 28, 0, 255).astype(np.uint8)


def inverse_matrix(center, angle, translate, shear) -> list[float]:
    r, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(r - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(r))
    c = math.sin(r - sy) / math.cos(sy)
    d = math.cos(r) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]
    cx, cy = center
    tx, ty = translate
    m[2] = m[2] + cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] = m[5] + cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def warp(image: np.ndarray, m: list[float]) -> np.ndarray:
    _, height, width = image.shape
    xo, yo = 0.5 - width / 2, 0.5 - height / 2
    a, b, c = fix(m[0]), fix(m[1]), fix(m[0] * xo + m[1] * yo + m[2] + (width / 2 - 0.5))
    d, e, f = fix(m[3]), fix(m[4]), fix(m[3] * xo + m[4] * yo + m[5] + (height / 2 - 0.5))
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    sx = (a * x + b * y + c + FIX // 2) >> 16
    sy = (d * x + e * y + f + FIX // 2) >> 16
    inside = (sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)
    out = image[:, np.clip(sy, 0, height - 1), np.clip(sx, 0, width - 1)]
    return np.where(inside[None], out, 0).astype(np.uint8)


def grey_levels(image: np.ndarray) -> np.ndarray:
    r, g, b = image.astype(np.int64)
    return (19595 * r + 38470 * g + 7471 * b + 32768) >> 16


def ra_op(image: np.ndarray, op: int, b: int, bins: int) -> np.ndarray:
    """The RandAugment op table of 4.5.3 at signed bin b of Bn = bins."""
    _, height, width = image.shape
    f = abs(b) / (bins - 1)
    s = -1.0 if b < 0 else 1.0
    x = image.astype(np.int64)
    if op == 0:
        return image.copy()
    if op in (1, 2):
        shear = math.degrees(math.atan((s * f) * 0.3))
        return warp(image, inverse_matrix((-width / 2, -height / 2), 0.0, (0.0, 0.0),
                                          (shear, 0.0) if op == 1 else (0.0, shear)))
    if op == 3:
        return warp(image, inverse_matrix((0.0, 0.0), 0.0, (float(trunc((s * f) * (150 / 331 * width))), 0.0),
                                          (0.0, 0.0)))
    if op == 4:
        return warp(image, inverse_matrix((0.0, 0.0), 0.0, (0.0, float(trunc((s * f) * (150 / 331 * height)))),
                                          (0.0, 0.0)))
    if op == 5:
        return warp(image, inverse_matrix((0.0, 0.0), -((s * f) * 30), (0.0, 0.0), (0.0, 0.0)))
    if 6 <= op <= 9:
        weight = fix(1 + (s * f) * 0.9)
        if op == 6:
            degenerate = np.zeros_like(x)
        elif op == 7:
            degenerate = np.broadcast_to(grey_levels(image), x.shape)
        elif op == 8:
            total, count = int(grey_levels(image).sum()), height * width
            degenerate = np.full_like(x, (2 * total + count) // (2 * count))
        else:
            degenerate = x.copy()
            if height > 2 and width > 2:
                kernel = [[1, 1, 1], [1, 5, 1], [1, 1, 1]]
                acc = sum(kernel[dy][dx] * x[:, dy:height - 2 + dy, dx:width - 2 + dx]
                          for dy in range(3) for dx in range(3))
                degenerate[:, 1:-1, 1:-1] = (acc + 6) // 13
        return round16(x * weight + degenerate * (FIX - weight))
    if op == 10:
        k = min(max(rint(8 - abs(b) / ((bins - 1) / 4)), 0), 8)
        return (x & ((255 << (8 - k)) & 255)).astype(np.uint8)
    if op == 11:
        threshold = float(np.float32((1 - f) * 255))
        return np.where(x >= threshold, 255 - x, x).astype(np.uint8)
    out = x.copy()
    for c in range(3):
        channel = x[c]
        if op == 12:
            lo, hi = int(channel.min()), int(channel.max())
            if hi > lo:
                out[c] = (channel - lo) * 255 // (hi - lo)
        else:
            hist = np.bincount(channel.ravel(), minlength=256)
            c_max = int(hist[int(channel.max())])
            step = (channel.size - c_max) // 255
            if step:
                cum = np.cumsum(hist)
                lut = np.array([0] + [min((int(cum[v - 1]) + step // 2) // step, 255) for v in range(1, 256)])
                out[c] = lut[channel]
    return out.astype(np.uint8)


def output_box(box: Sequence[float], size: int) -> tuple[int, int, int, int]:
    top, left, h, w = box
    return (math.floor(top * size + 0.5), math.floor(left * size + 0.5),
            min(math.floor((top + h) * size + 0.5), size), min(math.floor((left + w) * size + 0.5), size))


def param_count(op: dict) -> int:
    name = op["name"]
    if name in ("random_resized_crop", "random_crop", "random_erasing"):
        return 4
    if name == "center_crop":
        return 0
    if name == "horizontal_flip":
        return 1
    if name == "rand_augment":
        return 2 * op.get("num_ops", 2)
    if name == "augmix":
        width = op.get("width", 3)
        return width + 1 + 6 * width
    return 7


def apply_op(op: dict, image: np.ndarray, p: list[float], size: int) -> np.ndarray:
    """An op after the crop (not a mixer) with its parameters p."""
    name = op["name"]
    if name == "horizontal_flip":
        return image[:, :, ::-1].copy() if p[0] == 1 else image
    if name == "rand_augment":
        for i in range(op.get("num_ops", 2)):
            image = ra_op(image, int(p[2 * i]), int(p[2 * i + 1]), op.get("num_magnitude_bins", 31))
        return image
    if name == "augmix":
        width = op.get("width", 3)
        acc = image.astype(np.int64) * fix(p[0])
        for c in range(width):
            chain = image
            for d in range(3):
                op_id, b = int(p[width + 1 + 6 * c + 2 * d]), int(p[width + 2 + 6 * c + 2 * d])
                if op_id:
                    chain = ra_op(chain, op_id, b, 10)
            acc = acc + chain.astype(np.int64) * fix(p[1 + c])
        return round16(acc)
    if name == "random_erasing":
        value = op.get("value", 0)
        fill = np.array(value if isinstance(value, list) else [value] * 3, dtype=np.uint8)
        top, left, bottom, right = output_box(p, size)
        out = image.copy()
        out[:, top:bottom, left:right] = fill[:, None, None]
        return out
    raise AssertionError(name)


def replay(ops: Sequence[dict], p: Sequence[float], size: int, image: np.ndarray,
           partner: np.ndarray | None) -> np.ndarray:
    """Replay of one record (section 4.5, steps 2-4) from its decoded parameters p."""
    p = list(p)
    counts = [param_count(op) for op in ops]
    mixer = next((k for k, op in enumerate(ops) if op["name"] in MIXERS), None)

    def through(source: np.ndarray, stop: int, params: list[float]) -> np.ndarray:
        first = ops[0]
        box = params[:4]
        if first["name"] == "center_crop":
            _, height, width = source.shape
            side = max(1, rint(first.get("crop_fraction", 0.875) * min(height, width)))
            box = [(height - side) // 2, (width - side) // 2, side, side]
        out = crop(source, box, size, first.get("resample", "antialias"))
        at = counts[0]
        for op in ops[1:stop]:
            out = apply_op(op, out, params[at:at + param_count(op)], size)
            at += param_count(op)
        return out

    stop = len(ops) if mixer is None else mixer
    out = through(image, stop, p)
    if mixer is None:
        return out
    own_at = sum(counts[:mixer])
    own = p[own_at:own_at + 7]
    if own[0] >= 0:
        partner_image = through(partner, mixer, p[own_at + 7:])
        if own[1] == 1:
            weight = fix(own[2])
            out = round16(out.astype(np.int64) * weight + partner_image.astype(np.int64) * (FIX - weight))
        else:
            top, left, bottom, right = output_box(own[3:7], size)
            out = out.copy()
            out[:, top:bottom, left:right] = partner_image[:, top:bottom, left:right]
    at = own_at + 7 + sum(counts[:mixer])
    for op in ops[mixer + 1:]:
        out = apply_op(op, out, p[at:at + param_count(op)], size)
        at += param_count(op)
    return out
