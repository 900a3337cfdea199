"""Reading released files that are Python pickles, only when the user says so, and then only as data.

A pickle is a small program: loading one with :mod:`pickle` (or ``torch.load(weights_only=False)``, which also
hands any zip holding ``constants.pkl`` to ``torch.jit.load``) can run any code its author put in it, and even a
pickle naming only harmless globals can crash the process (numpy's ``_reconstruct`` with an object dtype and too
few items) or allocate what it claims (a 91-byte ``numpy.ndarray((3e8,), object)``). The stores released by other
projects (apple/ml-dr's ``{index}.pth.tar``, FKD's ``.tar`` files) are ``torch.save`` files, so the importers read
them with :func:`load_pickle`, an interpreter of its own over the pickle opcodes those files use
(:func:`pickletools.genops` decodes them; nothing here calls :mod:`pickle` or ``torch.load``):

* it builds only dicts, lists, tuples, ``None``, booleans, integers of at most 64 bits, floats, strings, bytes,
  numpy scalars and arrays of numeric dtypes, and torch tensors of numeric dtypes;
* the only globals it knows are the handful ``torch.save`` and numpy write for those (``_rebuild_tensor_v2``,
  ``torch.FloatStorage`` and friends, ``numpy.dtype``, ``_reconstruct``, ``scalar``, ``_codecs.encode``,
  ``OrderedDict``), each implemented here with its arguments checked; anything else is refused, naming it;
* a ``torch.save`` zip is read member by member (``zipfile``): only ``data.pkl``, the ``data/N`` storages and the
  few bookkeeping members are admitted (a TorchScript archive, with ``code/`` or ``constants.pkl``, is refused),
  a storage's byte count must equal what its persistent id declares, and every tensor's shape, strides and offset
  must stay inside the bytes of its storage (so a 2 KB file cannot claim a stride-0 tensor of 10^9 elements);
* everything is bounded before it is allocated: the file size (:data:`MAX_FILE_BYTES`), the opcodes executed
  (:data:`MAX_OPCODES`), the bytes of arrays and tensors made (:data:`MAX_ARRAY_BYTES`), the nesting depth
  (:data:`MAX_DEPTH`) and the values the result expands to, shared references counted each time
  (:data:`MAX_VALUES`); a structure that contains itself is refused.

Reading still needs ``--trust-pickle``: the files are data from a third party.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickletools
import re
import zipfile
from typing import Any

import numpy as np
import torch
from reinforce_loaders.errors import ReinforceError

MAX_FILE_BYTES = 64 << 20
"""Largest released file read (ml-dr and FKD files are kilobytes to a few megabytes)."""
MAX_OPCODES = 2_000_000
"""Pickle opcodes executed per file: bounds the Python objects a file can make (about 100 bytes each)."""
MAX_ARRAY_BYTES = 64 << 20
"""Bytes of arrays, tensors and byte strings made from one file, each reference to a storage counted."""
MAX_VALUES = 8_000_000
"""Values the loaded structure expands to (array elements included; a shared reference counts each time)."""
MAX_DEPTH = 32
"""Nesting depth of the loaded structure."""
MAX_NDIM = 8
MAX_ZIP_ENTRIES = 200_000

NUMPY_DTYPES = frozenset({"b1", "?", "bool", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8",
                          "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                          "float32", "float64"})
"""dtype names ``numpy.dtype`` may be called with: numeric types only (no object, void, string or structure)."""
TORCH_STORAGES = {
    "BoolStorage": torch.bool, "ByteStorage": torch.uint8, "CharStorage": torch.int8, "ShortStorage": torch.int16,
    "IntStorage": torch.int32, "LongStorage": torch.int64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
}
"""``torch.<name>`` storage types a ``torch.save`` persistent id may name, with their element types."""
ARCHIVE_MEMBERS = frozenset({"data.pkl", "version", ".data/version", "byteorder", ".data/serialization_id",
                             ".format_version", ".storage_alignment"})
"""Members of a ``torch.save`` zip (below its one top folder) besides the storages ``data/N``."""
LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
"""The first object of a ``torch.save`` file in the format before torch 1.6 (not read here)."""

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_SCALARS = (type(None), bool, int, float, str, bytes)


class UntrustedPickleError(ReinforceError):
    """A pickle file was not read: the user did not pass ``--trust-pickle``, or it holds something other than
    the data a released file needs (the message names the file and what)."""


def refusal(what: str) -> str:
    """Why a pickle is not read without ``--trust-pickle`` (the message the command line shows)."""
    return (f"{what} are Python pickles (torch.save), and loading a pickle with Python's pickle module can run any "
            "code its author put in it. reinforce reads them only when you pass --trust-pickle, and then with its own "
            "reader, which builds numbers, strings, lists, dicts and numeric arrays and tensors only (never calls "
            "pickle or torch.load). Pass --trust-pickle if you trust where the files come from")


class _Refused(Exception):
    """Why the file being read is refused (turned into :class:`UntrustedPickleError` naming the file)."""


@dataclasses.dataclass(frozen=True)
class _Global:
    """A global the pickle named: only those of the allow-list are ever made."""

    module: str
    name: str


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclasses.dataclass
class _Storage:
    """A ``torch.save`` storage: ``numel`` elements of ``dtype`` in the archive member ``data/KEY``."""

    dtype: torch.dtype
    numel: int
    data: bytes
    flat: torch.Tensor | None = None


class _DType:
    """A ``numpy.dtype`` being built (its byte order arrives with BUILD, after it may have been memoized)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


class _Array:
    """A ``numpy.ndarray`` being built by ``_reconstruct`` + BUILD."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None


def _int(value: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _Refused(f"{what} is {_short(value)}, not an integer in [{lo}, {hi}]")
    return value


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, _SCALARS) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_NDIM:
        raise _Refused(f"{what} is {_short(value)}, not a tuple of at most {MAX_NDIM} integers")
    return tuple(_int(side, what, 0, 1 << 40) for side in value)


def _numpy_dtype(value: Any, what: str) -> np.dtype:
    dtype = value.dtype if isinstance(value, _DType) else value
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or dtype.hasobject:
        raise _Refused(f"{what} is not a numeric dtype ({_short(value)})")
    return dtype


class _Reader:
    """The opcode interpreter of one file (see the module docstring); ``storages`` maps a torch archive's
    storage keys to their bytes (``None``: a plain pickle, where a persistent id is refused)."""

    def __init__(self, storages: dict[str, bytes] | None) -> None:
        self.storages = storages
        self.loaded: dict[str, _Storage] = {}
        self.array_bytes = 0

    # -- budgets ----------------------------------------------------------------------------------------------

    def spend(self, nbytes: int, what: str) -> None:
        self.array_bytes += nbytes
        if self.array_bytes > MAX_ARRAY_BYTES:
            raise _Refused(f"{what} would take the arrays made from the file past {MAX_ARRAY_BYTES:,} bytes")

    # -- the interpreter --------------------------------------------------------------------------------------

    def load(self, data: bytes) -> Any:
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}

        def pop_mark() -> list[Any]:
            if not marks:
                raise _Refused("an opcode needs a MARK that is not there (a damaged pickle)")
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            return items

        count = 0
        ops = pickletools.genops(io.BytesIO(data))
        while True:
            try:
                opcode, arg, _ = next(ops)
            except StopIteration:
                raise _Refused("the pickle ends without STOP (a truncated file)") from None
            except (ValueError, EOFError, OverflowError, UnicodeDecodeError) as error:
                raise _Refused(f"malformed pickle ({_first_line(error)})") from None
            count += 1
            if count > MAX_OPCODES:
                raise _Refused(f"the pickle runs more than {MAX_OPCODES:,} opcodes")
            name = opcode.name
            if name == "STOP":
                if len(stack) != 1 or marks:
                    raise _Refused("the pickle ends with a stack that is not one object (a damaged pickle)")
                return self.resolve(stack.pop())
            if name in ("PROTO", "FRAME"):
                continue
            if name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
                if isinstance(arg, bool):  # INT's "01"/"00" are True/False in protocol 0
                    stack.append(arg)
                    continue
                if arg == LEGACY_TORCH_MAGIC:
                    raise _Refused("it is in torch.save's format from before torch 1.6, which is not read here: "
                                   "re-save it with torch.save of a current torch (a zip)")
                if not -(1 << 64) <= arg < 1 << 64:
                    raise _Refused(f"it holds an integer of {arg.bit_length()} bits (at most 64 are read)")
                stack.append(arg)
            elif name in ("FLOAT", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "UNICODE", "SHORT_BINUNICODE",
                          "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES",
                          "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
                value = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}.get(name, arg)
                stack.append(bytes(value) if isinstance(value, bytearray) else value)
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                size = int(name[-1])
                if len(stack) < size:
                    raise _Refused(f"{name} on a stack of {len(stack)} (a damaged pickle)")
                items = tuple(stack[-size:])
                del stack[-size:]
                stack.append(items)
            elif name == "DICT":
                items = pop_mark()
                target: dict[Any, Any] = {}
                self.set_items(target, items)
                stack.append(target)
            elif name == "APPEND":
                value = stack.pop()
                self.list_of(stack).append(value)
            elif name == "APPENDS":
                items = pop_mark()
                self.list_of(stack).extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                self.set_items(self.dict_of(stack), [key, value])
            elif name == "SETITEMS":
                items = pop_mark()
                self.set_items(self.dict_of(stack), items)
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "POP":
                if not stack:
                    raise _Refused("POP on an empty stack (a damaged pickle)")
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack:
                    raise _Refused(f"{name} on an empty stack (a damaged pickle)")
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise _Refused(f"{name} {arg} reads a memo entry that was never stored (a damaged pickle)")
                stack.append(memo[int(arg)])
            elif name == "GLOBAL":
                module, _, attribute = str(arg).partition(" ")
                stack.append(self.named(module, attribute))
            elif name == "STACK_GLOBAL":
                attribute, module = stack.pop(), stack.pop()
                if not isinstance(module, str) or not isinstance(attribute, str):
                    raise _Refused("STACK_GLOBAL with a name that is not a string (a damaged pickle)")
                stack.append(self.named(module, attribute))
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                if not isinstance(func, _Global) or not isinstance(args, tuple):
                    raise _Refused(f"it calls a {_short(func)}, which is not a function a released file uses")
                stack.append(self.call(func, args))
            elif name == "BUILD":
                state = stack.pop()
                if not stack:
                    raise _Refused("BUILD on an empty stack (a damaged pickle)")
                self.build(stack[-1], state)
            elif name == "BINPERSID":
                stack.append(self.persistent(stack.pop()))
            else:  # PERSID, INST, OBJ, NEWOBJ(_EX), EXT*, sets, out-of-band buffers
                raise _Refused(f"it uses the pickle opcode {name}, which a released file does not need")

    @staticmethod
    def list_of(stack: list[Any]) -> list[Any]:
        if not stack or type(stack[-1]) is not list:
            raise _Refused("APPEND to something that is not a list (a damaged pickle)")
        return stack[-1]

    @staticmethod
    def dict_of(stack: list[Any]) -> dict[Any, Any]:
        if not stack or not isinstance(stack[-1], dict):
            raise _Refused("SETITEM on something that is not a dict (a damaged pickle)")
        return stack[-1]

    @staticmethod
    def set_items(target: dict[Any, Any], items: list[Any]) -> None:
        if len(items) % 2:
            raise _Refused("a dict's items come in an odd number (a damaged pickle)")
        for key, value in zip(items[::2], items[1::2]):
            if not isinstance(key, _SCALARS):
                raise _Refused(f"a dict key is a {type(key).__name__} (keys must be numbers or strings)")
            target[key] = value

    # -- globals ----------------------------------------------------------------------------------------------

    def named(self, module: str, name: str) -> Any:
        if module == "torch" and name in TORCH_STORAGES:
            return _StorageType(TORCH_STORAGES[name])
        known = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                 ("collections", "OrderedDict"), ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"),
                 ("builtins", "bytes"), ("__builtin__", "bytes")}
        known |= {(core, attribute) for core in _NUMPY_CORE for attribute in ("scalar", "_reconstruct")}
        known |= {(numeric, "_frombuffer") for numeric in _NUMPY_NUMERIC}
        if (module, name) not in known:
            raise _Refused(f"it asks for {module}.{name}, which a released file never needs")
        return _Global(module, name)

    def call(self, func: _Global, args: tuple[Any, ...]) -> Any:
        key = (func.module.replace("numpy._core", "numpy.core"), func.name)
        if key in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return self.tensor(args, v2=func.name.endswith("v2"))
        if key == ("collections", "OrderedDict"):
            if args:
                raise _Refused("OrderedDict called with arguments (a released file makes an empty one)")
            return {}
        if key == ("numpy", "dtype"):
            if not args or not isinstance(args[0], str) or args[0] not in NUMPY_DTYPES:
                raise _Refused(f"numpy.dtype{_short(args)} is not a numeric dtype (object, string and structured "
                               "dtypes are refused)")
            return _DType(np.dtype(args[0]))
        if key == ("numpy.core.multiarray", "scalar"):
            if len(args) != 2:
                raise _Refused("numpy scalar() with other than (dtype, bytes)")
            dtype = _numpy_dtype(args[0], "a numpy scalar's dtype")
            if not isinstance(args[1], bytes) or len(args[1]) != dtype.itemsize:
                raise _Refused(f"a numpy {dtype} scalar whose bytes are not {dtype.itemsize} bytes")
            return np.frombuffer(args[1], dtype=dtype)[0]
        if key == ("numpy.core.multiarray", "_reconstruct"):
            if len(args) != 3 or not (isinstance(args[0], _Global) and args[0] == _Global("numpy", "ndarray")):
                raise _Refused("numpy _reconstruct of something other than an ndarray")
            return _Array()
        if key == ("numpy.core.numeric", "_frombuffer"):
            if len(args) != 4:
                raise _Refused("numpy _frombuffer with other than (buffer, dtype, shape, order)")
            return self.array(args[0], args[1], args[2], isinstance(args[3], str) and args[3] == "F")
        if key == ("_codecs", "encode"):  # protocol 2's bytes: _codecs.encode(latin-1 text, "latin1")
            if len(args) != 2 or not isinstance(args[0], str) or not _is_text(args[1], "latin1", "latin-1"):
                raise _Refused("_codecs.encode with other than (text, 'latin1')")
            self.spend(len(args[0]), "a byte string")
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                raise _Refused("_codecs.encode of text that is not latin-1") from None
        if key in (("builtins", "bytes"), ("__builtin__", "bytes")):
            if args:
                raise _Refused("bytes() called with arguments")
            return b""
        raise _Refused(f"{func.module}.{func.name} cannot be called")  # ndarray, storage types

    def build(self, target: Any, state: Any) -> None:
        if isinstance(target, _DType):
            if (not isinstance(state, tuple) or len(state) not in (8, 9) or not _is_text(state[1], "<", ">", "|", "=")
                    or any(part is not None for part in state[2:5]) or not _empty(state[8:])):
                raise _Refused(f"a numpy dtype's state {_short(state)} is not that of a plain numeric dtype")
            target.dtype = target.dtype.newbyteorder(state[1]) if state[1] in "<>" else target.dtype
        elif isinstance(target, _Array):
            if target.array is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
                raise _Refused("a numpy array's state is not (version, shape, dtype, fortran, bytes)")
            shape, dtype, fortran, raw = state[-4:]
            target.array = self.array(raw, dtype, shape, bool(fortran))
        else:
            raise _Refused(f"BUILD sets the state of a {type(target).__name__}, which a released file never does")

    # -- arrays and tensors -----------------------------------------------------------------------------------

    def array(self, raw: Any, dtype: Any, shape: Any, fortran: bool) -> np.ndarray:
        dtype = _numpy_dtype(dtype, "a numpy array's dtype")
        shape = _shape(shape, "a numpy array's shape")
        if not isinstance(raw, bytes):  # object arrays keep a list here: refused with their dtype already
            raise _Refused(f"a numpy array's data is a {type(raw).__name__}, not bytes")
        numel = math.prod(shape)
        if numel * dtype.itemsize != len(raw):
            raise _Refused(f"a numpy array of shape {shape} and dtype {dtype} needs {numel * dtype.itemsize:,} "
                           f"bytes, the file holds {len(raw):,}")
        self.spend(len(raw), f"a numpy array of shape {shape}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()

    def persistent(self, pid: Any) -> _Storage:
        if self.storages is None:
            raise _Refused("it has a persistent id outside a torch.save zip archive")
        if (not isinstance(pid, tuple) or len(pid) != 5 or not _is_text(pid[0], "storage")
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)):
            raise _Refused(f"a persistent id {_short(pid)} is not ('storage', type, key, location, numel)")
        _, kind, key, _, numel = pid
        numel = _int(numel, f"storage {key}'s element count", 0, 1 << 40)
        if key in self.loaded:
            stored = self.loaded[key]
            if stored.dtype != kind.dtype or stored.numel != numel:
                raise _Refused(f"storage {key} is named with two types or sizes")
            return stored
        if key not in self.storages:
            raise _Refused(f"storage {key!r:.40} is not in the archive")
        size = numel * kind.dtype.itemsize
        if len(self.storages[key]) != size:
            raise _Refused(f"storage {key} declares {numel:,} elements of {kind.dtype} ({size:,} bytes), the "
                           f"archive holds {len(self.storages[key]):,} bytes")
        if kind.dtype == torch.bool and self.storages[key].translate(None, b"\x00\x01"):
            raise _Refused(f"boolean storage {key} holds bytes other than 0 and 1")
        self.loaded[key] = _Storage(kind.dtype, numel, self.storages[key])
        return self.loaded[key]

    def tensor(self, args: tuple[Any, ...], v2: bool) -> torch.Tensor:
        if len(args) not in ((6, 7) if v2 else (4,)) or not isinstance(args[0], _Storage):
            raise _Refused("_rebuild_tensor with other arguments than (storage, offset, size, stride, ...)")
        storage = args[0]
        offset = _int(args[1], "a tensor's storage offset", 0, 1 << 40)
        size = _shape(args[2], "a tensor's size")
        stride = _shape(args[3], "a tensor's stride")
        if len(stride) != len(size):
            raise _Refused(f"a tensor's size {size} and stride {stride} differ in length")
        if v2 and (not isinstance(args[4], bool) or not _empty(args[5:])):
            raise _Refused("a tensor with backward hooks or metadata (a released file has none)")
        numel = math.prod(size)
        if numel:
            last = offset + sum((side - 1) * step for side, step in zip(size, stride))
            if last >= storage.numel or numel > storage.numel:
                raise _Refused(f"a tensor of size {size}, stride {stride} and offset {offset} reaches past its "
                               f"storage of {storage.numel:,} elements (or overlaps itself)")
        self.spend(numel * storage.dtype.itemsize, f"a tensor of size {size}")
        if storage.flat is None:
            storage.flat = torch.frombuffer(bytearray(storage.data), dtype=storage.dtype) if storage.numel else \
                torch.empty(0, dtype=storage.dtype)
        if not numel:
            return torch.empty(size, dtype=storage.dtype)
        return torch.as_strided(storage.flat, size, stride, offset).clone()

    # -- the result -------------------------------------------------------------------------------------------

    def resolve(self, root: Any) -> Any:
        """``root`` with its arrays and dtypes finished, checked for depth, size and self-reference."""
        done: dict[int, tuple[Any, int]] = {}
        active: set[int] = set()

        def walk(obj: Any, depth: int) -> tuple[Any, int]:
            if isinstance(obj, _SCALARS) or isinstance(obj, np.generic):
                return obj, 1
            if isinstance(obj, (torch.Tensor, np.ndarray)):
                return obj, max(1, obj.numel() if isinstance(obj, torch.Tensor) else obj.size)
            key = id(obj)
            if key in done:
                return done[key]
            if key in active:
                raise _Refused("a list or dict contains itself")
            if depth > MAX_DEPTH:
                raise _Refused(f"it nests containers more than {MAX_DEPTH} deep")
            active.add(key)
            if isinstance(obj, _Array):
                if obj.array is None:
                    raise _Refused("a numpy array was never given its data (a damaged pickle)")
                result = obj.array, max(1, obj.array.size)
            elif isinstance(obj, (list, tuple)):
                parts = [walk(item, depth + 1) for item in obj]
                result = type(obj)(value for value, _ in parts), 1 + sum(count for _, count in parts)
            elif isinstance(obj, dict):
                parts = [walk(value, depth + 1) for value in obj.values()]
                result = dict(zip(obj, (value for value, _ in parts))), 1 + sum(count for _, count in parts)
            else:  # dtypes, globals, storages: never data
                raise _Refused(f"it leaves a {type(obj).__name__.strip('_')} among its data")
            if result[1] > MAX_VALUES:
                raise _Refused(f"its data expand to more than {MAX_VALUES:,} values (counting shared references)")
            active.discard(key)
            done[key] = result
            return result

        return walk(root, 0)[0]


def _is_text(value: Any, *choices: str) -> bool:
    return isinstance(value, str) and value in choices


def _empty(values: tuple[Any, ...]) -> bool:
    """Whether each of ``values`` is ``None`` or an empty dict (a tensor's hooks and metadata, a dtype's)."""
    return all(value is None or (type(value) is dict and not value) for value in values)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _archive_storages(data: bytes) -> tuple[bytes, dict[str, bytes]]:
    """``(data.pkl, {key: bytes of data/KEY})`` of a ``torch.save`` zip, refusing anything else it holds."""
    if data.count(b"PK\x01\x02") > MAX_ZIP_ENTRIES:
        raise _Refused(f"a zip of more than {MAX_ZIP_ENTRIES:,} members")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        tops = {info.filename.split("/", 1)[0] for info in infos}
        if len(tops) != 1:
            raise _Refused("a zip that is not one torch.save archive (its members are not in one folder)")
        top = tops.pop() + "/"
        pickled, storages = None, {}
        for info in infos:
            inner = info.filename[len(top):]
            if inner in ("constants.pkl", "code") or inner.startswith(("code/", "constants/", "extra/")):
                raise _Refused(f"a TorchScript archive (it holds {info.filename}): loading TorchScript runs the "
                               "code inside it")
            if inner not in ARCHIVE_MEMBERS and not re.fullmatch(r"data/\d{1,12}", inner):
                raise _Refused(f"a zip member {info.filename!r:.80} that a torch.save file does not have")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1 or info.file_size > len(data):
                raise _Refused(f"a zip member {info.filename!r:.80} that is compressed or encrypted (torch.save "
                               "stores members as they are)")
            if inner == "byteorder" and archive.read(info) not in (b"little",):
                raise _Refused("a torch archive written on a big-endian machine (not read here)")
            if inner == "data.pkl":
                pickled = archive.read(info)
            elif inner.startswith("data/"):
                storages[inner[len("data/"):]] = archive.read(info)
        if pickled is None:
            raise _Refused("a zip without data.pkl: not a torch.save file")
        return pickled, storages


def load_pickle(path: str | os.PathLike[str], *, trust_pickle: bool, what: str) -> Any:
    """The data in a ``torch.save`` (zip) or plain pickle file, read as data (see the module docstring).

    Without ``trust_pickle`` nothing is read and :class:`UntrustedPickleError` explains why; a file holding
    anything else than the data a release needs, or beyond the limits, is refused with an
    :class:`UntrustedPickleError` naming the file and the reason.
    """
    if not trust_pickle:
        raise UntrustedPickleError(refusal(what))
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise _Refused(f"it is larger than {MAX_FILE_BYTES:,} bytes, more than a released file holds")
        if data[:4] == b"PK\x03\x04":
            pickled, storages = _archive_storages(data)
            return _Reader(storages).load(pickled)
        return _Reader(None).load(data)
    except _Refused as reason:
        raise UntrustedPickleError(f"{source} is not read: {reason} (the file is damaged, of another kind, or "
                                   "malicious)") from None
    except (zipfile.BadZipFile, EOFError, NotImplementedError) as error:  # zipfile's ways of saying "damaged"
        raise UntrustedPickleError(f"{source} is not a readable {what} file (a damaged zip: "
                                   f"{_first_line(error)})") from None
    except OSError as error:
        raise UntrustedPickleError(f"{source} cannot be read ({error.strerror or error})") from None
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as error:
        raise UntrustedPickleError(f"{source} is not read: malformed pickle ({type(error).__name__}: "
                                   f"{_first_line(error)})") from None
    except MemoryError:
        raise UntrustedPickleError(f"{source} is not read: it needs more memory than this process may use") from None
