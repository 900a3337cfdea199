"""The student package trains without the build's heavy dependencies: a dataset epoch runs with ray and timm
(and the ``reinforce`` build package) unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from reinforce_loaders import ReinforcedDataset

BLOCKED = ("ray", "timm", "reinforce")

# Installed as sitecustomize, so it is active in the test process and in every DataLoader worker whatever the
# start method. Attempts are appended to a file: a package that catches the ImportError still shows up.
BLOCKER = textwrap.dedent('''
    import importlib.abc
    import os
    import sys

    BLOCKED = {blocked!r}


    class BlockHeavyImports(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                with open(os.environ["BLOCKED_IMPORT_LOG"], "a") as log:
                    log.write(name + "\\n")
                raise ImportError(f"{{name}} is blocked: reinforce_loaders must not need it")
            return None


    sys.meta_path.insert(0, BlockHeavyImports())
''').format(blocked=BLOCKED)

EPOCHS = textwrap.dedent('''
    import json, sys
    import torch
    from reinforce_loaders import ReinforcedDataset

    source, store, out = sys.argv[1:]
    ds = ReinforcedDataset(source, store, target="sparse")
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    result = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        indices, probs, shapes = [], [], set()
        for images, (top_indices, top_probs) in loader:
            shapes.add(tuple(images.shape[1:]))
            indices += top_indices.tolist()
            probs += top_probs.tolist()
        result[epoch] = {"indices": indices, "probs": probs, "shapes": sorted(shapes)}
    heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("ray", "timm", "reinforce"))
    json.dump({"epochs": result, "heavy_modules": heavy}, open(out, "w"))
''')


def _reference_epoch(source: Path, store: Path, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    ds = ReinforcedDataset(source, store, target="sparse")
    ds.set_epoch(epoch)
    targets = [ds[i][1] for i in range(len(ds))]
    return np.stack([t[0].numpy() for t in targets]), np.stack([t[1].numpy() for t in targets])


@pytest.mark.slow
def test_dataset_epochs_run_with_ray_timm_and_reinforce_blocked(digits, store, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    loaders = Path(__file__).resolve().parents[1] / "loaders"
    log = tmp_path / "blocked.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(loaders)]), "BLOCKED_IMPORT_LOG": str(log)}
    probe = subprocess.run([sys.executable, "-c", "import timm"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "timm is blocked" in probe.stderr  # the blocker is active
    log.unlink()
    out = tmp_path / "epochs.json"
    result = subprocess.run([sys.executable, "-c", EPOCHS, str(digits[0]), str(store), str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    attempted = log.read_text().split() if log.exists() else []
    assert not attempted, f"reinforce_loaders tried to import {sorted(set(attempted))}"
    got = json.loads(out.read_text())
    assert got["heavy_modules"] == []
    for epoch in (0, 1):
        indices, probs = _reference_epoch(digits[0], store, epoch)
        epoch_result = got["epochs"][str(epoch)]
        assert epoch_result["shapes"] == [[3, 32, 32]]
        np.testing.assert_array_equal(np.array(epoch_result["indices"]), indices)
        np.testing.assert_array_equal(np.array(epoch_result["probs"], dtype=np.float32), probs)
    assert got["epochs"]["0"]["indices"] != got["epochs"]["1"]["indices"]  # the epochs used different slots
