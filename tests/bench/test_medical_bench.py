"""``segcal bench --dataset hippocampus``: table structure, real numbers, bootstrap pieces, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from segcal.bench.bootstrap import boot_stat
from segcal.bench.hippocampus import MedicalBenchConfig, evaluate_cases, resolve_rows
from segcal.bench.protocol import ImageData
from segcal.bench.spec import MEDICAL_CI_METRICS, MEDICAL_ROWS, MEDICAL_TABLE_COLUMNS
from segcal.cli import main
from segcal.data import data_root
from segcal.metrics import CalibrationMetrics
from segcal.metrics.regions import foreground_region_mask

ROOT = Path(__file__).resolve().parents[2]


def _hippocampus_dir() -> Path:
    root = data_root(required=False)
    d = None if root is None else Path(root) / "msd_task04_hippocampus"
    if d is None or not (d / "imagesTr").is_dir():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    return d


class _Scale(torch.nn.Module):
    """A fixed temperature (argmax preserving) stand-in for a fitted calibrator."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.t


class _Shift(torch.nn.Module):
    """Adds a bias to class 1: changes the argmax of some voxels."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = z.clone()
        out[:, 1] += 1.5
        return out


def _synthetic_cases(n: int = 5, seed: int = 0) -> list[ImageData]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        shape = (9 + i, 10, 8 + (i % 2))  # volumes of different shapes
        lab = np.zeros(shape, dtype=np.int64)
        lab[2:6, 3:7, 2:5] = 1
        lab[5:8, 3:7, 2:5] = 2
        z = rng.normal(0, 1, (3, *shape)).astype(np.float32)
        z[lab, *np.indices(shape)] += 2.5
        cases.append(ImageData(f"case{i}", z, lab))
    return cases


def test_evaluate_cases_matches_direct_metrics():
    cases = _synthetic_cases()
    cfg = MedicalBenchConfig(n_bins=15, fg_radius=1)
    cals = {("ts", 0): _Scale(1.7), ("shift", 0): _Shift()}
    res = evaluate_cases(cases, cals, cfg)
    assert set(res["runs"]) == {"uncalibrated@0", "ts@0", "shift@0"}
    for key, f in (("uncalibrated@0", lambda z: z), ("ts@0", cals[("ts", 0)]), ("shift@0", cals[("shift", 0)])):
        m = CalibrationMetrics(3, n_bins=15, average_classes=[0, 1, 2])
        fg = CalibrationMetrics(3, n_bins=15)
        flips = 0
        for c in cases:
            z = torch.from_numpy(c.logits)[None]
            y = torch.from_numpy(c.labels)[None]
            with torch.no_grad():
                out = f(z)
            m.update(out, y)
            fg.update(out, y, mask=torch.from_numpy(foreground_region_mask(c.labels[None], out.argmax(1).numpy(), radius=1)))
            flips += int((out.argmax(1) != z.argmax(1)).sum())
        d, dfg = m.compute(), fg.compute()
        got = res["runs"][key]["metrics"]
        assert got["ece"] == pytest.approx(d["ece"], abs=1e-12)
        assert got["nll"] == pytest.approx(d["nll"], abs=1e-12)
        assert got["image_ece"] == pytest.approx(d["image_ece"], abs=1e-12)
        assert got["dice_ant"] == pytest.approx(d["dice_per_class"][1], abs=1e-12)
        assert got["case_dice_post"] == pytest.approx(np.nanmean(d["image_dice_per_class"][:, 2]), abs=1e-12)
        assert got["fg_ece"] == pytest.approx(dfg["ece"], rel=1e-9)  # same voxels, other summation order
        assert got["flip_rate"] == pytest.approx(flips / d["n_pixels"], abs=1e-15)
    u, t, s = (res["runs"][k]["metrics"] for k in ("uncalibrated@0", "ts@0", "shift@0"))
    for k in ("dice_ant", "dice_post", "case_dice_ant", "case_dice_post"):
        assert t[k] == u[k]  # argmax preserving: Dice kept exactly
    assert t["flip_rate"] == 0.0 and s["flip_rate"] > 0


def test_bootstrap_stats_reproduce_point_values():
    """All-ones weights give back the table's numbers for every medical CI metric."""
    cases = _synthetic_cases(6, seed=1)
    res = evaluate_cases(cases, {("ts", 0): _Scale(1.3)}, MedicalBenchConfig(fg_radius=1))
    run = res["runs"]["ts@0"]
    ones = np.ones((1, len(cases)))
    expect = {"ece": "ece", "image_ece": "image_ece", "image_ece50": "image_ece50", "nll": "nll",
              "brier": "brier", "dice:1": "dice_ant", "dice:2": "dice_post", "case_dice:1": "case_dice_ant",
              "case_dice:2": "case_dice_post", "fg_ece": "fg_ece", "flip_rate": "flip_rate"}
    assert set(expect) == set(MEDICAL_CI_METRICS)
    for metric, key in expect.items():
        got = boot_stat(metric, [run["_stats"]])(ones)[0]
        assert got == pytest.approx(run["metrics"][key], abs=1e-12), metric


def test_rows_and_errors(tmp_path):
    assert "lts" not in resolve_rows(MedicalBenchConfig())
    assert resolve_rows(MedicalBenchConfig(spatial=True)) == list(MEDICAL_ROWS)
    with pytest.raises(ValueError, match="unknown medical bench row"):
        resolve_rows(MedicalBenchConfig(methods=("ts", "nope")))
    rc = main(["bench", "--dataset", "hippocampus", "--data-root", str(tmp_path / "nope"), "--out",
               str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--quiet", "--no-report"])
    assert rc != 0


@pytest.mark.realdata
@pytest.mark.slow
def test_bench_hippocampus_quick_real(tmp_path, capsys):
    pytest.importorskip("monai")
    pytest.importorskip("matplotlib")
    d = _hippocampus_dir()
    checkout_before = {p.name for p in ROOT.iterdir()}  # whatever is there already (e.g. segcal demo's segcal-out/)
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = main(["bench", "--dataset", "hippocampus", "--quick", "--out", str(out), "--cache", str(cache),
               "--data-root", str(d.parent), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == "segcal-bench-medical"
    assert res["config"]["methods_resolved"] == ["ts", "dc"]
    assert set(res["conditions"]) == {"clean", "gamma-3"}
    assert res["cache"]["predicted_volumes"] == 4 + 4 + 4  # calibration + test + shifted test
    for tag, cond in res["conditions"].items():
        assert cond["n_images"] == 4
        assert list(cond["summary"]) == ["uncalibrated", "ts", "dc"]
        for row in cond["summary"].values():
            for key, *_ in MEDICAL_TABLE_COLUMNS:
                assert math.isfinite(row[key]), (tag, key)
        # decision preserving: TS keeps every Dice exactly and flips nothing; DC (not AP) may not
        u, t = cond["summary"]["uncalibrated"], cond["summary"]["ts"]
        for k in ("dice_ant", "dice_post", "case_dice_ant", "case_dice_post", "case_dice_fg"):
            assert t[k] == u[k], (tag, k)
        assert t["flip_rate"] == 0.0
        assert cond["summary"]["ts"]["ece"] < u["ece"]  # a real fit, not the identity
        boot = cond["bootstrap_vs_ts"]
        assert set(boot) == {"uncalibrated", "dc"}
        ci = boot["dc"]["fg_ece"]
        assert ci["lo"] <= ci["diff"] <= ci["hi"]
        assert boot["uncalibrated"]["dice:1"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}
    # cross-check against CalibrationMetrics on the cached logits: uncalibrated and TS (fitted T)
    from segcal.io.predictions import read_label

    clean = res["conditions"]["clean"]
    temps = {f["seed"]: f["temperature"] for f in res["fits"] if f["method"] == "ts"}
    assert sorted(temps) == [0, 1]
    for key, t in (("uncalibrated@0", 1.0), ("ts@0", temps[0]), ("ts@1", temps[1])):
        m = CalibrationMetrics(3, n_bins=15, average_classes=[0, 1, 2])
        m50 = CalibrationMetrics(3, n_bins=50)
        for c in clean["cases"]:
            z = torch.from_numpy(np.load(cache / "clean" / f"{c}.npy").astype(np.float32))[None] / t
            y = torch.from_numpy(read_label(d / "labelsTr" / f"{c}.nii.gz").astype(np.int64))[None]
            m.update(z, y)
            m50.update(z, y)
        direct, got = m.compute(), clean["runs"][key]["metrics"]
        assert got["ece"] == pytest.approx(direct["ece"], rel=1e-5)
        assert got["nll"] == pytest.approx(direct["nll"], rel=1e-5)
        assert got["image_ece50"] == pytest.approx(m50.compute()["image_ece"], rel=1e-5)
        assert got["dice_post"] == pytest.approx(direct["dice_per_class"][2], abs=1e-12)
    md = (out / "results.md").read_text()
    assert "| method | props | ECE % | case-ECE % |" in md and "fg-ECE %" in md and "## MRI shifts" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # 2 conditions x 2 reliability + slices
    assert "Axial slices" in html
    # a rerun reads every volume from the cache
    rc = main(["bench", "--dataset", "hippocampus", "--quick", "--out", str(tmp_path / "out2"), "--cache",
               str(cache), "--data-root", str(d.parent), "--quiet", "--no-report", "--methods", "ts"])
    assert rc == 0
    res2 = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert res2["cache"]["predicted_volumes"] == 0 and res2["cache"]["reused_volumes"] == 12
    assert res2["conditions"]["clean"]["summary"]["ts"]["ece"] == pytest.approx(clean["summary"]["ts"]["ece"], abs=1e-12)
    # everything the runs wrote is under this test's own folder; nothing new appeared in the checkout
    assert {p.name for p in tmp_path.iterdir()} == {"out", "out2", "cache"}
    assert {p.name for p in ROOT.iterdir()} - checkout_before == set()
