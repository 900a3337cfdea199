"""Storage benchmark: bytes per record of format v1 vs a reference-style layout, and bytes read per epoch.

Teacher outputs come from a real network on real images (see ``train_teacher``): a small CNN trained here on
scikit-learn's handwritten digits (rotated and scaled) with three heads, digit / rotation bin / scale bin,
whose product is a 1000-class distribution (class 100 d + 10 r + s: neighbouring classes are visually similar,
as ImageNet's neighbouring dog breeds are), evaluated on RandomResizedCrop+flip views of real digits. It is a
real model's predictions but NOT an ImageNet teacher: its statistics are printed so they can be compared. Augmentation parameters are sampled from the samplers'
definitions (RRC from ``reinforce_loaders``; RandAugment(2 ops, m9, mstd0.5, 31 bins, torchvision op set) and
RandomErasing(p=0.25) as defined by the augment ops) with ImageNet-like source sizes.

The reference-style layout is one pickled file per sample (pickle is used ONLY here, to measure it), holding
per record a dict of Python values: pixel crop box, flip, RandAugment (op, magnitude) pairs, erasing box and
flag, float64 top-k probabilities and int64 indices, as the ImageNet+ release does.

    PYTHONPATH=.:loaders python benchmarks/storage.py [--samples 1024] [--slots 16] [--train-steps 600] [--teacher-cache T.npz]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle  # baseline only: never in the format
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from range_server import RangeServer  # noqa: E402

from reinforce.build.writer import BlockResult, StoreWriter, store_bytes  # noqa: E402
from reinforce_loaders import format as fmt  # noqa: E402
from reinforce_loaders import make_pipeline, rng  # noqa: E402
from reinforce_loaders.codecs import FRACTION_255  # noqa: E402

NUM_CLASSES, TOP_K = 1000, 10
IMAGENET_IMAGES, IMAGENET_SLOTS = 1_281_167, 400
RA_OPS, RA_BINS = 14, 31
RA_NO_MAGNITUDE = {0, 12, 13}       # identity, autocontrast, equalize
RA_SIGNED = set(range(1, 10))       # shear x/y, translate x/y, rotate, brightness, color, contrast, sharpness


# ---------------------------------------------------------------------------------------------- teacher
def digit_images() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    return F.interpolate(images, size=16, mode="bilinear", align_corners=False), digits.target


def variant(images: torch.Tensor, rotation: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate (degrees) and scale each image about its centre."""
    angle = rotation * math.pi / 180
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], -1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def fine_labels(digit: torch.Tensor, rotation: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r = ((rotation + 40) / 8).long().clamp(0, 9)
    s = ((scale - 0.7) / 0.06).long().clamp(0, 9)
    return digit * 100 + r * 10 + s


def random_crops(images: torch.Tensor, generator: torch.Generator, min_area: float = 0.25,
                 flips: bool = True) -> torch.Tensor:
    """Square random crops of ``min_area``-1 of the area (+ horizontal flips), at 16x16."""
    n = images.shape[0]
    area = min_area + (1 - min_area) * torch.rand(n, generator=generator)
    side = area.sqrt()
    cx = (1 - side) * (2 * torch.rand(n, generator=generator) - 1)
    cy = (1 - side) * (2 * torch.rand(n, generator=generator) - 1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flips else torch.ones(n)
    zeros = torch.zeros(n)
    theta = torch.stack([torch.stack([side * flip, zeros, cx], -1), torch.stack([zeros, side, cy], -1)], 1)
    return F.grid_sample(images, F.affine_grid(theta, list(images.shape), align_corners=False), align_corners=False)


class FactorizedNet(torch.nn.Module):
    """Small CNN with three softmax heads (digit, rotation bin, scale bin); its 1000-class output is their
    product, ``p(d, r, s) = p(d) p(r) p(s)`` at class ``100 d + 10 r + s``."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

        self.body = torch.nn.Sequential(*block(1, 32), torch.nn.MaxPool2d(2), *block(32, 64), torch.nn.MaxPool2d(2),
                                        *block(64, 64), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.heads = torch.nn.Linear(64, 30)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.heads(self.body(x))
        return logits[:, :10], logits[:, 10:20], logits[:, 20:]

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        d, r, s = (torch.softmax(head.double(), -1) for head in self(x))
        return (d[:, :, None, None] * r[:, None, :, None] * s[:, None, None, :]).reshape(len(x), NUM_CLASSES)


def train_teacher(images: torch.Tensor, digits: np.ndarray, steps: int) -> FactorizedNet:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = FactorizedNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    targets = torch.from_numpy(digits)
    began = time.perf_counter()
    for _ in range(steps):
        pick = torch.randint(len(images), (128,), generator=generator)
        rotation = torch.rand(128, generator=generator) * 80 - 40
        scale = 0.7 + torch.rand(128, generator=generator) * 0.6
        x = random_crops(variant(images[pick], rotation, scale), generator, min_area=0.7, flips=False)
        label = fine_labels(targets[pick], rotation, scale)
        d, r, s = net(x)
        loss = F.cross_entropy(d, label // 100) + F.cross_entropy(r, label // 10 % 10) + F.cross_entropy(s, label % 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"teacher: {steps} steps in {time.perf_counter() - began:.0f} s, last loss (sum of 3 heads) {loss.item():.2f}")
    return net.eval()


@torch.no_grad()
def teacher_outputs(net, images, digits, samples, slots):
    """Top-k, probabilities and entropies of RRC+flip views: (samples, slots, K) and (samples, slots)."""
    generator = torch.Generator().manual_seed(1)
    pick = torch.arange(samples) % len(images)
    rotation = torch.rand(samples, generator=generator) * 80 - 40
    scale = 0.7 + torch.rand(samples, generator=generator) * 0.6
    views = random_crops(variant(images[pick], rotation, scale).repeat_interleave(slots, 0), generator)
    probs = torch.cat([net.probs(views[i:i + 1024]) for i in range(0, len(views), 1024)])
    probs = probs.reshape(samples, slots, NUM_CLASSES)
    values, classes = torch.sort(probs, dim=-1, descending=True, stable=True)
    entropy = torch.special.entr(probs).sum(-1)
    truth = fine_labels(torch.from_numpy(digits[pick.numpy()]), rotation, scale)
    plain = net.probs(random_crops(variant(images[pick], rotation, scale), generator, min_area=0.7, flips=False))
    plain_digit = (plain.argmax(-1) // 100 == truth // 100).double().mean().item()
    stats = {"mean top-1 prob": values[..., 0].mean().item(),
             "median top-1 prob": values[..., 0].median().item(),
             "mean top-10 mass": values[..., :TOP_K].sum(-1).mean().item(),
             "mean entropy (nats)": entropy.mean().item(),
             "top-1 digit correct": (classes[..., 0] // 100 == truth[:, None] // 100).double().mean().item(),
             "digit correct on training-like views": plain_digit,
             "top-1 = true class": (classes[..., 0] == truth[:, None]).double().mean().item(),
             "distinct top-10 classes per sample": np.mean([len(np.unique(c)) for c in classes[..., :TOP_K].numpy()])}
    return classes[..., :TOP_K].numpy(), values[..., :TOP_K].numpy().astype(np.float32), entropy.numpy(), stats


# ---------------------------------------------------------------------------------------------- params
def imagenet_sizes(n: int, generator: np.random.Generator) -> np.ndarray:
    common = np.array([[375, 500], [500, 375], [333, 500], [500, 333], [500, 500], [400, 500]])
    sizes = common[generator.integers(len(common), size=n)]
    other = generator.random(n) < 0.3
    sizes[other] = generator.integers(150, 900, (int(other.sum()), 2))
    return sizes


def randaugment_params(generator: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(op, signed magnitude bin) for 2 ops, p=1, magnitude 9, std 0.5, 31 bins (the augment op's sampler)."""
    out = np.zeros(shape + (4,))
    for i in range(2):
        op = generator.integers(RA_OPS, size=shape)
        bins = np.clip(np.rint(9 + 0.5 * generator.standard_normal(shape)), 0, RA_BINS - 1)
        sign = np.where(np.isin(op, list(RA_SIGNED)) & (generator.random(shape) < 0.5), -1, 1)
        out[..., 2 * i] = op
        out[..., 2 * i + 1] = np.where(np.isin(op, list(RA_NO_MAGNITUDE)), 0, bins * sign)
    return out


def erasing_params(generator: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(top, left, height, width) fractions of the output; zeros when not erased (p=0.25, torchvision ranges)."""
    out = np.zeros(shape + (4,))
    erase = generator.random(shape) < 0.25
    for index in zip(*np.nonzero(erase)):
        for _ in range(10):
            area = generator.uniform(0.02, 0.33)
            aspect = math.exp(generator.uniform(math.log(0.3), math.log(3.3)))
            h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if h < 1 and w < 1:
                out[index] = (generator.random() * (1 - h), generator.random() * (1 - w), h, w)
                break
    return out


def configuration(name: str, samples: int, slots: int, block: int, generator: np.random.Generator,
                  prob_scale: int = fmt.DEFAULT_PROB_SCALE):
    """Header, quantized params and ensemble results of one configuration."""
    pipeline = make_pipeline("rrc", 224)
    encodings = fmt.pipeline_param_encodings(pipeline)
    sizes = imagenet_sizes(samples, generator)
    params = np.stack([pipeline.sample_slots(0, i, slots, *sizes[i]) for i in range(samples)])
    if name == "imagenet+":  # RRC + flip + RandAugment(2) + RandomErasing, as format_spec.md encodes them
        encodings += [{"param": f"rand_augment.{p}{i}", "kind": "int", "offset": off, "width": 1}
                      for i in range(2) for p, off in (("op", 0), ("magnitude", -(RA_BINS - 1)))]
        encodings += [{"param": f"random_erasing.{p}", "kind": "linear", "lo": 0.0, "hi": 1.0,
                       "levels": FRACTION_255.levels} for p in ("top", "left", "height", "width")]
        params = np.concatenate([params, randaugment_params(generator, (samples, slots)),
                                 erasing_params(generator, (samples, slots))], -1)
    header = fmt.StoreHeader(num_samples=samples, num_classes=NUM_CLASSES, top_k=TOP_K, num_augmentations=slots,
                             seed=0, block_size=block, augmentation={"size": 224, "ops": [], "preset": name},
                             teachers=[], param_encodings=encodings, prob_scale=prob_scale)
    params = header.layout.params.quantize(params, sizes[:, :1], sizes[:, 1:])
    return header, sizes, params


# ---------------------------------------------------------------------------------------------- layouts
def write_v1(path: Path, header, sizes, params, teacher, vocabulary=None) -> None:
    indices, probs, entropy = teacher
    writer = StoreWriter.create_or_resume(path, header, len(header.param_encodings))
    for block in range(header.num_blocks):
        start, stop = header.block_range(block)
        writer.write_block(block, BlockResult(
            start=start, labels=indices[start:stop, 0, 0] // 100, fingerprints=np.arange(start, stop) + 1,
            image_sizes=sizes[start:stop], aug_params=params[start:stop], topk_indices=indices[start:stop],
            topk_probs=probs[start:stop], teacher_entropy=entropy[start:stop],
            class_vocabulary=None if vocabulary is None else vocabulary[start:stop]))
    writer.finalize()


def derived_variant(header, sizes, preset: str):
    """The same records with ``param_storage = "derived"`` under a real ``preset`` pipeline: its parameters
    are sampled from the keyed RNG as a build samples them (the records' teacher outputs stay as they are), so
    the store verifies on reading; returns (header, params)."""
    pipeline = make_pipeline(preset, header.augmentation["size"])
    derived = dataclasses.replace(header, augmentation=pipeline.config(), param_storage="derived",
                                  param_encodings=fmt.pipeline_param_encodings(pipeline))
    params = np.concatenate([pipeline.sample_block(derived.seed, np.arange(start, stop), derived.num_augmentations,
                                                   sizes[start:stop, 0], sizes[start:stop, 1])
                             for start, stop in map(derived.block_range, range(derived.num_blocks))])
    return derived, pipeline.param_layout.quantize(params, sizes[:, :1], sizes[:, 1:])


def measure_derived(path: Path, header, sizes, teacher, vocabulary, slots_per_image: int) -> None:
    """Write ``header``'s records as an ImageNet+ store with derived parameters, read every record back (each
    block slot's parameters re-derived and checked against its digest) and print its bytes per record."""
    derived, params = derived_variant(header, sizes, "rrc+ra/re")
    write_v1(path, derived, sizes, params, teacher, vocabulary)
    decoded = fmt.read_all_records(fmt.open_store_group(path))
    assert np.array_equal(decoded.indices, teacher[0])
    records = derived.num_samples * derived.num_augmentations
    record_bytes = sum(f.stat().st_size for f in (path / fmt.RECORDS).rglob("c/*/*/*"))
    digests = sum(f.stat().st_size for f in (path / fmt.PARAM_DIGESTS).rglob("c/*/*"))
    per_sample = sum(f.stat().st_size for array in fmt.PER_SAMPLE_ARRAYS + (fmt.CLASS_VOCABULARY,)
                     if (path / array / "c").exists() for f in (path / array / "c").rglob("*") if f.is_file())
    per_sample_share = per_sample / derived.num_samples / slots_per_image
    print(f"\n== imagenet+ with derived parameters (--derived-params), class vocabulary "
          f"{derived.class_vocabulary_size}: {records} records")
    print(f"{'  records as stored':<40}{record_bytes / records:>10.2f}")
    print(f"{'  param_digests (8 bytes per block slot)':<40}{digests / records:>10.2f}")
    print(f"{'  per-sample arrays / A=' + str(slots_per_image):<40}{per_sample_share:>10.2f}")
    print(f"{'  total bytes/record':<40}{(record_bytes + digests) / records + per_sample_share:>10.2f}   "
          "(every record's parameters re-derived and checked on reading)")


def write_reference(root: Path, header, sizes, params, teacher) -> None:
    indices, probs, _ = teacher
    root.mkdir()
    names = [item["param"] for item in header.param_encodings]
    for i in range(header.num_samples):
        records = []
        for j in range(header.num_augmentations):
            p = dict(zip(names, params[i, j].tolist()))
            record = {"rrc": [int(p[f"random_resized_crop.{k}"]) for k in ("top", "left", "height", "width")],
                      "flip": bool(p["horizontal_flip.flip"]),
                      "probs": probs[i, j].astype(np.float64), "idx": indices[i, j].astype(np.int64)}
            if "rand_augment.op0" in p:
                record["ra"] = [(int(p[f"rand_augment.op{k}"]), float(p[f"rand_augment.magnitude{k}"])) for k in (0, 1)]
                box = [p[f"random_erasing.{k}"] for k in ("top", "left", "height", "width")]
                record["re"] = (box[2] > 0, [int(round(v * 224)) for v in box])
            records.append(record)
        (root / f"{i:08d}.pkl").write_bytes(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))


def column_bytes(path: Path, header) -> dict[str, int]:
    """Compressed bytes of each column group of ``records``, compressed alone with the store's codecs."""
    import numcodecs

    group = fmt.open_store_group(path)
    shuffle = {"shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[fmt.record_shuffle(header)]
    blosc = numcodecs.Blosc(cname="zstd", clevel=fmt.ZSTD_LEVEL, shuffle=shuffle)  # as the store
    out = {name: 0 for name in header.layout.columns}
    for block in range(header.num_blocks):
        for slot in range(header.num_augmentations):
            rows = fmt.read_block_slot(group, header, block, slot)
            for name, columns in header.layout.columns.items():
                out[name] += len(blosc.encode(np.ascontiguousarray(rows[:, columns].T))) + 4
    return out


def shuffle_comparison(path: Path, header) -> dict[str, float]:
    """Bytes/record of the whole ``records`` chunks under blosc-zstd with byte shuffle and with bit shuffle,
    same level: the choice of format.record_shuffle."""
    import numcodecs

    group = fmt.open_store_group(path)
    out = {}
    for name, shuffle in (("byte shuffle", numcodecs.Blosc.SHUFFLE), ("bit shuffle", numcodecs.Blosc.BITSHUFFLE)):
        blosc = numcodecs.Blosc(cname="zstd", clevel=fmt.ZSTD_LEVEL, shuffle=shuffle)
        total = sum(len(blosc.encode(np.ascontiguousarray(fmt.read_block_slot(group, header, block, slot).T))) + 4
                    for block in range(header.num_blocks) for slot in range(header.num_augmentations))
        out[name] = total / (header.num_samples * header.num_augmentations)
    return out


def epoch_reads(path: Path, header, epoch: int) -> tuple[int, int, int]:
    """(requests, bytes served, bytes of the chunks used) to read one epoch's records over HTTP."""
    with RangeServer(path.parent) as server:
        group = fmt.open_store_group(f"{server.url}/{path.name}")
        opened = len(server.log)
        slot = rng.slot_for_epoch(header.seed, epoch, 0, header.num_augmentations)
        for block in range(header.num_blocks):
            fmt.read_block_slot(group, header, block, slot)
        log = server.log[opened:]
    used = 0
    for block in range(header.num_blocks):
        shard = (path / fmt.RECORDS / "c" / str(block) / "0" / "0").read_bytes()
        index = np.frombuffer(shard[-(16 * header.num_augmentations + 4):-4], dtype="<u8").reshape(-1, 2)
        used += int(index[slot, 1])
    return len(log), sum(r.bytes for r in log), used


# ---------------------------------------------------------------------------------------------- real teacher
def real_teacher_configurations(store: Path, slots: int, seed: int = 0, prob_scale: int = fmt.DEFAULT_PROB_SCALE):
    """Records of a store built by ``benchmarks/imagenet_teacher.py`` (a real ImageNet ensemble on real
    photos, every record real), laid out as an ImageNet-sized block would hold them.

    A block of an ImageNet store holds thousands of different images, each one slot per chunk; the photo set
    has a few images with many slots each. So the ``A`` slots of each photo are split into ``A / slots``
    pseudo-samples of ``slots`` records, shuffled, and each pseudo-sample's classes are cyclically shifted by
    a random offset (mod C): class ids across a chunk are then as varied as ImageNet's 1000 classes, while the
    offsets between the classes of one record (semantic neighbours) are kept. Each pseudo-sample's class
    vocabulary is its photo's, computed from all ``A`` slots (as a real store's is) and shifted alike.

    Returns ``{name: (header, sizes, params, (indices, probs, entropy), vocabulary)}`` for ``rrc`` (the RRC
    and flip columns) and ``imagenet+`` (all of them), and the photos' full ``(N, A)`` arrays for the
    reference layout, which stores one file per photo.
    """
    group = fmt.open_store_group(store)
    source = fmt.read_header(group)
    decoded = fmt.read_all_records(group, source)
    sizes = fmt.read_array(group, fmt.IMAGE_SIZES).astype(np.int64)
    n, a, k = decoded.indices.shape
    groups = a // slots
    generator = np.random.default_rng(seed)
    order = generator.permutation(n * groups)
    photo = np.repeat(np.arange(n), groups)[order]
    shift = generator.integers(0, source.num_classes, n * groups)

    def pseudo(values: np.ndarray) -> np.ndarray:
        return values[:, :groups * slots].reshape((n * groups, slots) + values.shape[2:])[order]

    indices = (pseudo(decoded.indices) + shift[:, None, None]) % source.num_classes
    fill = source.fill_value
    vocabulary = fmt.class_vocabulary(decoded.indices, fmt.DEFAULT_CLASS_VOCABULARY, fill)[photo]
    vocabulary = np.where(vocabulary == fill, fill, (vocabulary + shift[:, None]) % source.num_classes)
    teacher = (indices, pseudo(decoded.probs), pseudo(decoded.entropy))
    out = {}
    for name, columns in (("rrc", 5), ("imagenet+", len(source.param_encodings))):
        header = fmt.StoreHeader(num_samples=n * groups, num_classes=source.num_classes, top_k=k,
                                 num_augmentations=slots, seed=0, block_size=n * groups,
                                 augmentation={"size": source.augmentation["size"], "ops": [], "preset": name},
                                 teachers=source.teachers, param_encodings=source.param_encodings[:columns],
                                 class_vocabulary_size=fmt.DEFAULT_CLASS_VOCABULARY, prob_scale=prob_scale)
        out[name] = (header, sizes[photo], pseudo(decoded.params[..., :columns]), teacher, vocabulary)
    full = (decoded.indices, decoded.probs, decoded.entropy)
    return out, (source, sizes, decoded.params, full)


def measure_real_teacher(args: argparse.Namespace) -> None:
    store = Path(args.teacher_store)
    configurations, (source, sizes, params, full) = real_teacher_configurations(store, args.pseudo_slots,
                                                                                 prob_scale=args.prob_scale)
    a = source.num_augmentations
    stats = {"mean top-1 prob": full[1][..., 0].mean(), "median top-1 prob": np.median(full[1][..., 0]),
             "mean top-10 mass": full[1].sum(-1).mean(), "mean entropy (nats)": full[2].mean(),
             "distinct top-10 classes per photo": np.mean([len(np.unique(i)) for i in full[0]])}
    print(f"teacher store {store}: {source.num_samples} photos x {a} slots; "
          + ", ".join(f"{key} {value:.3f}" for key, value in stats.items()))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (header, pseudo_sizes, pseudo_params, teacher, vocabulary) in configurations.items():
            for size in (header.class_vocabulary_size, 0):
                variant = dataclasses.replace(header, class_vocabulary_size=size)
                path = Path(tmp) / f"{name}-{size}.zarr"
                write_v1(path, variant, pseudo_sizes, pseudo_params, teacher, vocabulary if size else None)
                decoded = fmt.read_all_records(fmt.open_store_group(path))
                assert np.array_equal(decoded.indices, teacher[0])
                max_error = float(np.abs(decoded.probs.astype(np.float64) - teacher[1]).max())
                records = variant.num_samples * variant.num_augmentations
                record_bytes = sum(f.stat().st_size for f in (path / fmt.RECORDS).rglob("c/*/*/*"))
                per_sample = sum(f.stat().st_size for array in fmt.PER_SAMPLE_ARRAYS + (fmt.CLASS_VOCABULARY,)
                                 if (path / array / "c").exists() for f in (path / array / "c").rglob("*")
                                 if f.is_file())
                # A real store holds one per-sample row per photo for its A records.
                total = record_bytes / records + per_sample / variant.num_samples / a
                print(f"\n== {name}, class vocabulary {size}: {records} records in chunks of {variant.block_size}, "
                      f"{len(variant.param_encodings)} params")
                for column, cost in column_bytes(path, variant).items():
                    print(f"{'    records.' + column + ' (alone)':<40}{cost / records:>10.2f}")
                print(f"{'  records as stored':<40}{record_bytes / records:>10.2f}")
                print(f"{'  per-sample arrays / A=' + str(a):<40}{per_sample / variant.num_samples / a:>10.2f}")
                print(f"{'  total bytes/record':<40}{total:>10.2f}   max probability error {max_error:.2e}")
                print("  records under blosc-zstd: " + ", ".join(
                    f"{key} {value:.2f}" for key, value in shuffle_comparison(path, variant).items()))
            if name == "imagenet+":
                measure_derived(Path(tmp) / f"{name}-derived.zarr", header, pseudo_sizes, teacher, vocabulary, a)
            with tempfile.TemporaryDirectory() as ref:
                reference_header = dataclasses.replace(header, num_samples=source.num_samples, num_augmentations=a)
                write_reference(Path(ref) / "r", reference_header, sizes, params[..., :len(header.param_encodings)],
                                full)
                ref_bytes = store_bytes(Path(ref) / "r")
            print(f"{'  reference pickles (one per photo)':<40}{ref_bytes / (source.num_samples * a):>10.2f}")


# ---------------------------------------------------------------------------------------------- main
def teacher_records(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher top-k, probabilities and entropies; trained here, or loaded from ``--teacher-cache`` if present."""
    cache = Path(args.teacher_cache) if args.teacher_cache else None
    if cache is not None and cache.exists():
        data = np.load(cache)
        print(f"teacher outputs loaded from {cache}")
        return data["indices"], data["probs"], data["entropy"]
    images, digits = digit_images()
    net = train_teacher(images, digits, args.train_steps)
    began = time.perf_counter()
    indices, probs, entropy, stats = teacher_outputs(net, images, digits, args.samples, args.slots)
    print(f"teacher outputs: {args.samples} x {args.slots} records in {time.perf_counter() - began:.1f} s; "
          + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    if cache is not None:
        np.savez(cache, indices=indices, probs=probs, entropy=entropy)
    return indices, probs, entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--teacher-cache", help=".npz to save the teacher outputs to, or to load them from")
    parser.add_argument("--teacher-store", help="a store built by benchmarks/imagenet_teacher.py: measure its real "
                                                "ImageNet-teacher records instead of the digits teacher's")
    parser.add_argument("--prob-scale", type=int, default=fmt.DEFAULT_PROB_SCALE,
                        help="probability quantization Q of the stores measured (as reinforce build --prob-scale)")
    parser.add_argument("--pseudo-slots", type=int, default=2,
                        help="with --teacher-store: slots per pseudo-sample (see real_teacher_configurations)")
    args = parser.parse_args()
    if args.teacher_store:
        measure_real_teacher(args)
        return
    torch.set_num_threads(2)
    indices, probs, entropy = teacher_records(args)
    records = args.samples * args.slots
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("rrc", "imagenet+"):
            generator = np.random.default_rng(2)
            header, sizes, params = configuration(name, args.samples, args.slots, args.block_size, generator,
                                                  args.prob_scale)
            teacher = (indices, probs, entropy)
            store, reference = Path(tmp) / f"{name}.zarr", Path(tmp) / f"{name}-ref"
            write_v1(store, header, sizes, params, teacher)
            write_reference(reference, header, sizes, params, teacher)
            v1_total, ref_total = store_bytes(store), store_bytes(reference)
            group = fmt.open_store_group(store)
            decoded = fmt.decode_records(header, np.asarray(group[fmt.RECORDS][:]), sizes[:, :1],
                                         sizes[:, 1:])
            assert np.array_equal(decoded.indices, indices)
            max_error = float(np.abs(decoded.probs.astype(np.float64) - probs).max())
            print(f"\n== {name}: {args.samples} samples x {args.slots} slots, {NUM_CLASSES} classes, top-{TOP_K}, "
                  f"{len(header.param_encodings)} params in {header.layout.params.columns} columns, "
                  f"block {args.block_size}")
            print(f"{'array / column group':<34}{'bytes':>12}{'bytes/record':>14}")
            for array in fmt.ALL_ARRAYS:
                size = sum(f.stat().st_size for f in (store / array).rglob("*") if f.is_file())
                print(f"{'  ' + array:<34}{size:>12,}{size / records:>14.2f}")
            for column, size in column_bytes(store, header).items():
                print(f"{'    records.' + column + ' (alone)':<34}{size:>12,}{size / records:>14.2f}")
            print(f"{'v1 store total':<34}{v1_total:>12,}{v1_total / records:>14.2f}")
            print(f"{'reference pickles total':<34}{ref_total:>12,}{ref_total / records:>14.2f}   "
                  f"ratio {ref_total / v1_total:.1f}x")
            print(f"indices exact: yes; max probability error {max_error:.2e}")
            with_vocabulary = dataclasses.replace(header, class_vocabulary_size=32)
            write_v1(Path(tmp) / f"{name}-v.zarr", with_vocabulary, sizes, params, teacher)
            print(f"with a class vocabulary of 32 (vocabulary from the {args.slots} slots of each sample): "
                  f"{store_bytes(Path(tmp) / f'{name}-v.zarr') / records:.2f} bytes/record in all, indices alone "
                  f"{column_bytes(Path(tmp) / f'{name}-v.zarr', with_vocabulary)['topk_indices'] / records:.2f}")
            if name == "imagenet+":
                measure_derived(Path(tmp) / f"{name}-derived.zarr", with_vocabulary, sizes, teacher, None,
                                args.slots)
            requests, served, used = epoch_reads(store, header, epoch=3)
            records_bytes = sum(f.stat().st_size for f in (store / fmt.RECORDS).rglob("c/*/*/*"))
            print(f"epoch read (HTTP): {requests} requests, {served:,} bytes served for {used:,} bytes of chunks "
                  f"used: amplification {served / used:.3f}x incl. shard indexes ({records_bytes / args.slots:,.0f} "
                  f"bytes = records/A); reference reads {ref_total:,} bytes "
                  f"({ref_total / served:.0f}x more) in {args.samples} files")
        for block in (1024, 4096):
            big = fmt.StoreHeader(num_samples=IMAGENET_IMAGES, num_classes=NUM_CLASSES, top_k=TOP_K,
                                  num_augmentations=IMAGENET_SLOTS, seed=0, block_size=block,
                                  augmentation={"size": 224, "ops": []}, teachers=[], param_encodings=[],
                                  class_vocabulary_size=fmt.default_class_vocabulary_size(
                                      NUM_CLASSES, IMAGENET_SLOTS, TOP_K))
            index_per_epoch = big.num_blocks * (16 * IMAGENET_SLOTS + 4)
            print(f"ImageNet size ({IMAGENET_IMAGES:,} images, A={IMAGENET_SLOTS}, block {block}): "
                  f"{fmt.expected_file_count(big):,} files; shard-index bytes read per epoch {index_per_epoch:,}; "
                  f"reference layout: {IMAGENET_IMAGES:,} files")


if __name__ == "__main__":
    main()
