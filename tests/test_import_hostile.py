"""Hostile release files for ``reinforce import`` (issue 20): small crafted files must stay data.

Each file is built here: a TorchScript archive whose ``__setstate__`` writes to a file, a 200-byte pickle that
crashed numpy, a 91-byte config claiming a 3e8-element object array, 2 KB files of stride-0 tensors claiming
400 million elements, junk tensor arguments, integers of 5,000 digits, self-referencing and exponentially shared
structures, and releases that do not match the source. Whatever could allocate or crash runs in a child process
under an address-space limit with its peak RSS checked (:mod:`limited_child`).
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Tuple

import pytest
import torch
from limited_child import run_limited
from test_import import write_fkd_release, write_ml_dr_release

from reinforce.importers import ImportFailure, fkd, ml_dr
from reinforce.importers.safe_unpickle import MAX_VALUES, UntrustedPickleError, load_pickle


class WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` maps the file it names read-write and overwrites it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:  # noqa: UP006 (TorchScript wants typing.Tuple)
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:  # noqa: UP006
        self.path = state[0]
        written = torch.from_file(state[0], shared=True, size=4, dtype=torch.uint8).fill_(88)
        self.training = bool(written.sum() > 0) and state[1]


def torchscript_archive(path: Path, victim: Path) -> None:
    torch.jit.save(torch.jit.script(WritesOnLoad(str(victim))), str(path))


def object_array_crash() -> bytes:
    """numpy's ``_reconstruct`` + BUILD with an object dtype, a shape of 10^6 and a list of one item: numpy
    reads past the list (a segfault) when it is unpickled."""
    return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85c_codecs\nencode\n"
            b"X\x01\x00\x00\x00bX\x06\x00\x00\x00latin1\x86R\x87R(K\x01J\x40\x42\x0f\x00\x85cnumpy\ndtype\n"
            b"X\x02\x00\x00\x00O8\x89\x88\x87R(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb"
            b"\x89](K\x01etb.")


def object_array_config() -> bytes:
    """``numpy.ndarray((300_000_000,), numpy.dtype('O8'))``: 2.4 GB of object pointers claimed by 60 bytes."""
    return (b"\x80\x02cnumpy\nndarray\nJ\x00\xa3\xe1\x11\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
            b"\x86R.")


def torch_zip(pickled: bytes, storages: dict[str, bytes] | None = None, extra: dict[str, bytes] | None = None,
              ) -> bytes:
    """A zip laid out like ``torch.save``'s: ``archive/data.pkl``, ``archive/data/KEY``, ``archive/version``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        for name, data in (extra or {}).items():
            archive.writestr(f"archive/{name}", data)
        archive.writestr("archive/version", b"3\n")
    return out.getvalue()


def rebuild_tensor(size: int, stride: int, numel: int = 1) -> bytes:
    """data.pkl of a float tensor of ``(size,)`` with ``(stride,)`` over storage '0' of ``numel`` floats."""
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
            b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + b"J" + struct.pack("<i", numel) + b"tQK\x00"
            + b"J" + struct.pack("<i", size) + b"\x85J" + struct.pack("<i", stride) + b"\x85\x89"
            b"ccollections\nOrderedDict\n)RtR.")


def stride_zero_fkd() -> bytes:
    """An FKD file (~2 KB) whose soft label is ``torch.zeros(1).expand(400_000_000)``: 1.6 GB when read."""
    out = io.BytesIO()
    torch.save([(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor(True), torch.zeros(1).expand(400_000_000))], out)
    return out.getvalue()


def stride_zero_ml_dr() -> bytes:
    """An ml-dr sample file whose top-k values and ids are stride-0 tensors of 400 million elements."""
    out = io.BytesIO()
    record = {"params": [(0, 0, 1, 1), True, [(0, 0), (1, 1)], None],
              "prob": (torch.zeros(1).expand(400_000_000), torch.zeros(1, dtype=torch.long).expand(400_000_000))}
    torch.save((0, [record]), out)
    return out.getvalue()


def shared_tower(levels: int) -> bytes:
    """A list of 2 references to a list of 2 references to ... (``2**levels`` leaves, a few bytes per level)."""
    data = b"\x80\x02K\x00"
    for _ in range(levels):
        data += b"q\x00h\x00\x86"  # memoize the top, fetch it again, pair them
    return data + b"."


HOSTILE_PICKLES = {
    "object dtype crash": (object_array_crash(), "numpy.dtype.*is not a numeric dtype"),
    "ndarray call": (object_array_config(), "is not a numeric dtype|numpy.ndarray cannot be called"),
    "builtins.exec": (b"\x80\x02cbuiltins\nexec\nX\x01\x00\x00\x001\x85R.", "asks for builtins.exec"),
    "5,000-digit integer": (b"I" + b"7" * 5000 + b"\n.", "malformed pickle|bits"),
    "huge LONG4": (b"\x80\x02\x8b\x00\x10\x00\x00" + b"\x7f" * 4096 + b".", "integer of 32767 bits"),
    "persistent id": (b"\x80\x02X\x01\x00\x00\x000Q.", "persistent id outside a torch.save zip"),
    "self-reference": (b"\x80\x02]q\x00h\x00a.", "contains itself"),
    "2**30 shared": (shared_tower(30), f"more than {MAX_VALUES:,} values"),
    "deep nesting": (b"\x80\x02" + b"]" * 40 + b"a" * 39 + b".", "more than 32 deep"),
    "truncated": (b"\x80\x02]q\x00(K\x01K\x02", "ends without STOP|malformed"),
    "junk tensor arguments": (torch_zip(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01K\x02K\x03K\x04K\x05"
                                       b"K\x06tR."), "_rebuild_tensor with other arguments"),
    "tensor past its storage": (torch_zip(rebuild_tensor(100_000_000_000 // 2**16, 1), {"0": b"\0" * 4}),
                                "reaches past its storage"),
    "stride-0 tensor": (torch_zip(rebuild_tensor(400_000_000, 0), {"0": b"\0" * 4}), "reaches past its storage"),
    "storage shorter than declared": (torch_zip(rebuild_tensor(1, 1, numel=1000), {"0": b"\0" * 4}),
                                      "declares 1,000 elements"),
    "TorchScript members": (torch_zip(b"\x80\x02K\x01.", extra={"constants.pkl": b"\x80\x02K\x01."}),
                            "TorchScript archive"),
    "unknown member": (torch_zip(b"\x80\x02K\x01.", extra={"extra.bin": b""}), "a torch.save file does not have"),
}


@pytest.mark.slow  # a child process importing torch
def test_hostile_pickles_are_refused_in_bounded_memory(tmp_path):
    """Each file is refused naming the file and the reason, in a child whose address space is limited."""
    paths = {}
    for number, (name, (data, _)) in enumerate(HOSTILE_PICKLES.items()):
        paths[name] = tmp_path / f"{number}.pth.tar"
        paths[name].write_bytes(data)
    results = run_limited(*(["load", str(path)] for path in paths.values()))
    for (name, (_, reason)), result, path in zip(HOSTILE_PICKLES.items(), results, paths.values()):
        assert result["error"] == "UntrustedPickleError", (name, result)
        assert str(path) in result["message"], (name, result["message"])
        assert re.search(reason, result["message"]), (name, result["message"])


@pytest.mark.parametrize("name", ["self-reference", "2**30 shared", "deep nesting", "junk tensor arguments",
                                  "TorchScript members", "5,000-digit integer"])
def test_hostile_pickles_that_cannot_allocate_are_refused_in_process(tmp_path, name):
    data, reason = HOSTILE_PICKLES[name]
    (tmp_path / "f.pth.tar").write_bytes(data)
    with pytest.raises(UntrustedPickleError, match=reason):
        load_pickle(tmp_path / "f.pth.tar", trust_pickle=True, what="test files")


@pytest.mark.parametrize("importer", ["ml-dr", "fkd"])
def test_a_torchscript_archive_is_refused_and_runs_nothing(digits, tmp_path, importer, capsys):
    """torch.load(weights_only=False) handed such a zip to torch.jit.load, which ran its __setstate__: here it
    overwrites the victim file through torch.from_file."""
    from reinforce.cli import main

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"safe")
    release = tmp_path / "release"
    if importer == "ml-dr":
        write_ml_dr_release(digits[0], release)
        target = next(release.rglob("0.pth.tar"))
    else:
        write_fkd_release(digits[0], release, "crops", False)
        target = sorted(release.rglob("*.tar"))[0]
    torchscript_archive(target, victim)
    assert 1000 < target.stat().st_size < 4000
    code = main(["import", importer, str(release), "--data", str(digits[0]), "--out", str(tmp_path / "out.zarr"),
                 "--trust-pickle", "--workers", "1", "--no-progress", "--block-size", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{target} is not read: a TorchScript archive (it holds " in err
    assert victim.read_bytes() == b"safe"


@pytest.mark.slow  # a child process importing torch, which converts blocks in two worker processes
def test_hostile_release_files_end_in_one_line_errors_within_the_caps(digits, tmp_path):
    """Through the command line: the 60-byte object-array config, stride-0 tensors in an ml-dr and an FKD sample
    file, and the numpy-crashing pickle as a sample converted by a worker process (it killed the worker into a
    raw TerminatedWorkerError)."""
    cases = {}
    config = tmp_path / "config"
    write_ml_dr_release(digits[0], config)
    (config / "config.pth.tar").write_bytes(object_array_config())
    cases["config"] = ("ml-dr", config, config / "config.pth.tar")
    for name, data in (("ml-dr-stride", stride_zero_ml_dr()), ("ml-dr-crash", object_array_crash())):
        root = tmp_path / name
        write_ml_dr_release(digits[0], root)
        victim = next(root.rglob("40.pth.tar" if name == "ml-dr-crash" else "0.pth.tar"))
        victim.write_bytes(data)
        cases[name] = ("ml-dr", root, victim)
    root = tmp_path / "fkd-stride"
    write_fkd_release(digits[0], root, "crops", False)
    victim = sorted(root.rglob("*.tar"))[0]
    victim.write_bytes(stride_zero_fkd())
    assert victim.stat().st_size < 4000
    cases["fkd-stride"] = ("fkd", root, victim)
    actions = [["cli", ["import", kind, str(root), "--data", str(digits[0]), "--out", str(tmp_path / f"{name}.zarr"),
                        "--trust-pickle", "--workers", "2", "--no-progress", "--block-size", "16"]]
               for name, (kind, root, _) in cases.items()]
    for (name, (_, _, victim)), result in zip(cases.items(), run_limited(*actions)):
        assert result["rc"] == 2, (name, result)
        lines = result["stderr"].strip().splitlines()
        assert len(lines) == 1 and f"{victim} is not read" in lines[0], (name, result["stderr"])


def test_a_release_file_for_a_sample_beyond_the_source_is_refused(digits, tmp_path):
    release = tmp_path / "release"
    write_ml_dr_release(digits[0], release)
    shutil.copy(next(release.rglob("3.pth.tar")), release / "00" / "999.pth.tar")
    with pytest.raises(ImportFailure, match=r"999.pth.tar is the file of sample 999, but the source has 45 images"):
        ml_dr.plan_import(release, digits[0], trust_pickle=True)
    fkd_release = tmp_path / "fkd"
    write_fkd_release(digits[0], fkd_release, "crops", False)
    stray = fkd_release / "3" / "not-in-the-source.tar"
    shutil.copy(sorted(fkd_release.rglob("*.tar"))[0], stray)
    with pytest.raises(ImportFailure, match=f"{stray} is the file of no source image: the release has 46 files, "
                                            "the source 45 images"):
        fkd.plan_import(fkd_release, digits[0], trust_pickle=True)


def test_content_of_another_shape_is_an_import_failure_naming_the_file(digits, tmp_path):
    release = tmp_path / "release"
    write_ml_dr_release(digits[0], release)
    victim = next(release.rglob("0.pth.tar"))
    torch.save((0, [{"params": [(0, 0, 1, 1), True, [(0, 0), (1, 1)], None], "prob": 5}]), victim)
    with pytest.raises(ImportFailure, match=f"{victim} does not hold what a release file holds"):
        ml_dr.plan_import(release, digits[0], trust_pickle=True)
