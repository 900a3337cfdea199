"""Training throughput from a store: does ``reinforce train``'s loader keep its student fed?

In one run, on the same JPEGs (scikit-learn's digits 0-3, upscaled to ``--side`` px and saved at quality 90, like
the issue's own data) and the same student (``--model``, ``--image-size``, ``--batch-size``), side by side:

* ``reinforce train`` from a store, for each ``--presets`` store (``rrc``, ``rrc+ra/re``, ...), default settings
  (``--workers`` from the machine, ``--replay`` auto);
* the first store with ``--decode fast``;
* the first store with ``--decode gpu`` (the workers only read the files; the batch's JPEGs are decoded in
  the training process, by nvjpeg on CUDA, by torchvision's libjpeg-turbo on a CPU, then replayed there);
* ``--recipe plain`` on the same images (torchvision RandomResizedCrop + flip in the workers);
* the limit: the student's step alone, on synthetic batches already on the device (simulated: the whole loop,
  ``reinforce train`` itself, on one batch served again and again, so that loading costs nothing).

Every row is a real :func:`reinforce.recipes.train` run, timed by the loop itself (``images_per_s`` of each epoch
in ``metrics.jsonl``; the first epoch, which starts the workers, is left out, then the median).

``--simulate-step-ms MS`` (the default on a machine without CUDA) replaces the student's step (forward, loss,
backward, optimizer) by a sleep of MS milliseconds, which leaves the CPU to the loader; the model EMA, a GPU's
work that the CPU would otherwise do here, is off, and the training process has one torch thread. Everything
else in the loop runs as it would (the batch's preparation and normalization, the schedule). The limit is
measured: the same run with a loader that serves one ready batch again and again (at most ``batch_size / MS``
images/s). A row's ratio to it says whether the loader keeps up, on any machine. The rows and the limit are
run in ``--rounds`` interleaved rounds, and each reports its median: a shared machine's load drifts.

Usage: ``nice -n 10 python benchmarks/train_throughput.py [--images 1024] [--simulate-step-ms 60] [--epochs 4]``
(``--simulate-step-ms 0`` on a GPU: the real step).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reinforce.recipes import TrainConfig, train
from reinforce.recipes.distributed import default_workers
from reinforce.recipes.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import random_teacher  # noqa: E402  (the benchmarks' own module, beside this one)


def digit_jpegs(root: Path, count: int, side: int) -> Path:
    """``count`` JPEGs (quality 90, RGB, ``side`` x ``side``) of scikit-learn's digits 0-3, in four class folders
    (the four classes of loader.py's random teacher); past the 720 digits there, they repeat."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    kept = np.flatnonzero(digits.target < 4)
    for number in range(count):
        index = int(kept[number % len(kept)])
        folder = root / f"class{digits.target[index]}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(images[index], mode="L").resize((side, side), Image.Resampling.BICUBIC)
        image.convert("RGB").save(folder / f"{number:05d}.jpg", quality=90)
    return root


def build_store(source: Path, out: Path, preset: str, teacher: str, size: int, device: str) -> Path:
    from reinforce.build import BuildConfig, run_build

    run_build(BuildConfig(source=str(source), out=str(out), teachers=[teacher], augment=preset, image_size=size,
                          num_augmentations=4, top_k=3, batch_size=256, block_size=128, device=device),
              progress=False)
    return out


class SimulatedStep:
    """Replaces :meth:`Trainer.optimize` by a sleep of ``seconds`` (a student whose step takes that long and
    leaves the CPU to the loader) while installed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._original: Any = None

    def __enter__(self) -> SimulatedStep:
        seconds = self.seconds

        def step(trainer: Trainer, x: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor,
                 where: str | None = None) -> torch.Tensor:
            time.sleep(seconds)
            return torch.zeros((), device=x.device)

        self._original = Trainer.optimize
        Trainer.optimize = step  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Trainer.optimize = self._original  # type: ignore[method-assign]


class ServedBatch:
    """While installed, the store's samples are those of its first batch, replayed once per worker and then
    served as they are: a loader that costs nothing but the batch's hand-over."""

    def __enter__(self) -> ServedBatch:
        from reinforce.recipes.data import StoreSamples

        self._original = original = StoreSamples.__getitems__
        served: dict[int, list[Any]] = {}

        def getitems(dataset: StoreSamples, items: list[Any]) -> list[Any]:
            if len(items) not in served:
                served[len(items)] = original(dataset, items)
            return served[len(items)]

        StoreSamples.__getitems__ = getitems  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from reinforce.recipes.data import StoreSamples

        StoreSamples.__getitems__ = self._original  # type: ignore[method-assign]


def train_rate(config: TrainConfig) -> tuple[float, float]:
    """Median images/s of ``config``'s epochs after the first (which starts the workers), and the CPU
    milliseconds per batch of its loader workers over the whole run (from their exit times: the load of other
    jobs on a shared machine changes it far less than the wall clock)."""
    before = os.times()
    train(config, log=lambda _: None)
    gc.collect()  # the run's loaders, and so their workers' exits (and CPU times), may wait in reference cycles
    after = os.times()
    rows = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    batches = len(rows) * (sum(1 for path in Path(config.train_source).rglob("*.jpg")) // config.batch_size)
    workers_cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return statistics.median(row["images_per_s"] for row in rows[1:]), 1000 * workers_cpu / batches


def synthetic_limit(model: str, size: int, batch_size: int, device: str, steps: int) -> float:
    """Images/s of the student's training step alone on a synthetic batch already on ``device`` (bf16 autocast
    on CUDA, as the recipes' ``--precision auto``)."""
    import timm

    net = timm.create_model(model, num_classes=10).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, size, size, device=device)
    target = torch.softmax(torch.randn(batch_size, 10, device=device), -1)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()

    def step() -> None:
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x).float()
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--side", type=int, default=128, help="JPEG side in pixels")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--presets", default="rrc,rrc+ra/re")
    parser.add_argument("--workers", type=int, default=None, help="default: reinforce train's default")
    parser.add_argument("--simulate-step-ms", type=float, default=None,
                        help="sleep this long instead of the student's step (default: 60 without CUDA, else the "
                             "real step; 0: the real step)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    # A simulated step skips optimizer.step(): the schedule's warning about the order says nothing here.
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    simulate = args.simulate_step_ms if args.simulate_step_ms is not None else (0.0 if cuda else 60.0)
    presets = args.presets.split(",")
    results: dict[str, Any] = {
        "machine": f"{platform.node()}: {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
                   f"{torch.cuda.get_device_name() if cuda else 'no GPU'}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "default_workers": default_workers(), "simulated_step_ms": simulate or None,
        "load_average": os.getloadavg(), "rows": {}}
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as scratch:
        root = Path(scratch)
        source = digit_jpegs(root / "jpegs", args.images, args.side)
        teacher = random_teacher(root)
        stores = {preset: build_store(source, root / f"{preset.replace('/', '_')}.zarr", preset, teacher,
                                      args.image_size, device) for preset in presets}
        common = dict(train_source=str(source), model=args.model, image_size=args.image_size,
                      batch_size=args.batch_size, epochs=args.epochs, progress=False, workers=args.workers,
                      device=device, **(dict(ema=False, threads=1) if simulate else {}))
        runs: dict[str, TrainConfig] = {}
        for preset, store in stores.items():
            runs[f"store {preset}"] = TrainConfig(store=str(store), out=str(root / f"run-{len(runs)}"), **common)
        runs[f"store {presets[0]} --decode fast"] = TrainConfig(store=str(stores[presets[0]]), decode="fast",
                                                                 out=str(root / "run-fast"), **common)
        runs[f"store {presets[0]} --decode gpu"] = TrainConfig(store=str(stores[presets[0]]), decode="gpu",
                                                                out=str(root / "run-gpu"), **common)
        runs["--recipe plain"] = TrainConfig(recipe="plain", out=str(root / "run-plain"), **common)
        if simulate:
            runs["limit"] = dataclasses.replace(runs[f"store {presets[0]}"], out=str(root / "run-limit"))
        rates: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        with SimulatedStep(simulate / 1000) if simulate else _nothing():
            for round_ in range(args.rounds):
                for name, config in runs.items():
                    config = dataclasses.replace(config, out=f"{config.out}-{round_}")
                    with ServedBatch() if name == "limit" else _nothing():
                        rate, worker_ms = train_rate(config)
                    rates[name].append(rate)
                    cpu[name].append(worker_ms)
                    print(f"round {round_ + 1}: {name:<32} {rate:8.0f} images/s, workers {worker_ms:5.1f} CPU ms per "
                          "batch", flush=True)
        results["rounds"] = rates
        limit = (statistics.median(rates["limit"]) if simulate
                 else synthetic_limit(args.model, args.image_size, args.batch_size, device, 50))
        results["rows"] = {name: statistics.median(values) for name, values in rates.items() if name != "limit"}
        results["worker_cpu_ms_per_batch"] = {name: statistics.median(values) for name, values in cpu.items()}
        for name, rate in results["rows"].items():
            print(f"{name:<32} {rate:8.0f} images/s (median), workers {results['worker_cpu_ms_per_batch'][name]:.1f} "
                  "CPU ms per batch")
        results["limit"] = limit
        results["sleep_limit"] = args.batch_size / (simulate / 1000) if simulate else None
        print(f"{'limit (' + ('the loop on one served batch' if simulate else 'synthetic device batches') + ')':<32}"
              f" {limit:8.0f} images/s" + (f" (the sleep alone: {results['sleep_limit']:.0f})" if simulate else ""))
        results["ratio"] = {name: (rate / limit if rate is not None else None)
                            for name, rate in results["rows"].items()}
        for name, ratio in results["ratio"].items():
            if ratio is not None:
                print(f"  {name:<30} {ratio:.3f} of the limit")
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
