"""Student loader memory at true ImageNet size (1,281,167 samples, A = 400), measured without ImageNet.

A real store is written by the project's writer with an ImageNet+ header (``rrc+ra/re``, top-10, 1000 classes,
class vocabulary 32, A = 400, blocks of 4096): complete per-sample arrays (labels, image sizes, fingerprints,
class vocabulary) for every sample, and records (all 400 slots, parameters sampled as a build samples them, a
synthetic teacher) for ``--record-blocks`` blocks and the last one, so the store is about 70 MB instead of
11 GB. Its source is a listing of 1,281,167 ImageNet-like paths (``ROOT/train/nXXXXXXXX/nXXXXXXXX_NNNNN.JPEG``,
1000 classes of 1281-1282 images); only the paths of the written blocks exist, as symbolic links to 64 real
JPEGs of 500 x 375 (``loader.make_jpegs``), whose sizes and fingerprints the store holds. Only samples of the
written blocks are read (``torch.utils.data.Subset``, shuffled, batches of 32).

Each case runs in a fresh process (so its main process holds one dataset): ``ReinforcedDataset`` over an
``ImageSource`` of the listing, and torchvision's ``ImageFolder`` (its listing given instead of scanned, the
transform of ``benchmarks/loader.py``'s baseline) over the same paths, each with 2 and 4 forked DataLoader
workers, and the first again with glibc's mmap threshold fixed (:data:`GLIBC_FIXED_THRESHOLD`). Measured per
process from ``/proc/PID/smaps`` after the first batch, half way and after ``--iterate`` samples: RSS, PSS,
shared and private bytes, the private bytes in mappings inherited from the main process (copy-on-write copies,
heap), the epoch table's mapping, and the ``/dev/shm`` files mapped; the epoch table file's size, allocated
and page-cache-resident (``fincore``) bytes; the constructor's time; and the workers' private bytes after one
shuffled epoch over all 1,281,167 samples that touches only the listing, as loading each sample does
(:class:`ListingTouch`: a whole epoch's copy-on-write cost without decoding 1.28 M images).

The listing's Python objects (path strings, ImageFolder's tuples) are allocated in a random order: the samples
read all come from a few blocks, and this makes them touch memory pages as the first samples of a shuffled
epoch over the whole dataset do (a new page per sample) instead of a few neighbouring pages.

Usage: ``PYTHONPATH=.:loaders nice -n 10 python benchmarks/loader_memory.py [--record-blocks 1] [--iterate 4096]
[--workers 2,4]`` (needs scikit-image, like ``benchmarks/loader.py``; about 10 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loader import IMAGENET_SAMPLES, OUTPUT, imagenet_memory, make_jpegs, torchvision_baseline
from reinforce.build.writer import BlockResult, StoreWriter
from reinforce_loaders import ImageSource, ReinforcedDataset, make_pipeline
from reinforce_loaders import format as fmt
from reinforce_loaders.source import decode_image, fingerprint

NUM_CLASSES, TOP_K, SLOTS, BLOCK_SIZE, VOCABULARY = 1000, 10, 400, 4096, 32
PRESET = "rrc+ra/re"
NUM_JPEGS = 64
MiB = 2**20
GLIBC_FIXED_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
"""Set for one case (to 128 KiB, glibc's default start): allocations above it are mmapped and returned at
``free``; without it glibc raises the threshold as large blocks are freed, and keeps them in the heap."""


# ---------------------------------------------------------------------------------------------- listing
@dataclasses.dataclass
class Listing:
    """An ImageNet-like training listing: sorted classes, per-sample paths and labels."""

    classes: list[str]
    paths: list[str]
    targets: list[int]
    labels: np.ndarray
    creation_order: np.ndarray


def imagenet_listing(root: Path, num_samples: int, seed: int = 0) -> Listing:
    """``num_samples`` paths ``root/train/SYNSET/SYNSET_NNNNN.JPEG`` over 1000 sorted classes (ImageNet's
    1281-1282 per class at full size), string objects created in a random order (see the module docstring).
    Labels are one int object per class, as ``ImageSource.from_folder`` and ``ImageFolder`` share them."""
    classes = [f"n{1440764 + 7919 * c:08d}" for c in range(NUM_CLASSES)]
    counts = np.full(NUM_CLASSES, num_samples // NUM_CLASSES)
    counts[:num_samples % NUM_CLASSES] += 1
    labels = np.repeat(np.arange(NUM_CLASSES), counts)
    numbers = np.arange(num_samples) - np.repeat(np.cumsum(counts) - counts, counts) + 10000
    order = np.random.default_rng(seed).permutation(num_samples)
    paths: list[Any] = [None] * num_samples
    for i, label, number in zip(order.tolist(), labels[order].tolist(), numbers[order].tolist()):
        paths[i] = f"{root}/train/{classes[label]}/{classes[label]}_{number}.JPEG"
    label_objects = list(range(NUM_CLASSES))
    return Listing(classes, paths, [label_objects[label] for label in labels.tolist()], labels, order)


def record_positions(num_samples: int, blocks: list[int]) -> np.ndarray:
    """Sample indices of ``blocks`` (blocks of :data:`BLOCK_SIZE`)."""
    return np.concatenate([np.arange(b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, num_samples)) for b in blocks])


def link_sources(listing: Listing, positions: np.ndarray, jpegs: list[Path]) -> None:
    """Make the paths of ``positions`` exist: symbolic links to ``jpegs`` (sample ``i`` is ``jpegs[i % 64]``)."""
    for i in positions.tolist():
        path = Path(listing.paths[i])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(jpegs[i % len(jpegs)])


# ---------------------------------------------------------------------------------------------- store
class SparseStoreWriter(StoreWriter):
    """A :class:`StoreWriter` that finalizes a store whose records are written for some blocks only (its other
    blocks stay marked not done): the reader then opens it like a complete store and reads the written blocks,
    and refuses records of the others (fill values)."""

    def pending_blocks(self) -> list[int]:
        return []


def imagenet_header(num_samples: int, classes: list[str]) -> fmt.StoreHeader:
    """The ImageNet+ header of ``loader.imagenet_memory`` with class names and a teacher entry."""
    pipeline = make_pipeline(PRESET, OUTPUT)
    return fmt.StoreHeader(num_samples=num_samples, num_classes=NUM_CLASSES, top_k=TOP_K, num_augmentations=SLOTS,
                           seed=0, block_size=BLOCK_SIZE, augmentation=pipeline.config(),
                           teachers=[{"name": "synthetic (benchmarks/loader_memory.py)"}], class_names=classes,
                           param_encodings=fmt.pipeline_param_encodings(pipeline),
                           class_vocabulary_size=VOCABULARY)


def nearby_classes(labels: np.ndarray) -> np.ndarray:
    """Per sample, the :data:`VOCABULARY` classes around its label, ascending (a valid class vocabulary)."""
    return np.sort((labels[:, None] + np.arange(VOCABULARY) - VOCABULARY // 2) % NUM_CLASSES, axis=1)


def synthetic_block(header: fmt.StoreHeader, block: int, labels: np.ndarray, sizes: np.ndarray,
                    fingerprints: np.ndarray) -> BlockResult:
    """One block as a build makes it: parameters sampled and encoded by the pipeline (``reinforce.build.blocks``),
    and a synthetic teacher: 10 distinct classes near the label per record, descending probabilities."""
    start, stop = header.block_range(block)
    n, generator = stop - start, np.random.default_rng(block)
    params = header.pipeline.sample_block(header.seed, np.arange(start, stop), SLOTS, sizes[start:stop, 0],
                                          sizes[start:stop, 1])
    heights, widths = sizes[start:stop, :1], sizes[start:stop, 1:]
    columns = header.layout.params.encode(params, heights, widths)
    positions = (generator.integers(0, VOCABULARY, (n, SLOTS, 1)) + 3 * np.arange(TOP_K)) % VOCABULARY
    indices = np.take_along_axis(nearby_classes(labels[start:stop])[:, None, :], positions, axis=-1)
    probs = np.sort(generator.dirichlet(np.full(TOP_K, 0.3), size=(n, SLOTS)) * 0.95, axis=-1)[..., ::-1]
    return BlockResult(start=start, labels=labels[start:stop], fingerprints=fingerprints[start:stop],
                       image_sizes=sizes[start:stop], aug_params=header.layout.params.decode(columns, heights, widths),
                       param_columns=columns, topk_indices=indices, topk_probs=probs,
                       teacher_entropy=generator.uniform(0.5, 3.0, (n, SLOTS)))


def write_store(out: Path, listing: Listing, jpegs: list[Path], record_blocks: list[int]) -> fmt.StoreHeader:
    """Every sample's per-sample arrays, then whole blocks (records of all slots) for ``record_blocks``."""
    header = imagenet_header(len(listing.paths), listing.classes)
    checked = [decode_image(path) for path in jpegs]
    which = np.arange(len(listing.paths)) % len(jpegs)
    sizes = np.array([image.shape[1:] for image in checked], dtype=np.int64)[which]
    fingerprints = np.array([fingerprint(image) for image in checked], dtype=np.uint64)[which]
    writer = SparseStoreWriter.create_or_resume(out, header)
    writer.group[fmt.LABELS][:] = listing.labels.astype(fmt.LABEL_DTYPE)
    writer.group[fmt.IMAGE_SIZES][:] = sizes.astype(fmt.IMAGE_SIZE_DTYPE)
    writer.group[fmt.FINGERPRINTS][:] = fingerprints.astype(fmt.FINGERPRINT_DTYPE)
    writer.group[fmt.CLASS_VOCABULARY][:] = nearby_classes(listing.labels).astype(header.dtype)
    for block in record_blocks:
        writer.write_block(block, synthetic_block(writer.header, block, listing.labels, sizes, fingerprints))
    return writer.finalize()


# ---------------------------------------------------------------------------------------------- measuring
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
_FIELDS = {"Rss": "rss", "Pss": "pss", "Shared_Clean": "shared", "Shared_Dirty": "shared",
           "Private_Clean": "private", "Private_Dirty": "private"}


def mappings(pid: int) -> list[tuple[int, int, str, dict[str, int]]]:
    """``(start, end, path, {smaps field: bytes})`` of every mapping of ``pid`` (``/proc/PID/smaps``)."""
    out: list[tuple[int, int, str, dict[str, int]]] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        found = _MAPPING.match(line)
        if found:
            parts = line.split(maxsplit=5)
            out.append((int(found[1], 16), int(found[2], 16), parts[5] if len(parts) > 5 else "", {}))
            continue
        key, _, value = line.partition(":")
        if out and value.strip().endswith("kB"):
            out[-1][3][key] = int(value.split()[0]) * 1024
    return out


def process_memory(pid: int, table_path: str | None = None,
                   parent: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Bytes of ``pid``: rss, pss, shared, private; ``private_inherited``: private bytes in mappings that
    overlap the ``parent``'s (copy-on-write copies of its pages, and what the process allocated in its heap
    and arenas), the rest is in mappings the process made; the epoch table's mapping (``table_rss``,
    ``table_pss``); and the ``/dev/shm`` files it maps (``shm``: path -> size)."""
    totals: dict[str, Any] = dict.fromkeys(("rss", "pss", "shared", "private", "private_inherited", "table_rss",
                                            "table_pss"), 0)
    totals["shm"] = {}
    starts = [start for start, _ in parent or []]
    for start, end, path, fields in mappings(pid):
        for key, name in _FIELDS.items():
            totals[name] += fields.get(key, 0)
        at = bisect.bisect_right(starts, end - 1) - 1
        if parent and at >= 0 and parent[at][1] > start:
            totals["private_inherited"] += fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        if table_path and path.startswith(table_path):
            totals["table_rss"] += fields.get("Rss", 0)
            totals["table_pss"] += fields.get("Pss", 0)
        if path.startswith("/dev/shm/"):
            totals["shm"][path] = fields.get("Size", 0)
    return totals


def resident_file_bytes(path: str) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``), or None without it."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


def table_file(ds: Any) -> dict[str, int | None]:
    """The epoch table file's size, bytes allocated on its file system and in the page cache ({} for ImageFolder)."""
    if not isinstance(ds, ReinforcedDataset):
        return {}
    path = ds._table.path
    status = os.stat(path)
    return {"size": status.st_size, "allocated": status.st_blocks * 512, "resident": resident_file_bytes(path),
            "in /dev/shm": int(path.startswith("/dev/shm"))}


def snapshot(loader_iterator: Any, table_path: str | None, parent: list[tuple[int, int]]) -> dict[str, Any]:
    """Memory of the main process and of each worker, and the bytes of the distinct /dev/shm files they map."""
    main = process_memory(os.getpid(), table_path)
    workers = [process_memory(worker.pid, table_path, parent) for worker in loader_iterator._workers]
    shm = {path: size for process in (main, *workers) for path, size in process.pop("shm").items()}
    return {"main": main, "workers": workers, "shm": sum(shm.values())}


def peak_rss() -> int:
    """This process's peak RSS (``VmHWM``: unlike ``ru_maxrss``, not inherited from the process that ran it)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024


def timed(make: Callable[[], Any], repeats: int) -> tuple[Any, list[float], list[float]]:
    """The last of ``repeats`` results of ``make()``, and the wall and CPU seconds of each call."""
    walls, cpus, made = [], [], None
    for _ in range(repeats):
        made = None  # the previous dataset (and its epoch table) goes before the next is made
        wall, cpu = time.perf_counter(), time.process_time()
        made = make()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return made, walls, cpus


def listed_image_folder(listing: Listing, transform: Any) -> Any:
    """torchvision's ``ImageFolder`` whose listing is ``listing`` instead of a directory scan (its samples are
    the same ``(path, label)`` tuples, created in the listing's order of string creation)."""
    from torchvision import datasets

    class ListedImageFolder(datasets.ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return listing.classes, {name: label for label, name in enumerate(listing.classes)}

        @staticmethod
        def make_dataset(directory: str, class_to_idx: dict[str, int], *args: Any, **kwargs: Any) -> list[Any]:
            samples: list[Any] = [None] * len(listing.paths)
            for i in listing.creation_order.tolist():
                samples[i] = (listing.paths[i], listing.targets[i])
            return samples

    return ListedImageFolder(str(Path(listing.paths[0]).parents[1]), transform=transform)


class ListingTouch(torch.utils.data.Dataset):
    """What loading a sample touches in a dataset's listing, without decoding: the path and label objects
    ``ImageSource.load`` reads (``name_of`` returns the same path object), or ``ImageFolder``'s
    ``samples[index]`` tuple, path and label. Over a whole epoch it copies into each worker the listing pages
    that a real epoch over every sample would copy."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        if isinstance(self.dataset, ReinforcedDataset):
            source = self.dataset.source
            return len(source.name_of(index)) + source.targets[index]
        path, target = self.dataset.samples[index]
        return len(path) + target


def listing_epoch(ds: Any, workers: int, parent: list[tuple[int, int]]) -> dict[str, Any]:
    """Memory of fresh workers after one shuffled epoch of :class:`ListingTouch` over every sample."""
    loader = torch.utils.data.DataLoader(ListingTouch(ds), batch_size=4096, shuffle=True, num_workers=workers,
                                         multiprocessing_context="fork", generator=torch.Generator().manual_seed(1))
    iterator = iter(loader)
    for _ in range(len(loader)):  # not past the end: the workers stay alive to be measured
        next(iterator)
    return snapshot(iterator, None, parent)


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One dataset kind with ``args.workers`` forked workers, in this (fresh) process."""
    torch.set_num_threads(1)
    root = Path(args.root)
    base = process_memory(os.getpid())["rss"]
    listing = imagenet_listing(root, args.samples)
    listed = process_memory(os.getpid())["rss"]
    if args.case == "reinforced":
        source = ImageSource(paths=listing.paths, targets=listing.targets, classes=listing.classes)

        def make() -> Any:
            return ReinforcedDataset(source, root / "store.zarr")
    else:
        transform = torchvision_baseline(root / "jpegs").transform

        def make() -> Any:
            return listed_image_folder(listing, transform)
    ds, walls, cpus = timed(make, args.constructions)
    built = process_memory(os.getpid())["rss"]
    table_path = ds._table.path if isinstance(ds, ReinforcedDataset) else None
    positions = record_positions(args.samples, [int(b) for b in args.blocks.split(",")])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, positions.tolist()), batch_size=args.batch_size,
                                         shuffle=True, num_workers=int(args.workers), multiprocessing_context="fork",
                                         generator=torch.Generator().manual_seed(0))
    parent = sorted((start, end) for start, end, _, _ in mappings(os.getpid()))
    iterator = iter(loader)
    seen = len(next(iterator)[1])
    snapshots, shm_peak, began = {seen: snapshot(iterator, table_path, parent)}, 0, time.perf_counter()
    while seen < args.iterate:
        batch = next(iterator)  # held while measuring: its storage is mapped from /dev/shm
        seen += len(batch[1])
        shm_peak = max(shm_peak, sum(process_memory(os.getpid())["shm"].values()))
        del batch
        if seen == args.iterate // 2:
            snapshots[seen] = snapshot(iterator, table_path, parent)
    wall = time.perf_counter() - began
    snapshots[seen] = snapshot(iterator, table_path, parent)
    del iterator
    touched = listing_epoch(ds, int(args.workers), parent)
    result = {"case": args.case, "workers": int(args.workers), "samples_read": seen, "listing_rss": listed - base,
              "dataset_rss": built - listed, "constructor_wall": walls, "constructor_cpu": cpus,
              "snapshots": snapshots, "listing_epoch": touched, "main_shm_peak": shm_peak, "iterate_wall": wall,
              "table_file": table_file(ds), "peak_rss_main": peak_rss(),
              "mean_path_chars": statistics.fmean(len(p) for p in listing.paths[:100000])}
    return result


# ---------------------------------------------------------------------------------------------- report
def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.1f}"


def worker_range(snap: dict[str, Any], key: str) -> str:
    values = [worker[key] for worker in snap["workers"]]
    low, high = min(values), max(values)
    return mib(low) if abs(high - low) < 0.05 * MiB else f"{mib(low)}-{mib(high)}"


def print_results(results: list[dict[str, Any]]) -> None:
    print("\n## constructor and main process (MiB)")
    print(f"{'case':27s} {'constructor wall s, each':>26s} {'CPU s':>16s} {'listing':>8s} {'dataset':>8s} "
          f"{'main RSS, first batch -> end':>29s} {'main peak RSS':>14s}")
    for r in results:
        first, *_, last = r["snapshots"].values()
        print(f"{name_of(r):27s} {' '.join(f'{w:.2f}' for w in r['constructor_wall']):>26s} "
              f"{' '.join(f'{c:.2f}' for c in r['constructor_cpu']):>16s} {mib(r['listing_rss']):>8s} "
              f"{mib(r['dataset_rss']):>8s} {mib(first['main']['rss']) + ' -> ' + mib(last['main']['rss']):>29s} "
              f"{mib(r['peak_rss_main']):>14s}")
    print("\n## per DataLoader worker (range over workers), MiB, after reading samples (all workers together)")
    keys = ("rss", "pss", "shared", "private", "private_inherited", "table_rss")
    print(f"{'case':27s} {'read':>5s} " + " ".join(f"{key:>17s}" for key in keys)
          + f" {'PSS main+workers':>17s} {'/dev/shm files':>15s}")
    for r in results:
        for read, snap in r["snapshots"].items():
            total = sum(p["pss"] for p in [snap["main"], *snap["workers"]])
            print(f"{name_of(r):27s} {int(read):5d} " + " ".join(f"{worker_range(snap, key):>17s}" for key in keys)
                  + f" {mib(total):>17s} {mib(snap['shm']):>15s}")
    print("\n## per worker after one shuffled epoch touching only the listing (ListingTouch, no decoding), MiB")
    for r in results:
        snap = r["listing_epoch"]
        print(f"{name_of(r):27s} " + ", ".join(f"{key} {worker_range(snap, key)}" for key in keys[:5]))
    print("\n## epoch table file (after the samples read), /dev/shm, speed")
    for r in results:
        table = r["table_file"]
        text = ", ".join(f"{key} {mib(value) if key != 'in /dev/shm' else value}" for key, value in table.items())
        print(f"{name_of(r):27s} table: {text or '-'} MiB; /dev/shm files mapped by the main process while it holds "
              f"a batch, at most {mib(r['main_shm_peak'])} MiB; {r['samples_read'] / r['iterate_wall']:.1f} samples/s")


def name_of(result: dict[str, Any]) -> str:
    fixed = " fixed-mmap" if GLIBC_FIXED_THRESHOLD in result.get("env", {}) else ""
    return f"{result['case']} x{result['workers']}{fixed}"


def print_computed() -> None:
    print("\n## computed at ImageNet size (benchmarks/loader.py imagenet_memory)")
    for name, value in imagenet_memory().items():
        print(f"{name:34s} {value / MiB:10.1f} MiB" if value > 1000 else f"{name:34s} {value:10d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=IMAGENET_SAMPLES)
    parser.add_argument("--record-blocks", type=int, default=1, help="blocks with records besides the last")
    parser.add_argument("--iterate", type=int, default=4096, help="samples read per case")
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--constructions", type=int, default=3, help="constructor timings per case")
    parser.add_argument("--root", help="working directory (default: a new temporary one, removed at the end)")
    parser.add_argument("--case", choices=("reinforced", "torchvision"), help=argparse.SUPPRESS)
    parser.add_argument("--blocks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    root = Path(args.root or tempfile.mkdtemp(prefix="loader-memory-"))
    num_blocks = -(-args.samples // BLOCK_SIZE)
    blocks = sorted({*range(min(args.record_blocks, num_blocks - 1)), num_blocks - 1})
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {args.samples:,} samples, "
          f"A = {SLOTS}, {PRESET}, top-{TOP_K}, {NUM_CLASSES} classes, vocabulary {VOCABULARY}, blocks of "
          f"{BLOCK_SIZE}; records written for blocks {blocks}; work dir {root}")
    began = time.perf_counter()
    jpegs = sorted(make_jpegs(root / "jpegs", NUM_JPEGS, 500).rglob("*.jpg"))
    listing = imagenet_listing(root, args.samples)
    link_sources(listing, record_positions(args.samples, blocks), jpegs)
    write_store(root / "store.zarr", listing, jpegs, blocks)
    del listing
    print(f"store written in {time.perf_counter() - began:.0f} s: "
          f"{sum(f.stat().st_size for f in (root / 'store.zarr').rglob('*') if f.is_file()) / MiB:.1f} MiB")
    workers = [int(w) for w in args.workers.split(",")]
    cases = [(case, count, {}) for count in workers for case in ("reinforced", "torchvision")]
    cases.append(("reinforced", workers[0], {GLIBC_FIXED_THRESHOLD: "131072"}))
    results = []
    for case, count, env in cases:
        command = [sys.executable, __file__, "--case", case, "--workers", str(count), "--root", str(root),
                   "--samples", str(args.samples), "--iterate", str(args.iterate), "--batch-size",
                   str(args.batch_size), "--constructions", str(args.constructions),
                   "--blocks", ",".join(map(str, blocks))]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
        if out.returncode:
            sys.exit(f"case {case} x{count} {env} failed:\n{out.stderr[-4000:]}")
        results.append({**json.loads(out.stdout.strip().splitlines()[-1]), "env": env})
        print(f"{name_of(results[-1])} done ({time.perf_counter() - began:.0f} s)", flush=True)
    print_results(results)
    print(f"mean path length {results[0]['mean_path_chars']:.1f} characters")
    print_computed()
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
