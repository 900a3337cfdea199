"""Teacher ensembles: timm architectures with local or pretrained weights, or any ``torch.nn.Module``.

Each member sees the augmented uint8 image resized to its own input size and normalized with its own mean
and std; the ensemble averages the members' softmax probabilities in float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from reinforce_loaders.errors import ReinforceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONNECT_TIMEOUT = 3.0
"""Seconds to wait for the weights' host before calling a teacher without cached weights unreachable."""


class TeacherError(ReinforceError):
    """A teacher cannot be created or loaded."""


@dataclasses.dataclass
class TeacherMember:
    """One ensemble member: a module mapping normalized ``[B, 3, S, S]`` float images to logits.

    ``num_classes`` is the width of its logits: None reads the module's ``num_classes`` (timm models have one),
    else one forward pass on a blank image finds it when first asked.
    """

    name: str
    module: torch.nn.Module
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: str | None = None
    num_classes: int | None = None
    data_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """timm's resolved preprocessing of the member (input size, mean, std, interpolation, crop_pct); the build
    resizes with the augmentation's own resampler and uses only the size, mean and std."""

    def __post_init__(self) -> None:
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 1:
            raise TeacherError(f"teacher {self.name}: input size {self.input_size!r} must be a positive integer "
                               "(--teacher-input-size, or the weights' input_size metadata)")
        self.mean = _three_floats(f"{self.name} mean (--teacher-mean, or the weights' metadata)", self.mean)
        self.std = _three_floats(f"{self.name} std (--teacher-std, or the weights' metadata)", self.std)
        if min(self.std) <= 0:
            raise TeacherError(f"teacher {self.name}: std {self.std} must be positive, images are divided by it "
                               "(--teacher-std, or the weights' std metadata)")
        if self.num_classes is None:
            found = getattr(self.module, "num_classes", None)
            self.num_classes = found if isinstance(found, int) and not isinstance(found, bool) else None
        if self.num_classes is not None and self.num_classes < 1:
            raise TeacherError(f"teacher {self.name} has no classifier head (num_classes={self.num_classes}): "
                               "use weights with a classification head")
        self.module.eval().requires_grad_(False)
        self.weights_sha256 = state_dict_sha256(self.module)

    def classes(self) -> int:
        """Width of the member's logits (one forward pass on the CPU if the module does not say)."""
        if self.num_classes is None:
            self.module.to("cpu")
            blank = torch.zeros(1, 3, self.input_size, self.input_size, dtype=torch.uint8)
            self.num_classes = int(self.probs(blank).shape[-1])
        return self.num_classes

    def describe(self) -> dict[str, Any]:
        """Identity of the member stored in the store header."""
        return {"name": self.name, "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "weights_sha256": self.weights_sha256}

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32) of uint8 ``[B, 3, input_size, input_size]`` images."""
        device = next(self.module.parameters()).device
        x = images.to(device, non_blocking=True).float() / 255.0  # never in place: a float input is the caller's
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
    def num_classes(self) -> int:
        """The classes every member predicts (they must agree)."""
        counts = [(member.name, member.classes()) for member in self.members]
        if len({count for _, count in counts}) > 1:
            listed = ", ".join(f"{name}: {count}" for name, count in counts)
            raise TeacherError(f"the teachers predict different numbers of classes ({listed}): every ensemble "
                               "member must predict the same classes")
        return counts[0][1]

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
    (keys ``input_size``, ``mean``, ``std`` as JSON) and timm's pretrained config of ``arch``: the first two are
    laid over the third with timm's ``pretrained_cfg_overlay`` and resolved by ``resolve_model_data_config``
    (which also gives the member's interpolation and crop_pct, kept in ``data_config``). The model is built
    once; its class count is its classifier's (for local weights: the weights' head).
    """
    import timm
    from timm.data import resolve_model_data_config

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:8]
        hint = f" (similar names: {', '.join(close)})" if close else ""
        raise TeacherError(f"unknown teacher architecture {arch!r}: use a timm model name{hint}")
    metadata: dict[str, str] = {}
    state = None
    if weights is not None:
        state, metadata = load_state_dict(weights)
    overlay = _data_overlay(input_size=input_size or metadata_value(metadata, "input_size"),
                            mean=mean or metadata_value(metadata, "mean"), std=std or metadata_value(metadata, "std"))
    if state is not None:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay,
                                  **_head_size(arch, state))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise TeacherError(f"weights {weights} do not fit timm architecture {arch!r}: {error}") from error
    else:
        model = _create_pretrained(arch, overlay)
    data_config = resolve_model_data_config(model)
    return TeacherMember(
        name=arch, module=model, input_size=int(data_config["input_size"][-1]),
        mean=tuple(float(v) for v in data_config["mean"]), std=tuple(float(v) for v in data_config["std"]),
        weights=str(weights) if weights is not None else None, num_classes=int(model.num_classes),
        data_config=dict(data_config),
    )


def _data_overlay(*, input_size: Any, mean: Any, std: Any) -> dict[str, Any]:
    """timm ``pretrained_cfg_overlay`` entries of the given (not None) preprocessing settings."""
    overlay: dict[str, Any] = {}
    if input_size is not None:
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise TeacherError(f"teacher input size {input_size!r} must be a positive integer")
        overlay["input_size"] = (3, input_size, input_size)
    for name, values in (("mean", mean), ("std", std)):
        if values is not None:
            overlay[name] = _three_floats(name, values)
    return overlay


def _head_size(arch: str, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``num_classes`` of local weights, read from their classifier (named by timm's config of ``arch``)."""
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(arch)
    classifier = getattr(config, "classifier", None) or "fc"
    if isinstance(classifier, (tuple, list)):
        classifier = classifier[0]
    head = state.get(f"{classifier}.weight")
    return {} if head is None else {"num_classes": int(head.shape[0])}


def _create_pretrained(arch: str, overlay: dict[str, Any]) -> torch.nn.Module:
    """timm's pretrained ``arch``: from the local cache without asking the network, else downloaded; fails
    at once with a clear message when the weights are not cached and their host cannot be reached."""
    import timm
    from timm.models import get_pretrained_cfg

    instead = f"Pass local weights instead: --teacher {arch}=PATH.safetensors (or a state_dict .pth)"
    config = get_pretrained_cfg(arch)
    if config is None or not (config.hf_hub_id or config.url or config.file):
        raise TeacherError(f"timm has no pretrained weights for {arch!r}. {instead}")
    cached = config.file or _cached_weights(config)
    if cached is None:
        unreachable = _unreachable_reason(config)
        if unreachable:
            raise TeacherError(f"timm's pretrained weights for {arch!r} are not in the local cache and "
                               f"{unreachable}. {instead}")
    try:
        return timm.create_model(arch, pretrained=True,
                                 pretrained_cfg_overlay={**overlay, **({"file": cached} if cached else {})})
    except Exception as error:  # hub, network and missing-weights errors all mean the same here
        raise TeacherError(f"could not get pretrained weights for {arch!r} ({type(error).__name__}: "
                           f"{_first_line(error)}). {instead}") from None


def _cached_weights(config: Any) -> str | None:
    """Path of ``config``'s weights in the Hugging Face or torch hub cache, if they are there."""
    if config.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = config.hf_hub_id.partition("@")
        names = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return found
    if config.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(config.url).path)
        if path.is_file():
            return str(path)
    return None


def _unreachable_reason(config: Any) -> str | None:
    """Why the weights' host cannot be reached (HF_HUB_OFFLINE, or a refused connection), or None if it can.

    One connection attempt of at most ``CONNECT_TIMEOUT`` seconds instead of the hub's retries; skipped behind a
    proxy, whose reachability says nothing about a direct connection.
    """
    if config.hf_hub_id and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
                                if config.hf_hub_id else config.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        return f"{url.hostname}:{port} cannot be reached ({error}; offline?)"
    return None


def _three_floats(name: str, values: Any) -> tuple[float, float, float]:
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        floats = ()
    if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
        raise TeacherError(f"teacher {name} {values!r} must be 3 finite numbers (R, G, B)")
    return floats  # type: ignore[return-value]


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def metadata_value(metadata: dict[str, str], key: str) -> Any:
    """A JSON value the weights file's metadata holds under ``key`` (``input_size``, ``mean``, ``std``: what
    ``reinforce train`` writes into its weights), or None."""
    return json.loads(metadata[key]) if key in metadata else None


def create_ensemble(specs: Sequence[str], *, input_size: int | None = None, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> Ensemble:
    """Ensemble from ``--teacher`` specs (``ARCH[=WEIGHTS]``), with optional overrides for every member."""
    members = []
    for spec in specs:
        arch, weights = parse_teacher_spec(spec)
        members.append(create_timm_member(arch, weights, input_size=input_size, mean=mean, std=std))
    return Ensemble(members)
