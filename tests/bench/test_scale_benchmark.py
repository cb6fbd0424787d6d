"""``benchmarks/scale.py`` pieces on a tiny folder: folder reuse, and the fit worker's record of
the passes over the folder (what the full-size wall time is estimated from)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    return load_script()


def test_reusable_only_for_a_complete_folder_of_the_same_shape(scale: ModuleType, tmp_path: Path) -> None:
    folder = tmp_path / "n3"
    scale.write_folder(folder, 3, 4, 8, 16)
    assert scale.reusable(folder, 3, 4, 8, 16)
    assert not scale.reusable(folder, 4, 4, 8, 16)  # another image count
    assert not scale.reusable(folder, 3, 5, 8, 16)  # another shape
    assert not scale.reusable(tmp_path / "absent", 3, 4, 8, 16)
    (folder / "labels" / "img_0002.png").unlink()  # an incomplete folder
    assert not scale.reusable(folder, 3, 4, 8, 16)


def test_fit_worker_records_passes_and_streams_over_the_budget(scale: ModuleType, tmp_path: Path) -> None:
    pred, lab = scale.write_folder(tmp_path / "n4", 4, 3, 16, 16)
    out = tmp_path / "fit.json"
    # a budget below one file's rows: streamed, every L-BFGS evaluation re-reads the 4 files
    assert scale._fit_worker(str(pred), str(lab), "ts", str(out), 1e-3, "lbfgs", 3) == 0
    got = json.loads(out.read_text())
    assert got["mode"] == "streaming" and got["optimizer"] == "lbfgs"
    assert got["steps"][0] <= 3
    assert got["files_read"] == 4 * got["passes"] and got["passes"] >= 2  # the counting pass + evaluations
    assert got["state"] and all(len(v) >= 1 for v in got["state"].values())  # the fitted parameters
    big = tmp_path / "fit_mem.json"
    assert scale._fit_worker(str(pred), str(lab), "ts", str(big), None, None) == 0
    mem = json.loads(big.read_text())
    assert mem["mode"] == "in-memory" and mem["passes"] == 1  # read once, then fitted in memory
