"""Shared fixtures: a small real-image ImageFolder (scikit-learn digits) and tiny timm teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reinforce.build import BuildConfig, run_build
from reinforce.demo import materialize_digits

IMAGE_SIZE = 32


class RecordingTeacher(torch.nn.Module):
    """Remembers every input batch; predicts from a fixed random linear map so outputs are not trivial."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * size * size, 10)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.linear(x.flatten(1)) * 20


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """(train, test) ImageFolder directories with 6 digits per class (45 train / 15 test images), 32x32."""
    root = tmp_path_factory.mktemp("digits")
    return materialize_digits(root, per_class=6, seed=0)


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> list[str]:
    """Two ``--teacher`` specs with random-weight 10-class timm models saved as .safetensors."""
    import timm

    root = tmp_path_factory.mktemp("teachers")
    specs = []
    for number, (arch, size) in enumerate((("test_resnet", 32), ("test_efficientnet", 40))):
        torch.manual_seed(number)
        model = timm.create_model(arch, num_classes=10)
        path = root / f"{arch}.safetensors"
        save_file(model.state_dict(), str(path), metadata={"input_size": json.dumps(size)})
        specs.append(f"{arch}={path}")
    return specs


def build_store(source: Path, out: Path, teachers: list[str], **overrides) -> Path:
    settings = dict(source=str(source), out=str(out), teachers=teachers, augment="rrc", image_size=IMAGE_SIZE,
                    num_augmentations=4, top_k=3, seed=7, batch_size=16, block_size=16)
    settings.update(overrides)
    run_build(BuildConfig(**settings), progress=False)
    return out


@pytest.fixture(scope="session")
def store(digits, teacher_weights, tmp_path_factory) -> Path:
    """A complete store built from the digits train split."""
    return build_store(digits[0], tmp_path_factory.mktemp("stores") / "train.zarr", teacher_weights)


@pytest.fixture(scope="session")
def vocabulary_store(digits, teacher_weights, tmp_path_factory) -> Path:
    """The same store with its top-k indices coded through a per-image vocabulary of 2 of the 10 classes (so
    both vocabulary positions and escaped class ids occur)."""
    return build_store(digits[0], tmp_path_factory.mktemp("stores") / "vocabulary.zarr", teacher_weights,
                       class_vocabulary=2)
