"""Stores read over HTTP: from a server that honours Range requests and from one that ignores them (as
``python -m http.server`` does), by the dataset, ``verify`` and ``inspect`` alike."""

from __future__ import annotations

import warnings

import pytest
import torch
from range_server import RangeServer
from reinforce_loaders import ReinforcedDataset
from zarr.storage import FsspecStore

from reinforce.errors import VerificationError
from reinforce.tools.inspect import describe_store
from reinforce.tools.verify import verify_store

RANGE_WARNING = "ignores HTTP Range requests"


def _epoch_targets(dataset: ReinforcedDataset, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dataset.set_epoch(epoch)
    return [dataset[index][1] for index in range(len(dataset))]


def _size_table(description: str) -> list[str]:
    """The per-array rows and the total of ``inspect``'s output (everything after the column header)."""
    lines = description.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("array")):]


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "no-range"])
def test_dataset_reads_remote_records_like_local(digits, vocabulary_store, honour_range):
    local = ReinforcedDataset(digits[0], vocabulary_store, target="sparse")
    with RangeServer(vocabulary_store.parent, honour_range=honour_range) as server:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            remote = ReinforcedDataset(digits[0], f"{server.url}/{vocabulary_store.name}", target="sparse")
            got = _epoch_targets(remote, 3)
        served_whole = [r for r in server.log if r.status == 200 and "/records/" in r.path]
    want = _epoch_targets(local, 3)
    for (indices, probs), (want_indices, want_probs) in zip(got, want, strict=True):
        assert torch.equal(indices, want_indices) and torch.equal(probs, want_probs)
    told = [w for w in caught if RANGE_WARNING in str(w.message)]
    if honour_range:
        assert not told and not served_whole
    else:
        assert len(told) == 1 and served_whole  # said once, and the reads really were whole files
        assert "python -m http.server" in str(told[0].message) and "local disk" in str(told[0].message)


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "no-range"])
def test_verify_and_inspect_read_remote_stores_like_local(digits, store, honour_range):
    local_checks = verify_store(store, digits[0])
    local_table = _size_table(describe_store(store))
    assert any("slot reads:" in line for line in local_checks)
    with RangeServer(store.parent, honour_range=honour_range) as server, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        url = f"{server.url}/{store.name}"
        assert verify_store(url, digits[0]) == local_checks
        assert _size_table(describe_store(url)) == local_table
    files = int(local_table[-1].split()[-3])
    assert files > 0  # a remote store's files are counted, not shown as 0 files of 0 bytes


def test_verify_fails_where_training_would_on_wrong_byte_ranges(store):
    """A plain fsspec HTTP store hands a Range-less server's whole file to zarr as the asked-for range: whole
    blocks still read, single slots (what training reads) do not. ``verify`` must say so, not "verified"."""
    with RangeServer(store.parent, honour_range=False) as server:
        plain = FsspecStore.from_url(f"{server.url}/{store.name}", read_only=True)
        # found by the last-block check (one slot read alone, before any whole array) or the slot-read check
        with pytest.raises(VerificationError, match=r"block \d+ slot \d+ alone|last block \(\d+\), slot 0 .*checksum"):
            verify_store(plain)
