"""Held-out evaluation, one home for the build and the recipes: validation images (:class:`EvalSamples`), the class
check between a training and a validation set, a teacher ensemble's probabilities and top-1
(:func:`ensemble_probs`, :func:`held_out_top1`), and a classifier's top-1, top-5 and calibration
(:func:`evaluate`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import open_source
from torchvision.transforms import v2

if TYPE_CHECKING:
    from .build.teachers import Ensemble


class ClassMismatchError(ReinforceError):
    """A validation set's classes are not the training set's, in the same order."""


class EvalSamples(torch.utils.data.Dataset):
    """Validation images: resize the short side to ``size / crop``, then center-crop ``size``; ``(uint8 image,
    label)``.

    A class folder without images is kept as a class without samples (a store built with
    ``--allow-empty-classes`` names such a class, and so does its validation split): its label does not shift
    the later ones, and :func:`check_classes` compares the folder names with the training set's in order.
    """

    def __init__(self, source: Any, size: int, crop: float) -> None:
        self.source = open_source(source, allow_empty_classes=True)
        resize = int(round(size / crop))
        self.transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])

    @property
    def classes(self) -> list[str] | None:
        return self.source.classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        image, label = self.source.load(position)
        return self.transform(image), int(label)


def check_classes(train_classes: list[str] | None, val_classes: list[str] | None, num_classes: int) -> None:
    """Refuse a validation set whose classes are not the training set's, in the same order."""
    if val_classes is None or train_classes is None:
        return
    if list(val_classes) != list(train_classes):
        missing = sorted(set(train_classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(train_classes))
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}")
        if extra:
            detail.append(f"unknown {extra[:5]}")
        if not detail:
            detail.append("same names in another order")
        raise ClassMismatchError(
            f"the validation set's classes differ from the training set's ({'; '.join(detail)}): label indices "
            "would not match. Use a validation folder with the same class subdirectories"
        )
    if len(val_classes) != num_classes:
        raise ClassMismatchError(f"the validation set has {len(val_classes)} classes but the store has {num_classes}")


def ensemble_probs(ensemble: Ensemble, images: torch.Tensor) -> torch.Tensor:
    """Mean member probabilities of ``[B, 3, H, W]`` images with values in [0, 255] (uint8 or float).

    Each member gets its own copy at its input size: ``TeacherMember.probs`` scales a float input in place, so
    neither ``images`` (the student's batch) nor another member's input may be shared with it.
    """
    total = None
    for member in ensemble.members:
        size = member.input_size
        own = images.to(torch.float32, copy=True) if images.shape[-1] == size else F.interpolate(
            images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        probs = member.probs(own)
        total = probs if total is None else total + probs
    return total / len(ensemble.members)


@torch.no_grad()
def held_out_top1(ensemble: Ensemble, batches_at: Callable[[int], Iterable]) -> tuple[float, int]:
    """Top-1 (percent) of ``ensemble`` over the ``(uint8 images, labels)`` batches that ``batches_at(size)``
    gives at the members' largest input size, and that size.

    Validation images are prepared at the teachers' own size, not the student's: an elpv teacher trained at
    128 px scored 69.79 % on 96-px validation images upsampled to 128 and 71.85 % on 128-px ones.
    """
    size = max(ensemble.input_sizes)
    correct = total = 0
    for images, labels in batches_at(size):
        predicted = ensemble_probs(ensemble, images).argmax(-1)  # on the members' device
        correct += int((predicted == labels.to(predicted.device)).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1), size


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], mean: torch.Tensor,
             std: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and expected calibration error (percent, ``bins`` confidence bins) of
    ``model`` over ``(uint8 images, labels)`` batches, normalized with ``mean`` and ``std`` (``[1, 3, 1, 1]``, in
    0-255 units, on the model's device)."""
    model.eval()
    device = mean.device
    correct1 = correct5 = total = 0
    confidences, hits = [], []
    for images, labels in batches:
        x = (images.to(device).float() - mean) / std
        labels = labels.to(device)
        probs = torch.softmax(model(x).float(), dim=-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(-1).sum())
        total += len(labels)
        confidences.append(probs.max(-1).values.cpu())
        hits.append((top[:, 0] == labels).float().cpu())
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1),
            "ece": 100.0 * _calibration_error(torch.cat(confidences), torch.cat(hits), bins)}


def _calibration_error(confidence: torch.Tensor, hit: torch.Tensor, bins: int) -> float:
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += float(inside.float().mean() * (confidence[inside].mean() - hit[inside].mean()).abs())
    return ece
