"""``benchmarks/conformal_experiments.py --quick`` on the real data (skipped without CamVid / MSD
hippocampus under the data root): it runs end to end, its loss tables equal
:func:`segcal.conformal.loss_table` on the same images, and CRC stays at or below α up to
Monte-Carlo error (the guarantee holds for random splits of any pool)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from segcal.bench.cache import BenchDataError
from segcal.conformal import crc_index, default_grid, loss_table

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("conformal_experiments", ROOT / "benchmarks" / "conformal_experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ce():
    return load_script()


@pytest.mark.slow
def test_quick_run(ce, tmp_path):
    try:
        results = ce.run(True, tmp_path, 100, 201, 500, ["camvid", "hippocampus"])
    except (BenchDataError, FileNotFoundError) as exc:
        pytest.skip(f"data not available: {exc}")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["experiments"]) == set(results["experiments"])
    assert (tmp_path / "hist.png").stat().st_size > 0 and "### Learn-then-Test" in (tmp_path / "results.md").read_text()
    exps = results["experiments"]
    assert {"camvid/miscoverage/none", "camvid/fnr-pedestrian/ts", "hippocampus/fnr-anterior/ts",
            "hippocampus/fnr-posterior/none"} <= set(exps)
    checked = 0
    for key, e in exps.items():
        for a in ce.ALPHAS:
            c = e[str(a)]["crc"]
            if c["refused"] == 0:
                assert c["risk"]["mean"] <= a + 3 * c["risk"]["se"] + 1e-12, (key, a, c)
                checked += 1
            for d in ce.DELTAS:
                assert 0.0 <= e[str(a)]["ltt"][str(d)]["violations_iid"] <= 1.0
    assert checked >= 6


@pytest.mark.slow
def test_streaming_tables_equal_loss_table(ce):
    """The one-pass tables of the script (several risks and calibrators at once) equal the library's
    per-risk :func:`loss_table` on the same hippocampus volumes; the split rule equals crc_index."""
    try:
        calib, test = ce.hippocampus_data(True)
    except (BenchDataError, FileNotFoundError) as exc:
        pytest.skip(f"data not available: {exc}")
    grid = default_grid(101)
    cals = ce.fit_calibrators(calib[:2], None, 3000, ("none", "ts"))
    tabs = ce.build_tables(test, cals, {"a": 1, "p": 2}, grid, None)
    for name, cal in cals.items():
        for risk, k in (("a", 1), ("p", 2)):
            ref = loss_table([(z, y) for _, z, y in test], "fnr", class_index=k, grid=grid, input_type="logits",
                             calibrator=cal)
            np.testing.assert_array_equal(tabs[name][risk]["losses"], ref.losses)
            np.testing.assert_array_equal(tabs[name][risk]["sizes"], ref.sizes)
            np.testing.assert_array_equal(tabs[name][risk]["weights"], [int((y == k).sum()) for _, _, y in test])
    t = tabs["none"]["a"]
    out, hists = ce.split_experiment(t, grid, 10, 20, seed=3)
    perms = [np.random.default_rng([3, s]).permutation(len(test)) for s in range(20)]
    direct = [t["losses"][p[10:], crc_index(t["losses"][p[:10]], 0.2)].mean() for p in perms]
    np.testing.assert_allclose(hists["crc@0.2"], direct, rtol=0, atol=0)
    assert math.isclose(out["0.2"]["crc"]["risk"]["mean"], float(np.mean(direct)), rel_tol=1e-12)
