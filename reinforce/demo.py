"""``reinforce demo``: the whole dataset-reinforcement path on real data, on a laptop CPU.

1. Materialize scikit-learn's handwritten digits (1,797 real 8x8 scans) as an ImageFolder at 32x32.
2. Train a small teacher ensemble (timm resnet10t and resnet14t) and save it as .safetensors.
3. ``reinforce build`` a store from the training split with the ``rrc`` preset.
4. Train the same student twice for the same number of steps: hard labels with the same kind of
   augmentation (torchvision RandomResizedCrop + flip), and the reinforced store (stored augmentation,
   teacher soft labels). Print both test accuracies.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from reinforce_loaders import ReinforcedDataset
from reinforce_loaders.source import ImageSource
from safetensors.torch import save_file
from torchvision.transforms import v2

from .build import BuildConfig, run_build
from .training import accuracy, hard_label_loss, soft_target_loss, train

IMAGE_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
TEACHERS = ("resnet10t", "resnet14t")
STUDENT = "test_efficientnet"
BATCH_SIZE = 64
TEACHER_EPOCHS = 25
STUDENT_STEPS = 600
NUM_AUGMENTATIONS = 32
TOP_K = 5


def materialize_digits(root: str | os.PathLike[str], *, size: int = IMAGE_SIZE, test_fraction: float = 0.25,
                       seed: int = 0, per_class: int | None = None) -> tuple[Path, Path]:
    """Write scikit-learn's digits as ``root/train/D/*.png`` and ``root/test/D/*.png`` (stratified split).

    ``per_class`` keeps only that many images of each class (for small tests).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    targets = digits.target
    order = np.arange(len(targets))
    if per_class is not None:
        order = np.concatenate([np.flatnonzero(targets == c)[:per_class] for c in range(10)])
    train_idx, test_idx = train_test_split(order, test_size=test_fraction, random_state=seed,
                                           stratify=targets[order])
    root = Path(root)
    for split, indices in (("train", train_idx), ("test", test_idx)):
        for index in sorted(indices):
            folder = root / split / str(targets[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index], mode="L").resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{index:04d}.png")
    return root / "train", root / "test"


def _load_all(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    source = ImageSource.from_folder(folder)
    loaded = [source.load(i) for i in range(len(source))]
    return torch.stack([image for image, _ in loaded]), torch.tensor([label for _, label in loaded])


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _augmented_batches(images: torch.Tensor, labels: torch.Tensor, augment: v2.Transform, seed: int):
    def batches(epoch: int):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            chunk = order[first:first + BATCH_SIZE]
            yield _normalize(torch.stack([augment(images[i]) for i in chunk])), labels[chunk]
    return batches


def _plain_batches(images: torch.Tensor, labels: torch.Tensor):
    for first in range(0, len(images), 256):
        yield _normalize(images[first:first + 256]), labels[first:first + 256]


def _timm(arch: str, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=10)


def run_demo(workdir: str | None = None, seed: int = 0, log=print, *, teacher_epochs: int = TEACHER_EPOCHS,
             student_steps: int = STUDENT_STEPS, num_augmentations: int = NUM_AUGMENTATIONS,
             per_class: int | None = None, teachers: tuple[str, ...] = TEACHERS) -> dict[str, float]:
    """Run the demo; returns the test accuracies (``teacher_<arch>``, ``plain``, ``reinforced``).

    The keyword arguments shrink it for tests (``per_class`` keeps that many digits of each class).
    """
    began = time.perf_counter()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="reinforce-demo-") as scratch:
        root = Path(workdir) if workdir else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        train_dir, test_dir = materialize_digits(root / "digits", seed=seed, per_class=per_class)
        train_images, train_labels = _load_all(train_dir)
        test_images, test_labels = _load_all(test_dir)
        log(f"[1/4] digits: {len(train_images)} train / {len(test_images)} test images at "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} in {train_dir.parent}")

        results: dict[str, float] = {}
        teacher_specs = []
        teacher_augment = v2.RandomResizedCrop(IMAGE_SIZE, scale=(0.25, 1.0), antialias=True)
        steps = teacher_epochs * (len(train_images) // BATCH_SIZE)
        for number, arch in enumerate(teachers):
            model = train(_timm(arch, seed + number), _augmented_batches(train_images, train_labels,
                                                                          teacher_augment, seed + number),
                          steps, hard_label_loss)
            results[f"teacher_{number}_{arch}"] = accuracy(model, _plain_batches(test_images, test_labels))
            path = root / f"teacher_{number}_{arch}.safetensors"
            save_file(model.state_dict(), str(path), metadata={
                "input_size": json.dumps(IMAGE_SIZE), "mean": json.dumps(MEAN), "std": json.dumps(STD)})
            teacher_specs.append(f"{arch}={path}")
            log(f"[2/4] teacher {arch}: test accuracy {results[f'teacher_{number}_{arch}']:.4f} ({steps} steps)")

        store = root / "digits-train.reinforce.zarr"
        summary = run_build(BuildConfig(
            source=str(train_dir), out=str(store), teachers=teacher_specs, augment="rrc", image_size=IMAGE_SIZE,
            num_augmentations=num_augmentations, top_k=TOP_K, seed=seed, batch_size=256, block_size=256,
        ), progress=False)
        log(f"[3/4] reinforce build: {summary}")

        student_augment = v2.Compose([v2.RandomResizedCrop(IMAGE_SIZE, antialias=True), v2.RandomHorizontalFlip()])
        plain = train(_timm(STUDENT, seed + 10), _augmented_batches(train_images, train_labels, student_augment,
                                                                    seed + 10),
                      student_steps, hard_label_loss)
        results["plain"] = accuracy(plain, _plain_batches(test_images, test_labels))

        dataset = ReinforcedDataset(train_dir, store, transform=lambda image: _normalize(image[None])[0])
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(seed + 10))
        reinforced = train(_timm(STUDENT, seed + 10), lambda epoch: loader, student_steps, soft_target_loss,
                           on_epoch=dataset.set_epoch)
        results["reinforced"] = accuracy(reinforced, _plain_batches(test_images, test_labels))
        log(f"[4/4] student {STUDENT}, {student_steps} steps of {BATCH_SIZE}:")
        log(f"      plain labels + RandomResizedCrop/flip   test accuracy {results['plain']:.4f}")
        log(f"      reinforced store ({num_augmentations} aug/image, top-{TOP_K})  "
            f"test accuracy {results['reinforced']:.4f}")
        log(f"demo finished in {time.perf_counter() - began:.0f} s")
        return results
