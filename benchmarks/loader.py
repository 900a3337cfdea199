"""Student loader benchmark: ReinforcedDataset against plain torchvision training loading, side by side.

In one run, on JPEGs (quality 90) cut from the real photos scikit-image and scikit-learn ship, at ImageNet-like
size (500 x 375 or 375 x 500) and larger (1000 x 750):

* throughput through a DataLoader (same workers, batch size and output for all, persistent workers, a
  ``set_epoch`` per epoch, median of interleaved epochs): torchvision ``ImageFolder`` + ``RandomResizedCrop(224)``
  + flip, against ``ReinforcedDataset`` (``rrc`` store) with ``decode="exact"`` and ``decode="fast"``, and
  the ``rrc+mix`` preset against ``rrc`` (time per sample), also with ``ReinforcedSampler(pair_partners=True)``;
* batched replay (``__getitems__``) against one sample at a time, in one process;
* the pixel difference of ``decode="fast"`` from the exact replay, and the decoders alone on these files;
* ``decode="gpu"`` on ``--device`` (JPEGs decoded and the replay run there): its pixel difference from the exact
  replay and its ms/sample on the device;
* the ops after the crop (flip, RandAugment, erasing, mixing) replayed batched from ``output="crops"`` on the CPU
  and on ``--device`` (a GPU when one is lent), decoding excluded;
* memory: the epoch table and per-sample arrays computed at ImageNet size, and per-worker memory measured here.

Usage: ``nice -n 10 python benchmarks/loader.py [--images 128] [--large-images 64] [--workers 2] [--repeats 5]``
(needs scikit-image: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reinforce_loaders import (Crop, ReinforcedDataset, ReinforcedSampler, make_pipeline, replay_crops, replay_encoded,
                               soft_target_collate)
from reinforce_loaders import format as fmt
from reinforce_loaders import jpeg as fast_jpeg
from reinforce_loaders.source import reduced_scale

OUTPUT = 224
IMAGENET_SAMPLES = 1_281_167


def photos() -> list[np.ndarray]:
    """The colour photos bundled with scikit-image and scikit-learn (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                                              "retina")]
    return out + list(data.stereo_motorcycle()[:2]) + list(load_sample_images().images)


def make_jpegs(root: Path, count: int, side: int, seed: int = 0) -> Path:
    """``count`` JPEGs of ``side`` x ``3/4 side`` (a quarter portrait), random crops of the photos, 4 classes."""
    generator = np.random.default_rng(seed)
    sources = [Image.fromarray(photo) for photo in photos()]
    for i in range(count):
        photo = sources[i % len(sources)]
        width, height = (side, side * 3 // 4) if generator.random() < 0.75 else (side * 3 // 4, side)
        crop_w = int(min(photo.width, photo.height * width / height) * generator.uniform(0.6, 1.0))
        crop_h = int(crop_w * height / width)
        left = int(generator.integers(0, photo.width - crop_w + 1))
        top = int(generator.integers(0, photo.height - crop_h + 1))
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.LANCZOS)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def build(source: Path, out: Path, preset: str, teacher: str) -> Path:
    from reinforce.build import BuildConfig, run_build

    run_build(BuildConfig(source=str(source), out=str(out), teachers=[teacher], augment=preset, image_size=OUTPUT,
                          num_augmentations=4, top_k=3, batch_size=64, block_size=64), progress=False)
    return out


def random_teacher(root: Path) -> str:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = root / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(weights),
              metadata={"input_size": json.dumps(32)})
    return f"test_resnet={weights}"


def torchvision_baseline(source: Path, dtype: torch.dtype = torch.float32):
    """ImageFolder + RandomResizedCrop + flip, returning float32 in [0, 1] or (``torch.uint8``) uint8."""
    from torchvision import datasets
    from torchvision.transforms import v2

    return datasets.ImageFolder(str(source), transform=v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(OUTPUT, antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(dtype, scale=True)]))


class ConstantImages(torch.utils.data.Dataset):
    """``count`` copies of one ``3 x 224 x 224`` image: what the DataLoader itself costs per sample (workers
    handing batches to the main process), a floor under every other row."""

    def __init__(self, count: int, dtype: torch.dtype) -> None:
        self.count = count
        self.image = torch.zeros((3, OUTPUT, OUTPUT), dtype=dtype)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image.clone(), 0


def loader_epochs(datasets: dict[str, object], workers: int, batch_size: int, repeats: int,
                  samplers: dict[str, ReinforcedSampler] | None = None) -> dict[str, dict[str, float]]:
    """Per dataset through a DataLoader, medians over epochs interleaved across datasets: wall seconds per sample
    and CPU seconds per sample of the loading processes (workers and main), which other jobs on a shared
    machine disturb far less than wall time."""
    samplers = samplers or {}
    loaders = {name: torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                                 persistent_workers=workers > 0, sampler=samplers.get(name),
                                                 shuffle=None if name in samplers else True,
                                                 generator=torch.Generator().manual_seed(0))
               for name, ds in datasets.items()}
    measured: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in datasets}
    for epoch in range(repeats + 1):  # epoch 0 starts workers, warms the page cache, checks fingerprints
        for name, loader in loaders.items():
            dataset = datasets[name]
            if name in samplers:
                samplers[name].set_epoch(epoch)  # also the dataset's epoch
            elif hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            pids = [worker.pid for worker in loader._iterator._workers] if epoch else []
            cpu, began = cpu_seconds(pids), time.perf_counter()
            for _ in loader:
                pass
            if epoch:
                measured[name]["wall"].append((time.perf_counter() - began) / len(dataset))
                measured[name]["cpu"].append((cpu_seconds(pids) - cpu) / len(dataset))
    return {name: {key: statistics.median(values) for key, values in times.items()}
            for name, times in measured.items()}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process and of ``pids`` (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def batched_vs_single(ds: ReinforcedDataset, batch_size: int, repeats: int) -> tuple[float, float]:
    """Median CPU seconds per sample of ``__getitems__`` batches and of ``ds[i]`` one at a time."""
    positions = list(range(len(ds)))

    def single() -> None:
        for position in positions:
            ds[position]

    def batched() -> None:
        for first in range(0, len(positions), batch_size):
            ds.__getitems__(positions[first:first + batch_size])

    times: dict[str, list[float]] = {"single": [], "batched": []}
    batched()  # warm-up: records read, fingerprints checked
    for _ in range(repeats):
        for name, run in (("single", single), ("batched", batched)):
            began = time.process_time()
            run()
            times[name].append((time.process_time() - began) / len(positions))
    return statistics.median(times["batched"]), statistics.median(times["single"])


def fast_difference(source: Path, store: Path, epochs: int = 2, size: int = OUTPUT) -> dict[str, float]:
    """Mean and max |fast - exact| (uint8 levels) over records, and the share of records decoded reduced."""
    exact, fast = (ReinforcedDataset(source, store, transform=torch.nn.Identity(), decode=mode)
                   for mode in ("exact", "fast"))
    means, maxima, scales, reduced = [], [], [], 0
    for epoch in range(epochs):
        exact.set_epoch(epoch)
        fast.set_epoch(epoch)
        for index in range(len(exact)):
            difference = (exact[index][0].float() - fast[index][0].float()).abs()
            means.append(difference.mean().item())
            maxima.append(difference.max().item())
            scales.append(reduced_scale(exact.record(index, exact.slot(index))[0][:4], size))
            reduced += scales[-1] > 1
    return {"records": len(means), "reduced": reduced / len(means), "mean_abs": float(np.mean(means)),
            "mean_abs_reduced": float(np.mean([m for m, r in zip(means, scales) if r > 1] or [0])),
            "max_abs": max(maxima)}


def gpu_decode_difference(source: Path, store: Path, device: str, batch_size: int) -> dict[str, float]:
    """``decode="gpu"`` on ``device`` (nvjpeg on CUDA, torchvision's libjpeg-turbo on the CPU) against the exact
    replay: mean and max |d| (uint8 levels) over one epoch's records, and the device's ms/sample to decode and
    replay a batch (wall time, synchronized; the workers' reading excluded)."""
    exact = ReinforcedDataset(source, store, transform=torch.nn.Identity())
    on_device = ReinforcedDataset(source, store, decode="gpu")
    positions = list(range(len(exact)))
    batches = [soft_target_collate(on_device.__getitems__(positions[first:first + batch_size]))[0]
               for first in range(0, len(positions), batch_size)]

    def replay() -> list[torch.Tensor]:
        out = [replay_encoded(on_device.pipeline, batch, device) for batch in batches]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    replay()  # warm-up (nvjpeg's handles, kernels)
    began = time.perf_counter()
    replayed = torch.cat(replay()).cpu().float()
    seconds = time.perf_counter() - began
    want = torch.stack([exact[p][0] for p in positions]).float()
    difference = (replayed - want).abs()
    return {"mean |d|": difference.mean().item(), "max |d|": difference.max().item(),
            f"{device} ms/sample": 1e3 * seconds / len(positions)}


def device_replay(source: Path, store: Path, device: str, batch_size: int, repeats: int) -> dict[str, float]:
    """ms/sample of replaying the ops after the crop (``output="crops"`` + ``replay_crops``) on the CPU and on
    ``device``, decoding excluded, and the largest pixel difference between the two."""
    dataset = ReinforcedDataset(source, store, output="crops")
    positions = list(range(len(dataset)))
    batches = [soft_target_collate(dataset.__getitems__(positions[first:first + batch_size]))[0]
               for first in range(0, len(positions), batch_size)]
    if device.startswith("cuda"):
        batches = [Crop(*(part.pin_memory() for part in batch)) for batch in batches]

    def replay(on: str) -> list[torch.Tensor]:
        out = [replay_crops(dataset.pipeline, batch, on) for batch in batches]
        if on.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    difference = max((a.cpu().float() - b.float()).abs().max().item() for a, b in zip(replay(device), replay("cpu")))
    times: dict[str, list[float]] = {"cpu": [], device: []}
    for _ in range(repeats):
        for on in times:  # CPU seconds on the CPU (steadier on a shared machine), wall time on a device
            clock = time.process_time if on == "cpu" else time.perf_counter
            began = clock()
            replay(on)
            times[on].append((clock() - began) / len(positions))
    return {**{f"{on} ms/sample": 1e3 * statistics.median(values) for on, values in times.items()},
            "max |d|": difference}


def decoder_costs(source: Path, repeats: int = 3) -> dict[str, float]:
    """Median CPU us per image of decoding every JPEG of ``source`` to RGB uint8, one decoder at a time:
    torchvision, Pillow (decode + RGB + tensor), simplejpeg at full scale (libjpeg's defaults, then plain
    upsampling) and at the reduced scales; file reading excluded."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2.functional import pil_to_tensor

    files = [path.read_bytes() for path in sorted(source.rglob("*.jpg"))]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    decoders = {"torchvision": lambda i: decode_jpeg(tensors[i]),
                "pillow": lambda i: pil_to_tensor(Image.open(io.BytesIO(files[i])).convert("RGB"))}
    if fast_jpeg.available():
        headers = [fast_jpeg.read_header(data) for data in files]
        decoders["simplejpeg"] = lambda i: fast_jpeg.decode_exact(files[i])
        for scale in (1, 2, 4, 8):
            decoders[f"simplejpeg 1/{scale}, plain upsampling"] = (
                lambda i, scale=scale: fast_jpeg.decode_scaled(files[i], headers[i], scale))
    costs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's decoders are moving to TorchCodec
        for name, decode in decoders.items():
            times = []
            for _ in range(repeats):
                began = time.process_time()
                for index in range(len(files)):
                    decode(index)
                times.append((time.process_time() - began) / len(files))
            costs[name] = 1e6 * statistics.median(times)
    return costs


def imagenet_memory(num_samples: int = IMAGENET_SAMPLES, num_augmentations: int = 400) -> dict[str, float]:
    """Bytes of the shared epoch table and of the per-sample arrays for an ImageNet+ store (rrc+ra/re, top-10,
    1000 classes, class vocabulary 32)."""
    pipeline = make_pipeline("rrc+ra/re", OUTPUT)
    header = fmt.StoreHeader(num_samples=num_samples, num_classes=1000, top_k=10,
                             num_augmentations=num_augmentations, seed=0, block_size=4096,
                             augmentation=pipeline.config(), teachers=[],
                             param_encodings=fmt.pipeline_param_encodings(pipeline), class_vocabulary_size=32)
    row = header.layout.width * header.dtype.itemsize
    per_sample = {"labels": 4, "image_sizes (int64 in memory)": 16, "fingerprints": 8,
                  "class vocabulary": header.class_vocabulary_size * header.dtype.itemsize,
                  "fingerprint-checked flags": 1}
    # ImageFolder's path list: Python strings, copied page by page into each worker as reference counts touch them.
    path = sys.getsizeof("/data/imagenet/train/n01440764/n01440764_10026.JPEG") + 8
    return {"record_width": header.layout.width, "row_bytes": row, "epoch_table": num_samples * row,
            **{name: num_samples * size for name, size in per_sample.items()},
            "source path list (52-char paths)": num_samples * path}


def worker_memory(ds: ReinforcedDataset, workers: int, batch_size: int) -> list[dict[str, int]]:
    """Per DataLoader worker, from /proc/PID/smaps_rollup after one epoch: Rss, Pss, shared and private bytes."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, persistent_workers=True)
    iterator = iter(loader)
    for _ in iterator:
        pass
    out = []
    for worker in iterator._workers:  # the live worker processes of this iterator
        fields = {}
        for line in Path(f"/proc/{worker.pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) * 1024
        out.append({"rss": fields["Rss"], "pss": fields["Pss"],
                    "shared": fields["Shared_Clean"] + fields["Shared_Dirty"],
                    "private": fields["Private_Clean"] + fields["Private_Dirty"]})
    del iterator, loader
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="ImageNet-size JPEGs (0 skips)")
    parser.add_argument("--large-images", type=int, default=64, help="1000 x 750 JPEGs (0 skips)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--device", default="cpu", help="device of the after-the-crop replay (e.g. cuda)")
    parser.add_argument("--root", help="working directory (default: a new temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root or tempfile.mkdtemp(prefix="loader-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.workers} DataLoader "
          f"workers, batch {args.batch_size}, output {OUTPUT}, median of {args.repeats} epochs; work dir {root}")
    teacher = random_teacher(root)
    for label, count, side in (("imagenet-size", args.images, 500), ("large", args.large_images, 1000)):
        if not count:
            continue
        source = make_jpegs(root / f"{label}-data", count, side)
        presets = ("rrc", "rrc+mix", "rrc+m*+r*") if label == "imagenet-size" else ("rrc", "rrc+mix")
        stores = {preset: build(source, root / f"{label}-{preset.replace('+', '_').replace('*', 'x')}.zarr",
                                preset, teacher) for preset in presets}
        torch.set_num_threads(args.threads)  # the build sets its own; idle spinning threads would count as CPU time
        datasets = {"torchvision rrc": torchvision_baseline(source),
                    "exact rrc": ReinforcedDataset(source, stores["rrc"]),
                    "fast rrc": ReinforcedDataset(source, stores["rrc"], decode="fast"),
                    "exact rrc+mix": ReinforcedDataset(source, stores["rrc+mix"]),
                    "fast rrc+mix": ReinforcedDataset(source, stores["rrc+mix"], decode="fast"),
                    "exact rrc+mix paired": ReinforcedDataset(source, stores["rrc+mix"]),
                    # uint8 out of the workers, as soft_target_collate + to_device use it (and timm's loader):
                    "torchvision rrc uint8": torchvision_baseline(source, torch.uint8),
                    "exact rrc uint8": ReinforcedDataset(source, stores["rrc"], transform=torch.nn.Identity()),
                    "fast rrc uint8": ReinforcedDataset(source, stores["rrc"], decode="fast",
                                                        transform=torch.nn.Identity()),
                    "DataLoader only": ConstantImages(count, torch.float32),
                    "DataLoader only uint8": ConstantImages(count, torch.uint8)}
        paired = ReinforcedSampler(datasets["exact rrc+mix paired"], seed=0, pair_partners=True)
        per_sample = loader_epochs(datasets, args.workers, args.batch_size, args.repeats,
                                   {"exact rrc+mix paired": paired})
        print(f"\n## {label}: {count} JPEGs of {side} x {side * 3 // 4}, DataLoader; fast decoder: "
              + ("libjpeg-turbo (simplejpeg)" if fast_jpeg.available() else "Pillow draft (simplejpeg not installed)"))
        print(f"{'loader':21s} {'samples/s':>10s} {'vs torchvision':>15s} {'CPU ms/sample':>14s} "
              f"{'vs torchvision':>15s} {'mix/rrc CPU time':>17s}")
        for name, seconds in per_sample.items():
            base = per_sample["torchvision rrc uint8" if name.endswith("uint8") else "torchvision rrc"]
            same = per_sample.get(name.split("+mix")[0]) if "+mix" in name else None
            versus = f"{seconds['cpu'] / same['cpu']:.2f}x" if same else ""
            print(f"{name:21s} {1 / seconds['wall']:10.1f} {base['wall'] / seconds['wall']:14.2f}x "
                  f"{1e3 * seconds['cpu']:14.3f} {base['cpu'] / seconds['cpu']:14.2f}x {versus:>17s}")
        print("in-process CPU ms/sample   batched (__getitems__)   one at a time")
        for name in ("exact rrc", "fast rrc", "exact rrc+mix"):
            batched, single = batched_vs_single(datasets[name], args.batch_size, max(2, args.repeats // 2))
            print(f"{name:24s} {1e3 * batched:12.3f} {1e3 * single:18.3f}   ({single / batched:.2f}x)")
        print("decoders alone, CPU us/image: " + ", ".join(f"{name} {value:.0f}"
                                                          for name, value in decoder_costs(source).items()))
        difference = fast_difference(source, stores["rrc"])
        print(f"fast vs exact: {difference['reduced']:.0%} of {difference['records']} records decoded reduced "
              f"(1/2 scale or less); "
              f"mean |d| {difference['mean_abs']:.3f} levels over all records, {difference['mean_abs_reduced']:.3f} "
              f"over the reduced ones; max |d| {difference['max_abs']:.0f}")
        if label == "imagenet-size":
            gpu = gpu_decode_difference(source, stores["rrc"], args.device, args.batch_size)
            print(f"decode='gpu' on {args.device} vs exact (rrc): " + ", ".join(f"{key} {value:.3f}"
                                                                           for key, value in gpu.items()))
            replayed = device_replay(source, stores["rrc+m*+r*"], args.device, args.batch_size, args.repeats)
            print("rrc+m*+r* ops after the crop, batched, decoding excluded: "
                  + ", ".join(f"{key} {value:.3f}" for key, value in replayed.items()))
            measured = worker_memory(datasets["exact rrc"], args.workers, args.batch_size)
            table = len(datasets["exact rrc"]) * datasets["exact rrc"]._table.rows.shape[1]
            for rank, fields in enumerate(measured):
                print(f"worker {rank}: " + ", ".join(f"{key} {value / 2**20:.1f} MiB" for key, value in fields.items())
                      + f" (epoch table here: {table} bytes)")
    print("\n## memory at ImageNet size (1,281,167 samples, A = 400, ImageNet+ store), computed")
    for name, value in imagenet_memory().items():
        print(f"{name:32s} {value / 2**20:10.1f} MiB" if value > 1000 else f"{name:32s} {value:10d}")


if __name__ == "__main__":
    main()
