"""What a build is asked for (:class:`BuildConfig`) and what it will do (:class:`BuildPlan`).

A :class:`BuildConfig` holds the user's settings, every default declared once here (the CLI takes its
defaults from it). :func:`resolve_plan` validates it against the source and the teachers and resolves
everything the settings leave open (image and block size, precision, CPU threads, class count, class
vocabulary, the store header) into one frozen :class:`BuildPlan`, which the driver, the block processor and
every worker then read. No other module re-derives these values.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import zarr
from reinforce_loaders import format as fmt
from reinforce_loaders.augment import PRESETS, AugmentPipeline, make_pipeline
from reinforce_loaders.errors import AugmentationError, ReinforceError
from reinforce_loaders.source import ImageSource, open_source, set_max_image_pixels

from .. import __version__
from .teachers import Ensemble

Precision = Literal["auto", "fp32", "bf16", "fp16"]
BadImagePolicy = Literal["fail", "skip"]
TeacherClasses = Literal["dataset", "all"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BAD_IMAGE_POLICIES = ("fail", "skip")
TEACHER_CLASSES = ("dataset", "all")

DEFAULT_IMAGE_SIZE = 224
"""Side of the augmented images when neither ``--image-size`` nor the augmentation config gives one."""
MAX_IMAGE_SIZE = 4096
"""Largest augmented-image and teacher-input side a build accepts (a 4096^2 RGB image is 48 MiB)."""
SEED_LIMIT = 2**64
"""Seeds are unsigned 64-bit integers (format_spec.md): ``0 <= seed < 2**64``."""


class BuildError(ReinforceError):
    """A build cannot go on: a block failed for good, the device ran out of memory, or the engine is misconfigured."""


@dataclasses.dataclass
class BuildConfig:
    """Settings of ``reinforce build`` (see ``reinforce build --help`` for their meaning).

    ``workers`` and ``ray_address`` choose the engine: neither runs every block in this process; ``workers=N``
    starts a local Ray instance with N block workers; ``ray_address`` joins a running Ray cluster (``"auto"``
    or ``HOST:PORT``) with ``workers`` workers, by default as many as its CPUs (or GPUs with ``device=cuda``)
    allow. ``None`` values are resolved by :func:`resolve_plan`.
    """

    source: str
    out: str
    teachers: Sequence[str] = ()
    augment: str = "rrc"
    image_size: int | None = None  # None: the augmentation config's "size", else DEFAULT_IMAGE_SIZE
    num_augmentations: int = 8
    top_k: int = 5
    seed: int = 0
    batch_size: int = 256
    block_size: int | None = None  # None: format.recommended_block_size(num_augmentations)
    class_vocabulary: int | None = None  # None: format.default_class_vocabulary_size(...)
    prob_scale: int = fmt.DEFAULT_PROB_SCALE
    param_storage: str = "columns"  # format.PARAM_STORAGE: "derived" stores no parameters, readers re-derive them
    device: str = "cpu"
    decode_threads: int | None = None  # None: default_decode_threads (4 on the CPU, the cores less 2 on a GPU)
    teacher_input_size: int | None = None
    teacher_mean: Sequence[float] | None = None
    teacher_std: Sequence[float] | None = None
    teacher_classes: TeacherClasses = "dataset"
    precision: Precision = "auto"
    channels_last: bool = True
    compile: bool = False
    on_bad_image: BadImagePolicy = "fail"
    allow_empty_classes: bool = False  # keep a class folder without images as a class without samples
    val_source: str | None = None  # held-out images (the source's class folders): the teachers' top-1 is recorded
    max_image_pixels: int | None = None  # None: Pillow's limit (89,478,485); 0: none (source.set_max_image_pixels)
    workers: int | None = None
    ray_address: str | None = None
    cpu_threads: int | None = None  # None: this machine's cores up to 8 on the CPU, 1 on a GPU (default_cpu_threads)
    max_retries: int = 2

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BuildConfig:
        """The config of the entries of ``values`` named like its fields (e.g. ``vars()`` of parsed arguments)."""
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values})

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def uses_ray(self) -> bool:
        return self.ray_address is not None or (self.workers or 0) > 0

    def validate(self) -> None:
        """Refuse settings out of range, naming the flag (checks that need the source or teachers: :func:`resolve_plan`)."""
        _at_least(1, top_k=self.top_k, num_augmentations=self.num_augmentations, batch_size=self.batch_size,
                  block_size=self.block_size, decode_threads=self.decode_threads, cpu_threads=self.cpu_threads)
        _at_least(0, class_vocabulary=self.class_vocabulary, workers=self.workers, max_retries=self.max_retries,
                  max_image_pixels=self.max_image_pixels)
        for name, size in (("image_size", self.image_size), ("teacher_input_size", self.teacher_input_size)):
            if size is not None and not 1 <= size <= MAX_IMAGE_SIZE:
                raise BuildError(f"{_flag(name)} {size} is out of range: use 1 to {MAX_IMAGE_SIZE} pixels")
        if not 0 <= self.seed < SEED_LIMIT:
            raise BuildError(f"--seed {self.seed} is out of range: seeds are unsigned 64-bit, 0 <= seed < 2**64")
        for name, values in (("teacher_mean", self.teacher_mean), ("teacher_std", self.teacher_std)):
            if values is not None and (len(values) != 3 or not all(math.isfinite(v) for v in values)):
                raise BuildError(f"{_flag(name)} needs 3 finite values (R,G,B), e.g. 0.5,0.5,0.5; got "
                                 f"{','.join(str(v) for v in values)}")
        if self.teacher_std is not None and min(self.teacher_std) <= 0:
            raise BuildError(f"--teacher-std must be positive (images are divided by it), got "
                             f"{','.join(str(v) for v in self.teacher_std)}")
        for name, value, allowed in (("precision", self.precision, PRECISIONS),
                                     ("on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES),
                                     ("teacher_classes", self.teacher_classes, TEACHER_CLASSES),
                                     ("param_storage", self.param_storage, fmt.PARAM_STORAGE)):
            if value not in allowed:
                raise BuildError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {value!r}")
        if self.device_type == "cuda" and not self.uses_ray:
            if not torch.cuda.is_available():
                raise BuildError(f"--device {self.device} was asked for but CUDA is not available: use --device cpu")
            gpus = torch.cuda.device_count()
            if torch.device(self.device).index is None and gpus > 1:
                # One process drives one GPU; silently using cuda:0 would leave the others idle.
                raise BuildError(
                    f"--device {self.device} on a machine with {gpus} GPUs: a build in one process uses one GPU. "
                    f"Pass --workers {gpus} to run one worker per GPU (a local Ray instance), --ray-address to "
                    "join a cluster, or --device cuda:0 to use only the first GPU")


def config_defaults() -> dict[str, Any]:
    """Every :class:`BuildConfig` field's default, by field name (the CLI's defaults)."""
    return {field.name: field.default for field in dataclasses.fields(BuildConfig)
            if field.default is not dataclasses.MISSING}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(minimum: int, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < minimum:
            raise BuildError(f"{_flag(name)} must be at least {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """A validated build with everything resolved: what the driver, the processor and every worker run.

    ``config`` has absolute paths and its ``image_size`` and ``block_size`` filled in; ``header`` is the store
    header the build writes (on resume: the store's own, whose settings equal these).
    """

    config: BuildConfig
    header: fmt.StoreHeader
    precision: str
    cpu_threads: int

    @property
    def num_classes(self) -> int:
        return self.header.num_classes

    @property
    def block_size(self) -> int:
        return self.header.block_size

    @property
    def class_vocabulary_size(self) -> int:
        return self.header.class_vocabulary_size

    @property
    def device_type(self) -> str:
        return self.config.device_type

    def pipeline(self) -> AugmentPipeline:
        """The augmentation pipeline, as stored in the header (so every worker samples the same one)."""
        return AugmentPipeline.from_config(self.header.augmentation)


def available_cores() -> int:
    """CPUs this process may run on (its affinity where the OS tells it, else the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_cpu_threads(device_type: str, cores: int | None = None) -> int:
    """Torch threads when ``--cpu-threads`` is not given: the cores up to 8 when the teachers run on the CPU
    (the count is part of a store's settings: it changes their float sums); 1 on a GPU, where the CPU's torch
    work is small and the cores go to decoding (:func:`default_decode_threads`)."""
    if device_type == "cpu":
        return min(cores or available_cores(), 8)
    return 1


def default_decode_threads(device_type: str, cores: int | None = None) -> int:
    """Decoding threads of a worker when ``--decode-threads`` is not given: 4 when the teachers run on the CPU
    (they need the cores); on a GPU every core but the two that run the teachers' and the augmentation's
    threads, at least 4 (decoding is most of a GPU build's host work, and its threads mostly leave the GIL)."""
    if device_type == "cpu":
        return 4
    return max((cores or available_cores()) - 2, 4)


def open_build_source(config: BuildConfig) -> ImageSource:
    """The build's source images, listed once, with Pillow's pixel limit set to the build's (process-wide: a Ray
    worker, another process, calls this itself)."""
    set_max_image_pixels(config.max_image_pixels)
    return open_source(config.source, allow_empty_classes=config.allow_empty_classes)


def resolve_plan(config: BuildConfig, source: ImageSource, ensemble: Ensemble) -> BuildPlan:
    """Resolve a validated ``config`` (:meth:`BuildConfig.validate`, which :func:`~reinforce.build.run.run_build`
    runs first of all) against ``source`` and ``ensemble`` into a :class:`BuildPlan`."""
    image_size = resolve_image_size(config)
    pipeline = make_pipeline(config.augment, image_size)
    num_classes = ensemble.num_classes
    if config.top_k > num_classes:
        raise BuildError(f"--top-k {config.top_k} exceeds the {num_classes} classes the teachers predict")
    check_teacher_classes(config, source, num_classes)
    block_size = config.block_size or fmt.recommended_block_size(config.num_augmentations)
    config = absolute(dataclasses.replace(config, image_size=image_size, block_size=block_size))
    check_out_apart_from_source(config)
    precision = resolve_precision(config)
    cpu_threads = config.cpu_threads or default_cpu_threads(config.device_type)
    compute = {"batch_size": config.batch_size, "precision": precision, "channels_last": config.channels_last,
               "compile": config.compile, "device_type": config.device_type}
    if config.device_type == "cpu":
        compute["cpu_threads"] = cpu_threads  # on the CPU the thread count changes the teachers' bytes
    vocabulary = (fmt.default_class_vocabulary_size(num_classes, config.num_augmentations, config.top_k)
                  if config.class_vocabulary is None else min(config.class_vocabulary, num_classes))
    header = fmt.StoreHeader(
        num_samples=len(source), num_classes=num_classes, top_k=config.top_k,
        num_augmentations=config.num_augmentations, seed=config.seed, block_size=block_size,
        augmentation=pipeline.config(), teachers=ensemble.describe(), class_names=source.classes,
        compute=compute, param_encodings=fmt.pipeline_param_encodings(pipeline), prob_scale=config.prob_scale,
        class_vocabulary_size=vocabulary, param_storage=config.param_storage, provenance=_provenance(config),
    )
    return BuildPlan(config=config, header=header, precision=precision, cpu_threads=cpu_threads)


def check_out_apart_from_source(config: BuildConfig) -> None:
    """Refuse a store directory inside the source folder (its files would be listed as images on a rebuild) or a
    source folder inside the store (a build or cleanup of the store would touch the source)."""
    if not isinstance(config.source, (str, os.PathLike)):
        return
    source, out = Path(os.path.realpath(config.source)), Path(os.path.realpath(config.out))
    if out == source or source in out.parents:
        raise BuildError(f"--out {config.out} is inside the source folder {config.source}: put the store "
                         "outside the dataset it is built from")
    if out in source.parents:
        raise BuildError(f"the source folder {config.source} is inside --out {config.out}: put the store "
                         "in a directory of its own, outside the dataset")


def resolve_image_size(config: BuildConfig) -> int:
    """``--image-size``, else the augmentation config's ``size``, else :data:`DEFAULT_IMAGE_SIZE`; both given
    and different is an error (neither silently wins)."""
    from_config = augmentation_config_size(config.augment)
    if config.image_size is None:
        return DEFAULT_IMAGE_SIZE if from_config is None else from_config
    if from_config is not None and from_config != config.image_size:
        raise BuildError(f"--image-size {config.image_size} differs from the size {from_config} in the augmentation "
                         f"config {config.augment}: drop --image-size to use the config's size, or make them agree")
    return config.image_size


def augmentation_config_size(augment: str) -> int | None:
    """The ``size`` of a JSON augmentation config file (None for a preset, or a config without one)."""
    if augment in PRESETS:
        return None
    path = Path(augment)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError:
        return None  # make_pipeline names the missing file
    except UnicodeDecodeError:
        raise AugmentationError(f"augmentation config {path} is not a UTF-8 text file: pass a preset "
                                f"({', '.join(PRESETS)}) or a JSON config") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise AugmentationError(f"augmentation config {path} is not valid JSON: {error}") from None
    size = config.get("size") if isinstance(config, dict) else None
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise AugmentationError(f"augmentation config {path}: size {size!r} must be an integer from 1 to "
                                f"{MAX_IMAGE_SIZE}")
    return size


def check_teacher_classes(config: BuildConfig, source: ImageSource, num_classes: int) -> None:
    """Refuse teachers whose class count differs from the dataset's, unless ``teacher_classes="all"``."""
    if config.teacher_classes == "all":
        return
    if source.classes is not None:
        dataset_classes, what = len(source.classes), "class folders"
    elif source.targets is not None and len(source.targets):
        dataset_classes, what = int(max(source.targets)) + 1, "classes (largest label + 1)"
    else:
        return
    if dataset_classes != num_classes:
        raise BuildError(
            f"the teachers predict {num_classes} classes but the dataset has {dataset_classes} {what}: use "
            f"teachers trained on these {dataset_classes} classes, or pass --teacher-classes all to keep the "
            f"teachers' {num_classes}-class label space on purpose (stored top-k indices and soft targets are "
            "then teacher class ids, while the dataset's labels stay folder indices)"
        )


def resolve_precision(config: BuildConfig) -> str:
    """``auto`` is bf16 on CUDA (fp16 where this machine's GPU lacks bf16) and fp32 elsewhere."""
    if config.precision != "auto":
        return config.precision
    if config.device_type != "cuda":
        return "fp32"
    return "fp16" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"


def absolute(config: BuildConfig) -> BuildConfig:
    """The config with local paths made absolute, so workers with another working directory find them."""
    def teacher(spec: str) -> str:
        arch, sep, weights = spec.partition("=")
        return f"{arch}={os.path.abspath(weights)}" if sep and weights else spec

    source = os.path.abspath(config.source) if isinstance(config.source, (str, os.PathLike)) else config.source
    return dataclasses.replace(config, source=source, out=os.path.abspath(config.out),
                               teachers=[teacher(spec) for spec in config.teachers])


def versions() -> dict[str, str]:
    """Versions of everything that touches the stored bytes."""
    import numpy
    import timm

    found = {"reinforce": __version__, "torch": torch.__version__, "timm": timm.__version__,
             "zarr": zarr.__version__, "numpy": numpy.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["cudnn"] = str(torch.backends.cudnn.version())
    return found


def _provenance(config: BuildConfig) -> dict[str, Any]:
    return {"tool": f"reinforce {__version__}", "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "device": config.device, "torch": torch.__version__, "zarr": zarr.__version__,
            "python": platform.python_version(), "versions": versions(), "batch_size": config.batch_size,
            "teacher_files": list(config.teachers)}
