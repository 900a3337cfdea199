"""``reinforce build``: make a store from an ImageFolder and a teacher ensemble.

The path of a build, one module per stage: :mod:`~reinforce.build.plan` resolves the settings, the source and
the teachers into one :class:`BuildPlan`; :mod:`~reinforce.build.engine` hands its blocks to workers (in this
process or on Ray); :mod:`~reinforce.build.blocks` decodes, samples, runs the :mod:`~reinforce.build.teachers`
and keeps the top-k; :mod:`~reinforce.build.writer` encodes and writes the block; :mod:`~reinforce.build.run`
drives them and finalizes the store.

The public names below are loaded on first use, so importing one stage (a Ray worker importing ``engine``)
does not import the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "BuildConfig": "plan", "BuildError": "plan", "BuildPlan": "plan", "resolve_plan": "plan",
    "BuildSummary": "run", "run_build": "run", "make_ensemble": "run",
    "BlockProcessor": "blocks", "BlockRunner": "blocks", "BlockStats": "blocks", "LoadedBlock": "blocks",
    "SkippedSample": "blocks", "make_processor": "blocks",
    "Ensemble": "teachers", "TeacherMember": "teachers", "create_ensemble": "teachers",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
