"""``reinforce train``: its options, generated from :class:`TrainConfig`'s fields (flag, help, group, default and
type declared once, there), and the command."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from .config import TrainConfig, shown

DESCRIPTION = ("Train a student. Recipe defaults are filled in and written to OUT/config.json. Runs under torchrun "
               "for DDP (gloo on CPU; NCCL for gradients and gloo for metrics on CUDA).")


def add_train_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``train`` to ``commands`` (an ``add_subparsers()`` result): one option per :class:`TrainConfig` field."""
    parser = commands.add_parser(
        "train", help="train a student from a store (usi), fine-tune adaptively (adaptive), or a baseline (plain)",
        description=DESCRIPTION)
    groups: dict[str | None, Any] = {None: parser}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        spec = dict(field.metadata["cli"])
        title = spec.pop("group")
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        flag = spec.pop("flag")
        names, options = _argument(field, hints[field.name], flag, spec)
        groups[title].add_argument(*names, **options)
    return parser


def _argument(field: dataclasses.Field, hint: Any, flag: str | None,
              spec: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` names and keywords of one field."""
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    options = {key: value for key, value in spec.items() if value is not None}
    if "help" in options:
        options["help"] = options["help"].replace("{default}", shown(default))
    kind = _without_none(hint)
    if typing.get_origin(kind) is typing.Literal:
        options["choices"] = typing.get_args(kind)
    elif kind is bool:
        options.setdefault("action", "store_true")
    elif typing.get_origin(kind) is list:
        options["action"] = "append"
    elif kind in (int, float):
        options["type"] = kind
    if flag == "":
        return [field.name], options
    if default is dataclasses.MISSING:
        options["required"] = True
    else:
        options["default"] = default
    return [flag or "--" + field.name.replace("_", "-")], {"dest": field.name, **options}


def _without_none(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if len(args) == 1 else hint


def run_from_args(args: argparse.Namespace) -> int:
    """``reinforce train``: warnings are printed as they arise and kept in OUT/summary.json."""
    from .train import train

    train(TrainConfig.from_mapping(vars(args)))
    return 0
