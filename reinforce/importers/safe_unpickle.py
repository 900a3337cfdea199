"""Reading released files that are Python pickles, only when the user says so, and then only their data types.

A pickle can run any code while it loads. The stores released by other projects (apple/ml-dr's
``{index}.pth.tar``, FKD's ``.tar`` files) are ``torch.save`` pickles that ``torch.load(weights_only=True)``
rejects, so the importers read them through :class:`RestrictedUnpickler`: its ``find_class`` admits only the
globals such files use (tensors, numpy scalars, arrays and dtypes, ``OrderedDict``) and refuses anything else
(``os.system``, ``builtins.exec``, ...) before it is called. Even so, reading needs ``--trust-pickle``.
"""

from __future__ import annotations

import os
import pickle
import types
import zipfile
from typing import Any

import torch
from reinforce_loaders.errors import ReinforceError

ALLOWED_GLOBALS = frozenset({
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("collections", "OrderedDict"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
})
"""``(module, name)`` of every global a released file may name; ``numpy.dtypes.*DType`` classes also pass."""


class UntrustedPickleError(ReinforceError):
    """A pickle file was not read: the user did not pass ``--trust-pickle``, or it names a forbidden global."""


def refusal(what: str) -> str:
    """Why a pickle is not read without ``--trust-pickle`` (the message the command line shows)."""
    return (f"{what} are Python pickles (torch.save), and loading a pickle can run any code its author put in it. "
            "reinforce reads them only when you pass --trust-pickle, and then through a restricted unpickler that "
            "admits tensors and numpy numbers only. Pass --trust-pickle if you trust where the files come from")


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader whose ``find_class`` admits only :data:`ALLOWED_GLOBALS`."""

    source = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise UntrustedPickleError(f"{self.source} asks to load {module}.{name}, which a released file never needs: "
                                   "refused (the file is damaged, of another kind, or malicious)")


def _restricted_module(source: str) -> types.SimpleNamespace:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)`` whose Unpickler is restricted."""
    unpickler = type("SourceUnpickler", (RestrictedUnpickler,), {"source": source})
    return types.SimpleNamespace(Unpickler=unpickler, load=lambda file, **kw: unpickler(file, **kw).load(),
                                 __name__="restricted_pickle")


def load_pickle(path: str | os.PathLike[str], *, trust_pickle: bool, what: str) -> Any:
    """The object in a ``torch.save`` (zip) or plain pickle file, read with :class:`RestrictedUnpickler`.

    Without ``trust_pickle`` nothing is read and :class:`UntrustedPickleError` explains why.
    """
    if not trust_pickle:
        raise UntrustedPickleError(refusal(what))
    source = os.fspath(path)
    try:
        if zipfile.is_zipfile(source):
            return torch.load(source, map_location="cpu", weights_only=False,
                              pickle_module=_restricted_module(source))
        with open(source, "rb") as handle:
            reader = _restricted_module(source).Unpickler(handle)
            return reader.load()
    except UntrustedPickleError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as error:
        raise UntrustedPickleError(f"{source} is not a readable {what} file ({type(error).__name__}: {error})") from None
