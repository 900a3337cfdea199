"""Teacher ensembles: timm architectures with local or pretrained weights, or any ``torch.nn.Module``.

Each member sees the augmented uint8 image resized to its own input size and normalized with its own mean
and std; the ensemble averages the members' softmax probabilities in float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from reinforce_loaders.errors import ReinforceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherError(ReinforceError):
    """A teacher cannot be created or loaded."""


@dataclasses.dataclass
class TeacherMember:
    """One ensemble member: a module mapping normalized ``[B, 3, S, S]`` float images to logits."""

    name: str
    module: torch.nn.Module
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: str | None = None

    def __post_init__(self) -> None:
        self.module.eval().requires_grad_(False)
        self.weights_sha256 = state_dict_sha256(self.module)

    def describe(self) -> dict[str, Any]:
        """Identity of the member stored in the store header."""
        return {"name": self.name, "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "weights_sha256": self.weights_sha256}

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32) of uint8 ``[B, 3, input_size, input_size]`` images."""
        device = next(self.module.parameters()).device
        x = images.to(device, non_blocking=True).float().div_(255.0)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        logits = self.module((x - mean) / std)
        return torch.softmax(logits.float(), dim=-1)


class Ensemble:
    """Members whose probabilities are averaged; all must predict the same number of classes."""

    def __init__(self, members: Sequence[TeacherMember]) -> None:
        if not members:
            raise TeacherError("a teacher ensemble needs at least one member: pass --teacher ARCH[=WEIGHTS]")
        self.members = list(members)

    @property
    def input_sizes(self) -> list[int]:
        return sorted({member.input_size for member in self.members})

    def to(self, device: str | torch.device) -> Ensemble:
        for member in self.members:
            member.module.to(device)
        return self

    @torch.no_grad()
    def probs(self, images_by_size: dict[int, torch.Tensor]) -> torch.Tensor:
        """Mean member probabilities, given the batch resized to every member input size."""
        total = None
        for member in self.members:
            p = member.probs(images_by_size[member.input_size])
            if total is not None and p.shape[-1] != total.shape[-1]:
                raise TeacherError(
                    f"teacher {member.name} predicts {p.shape[-1]} classes but {self.members[0].name} predicts "
                    f"{total.shape[-1]}: every ensemble member must predict the same classes"
                )
            total = p if total is None else total + p
        return total / len(self.members)

    def describe(self) -> list[dict[str, Any]]:
        return [member.describe() for member in self.members]


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (sorted names, dtypes, shapes and bytes): the weights' identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parse_teacher_spec(spec: str) -> tuple[str, str | None]:
    """``"ARCH"`` or ``"ARCH=WEIGHTS"`` -> (arch, weights path or None)."""
    arch, _, weights = spec.partition("=")
    if not arch:
        raise TeacherError(f"malformed teacher {spec!r}: use ARCH or ARCH=PATH_TO_WEIGHTS")
    return arch, weights or None


def load_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a .safetensors file, or a torch state dict loaded with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher weights {path} not found: pass an existing .safetensors or state_dict file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or unsafe files
        raise TeacherError(f"cannot load teacher weights {path} as a state_dict (weights_only=True): {error}") from error
    for wrapper in ("state_dict", "model", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"teacher weights {path} do not hold a state_dict of tensors")
    return state, {}


def create_timm_member(arch: str, weights: str | os.PathLike[str] | None = None, *, input_size: int | None = None,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> TeacherMember:
    """A member from a timm architecture name and local weights, or timm's pretrained weights.

    Input size, mean and std come, in order of precedence, from the arguments, the safetensors metadata
    (keys ``input_size``, ``mean``, ``std`` as JSON) and timm's pretrained config of ``arch``.
    """
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:8]
        hint = f" (similar names: {', '.join(close)})" if close else ""
        raise TeacherError(f"unknown teacher architecture {arch!r}: use a timm model name{hint}")
    metadata: dict[str, str] = {}
    if weights is not None:
        state, metadata = load_state_dict(weights)
        probe = timm.create_model(arch, pretrained=False)
        classifier = probe.pretrained_cfg.get("classifier", "fc")
        head = state.get(f"{classifier}.weight")
        num_classes = int(head.shape[0]) if head is not None else probe.num_classes
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise TeacherError(f"weights {weights} do not fit timm architecture {arch!r}: {error}") from error
    else:
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as error:  # hub, network and missing-weights errors all mean the same here
            raise TeacherError(
                f"could not get pretrained weights for {arch!r} ({type(error).__name__}: {error}). "
                f"Pass local weights instead: --teacher {arch}=PATH.safetensors (or a state_dict .pth)"
            ) from error
    config = model.pretrained_cfg
    size = input_size or _meta(metadata, "input_size") or int(config.get("input_size", (3, 224, 224))[-1])
    return TeacherMember(
        name=arch, module=model, input_size=int(size),
        mean=tuple(mean or _meta(metadata, "mean") or config.get("mean", IMAGENET_MEAN)),
        std=tuple(std or _meta(metadata, "std") or config.get("std", IMAGENET_STD)),
        weights=str(weights) if weights is not None else None,
    )


def _meta(metadata: dict[str, str], key: str) -> Any:
    return json.loads(metadata[key]) if key in metadata else None


def create_ensemble(specs: Sequence[str], *, input_size: int | None = None, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> Ensemble:
    """Ensemble from ``--teacher`` specs (``ARCH[=WEIGHTS]``), with optional overrides for every member."""
    members = []
    for spec in specs:
        arch, weights = parse_teacher_spec(spec)
        members.append(create_timm_member(arch, weights, input_size=input_size, mean=mean, std=std))
    return Ensemble(members)
