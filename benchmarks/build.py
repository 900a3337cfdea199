"""Benchmark of ``reinforce build``: is it bound by the teachers, and how does it compare to the reference style?

In one run, on the same images, teachers (timm architectures with random weights: weights don't change speed)
and records:

(a) the full pipeline: ``run_build`` in this process (decode, batched augmentation, teachers, top-k, store);
(b) the ensemble's forward alone, on ready device tensors of exactly the micro-batches (a) runs;
(c) a baseline in the style of the reference generator: per-image CPU augmentation of every slot with
    torchvision transforms on PIL images (a DataLoader), an fp32 contiguous teacher, one file per sample.

(a0) the same pipeline with every step in series (``MICRO_BATCHES_AHEAD = 0``: a micro-batch is augmented only
    once the teachers are done with the previous one, each top-k waited for at once, each block written before
    the teachers go on): the baseline of the overlap.

It prints images/s of each (median of ``--repeats``), the ratio a/b (1.0: data handling fully hidden behind the
teachers), a0/b and a/c. Source images are JPEG crops of scikit-learn's two sample photos, at varied sizes.

``--simulate-device`` measures the overlap on any machine, without a GPU: the teacher is one member that sleeps a
fixed time per micro-batch (the CPU stays free, as it does while a GPU runs kernels) and returns logits of the
images' first pixel. Each repeat first measures the host work per micro-batch H (the serial pipeline with a
teacher that does not sleep), sets the simulated device time to H (or ``--device-ms``), then measures b, a and
a0: with perfect overlap a/b = 1 and a0/b = 0.5. Torch runs 1 thread, as a GPU build does by default. It also
prints the pipeline's fill (from the build's start to the first teacher call: store opened, first block
decoded, first micro-batch augmented; paid once per build) and a/b from the first to the last teacher call,
the ratio a long build sees.

CPU (2 cores):  python benchmarks/build.py
Overlap:        python benchmarks/build.py --simulate-device
Compilation:    python benchmarks/build.py --device cuda --models resnet50 --image-size 224 --num-images 512 \\
                    -A 8 --batch-size 256 --compare-compile
GPU example:    python benchmarks/build.py --device cuda --models resnet50,resnet50,resnet50,resnet50 \\
                    --image-size 224 --num-images 2048 -A 8 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import reinforce.build.blocks
from reinforce.build import BuildConfig, make_processor, resolve_plan, run_build
from reinforce.build.plan import resolve_precision
from reinforce.build.teachers import Ensemble, TeacherMember, create_ensemble


class SimulatedDevice(TeacherMember):
    """A teacher member standing in for a GPU: its forward sleeps ``seconds`` (leaving the CPU free, as a GPU
    kernel does) and returns probabilities from one pixel of each image, so its records are real and its CPU cost
    is next to nothing (a real member would normalize the whole batch on the CPU first)."""

    seconds: float = 0.0

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.softmax(self.module(images[:, :, 0, 0].float()), dim=-1)


def simulated_device(num_classes: int = 1000) -> SimulatedDevice:
    torch.manual_seed(0)
    return SimulatedDevice("simulated-device", torch.nn.Linear(3, num_classes), input_size=112,
                           num_classes=num_classes)


def make_images(root: Path, count: int, seed: int) -> Path:
    """``count`` JPEGs (random crops of the sample photos, 200-427 px per side) in an ImageFolder of 2 classes."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = int(rng.integers(200, 428)), int(rng.integers(200, 428))
        top, left = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top:top + h, left:left + w]).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def make_teachers(root: Path, models: list[str], size: int) -> list[str]:
    import timm

    specs = []
    for number, arch in enumerate(models):
        torch.manual_seed(number)
        path = root / f"{number}_{arch}.safetensors"
        save_file(timm.create_model(arch, num_classes=1000).state_dict(), str(path),
                  metadata={"input_size": json.dumps(size)})
        specs.append(f"{arch}={path}")
    return specs


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_pipeline(config: BuildConfig, ensemble: Ensemble, *, serial: bool = False,
                 calls: list[float] | None = None) -> tuple[float, float]:
    """(a): images/s of a fresh build, timed by the build itself (teachers loaded before the clock starts), and
    images/s of the ensemble's forward passes inside that very build (their summed time). ``serial``: (a0),
    every step in series. ``calls`` (optional) receives the time ``run_build`` was called, then the host time
    each forward call began."""
    shutil.rmtree(config.out, ignore_errors=True)
    ahead = reinforce.build.blocks.MICRO_BATCHES_AHEAD
    if serial:
        reinforce.build.blocks.MICRO_BATCHES_AHEAD = 0
    forward = ensemble.probs
    spent = [0.0]
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed(images_by_size):
        if config.device.startswith("cuda"):  # timed on the stream: a host sync here would undo the overlap
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
            probs = forward(images_by_size)
            ended.record()
            events.append((began, ended))
            return probs
        began = time.perf_counter()
        if calls is not None:
            calls.append(began)
        probs = forward(images_by_size)
        spent[0] += time.perf_counter() - began
        return probs

    ensemble.probs = timed
    if calls is not None:
        calls.append(time.perf_counter())
    try:
        summary = run_build(config, ensemble=ensemble, progress=False)
    finally:
        del ensemble.probs
        reinforce.build.blocks.MICRO_BATCHES_AHEAD = ahead
    synchronize(config.device)
    spent[0] += sum(began.elapsed_time(ended) for began, ended in events) / 1000
    return summary.images_per_second, summary.images / spent[0]


def ready_micro_batches(config: BuildConfig, ensemble: Ensemble, num_images: int) -> list[dict[int, torch.Tensor]]:
    """The very micro-batches of (a), augmented and already on the device (by input size)."""
    from reinforce.build.plan import open_build_source

    config.validate()
    source = open_build_source(config)
    processor = make_processor(resolve_plan(config, source, ensemble), ensemble, source)
    batches = []
    for start in range(0, num_images, config.block_size):
        loaded = processor.load(start, min(start + config.block_size, num_images))
        n, a, params = len(loaded.images), config.num_augmentations, loaded.params
        images = [im.to(processor.device) for im in loaded.images]
        rows, cols = np.divmod(np.arange(n * a), a)
        for first in range(0, n * a, config.batch_size):
            r, c = rows[first:first + config.batch_size], cols[first:first + config.batch_size]
            by_size = {size: processor.pipeline.apply_batch([images[i] for i in r], params[r, c], size)
                       .contiguous(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
                       for size in ensemble.input_sizes}
            batches.append(by_size)
    processor.close()
    return batches


def forward_over(config: BuildConfig, ensemble: Ensemble, batches: list[dict[int, torch.Tensor]],
                 num_images: int, outputs: list[torch.Tensor] | None = None) -> float:
    """Images/s of the ensemble alone over ``batches`` (autocast as the build runs it), with the device work the
    build does after it on each micro-batch (entropy, top-k: device kernels on a GPU, CPU time on the simulated
    device, where leaving them out would charge them to the host); ``outputs`` collects each micro-batch's
    top-5 classes and probabilities (on the host) when given."""
    from reinforce.build.blocks import top_k_stable

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(config))
    synchronize(config.device)
    began = time.perf_counter()
    with torch.inference_mode(), torch.autocast(torch.device(config.device).type, dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):
        for by_size in batches:
            probs = ensemble.probs(by_size).float()
            torch.special.entr(probs).sum(-1)
            values, classes = top_k_stable(probs, max(config.top_k, 5))
            if outputs is not None:
                outputs.append(torch.cat([classes[:, :5].float(), values[:, :5]], dim=-1).cpu())
    synchronize(config.device)
    return num_images / (time.perf_counter() - began)


def prepare_forward_only(config: BuildConfig, ensemble: Ensemble, num_images: int):
    """(b): a function timing the ensemble alone on the very micro-batches of (a), already on the device."""
    batches = ready_micro_batches(config, ensemble, num_images)
    forward_over(config, ensemble, batches, num_images)  # warm-up
    return lambda: forward_over(config, ensemble, batches, num_images)


def compare_compile(config: BuildConfig, teachers: list[str], num_images: int, repeats: int) -> None:
    """``--compare-compile``: the ensemble's forward alone, eager vs ``torch.compile`` vs ``torch.compile(mode=
    "reduce-overhead")`` (CUDA graphs on a GPU), on the same micro-batches; the speed of each against eager, and
    whether its top-5 classes and probabilities are bitwise eager's."""
    from reinforce.build.blocks import prepare_ensemble

    modes = {"eager": None, "compile": "default", "compile+cudagraphs": "reduce-overhead"}
    device = torch.device(config.device)
    batches = ready_micro_batches(config, create_ensemble(teachers), num_images)
    rates, tops = {}, {}
    for name, mode in modes.items():
        ensemble = prepare_ensemble(create_ensemble(teachers), device, channels_last=config.channels_last,
                                    compile=False)
        if mode is not None:
            for member in ensemble.members:
                member.module = torch.compile(member.module, mode=mode)
        tops[name] = []
        forward_over(config, ensemble, batches, num_images, tops[name])  # compiles, and the outputs to compare
        rates[name] = [forward_over(config, ensemble, batches, num_images) for _ in range(repeats)]
    eager = statistics.median(rates["eager"])
    for name, runs in rates.items():
        same = all(torch.equal(x, y) for x, y in zip(tops[name], tops["eager"], strict=True))
        print(f"{name:20s} {statistics.median(runs):9.1f} images/s  x{statistics.median(runs) / eager:.2f} of eager  "
              f"top-5 {'bitwise equal to' if same else 'DIFFERS from'} eager's  runs {[round(r, 1) for r in runs]}")


class ReferenceStyleDataset(torch.utils.data.Dataset):
    """Per image: decode, then augment each of the A slots on the CPU with torchvision, recording parameters."""

    def __init__(self, paths: list[str], num_augmentations: int, size: int, mean, std) -> None:
        self.paths, self.a, self.size, self.mean, self.std = paths, num_augmentations, size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from torchvision import transforms as T
        from torchvision.transforms import functional as F

        image = Image.open(self.paths[index]).convert("RGB")
        tensors, params = [], []
        for _ in range(self.a):
            top, left, h, w = T.RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(()) < 0.5)
            slot = F.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
            if flip:
                slot = F.hflip(slot)
            tensors.append(F.normalize(F.to_tensor(slot), self.mean, self.std))
            params.append([top, left, h, w, float(flip)])
        return torch.stack(tensors), torch.tensor(params), index


def run_reference_style(paths: list[str], teachers: list[str], out: Path, *, num_augmentations: int, size: int,
                        batch_size: int, top_k: int, device: str, workers: int) -> float:
    """(c): images/s of the reference-style generator (fp32 teachers, one .npz per sample)."""
    ensemble = create_ensemble(teachers).to(device)
    first = ensemble.members[0]
    dataset = ReferenceStyleDataset(paths, num_augmentations, size, first.mean, first.std)
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(batch_size // num_augmentations, 1),
                                         num_workers=workers)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    synchronize(device)
    began = time.perf_counter()
    with torch.inference_mode():
        for images, params, indices in loader:
            x = images.flatten(0, 1).to(device)
            probs = sum(torch.softmax(m.module(x).float(), dim=-1) for m in ensemble.members) / len(ensemble.members)
            values, classes = torch.topk(probs, top_k, dim=-1)
            values = values.view(len(indices), num_augmentations, top_k).cpu().numpy()
            classes = classes.view(len(indices), num_augmentations, top_k).cpu().numpy()
            for row, index in enumerate(indices.tolist()):
                np.savez(out / f"{index:08d}.npz", params=params[row].numpy(), probs=values[row],
                         classes=classes[row])
    synchronize(device)
    return len(paths) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet18", help="comma-separated timm architectures")
    parser.add_argument("--image-size", type=int, default=112, help="augmented and teacher input side")
    parser.add_argument("--num-images", type=int, help="default 64; 2048 with --simulate-device")
    parser.add_argument("--num-augmentations", "-A", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compare-compile", action="store_true",
                        help="only the forward: eager vs torch.compile vs CUDA graphs (reduce-overhead), same batches")
    parser.add_argument("--cpu-threads", type=int,
                        help="torch threads (default: the build's; 1 with --simulate-device, as on a GPU)")
    parser.add_argument("--baseline-workers", type=int, default=0, help="DataLoader workers of the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--simulate-device", action="store_true",
                        help="the teacher sleeps a fixed time per micro-batch instead of computing (see above)")
    parser.add_argument("--device-ms", type=float,
                        help="with --simulate-device: milliseconds per micro-batch (default: the measured host work)")
    parser.add_argument("--workdir", help="keep images, teachers and stores here (default: a temporary dir)")
    args = parser.parse_args()
    args.num_images = args.num_images or (2048 if args.simulate_device else 64)

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.workdir or temporary)
        root.mkdir(parents=True, exist_ok=True)
        source = make_images(root / "images", args.num_images, seed=0)
        if args.simulate_device:
            simulate(args, source, root)
            return
        paths = sorted(str(p) for p in source.rglob("*.jpg"))
        teachers = make_teachers(root, args.models.split(","), args.image_size)
        config = BuildConfig(source=str(source), out=str(root / "store.zarr"), teachers=teachers, augment="rrc",
                             image_size=args.image_size, num_augmentations=args.num_augmentations,
                             top_k=args.top_k, batch_size=args.batch_size, block_size=args.block_size,
                             device=args.device, precision=args.precision, compile=args.compile,
                             teacher_classes="all", cpu_threads=args.cpu_threads)
        if args.compare_compile:
            compare_compile(config, teachers, args.num_images, args.repeats)
            return
        # (a) and (b) share one ensemble, so they run the very same modules.
        ensemble = create_ensemble(teachers)
        # Warm-up: the first forward passes of a process are slower (allocator, kernel selection).
        run_pipeline(BuildConfig(**{**config.__dict__, "out": str(root / "warmup.zarr")}), ensemble)
        forward_all = prepare_forward_only(config, ensemble, args.num_images)
        pipeline, serial, inside, forward, reference = [], [], [], [], []
        # Interleaved, so load from other processes on the machine hits all of them alike.
        for _ in range(args.repeats):
            rate, inside_rate = run_pipeline(config, ensemble)
            pipeline.append(rate)
            inside.append(inside_rate)
            serial.append(run_pipeline(config, ensemble, serial=True)[0])
            forward.append(forward_all())
            reference.append(run_reference_style(
                paths, teachers, root / "reference", num_augmentations=args.num_augmentations,
                size=args.image_size, batch_size=args.batch_size, top_k=args.top_k, device=args.device,
                workers=args.baseline_workers))
    a, a0, b, c, b_in = (statistics.median(rates) for rates in (pipeline, serial, forward, reference, inside))
    print(f"machine: {platform.machine()} {torch.get_num_threads()} torch threads, device {args.device} "
          f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else platform.processor() or 'cpu'})")
    print(f"teachers {args.models} at {args.image_size}px, {args.num_images} images x {args.num_augmentations} "
          f"augmentations, batch {args.batch_size}, precision {resolve_precision(config)}, "
          f"medians of {args.repeats}")
    print(f"(a) full pipeline          {a:9.1f} images/s  ({a * args.num_augmentations:.1f} records/s)  "
          f"runs {[round(r, 1) for r in pipeline]}")
    print(f"(a0) same, steps in series {a0:9.1f} images/s  runs {[round(r, 1) for r in serial]}")
    print(f"(b) ensemble forward only  {b:9.1f} images/s  runs {[round(r, 1) for r in forward]}")
    print(f"(b') forward inside (a)    {b_in:9.1f} images/s  runs {[round(r, 1) for r in inside]}")
    print(f"(c) reference-style        {c:9.1f} images/s  runs {[round(r, 1) for r in reference]}")
    print(f"a/b = {a / b:.3f}   a0/b = {a0 / b:.3f}   a/a0 = {a / a0:.2f}x   a/b' = {a / b_in:.3f}   "
          f"a/c = {a / c:.2f}x   (medians)")
    best_a, best_b, best_c = (max(rates) for rates in (pipeline, forward, reference))
    print(f"a/b = {best_a / best_b:.3f}   a/c = {best_a / best_c:.2f}x   (best of {args.repeats}: least disturbed by "
          "other load on the machine)")


def simulate(args: argparse.Namespace, source: Path, root: Path) -> None:
    """``--simulate-device``: how much of the host work hides behind a device that takes a fixed time."""
    device = simulated_device()
    device.input_size = args.image_size
    ensemble = Ensemble([device])
    config = BuildConfig(source=str(source), out=str(root / "store.zarr"), augment="rrc", image_size=args.image_size,
                         num_augmentations=args.num_augmentations, top_k=args.top_k, batch_size=args.batch_size,
                         block_size=args.block_size, teacher_classes="all",
                         cpu_threads=args.cpu_threads or 1)  # as a GPU build's default: no OpenMP teams spinning
    micro_batches = sum(-(-min(args.block_size, args.num_images - start) * args.num_augmentations // args.batch_size)
                        for start in range(0, args.num_images, args.block_size))
    run_pipeline(config, ensemble)  # warm-up
    forward_all = prepare_forward_only(config, ensemble, args.num_images)
    hosts, pipeline, serial, forward, ratios, fills, steady = [], [], [], [], [], [], []
    # Each repeat measures its own host work first, so load from other processes drifting between repeats moves
    # host work and device time together.
    for _ in range(args.repeats):
        device.seconds = 0.0
        hosts.append(args.num_images / run_pipeline(config, ensemble, serial=True)[0] / micro_batches)
        device.seconds = args.device_ms / 1000 if args.device_ms is not None else hosts[-1]
        forward.append(forward_all())
        calls: list[float] = []
        pipeline.append(run_pipeline(config, ensemble, calls=calls)[0])
        # The pipeline's fill (store opened, first block decoded, first micro-batch augmented) is paid once per
        # build; between the first and the last teacher call the device's own rate is what a long build sees.
        fills.append(calls[1] - calls[0])
        steady.append(args.num_images * (len(calls) - 2) / (len(calls) - 1) / (calls[-1] - calls[1]) / forward[-1])
        serial.append(run_pipeline(config, ensemble, serial=True)[0])
        ratios.append(pipeline[-1] / forward[-1])
    host = statistics.median(hosts)
    a, a0, b = (statistics.median(rates) for rates in (pipeline, serial, forward))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
          f"simulated device")
    print(f"{args.num_images} images x {args.num_augmentations} augmentations at {args.image_size}px, batch "
          f"{args.batch_size}, block {args.block_size}: {micro_batches} micro-batches; host work per micro-batch "
          f"(serial, device time 0) {host * 1000:.1f} ms, runs {[round(h * 1000, 1) for h in hosts]}; device time "
          f"{'set to ' + str(args.device_ms) + ' ms' if args.device_ms is not None else 'equal to it'}; "
          f"medians of {args.repeats}")
    print(f"(a) overlapped pipeline    {a:9.1f} images/s  runs {[round(r, 1) for r in pipeline]}")
    print(f"(a0) steps in series       {a0:9.1f} images/s  runs {[round(r, 1) for r in serial]}")
    print(f"(b) device only            {b:9.1f} images/s  runs {[round(r, 1) for r in forward]}")
    print(f"a/b = {a / b:.3f}   a0/b = {a0 / b:.3f}   a/a0 = {a / a0:.2f}x   (medians); a/b of each repeat "
          f"{[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f}")
    print(f"pipeline fill (build started to first teacher call) {statistics.median(fills) * 1000:.0f} ms; from the "
          f"first to the last teacher call a/b = {statistics.median(steady):.3f} (repeats "
          f"{[round(r, 3) for r in steady]})")


if __name__ == "__main__":
    main()
