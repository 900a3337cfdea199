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
from ..codecs import Codec, LinearCodec, ParamLayout, Float16Codec
from ..errors import AugmentationError
from .base import AugmentOp, Mixer, SampleContext, SourceOp
from .color import AugMix, RandAugment
from .geometric import CenterCrop, HorizontalFlip, RandomCrop, RandomResizedCrop, partner_box_codecs
from .mixing import CutMix, Mix, MixUp, RandomErasing

PARTNER_STREAM_OFFSET = 1 << 16
"""The partner's copy of op ``k`` draws from RNG stream ``PARTNER_STREAM_OFFSET + k`` of the record's key."""

OPS: dict[str, type[AugmentOp]] = {op.name: op for op in (
    RandomResizedCrop, RandomCrop, CenterCrop, HorizontalFlip, RandAugment, AugMix, RandomErasing, Mix, MixUp, CutMix,
)}

ARITHMETIC_VERSION = 2
"""Version of the replay's pixel arithmetic, stored as ``augmentation.arithmetic`` in the header.

1 (absent from the header; reinforce-loaders 0.1.0): float32 blends, torchvision's resamplers and float
affine grids, whose bytes depend on the device. 2: integer and fixed-point arithmetic, the same bytes on every
device (format_spec.md 4.5). A store is replayed only with the arithmetic it was built with."""

CPU_CHUNK = 8
"""Records per chunk of the ops after the crop on the CPU (results do not depend on it)."""

PartnerSize = Callable[[int], Sequence[int] | None]
Uniforms = Callable[[int], np.ndarray]


class AugmentPipeline:
    """An ordered list of ops producing ``size`` x ``size`` uint8 images.

    The first op is a crop (a :class:`SourceOp`); at most one :class:`Mixer` may follow, and the ops before it
    are also applied to the partner with the partner's own parameters. Op ``k`` of record (sample, slot) draws
    from RNG stream ``k`` of key (seed, sample, slot); the partner's copy of op ``k`` from stream
    ``PARTNER_STREAM_OFFSET + k``.

    Parameter layout of a record (:attr:`param_layout`): every op's parameters in order; the mixer's block
    ends with the partner's parameters of the ops before it, named ``<mixer>.partner.<op>.<param>``.
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
        mixers = [k for k, op in enumerate(ops) if isinstance(op, Mixer)]
        if len(mixers) > 1:
            raise AugmentationError("a pipeline may hold at most one mixing op (mix, mixup or cutmix)")
        self.ops = ops
        self.size = int(size)
        self.mix_index: int | None = mixers[0] if mixers else None
        names: list[str] = []
        codecs: list[Codec] = []

        def add(prefix: str, op: AugmentOp, op_codecs: Sequence[Codec]) -> tuple[int, int]:
            first = len(names)
            names.extend(f"{prefix}{name}" for name in op.param_names)
            codecs.extend(op_codecs)
            return first, len(names)

        self._own: list[tuple[int, int]] = []
        self._partner: list[tuple[int, int]] = []
        for k, op in enumerate(ops):
            self._own.append(add(f"{op.name}.", op, op.param_codecs))
            if k == self.mix_index:
                self._partner = [add(f"{op.name}.partner.{before.name}.", before,
                                     partner_box_codecs(before) if isinstance(before, SourceOp)
                                     else before.param_codecs)
                                 for before in ops[:k]]
        self.param_layout = ParamLayout(names, codecs, self.size)
        # Real-valued parameters are rounded to binary32 when sampled (format_spec.md, section 5).
        self._real_columns = np.array([isinstance(codec, (LinearCodec, Float16Codec)) for codec in codecs], bool)

    @property
    def num_params(self) -> int:
        return len(self.param_layout.names)

    @property
    def mixes(self) -> bool:
        """Whether records mix with a partner sample."""
        return self.mix_index is not None

    @property
    def param_names(self) -> list[str]:
        return list(self.param_layout.names)

    # -- sampling ---------------------------------------------------------------------------------------------

    def sample_block(self, seed: int, samples: Sequence[int] | np.ndarray, num_slots: int,
                     heights: Sequence[int] | np.ndarray, widths: Sequence[int] | np.ndarray, *,
                     num_samples: int | None = None, partner_size: PartnerSize | None = None,
                     partner_pool: np.ndarray | None = None) -> np.ndarray:
        """Parameters ``(n, num_slots, num_params)`` of slots ``0..num_slots-1`` of each of ``n`` samples.

        ``heights``/``widths`` ``(n,)`` are the decoded source images' sizes. Mixing pipelines also need
        ``num_samples`` (the dataset's length) and ``partner_size(index) -> (height, width)`` of any source
        image, or None for an image that cannot be read: a record drawing it is left unmixed.
        ``partner_pool`` (sorted sample indices, :func:`~reinforce_loaders.rng.partner_pool`) restricts the
        partners to its members; the build passes its block's pool. A record's values do not depend on the
        other records sampled with it.
        """
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)

        def uniforms(stream: int) -> np.ndarray:
            if not len(samples):
                return np.empty((0, rng.UNIFORMS_PER_SLOT))
            return np.concatenate([rng.all_slot_uniforms(seed, int(s), num_slots, stream) for s in samples])

        params = self._sample(uniforms, np.repeat(samples, num_slots),
                              np.repeat(np.asarray(heights, dtype=np.int64).reshape(-1), num_slots),
                              np.repeat(np.asarray(widths, dtype=np.int64).reshape(-1), num_slots),
                              num_samples, partner_size, partner_pool)
        return params.reshape(len(samples), num_slots, self.num_params)

    def sample_slots(self, seed: int, sample: int, num_slots: int, height: int, width: int,
                     num_samples: int | None = None, partner_size: PartnerSize | None = None,
                     partner_pool: np.ndarray | None = None) -> np.ndarray:
        """Parameters ``(num_slots, num_params)`` of slots ``0..num_slots-1`` of one sample (see
        :meth:`sample_block`)."""
        return self.sample_block(seed, [sample], num_slots, [height], [width], num_samples=num_samples,
                                 partner_size=partner_size, partner_pool=partner_pool)[0]

    def sample_records(self, seed: int, samples: Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray,
                       heights: Sequence[int] | np.ndarray, widths: Sequence[int] | np.ndarray, *,
                       num_samples: int | None = None, partner_size: PartnerSize | None = None,
                       partner_pool: np.ndarray | None = None) -> np.ndarray:
        """Parameters ``(m, num_params)`` of records ``(samples[r], slots[r])`` (see :meth:`sample_block`); a
        reader uses it for one slot of many samples."""
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        slots = np.broadcast_to(np.asarray(slots, dtype=np.int64), samples.shape)

        def uniforms(stream: int) -> np.ndarray:
            if not len(samples):
                return np.empty((0, rng.UNIFORMS_PER_SLOT))
            return np.stack([rng.slot_uniforms(seed, int(s), int(j), stream) for s, j in zip(samples, slots)])

        return self._sample(uniforms, samples, np.asarray(heights, dtype=np.int64).reshape(-1),
                            np.asarray(widths, dtype=np.int64).reshape(-1), num_samples, partner_size, partner_pool)

    def sample(self, seed: int, sample: int, slot: int, height: int, width: int, num_samples: int | None = None,
               partner_size: PartnerSize | None = None, partner_pool: np.ndarray | None = None) -> np.ndarray:
        """Parameters ``(num_params,)`` of record (sample, slot) (see :meth:`sample_block`)."""
        return self.sample_records(seed, [sample], [slot], [height], [width], num_samples=num_samples,
                                   partner_size=partner_size, partner_pool=partner_pool)[0]

    def _sample(self, uniforms: Uniforms, samples: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                num_samples: int | None, partner_size: PartnerSize | None,
                partner_pool: np.ndarray | None) -> np.ndarray:
        """Parameters ``(m, P)`` of ``m`` records; ``uniforms(stream)`` gives their ``(m, 64)`` uniforms."""
        if self.mixes:
            if num_samples is None or partner_size is None:
                raise AugmentationError("a mixing pipeline samples partners: pass num_samples and partner_size")
            if len(samples) and not (0 <= samples.min() and samples.max() < num_samples):
                raise AugmentationError(f"samples must lie in [0, num_samples={num_samples}) to draw partners")
        context = SampleContext(heights, widths, samples, num_samples, partner_pool)
        out = np.zeros((len(samples), self.num_params), dtype=np.float64)
        for k, op in enumerate(self.ops):
            lo, hi = self._own[k]
            out[:, lo:hi] = op.sample_batch(uniforms(k), context)
        if self.mixes:
            self._sample_partners(uniforms, out, partner_size)
        out[:, self._real_columns] = out[:, self._real_columns].astype(np.float32)
        return out

    def _sample_partners(self, uniforms: Uniforms, out: np.ndarray, partner_size: PartnerSize) -> None:
        """Fill the partner parameters of mixed records; a record whose partner cannot be read is unmixed."""
        lo, hi = self._own[self.mix_index]
        partners = np.rint(out[:, lo]).astype(np.int64)
        mixed = np.flatnonzero(partners >= 0)
        if not mixed.size:
            return
        unique, inverse = np.unique(partners[mixed], return_inverse=True)
        sizes = [partner_size(int(p)) for p in unique]
        known = np.array([[int(v) for v in size] if size is not None else [-1, -1] for size in sizes],
                         dtype=np.int64).reshape(-1, 2)[inverse]
        readable = known[:, 0] >= 0
        out[mixed[~readable], lo:hi] = self.ops[self.mix_index].unmixed(int((~readable).sum()))
        mixed, shape = mixed[readable], known[readable]
        if not mixed.size:
            return
        context = SampleContext(shape[:, 0], shape[:, 1])
        for k, (first, last) in enumerate(self._partner):
            out[mixed, first:last] = self.ops[k].sample_batch(uniforms(PARTNER_STREAM_OFFSET + k)[mixed], context)

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
            result = torch.cat([mix.apply_mixed(own[i:i + step], partners[i:i + step], own_params[i:i + step, lo:hi])
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
        return {"size": self.size, "ops": [op.config() for op in self.ops], "param_names": self.param_names,
                "arithmetic": ARITHMETIC_VERSION}

    @classmethod
    def from_config(cls, config: dict[str, Any], size: int | None = None) -> AugmentPipeline:
        """Pipeline of a :meth:`config` dict (``size`` overrides the stored one).

        A store header's config (it has ``param_names``) must carry this version's ``arithmetic``
        (:data:`ARITHMETIC_VERSION`): a store built with other pixel arithmetic is refused, never replayed with
        different pixels. A hand-written config (no ``param_names``) without ``arithmetic`` gets this version's.
        """
        if not isinstance(config, dict) or not isinstance(config.get("ops"), list):
            raise AugmentationError(f"an augmentation config is an object with a list 'ops', got {config!r:.200}")
        check_arithmetic(config)
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


def check_arithmetic(config: dict[str, Any]) -> None:
    """Refuse an augmentation config whose pixel arithmetic is not :data:`ARITHMETIC_VERSION` (see
    :meth:`AugmentPipeline.from_config`)."""
    default = ARITHMETIC_VERSION if "param_names" not in config else 1
    version = config.get("arithmetic", default)
    if version == ARITHMETIC_VERSION and not isinstance(version, bool):
        return
    if isinstance(version, int) and not isinstance(version, bool) and version == 1:
        raise AugmentationError(
            "this store was built with augmentation arithmetic 1 (reinforce-loaders 0.1.0: float blends and "
            "resamplers whose pixels depend on the device), and this reinforce-loaders replays arithmetic "
            f"{ARITHMETIC_VERSION} (exact integer ops, format_spec.md 4.5): its records would replay other "
            "pixels than the teachers labelled. Rebuild the store with this version, or replay it with "
            "reinforce-loaders 0.1.0")
    raise AugmentationError(
        f"this store's augmentation arithmetic is {str(version)[:40]!r}; this reinforce-loaders replays "
        f"arithmetic {ARITHMETIC_VERSION} only: upgrade reinforce-loaders, or rebuild the store with this version")


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
