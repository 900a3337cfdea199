"""The student: a timm model (timm's factory) with optional local weights, or any module passed from Python."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..build.teachers import IMAGENET_MEAN, IMAGENET_STD, load_state_dict, metadata_value, parse_teacher_spec
from .errors import TrainError

if TYPE_CHECKING:
    from .settings import Settings


def make_student(settings: Settings, num_classes: int, module: torch.nn.Module | None = None) -> Student:
    """The run's student: ``module`` when given from Python (checked against the class count; ImageNet
    normalization unless the settings say otherwise), else ``settings.model`` created with the run's seed."""
    if module is not None:
        check_module_classes(module, num_classes, settings.image_size)
        return Student(module=module, name=type(module).__name__, mean=settings.mean or IMAGENET_MEAN,
                       std=settings.std or IMAGENET_STD, input_size=None, notes=[])
    torch.manual_seed(settings.seed)
    return create_student(settings.model, num_classes, fine_tune=settings.fine_tune, mean=settings.mean,
                          std=settings.std)


@dataclasses.dataclass
class Student:
    """The model a run trains, with the normalization its inputs get and where it came from."""

    module: torch.nn.Module
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int | None
    notes: list[str]


def create_student(spec: str, num_classes: int, *, fine_tune: bool, mean=None, std=None) -> Student:
    """``ARCH[=WEIGHTS]`` -> a timm model with ``num_classes`` outputs.

    Local weights whose classifier has another class count are refused, except when fine-tuning
    (``fine_tune``), where the classifier is re-initialized for ``num_classes`` (the ImageNet-pretrained case).
    """
    import timm

    arch, weights = parse_teacher_spec(spec)
    if not timm.is_model(arch):
        raise TrainError(f"unknown model {arch!r}: use a timm model name (timm.list_models())")
    if fine_tune and weights is None:
        raise TrainError("fine-tuning (--recipe adaptive, --fine-tune) starts from pretrained weights: pass --model "
                         "ARCH=WEIGHTS (.safetensors or a state_dict file)")
    module = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    metadata: dict[str, str] = {}
    notes: list[str] = []
    if weights is not None:
        state, metadata = load_state_dict(weights)
        notes += _load_weights(module, state, weights, num_classes, fine_tune)
    config = module.pretrained_cfg
    size = metadata_value(metadata, "input_size")
    return Student(module=module, name=arch,
                   mean=tuple(mean or metadata_value(metadata, "mean") or config.get("mean", IMAGENET_MEAN)),
                   std=tuple(std or metadata_value(metadata, "std") or config.get("std", IMAGENET_STD)),
                   input_size=int(size) if size else None, notes=notes)


def _load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], weights: str, num_classes: int,
                  fine_tune: bool) -> list[str]:
    classifier = module.pretrained_cfg.get("classifier", "fc")
    head_keys = [key for key in state if key.startswith(f"{classifier}.")]
    head = state.get(f"{classifier}.weight")
    notes = []
    if head is not None and head.shape[0] != num_classes:
        if not fine_tune:
            raise TrainError(
                f"model weights {weights} predict {head.shape[0]} classes but the training data has {num_classes}: "
                "pass weights for these classes, or add --fine-tune to re-initialize the classifier (the default "
                "of --recipe adaptive)"
            )
        state = {key: value for key, value in state.items() if key not in head_keys}
        _zero_classifier(module)
        notes.append(f"classifier {classifier} re-initialized (zeros) for {num_classes} classes (the weights had "
                     f"{head.shape[0]})")
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith(f"{classifier}.")]
    if missing or unexpected:
        raise TrainError(f"weights {weights} do not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return notes


def _zero_classifier(module: torch.nn.Module) -> None:
    """A new classifier starts at zero, so the fine-tune starts from uniform predictions (loss ln C), as BiT
    does; timm's random init of an EfficientNet head starts an 8-class fine-tune at a loss of about 5."""
    with torch.no_grad():
        for parameter in module.get_classifier().parameters():
            parameter.zero_()


def check_module_classes(module: torch.nn.Module, num_classes: int, size: int) -> None:
    """Refuse a model (passed from Python) whose output count is not the store's class count."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        outputs = module(torch.zeros(1, 3, size, size)).shape[-1]
    module.train(was_training)
    if outputs != num_classes:
        raise TrainError(f"the model predicts {outputs} classes but the store/training data has {num_classes}: "
                         f"create it with num_classes={num_classes}")

