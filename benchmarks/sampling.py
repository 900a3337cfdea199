"""Parameter sampling and record decoding cost per record, for every preset, in one run.

* sampling: ``AugmentPipeline.sample_block`` over a block (``--samples`` samples x ``--slots`` slots, the build's
  path) vs the same records sampled one at a time with ``AugmentPipeline.sample`` (the shape of a per-record
  loop); both give identical parameters (checked here).
* decoding: ``format.decode_records`` on one record at a time (the student's ``__getitem__`` path) and on a whole
  block of rows at once, for an ImageNet-like header (1000 classes, top-10, class vocabulary 32).

Times are this process's CPU time (``time.process_time``, so other work on a busy machine does not count),
medians of ``--repeats`` runs, in microseconds per record.

Usage: ``PYTHONPATH=.:loaders python benchmarks/sampling.py [--samples 64] [--slots 32] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from reinforce_loaders import format as fmt
from reinforce_loaders import rng
from reinforce_loaders.augment import PRESETS, AugmentPipeline, make_pipeline


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def image_sizes(count: int) -> np.ndarray:
    """ImageNet-like source sizes (height 300-500, width 300-640)."""
    generator = np.random.default_rng(0)
    return np.stack([generator.integers(300, 501, count), generator.integers(300, 641, count)], axis=1)


def sampling_row(pipeline: AugmentPipeline, samples: int, slots: int, repeats: int) -> tuple[float, float]:
    sizes = image_sizes(4 * samples)
    indices = np.arange(samples)
    kwargs = dict(num_samples=len(sizes), partner_size=lambda p: tuple(sizes[p]),
                  partner_pool=rng.partner_pool(0, 0, len(sizes), samples))

    def block() -> np.ndarray:
        return pipeline.sample_block(0, indices, slots, sizes[:samples, 0], sizes[:samples, 1], **kwargs)

    def one_by_one() -> np.ndarray:
        return np.stack([[pipeline.sample(0, i, j, *sizes[i], **kwargs) for j in range(slots)] for i in indices])

    np.testing.assert_array_equal(block(), one_by_one())
    records = samples * slots
    return (median_seconds(block, repeats) / records * 1e6,
            median_seconds(one_by_one, max(1, repeats // 2)) / records * 1e6)


def decoding_row(pipeline: AugmentPipeline, rows: int, repeats: int) -> tuple[float, float]:
    header = fmt.StoreHeader(num_samples=rows, num_classes=1000, top_k=10, num_augmentations=1, seed=0,
                             block_size=rows, augmentation=pipeline.config(), teachers=[],
                             param_encodings=fmt.pipeline_param_encodings(pipeline), class_vocabulary_size=32)
    generator = np.random.default_rng(1)
    sizes = image_sizes(rows)
    vocabulary = np.stack([generator.permutation(1000)[:32] for _ in range(rows)])
    # Six classes from the sample's vocabulary (stored as positions) and four others (stored escaped).
    indices = np.array([list(vocabulary[r, :6]) + [c for c in generator.permutation(1000)[:20]
                                                   if c not in vocabulary[r, :6]][:4] for r in range(rows)])
    probs = -np.sort(-generator.dirichlet(np.ones(10), rows), axis=1)
    params = pipeline.sample_block(0, np.arange(rows), 1, sizes[:, 0], sizes[:, 1], num_samples=rows,
                                   partner_size=lambda p: tuple(sizes[p]))[:, 0]
    params = pipeline.param_layout.quantize(params, sizes[:, 0], sizes[:, 1])
    columns = header.layout.params.encode(params, sizes[:, 0], sizes[:, 1])
    records = fmt.encode_records(header, indices, probs, columns, np.ones(rows), vocabulary=vocabulary)
    layout_ready = header.layout  # parsed once, as a dataset does

    def single() -> None:
        for r in range(rows):
            fmt.decode_records(header, records[r], sizes[r, 0], sizes[r, 1], vocabulary=vocabulary[r])

    def batched() -> None:
        fmt.decode_records(header, records, sizes[:, 0], sizes[:, 1], vocabulary=vocabulary)

    decoded = fmt.decode_records(header, records, sizes[:, 0], sizes[:, 1], vocabulary=vocabulary)
    assert layout_ready is header.layout and np.array_equal(decoded.indices, indices)
    return median_seconds(single, repeats) / rows * 1e6, median_seconds(batched, repeats) / rows * 1e6


def derive_row(pipeline: AugmentPipeline, samples: int, repeats: int) -> float:
    """CPU us per record to re-derive one slot of a block of a ``--derived-params`` store (format 5.1)."""
    header = fmt.StoreHeader(num_samples=samples, num_classes=1000, top_k=10, num_augmentations=400, seed=0,
                             block_size=samples, augmentation=pipeline.config(), teachers=[],
                             param_encodings=fmt.pipeline_param_encodings(pipeline), param_storage="derived")
    sizes = image_sizes(samples)
    return median_seconds(lambda: fmt.derive_param_columns(header, 0, 7, sizes), repeats) / samples * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="samples per sampled block")
    parser.add_argument("--slots", type=int, default=32, help="slots per sample")
    parser.add_argument("--rows", type=int, default=2000, help="records decoded")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--derive-samples", type=int, default=1024, help="block size for the re-derivation cost")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}")
    print(f"sampling: {args.samples} samples x {args.slots} slots; decoding: {args.rows} records; "
          f"medians of {args.repeats}; CPU microseconds per record; load average {os.getloadavg()[0]:.1f}")
    print("| preset | params | sample_block | one record at a time | ratio | decode 1 record | decode a block |")
    print("|---|---|---|---|---|---|---|")
    for preset in PRESETS:
        pipeline = make_pipeline(preset, 224)
        block, single = sampling_row(pipeline, args.samples, args.slots, args.repeats)
        one, many = decoding_row(pipeline, args.rows, args.repeats)
        print(f"| {preset} | {pipeline.num_params} | {block:.2f} | {single:.1f} | {single / block:.0f}x "
              f"| {one:.1f} | {many:.2f} |", flush=True)
    print(f"\nre-deriving one slot of a {args.derive_samples}-sample block of a --derived-params store "
          "(CPU us per record):")
    for preset in ("rrc", "rrc+ra/re", "rrc+m*+r*"):
        print(f"| {preset} | {derive_row(make_pipeline(preset, 224), args.derive_samples, args.repeats):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
