"""Images a build decodes per block with a mixing preset: partners drawn from the block's pool (the build) vs
from the whole dataset (the draw without a pool), with the real samplers, for the first blocks of a store.

    PYTHONPATH=.:loaders python benchmarks/mixing_partners.py [--num-samples 1281167] [--block-size 4096]
        [-A 400] [--augment rrc+mix] [--blocks 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from reinforce_loaders import make_pipeline, rng


def partners_of_block(pipeline, seed: int, start: int, stop: int, num_samples: int, slots: int,
                      pool: np.ndarray | None) -> np.ndarray:
    """Distinct partner samples outside ``[start, stop)`` that the block's records mix with."""
    drawn = []
    for sample in range(start, stop):
        params = pipeline.sample_slots(seed, sample, slots, 375, 500, num_samples=num_samples,
                                       partner_size=lambda p: (375, 500), partner_pool=pool)
        drawn.append(pipeline.partner_indices(params))
    partners = np.unique(np.concatenate(drawn))
    return partners[(partners >= 0) & ((partners < start) | (partners >= stop))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1_281_167)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("-A", "--num-augmentations", type=int, default=400)
    parser.add_argument("--augment", default="rrc+mix")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipeline = make_pipeline(args.augment, 224)
    n, b, a = args.num_samples, args.block_size, args.num_augmentations
    print(f"{args.augment}: N = {n:,}, block {b}, A = {a}")
    for block in range(args.blocks):
        start, stop = block * b, min((block + 1) * b, n)
        began = time.perf_counter()
        pool = rng.partner_pool(args.seed, start, n, b)
        with_pool = partners_of_block(pipeline, args.seed, start, stop, n, a, pool)
        without = partners_of_block(pipeline, args.seed, start, stop, n, a, None)
        print(f"block {block}: {stop - start} own images + partner images decoded: pool {len(with_pool):,} "
              f"(pool size {len(pool):,}), whole-dataset draw {len(without):,} "
              f"({len(without) / max(len(with_pool), 1):.0f}x more; {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
