"""AugmentPipeline: ordered ops, keyed sampling of every record, batched replay; presets and configs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import rng
from ..errors import AugmentationError
from .base import AugmentOp, ParamSpec, SourceOp
from .color import AugMix, RandAugment
from .geometric import CenterCrop, HorizontalFlip, RandomCrop, RandomResizedCrop
from .mixing import CutMix, Mix, MixUp, RandomErasing

PARTNER_STREAM_OFFSET = 1 << 16
"""The partner's copy of op ``k`` draws from RNG stream ``PARTNER_STREAM_OFFSET + k`` of the record's key."""

MAX_EXACT_INDEX = 1 << 24
"""Partner indices are stored in float32 parameters, exact below 2**24."""

OPS: dict[str, type[AugmentOp]] = {op.name: op for op in (
    RandomResizedCrop, RandomCrop, CenterCrop, HorizontalFlip, RandAugment, AugMix, RandomErasing, Mix, MixUp, CutMix,
)}

CPU_CHUNK = 8
"""Records per chunk of the ops after the crop on the CPU (results do not depend on it)."""

PartnerSize = Callable[[int], Sequence[int]]


class AugmentPipeline:
    """An ordered list of ops producing ``size`` x ``size`` uint8 images.

    The first op is a crop (a :class:`SourceOp`); at most one mixing op (:class:`Mix`) may follow, and the
    ops before it are also applied to the partner with the partner's own parameters. Op ``k`` of record
    (sample, slot) draws from RNG stream ``k`` of key (seed, sample, slot); the partner's copy of op ``k``
    from stream ``PARTNER_STREAM_OFFSET + k``.

    Parameter layout of a record: every op's parameters in order; a mixing op's block ends with the
    partner's parameters of the ops before it, named ``mix.partner.<op>.<param>``.
    """

    def __init__(self, ops: Sequence[AugmentOp], size: int) -> None:
        ops = list(ops)
        if not ops:
            raise AugmentationError("an augmentation pipeline needs at least one op")
        if int(size) < 1:
            raise AugmentationError(f"augmentation output size must be positive, got {size}")
        if not isinstance(ops[0], SourceOp):
            raise AugmentationError(
                f"the first op of a pipeline must be a crop ({', '.join(n for n, o in OPS.items() if issubclass(o, SourceOp))}), "
                f"got {ops[0].name}")
        if any(isinstance(op, SourceOp) for op in ops[1:]):
            raise AugmentationError("only the first op of a pipeline may be a crop")
        mixers = [k for k, op in enumerate(ops) if isinstance(op, Mix)]
        if len(mixers) > 1:
            raise AugmentationError("a pipeline may hold at most one mixing op (mix, mixup or cutmix)")
        self.ops = ops
        self.size = int(size)
        self.mix_index: int | None = mixers[0] if mixers else None
        if self.mix_index is not None:
            ops[self.mix_index].bind_partner_ops(ops[:self.mix_index])
        widths = [len(op.param_names) for op in ops]
        offsets = np.cumsum([0] + widths)
        self._own = [(int(offsets[k]), int(offsets[k + 1])) for k in range(len(ops))]
        if self.mix_index is not None:  # the partner's copies sit inside the mixing op's block, after its own
            first = self._own[self.mix_index][0] + len(Mix.OWN_PARAMS)
            partner_offsets = first + np.cumsum([0] + widths[:self.mix_index])
            self._own[self.mix_index] = (self._own[self.mix_index][0], first)
            self._partner = [(int(partner_offsets[k]), int(partner_offsets[k + 1])) for k in range(self.mix_index)]
        else:
            self._partner = []
        self._num_params = int(offsets[-1])

    @property
    def num_params(self) -> int:
        return self._num_params

    @property
    def mixes(self) -> bool:
        """Whether records mix with a partner sample."""
        return self.mix_index is not None

    @property
    def param_names(self) -> list[str]:
        return [f"{op.name}.{name}" for op in self.ops for name in op.param_names]

    @property
    def param_specs(self) -> list[ParamSpec]:
        """Range of every parameter, aligned with :attr:`param_names`."""
        return [spec for op in self.ops for spec in op.param_specs]

    # -- sampling ---------------------------------------------------------------------------------------------

    def sample(self, seed: int, sample: int, slot: int, height: int, width: int, num_samples: int | None = None,
               partner_size: PartnerSize | None = None, partner_pool: np.ndarray | None = None) -> np.ndarray:
        """Parameters of record (sample, slot) as a ``(num_params,)`` vector (see :meth:`sample_slots`)."""
        uniforms = [rng.slot_uniforms(seed, sample, slot, k)[None] for k in range(len(self.ops))]
        return self._sample(seed, sample, [slot], uniforms, height, width, num_samples, partner_size,
                            partner_pool)[0]

    def sample_slots(self, seed: int, sample: int, num_slots: int, height: int, width: int,
                     num_samples: int | None = None, partner_size: PartnerSize | None = None,
                     partner_pool: np.ndarray | None = None) -> np.ndarray:
        """Parameters of slots ``0..num_slots-1`` of one sample, shape ``(num_slots, num_params)``.

        ``height`` x ``width`` is the decoded source image's size. Mixing pipelines also need ``num_samples``
        (the dataset's length, partners are drawn from it) and ``partner_size(index) -> (height, width)`` of
        any source image, or None for an image that cannot be read: a record drawing it is left unmixed.
        ``partner_pool`` (sorted sample indices, :func:`~reinforce_loaders.rng.partner_pool`) restricts the
        partners to its members; the build passes its block's pool. Values are float32-exact, so replaying stored float32 parameters is bit-identical.
        """
        uniforms = [rng.all_slot_uniforms(seed, sample, num_slots, k) for k in range(len(self.ops))]
        return self._sample(seed, sample, list(range(num_slots)), uniforms, height, width, num_samples, partner_size,
                            partner_pool)

    def _sample(self, seed: int, sample: int, slots: list[int], uniforms: list[np.ndarray], height: int, width: int,
                num_samples: int | None, partner_size: PartnerSize | None,
                partner_pool: np.ndarray | None = None) -> np.ndarray:
        if self.mixes:
            if num_samples is None or partner_size is None:
                raise AugmentationError("a mixing pipeline samples partners: pass num_samples and partner_size")
            if not 0 <= sample < num_samples or num_samples > MAX_EXACT_INDEX:
                raise AugmentationError(f"sample {sample} of {num_samples}: mixing needs 0 <= sample < num_samples "
                                        f"<= {MAX_EXACT_INDEX}")
        out = np.zeros((len(slots), self.num_params), dtype=np.float64)
        for k, op in enumerate(self.ops):
            lo, hi = self._own[k]
            for row in range(len(slots)):
                u = uniforms[k][row]
                out[row, lo:hi] = (op.sample_mix(u, sample, num_samples, partner_pool) if isinstance(op, Mix)
                                   else op.sample(u, height, width))
        if self.mixes:
            partner_column = self._own[self.mix_index][0]
            for row, slot in enumerate(slots):
                partner = int(out[row, partner_column])
                if partner < 0:
                    continue
                size = partner_size(partner)
                if size is None:  # an unreadable (skipped) partner: the record is not mixed
                    lo, hi = self._own[self.mix_index]
                    out[row, lo:hi] = self.ops[self.mix_index].unmixed()
                    continue
                p_height, p_width = (int(v) for v in size)
                for k, (lo, hi) in enumerate(self._partner):
                    u = rng.slot_uniforms(seed, sample, slot, PARTNER_STREAM_OFFSET + k)
                    out[row, lo:hi] = self.ops[k].sample(u, p_height, p_width)
        return out.astype(np.float32).astype(np.float64)

    def partner_indices(self, params: np.ndarray) -> np.ndarray | None:
        """Source sample each record of ``params`` (``[n, num_params]``) mixes with (-1: none), or None if the
        pipeline does not mix."""
        if not self.mixes:
            return None
        params = np.asarray(params)
        return np.rint(params[..., self._own[self.mix_index][0]]).astype(np.int64)

    # -- replay -----------------------------------------------------------------------------------------------

    def apply(self, image: torch.Tensor, params: Sequence[float] | np.ndarray, size: int | None = None,
              partner_image: torch.Tensor | None = None) -> torch.Tensor:
        """Replay one record on a uint8 ``[C, H, W]`` image (the student path): a batch of one through
        :meth:`apply_batch`. ``partner_image`` is the decoded partner source of a mixed record."""
        params = np.asarray(params, dtype=np.float64)[None]
        return self.apply_batch([image], params, size, [partner_image])[0]

    def apply_batch(self, images: Sequence[torch.Tensor] | torch.Tensor, params: np.ndarray | torch.Tensor,
                    size: int | None = None, partner_images: Sequence[torch.Tensor | None] | None = None,
                    ) -> torch.Tensor:
        """Replay record ``r``'s ``params[r]`` on ``images[r]`` for every record at once: uint8
        ``[n, C, size, size]`` on the images' device.

        ``images`` are uint8 ``[C, H, W]`` tensors on one device; pass the same tensor object for records of
        one sample (the crop then converts it once). ``partner_images[r]`` is the source image of
        :meth:`partner_indices` ``[r]`` for mixed records (None elsewhere). ``size`` overrides the pipeline's
        output side.
        """
        size = self.size if size is None else int(size)
        images = list(images)
        if not images:
            raise AugmentationError("apply_batch needs at least one image")
        device = images[0].device
        params = torch.as_tensor(np.asarray(params, dtype=np.float64), device=device)
        if params.ndim != 2 or params.shape != (len(images), self.num_params):
            raise AugmentationError(f"expected parameters of shape ({len(images)}, {self.num_params}) for this "
                                    f"pipeline ({', '.join(op.name for op in self.ops)}), got {tuple(params.shape)}")
        stop = len(self.ops) if self.mix_index is None else self.mix_index
        out = self._run(self.ops[:stop], images, params, self._own[:stop], size)
        if self.mix_index is None:
            return out
        mix = self.ops[self.mix_index]
        lo, hi = self._own[self.mix_index]
        mixed = torch.nonzero(params[:, lo] >= 0).flatten()
        if len(mixed):
            rows = mixed.tolist()
            if partner_images is None or len(partner_images) != len(images) or any(
                    partner_images[r] is None for r in rows):
                raise AugmentationError("mixed records need their partner images: pass partner_images "
                                        "(see partner_indices)")
            partners = self._run(self.ops[:stop], [partner_images[r] for r in rows], params[mixed], self._partner, size)
            every = len(rows) == len(out)
            own, own_params = (out, params) if every else (out[mixed], params[mixed])
            step = CPU_CHUNK if device.type == "cpu" else len(own)
            result = torch.cat([mix.mix(own[i:i + step], partners[i:i + step], own_params[i:i + step, lo:hi])
                                for i in range(0, len(own), step)])
            if every:
                out = result
            else:
                out = out.clone()
                out[mixed] = result
        rest = range(self.mix_index + 1, len(self.ops))
        return self._run_batch([self.ops[k] for k in rest], out, params, [self._own[k] for k in rest])

    def _run(self, ops: list[AugmentOp], images: list[torch.Tensor], params: torch.Tensor,
             columns: list[tuple[int, int]], size: int) -> torch.Tensor:
        lo, hi = columns[0]
        out = ops[0].apply_sources(images, params[:, lo:hi], size)
        return self._run_batch(ops[1:], out, params, columns[1:])

    @staticmethod
    def _run_batch(ops: list[AugmentOp], images: torch.Tensor, params: torch.Tensor,
                   columns: list[tuple[int, int]]) -> torch.Tensor:
        if not ops:
            return images
        # Records are independent: on the CPU, chunks that fit in cache beat one pass over a huge batch.
        step = CPU_CHUNK if images.device.type == "cpu" else len(images)
        chunks = []
        for first in range(0, len(images), step):
            chunk = images[first:first + step]
            for op, (lo, hi) in zip(ops, columns):
                chunk = op.apply_batch(chunk, params[first:first + step, lo:hi])
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    # -- configs ----------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {"size": self.size, "ops": [op.config() for op in self.ops], "param_names": self.param_names}

    @classmethod
    def from_config(cls, config: dict[str, Any], size: int | None = None) -> AugmentPipeline:
        """Pipeline of a :meth:`config` dict (``size`` overrides the stored one)."""
        if not isinstance(config, dict) or not isinstance(config.get("ops"), list):
            raise AugmentationError(f"an augmentation config is an object with a list 'ops', got {config!r:.200}")
        ops = []
        for op_config in config["ops"]:
            if not isinstance(op_config, dict) or "name" not in op_config:
                raise AugmentationError(f"each augmentation op is an object with a 'name', got {op_config!r:.200}")
            kwargs = dict(op_config)
            name = kwargs.pop("name")
            if name not in OPS:
                raise AugmentationError(
                    f"unknown augmentation op {name!r} (known: {', '.join(sorted(OPS))}); if a store uses it, "
                    "upgrade reinforce-loaders")
            try:
                ops.append(OPS[name](**kwargs))
            except TypeError as error:
                raise AugmentationError(f"bad arguments for augmentation op {name!r}: {error}") from None
        if size is None and "size" not in config:
            raise AugmentationError("the augmentation config has no 'size' and none was given")
        pipeline = cls(ops, int(size if size is not None else config["size"]))
        if "param_names" in config and list(config["param_names"]) != pipeline.param_names:
            raise AugmentationError(
                f"stored parameter layout {config['param_names']} differs from this version's "
                f"{pipeline.param_names}: upgrade reinforce-loaders"
            )
        return pipeline


def _ra() -> RandAugment:
    return RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31, p=1.0, magnitude_std=0.5)


PRESETS: dict[str, Callable[[], list[AugmentOp]]] = {
    "cropflip": lambda: [RandomCrop(0.875), HorizontalFlip(0.5)],
    "rrc": lambda: [RandomResizedCrop(), HorizontalFlip(0.5)],
    "rrc+ra/re": lambda: [RandomResizedCrop(), HorizontalFlip(0.5), _ra(), RandomErasing(p=0.25)],
    "rrc+mix": lambda: [RandomResizedCrop(), HorizontalFlip(0.5), Mix(mixup_alpha=0.2, cutmix_alpha=1.0)],
    "rrc+m*+r*": lambda: [RandomResizedCrop(), HorizontalFlip(0.5), _ra(), RandomErasing(p=0.25),
                          Mix(mixup_alpha=0.2, cutmix_alpha=1.0)],
    "rrc+augmix": lambda: [RandomResizedCrop(), HorizontalFlip(0.5), AugMix()],
}
"""Named pipelines after the DR paper (Table 2, Appendix C.1): ``cropflip`` (fixed resize, random crop, flip),
``rrc`` (RandomResizedCrop + flip), ``rrc+ra/re`` (ImageNet+: + RandAugment 2 ops m9 mstd0.5 p=1 + RandomErasing
p=0.25), ``rrc+mix`` (+ MixUp 0.2 / CutMix 1.0, switch 0.5), ``rrc+m*+r*`` (both), and ``rrc+augmix``."""


def make_pipeline(preset: str | os.PathLike[str], size: int = 224) -> AugmentPipeline:
    """Pipeline of a named preset (see ``PRESETS``) or of a JSON config file, producing ``size`` x ``size``.

    A config file holds ``{"ops": [{"name": OP, ARG: VALUE, ...}, ...]}`` (the ``augmentation`` object of a
    store header also works; ``size`` always comes from the argument). Op names: see ``OPS``.
    """
    if isinstance(preset, str) and preset in PRESETS:
        return AugmentPipeline(PRESETS[preset](), size)
    path = Path(preset)
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            config = json.loads(path.read_text())
        except OSError as error:
            raise AugmentationError(f"cannot read augmentation config {path}: {error}") from None
        except json.JSONDecodeError as error:
            raise AugmentationError(f"augmentation config {path} is not valid JSON: {error}") from None
        config = {key: value for key, value in config.items() if key != "param_names"} if isinstance(
            config, dict) else config
        return AugmentPipeline.from_config(config, size)
    raise AugmentationError(f"unknown augmentation preset {str(preset)!r}; choose one of: {', '.join(PRESETS)}, "
                            "or pass a JSON config file")
