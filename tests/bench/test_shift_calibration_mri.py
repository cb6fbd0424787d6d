"""MRI rows of segcal bench --shift-calibration (issue 17): leave-one-shift-out on hippocampus, the
clean-anchored sts fit strategy, and a real quick run of the 3D U-Net part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segcal.bench.protocol import ImageData, WholeVolumes
from segcal.bench.shift_fit import Anchored, argmax_check, copies, is_clean
from segcal.bench.shift_mri import (
    MriShiftConfig,
    check_mri_config,
    loso_summary,
    mixed_severity,
    run_mri_rows,
)
from segcal.calibrators import create
from segcal.data import data_root
from segcal.errors import InputError
from segcal.report.shift_tables import mri_sections


def _hippocampus_root() -> Path:
    root = data_root(required=False)
    if root is None or not (Path(root) / "msd_task04_hippocampus" / "imagesTr").is_dir():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    pytest.importorskip("nibabel")
    return Path(root)


def _cases(n: int, scale: float, seed: int) -> list[ImageData]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = (6 + i % 3, 7, 5)  # volumes of different shapes
        lab = rng.integers(0, 3, shape)
        z = rng.normal(0, 1, (3, *shape)).astype(np.float32)
        z[lab, *np.indices(shape)] += 1.0
        out.append(ImageData(f"case{i}", scale * z, lab))
    return out


def test_anchored_strategy_passes_the_clean_volumes_of_the_fit_half():
    clean = _cases(6, 1.0, 0)
    pert = copies(_cases(6, 4.0, 1), "gamma")  # over-confident "shifted" copies
    assert all(is_clean(c.stem) for c in clean) and not any(is_clean(c.stem) for c in pert)
    seen = {}

    class Spy:
        """Records the anchor the strategy passes, then fits a real anchored sts."""

        def __init__(self):
            self.cal = create("sts", max_iter=30)

        def fit(self, batches, val=None, anchor=None):
            seen["anchor"] = anchor
            return self.cal.fit(batches, val=val, anchor=anchor)

    spy = Spy()
    spy.__class__ = type("SpySts", (Spy, type(spy.cal)), {})  # an isinstance of sts for the strategy
    Anchored(WholeVolumes()).fit(spy, clean[:3] + pert[:3], clean[3:], None, 0, None)
    assert len(seen["anchor"]) == 3 and all(a[0].shape[0] == 1 for a in seen["anchor"])
    for a, c in zip(seen["anchor"], clean[:3], strict=True):
        assert torch.equal(a[0][0], torch.from_numpy(c.logits))
    cal = spy.cal
    t0 = cal.fit_info["anchor_temperature"]
    t_clean = torch.cat([cal.temperatures(torch.from_numpy(c.logits)[None]) for c in clean[:3]])
    torch.testing.assert_close(t_clean, torch.full((3,), t0))
    # a calibrator without an anchor (TS) is fitted by the base strategy unchanged
    ts = create("ts")
    Anchored(WholeVolumes()).fit(ts, clean[:3] + pert[:3], clean[3:], None, 0, None)
    assert ts.is_fitted


def test_config_checks_and_severity_draws():
    check_mri_config(MriShiftConfig())
    for bad in (dict(shifts=("gamma",)), dict(shifts=("gamma", "frost")), dict(methods=("ts_aug",)),
                dict(methods=("ts_clean", "cmsop_aug")), dict(severities=(6,))):
        with pytest.raises(InputError):
            check_mri_config(MriShiftConfig(**bad))
    sev = [mixed_severity(f"hippocampus_{i:03d}", "gamma", 1) for i in range(200)]
    assert set(sev) == {1, 2, 3, 4, 5} and mixed_severity("hippocampus_001", "gamma", 1) == sev[1]
    assert [mixed_severity(f"hippocampus_{i:03d}", "ghosting", 1) for i in range(200)] != sev  # per shift


def test_dice_check_and_loso_summary_by_hand():
    def run(method, ece, nll, dice, flip=0.0):
        return {"method": method, "metrics": {"ece": ece, "nll": nll, "dice_ant": dice, "dice_post": dice,
                                              "flip_rate": flip}}
    res = {"runs": {"u": run("uncalibrated", 0.02, 0.1, 0.8), "a": run("ts_clean", 0.01, 0.09, 0.8),
                    "b": run("sts_aug", 0.005, 0.08, 0.8)}}
    dice = ("dice_ant", "dice_post")
    assert argmax_check(res, ["ts_clean", "sts_aug"], dice)["sts_aug"]["argmax_kept"]
    res["runs"]["b"] = run("sts_aug", 0.005, 0.08, 0.79)
    with pytest.raises(AssertionError, match="sts_aug"):
        argmax_check(res, ["sts_aug"], dice)
    ci = lambda d, sig: {"nll": {"diff": d, "significant": sig}}  # noqa: E731
    conds = {
        "gamma-3": {"held_out": "gamma", "summary": {"ts_clean": {"ece": 0.02, "nll": 0.2}, "sts_aug": {"ece": 0.008, "nll": 0.1}},
                    "bootstrap_vs_ts_clean": {"sts_aug": ci(-0.1, True)}, "argmax_check": {"sts_aug": {"argmax_kept": True}}},
        "ghosting-3": {"held_out": "ghosting", "summary": {"ts_clean": {"ece": 0.04, "nll": 0.3}, "sts_aug": {"ece": 0.02, "nll": 0.4}},
                       "bootstrap_vs_ts_clean": {"sts_aug": ci(0.1, True)}, "argmax_check": {"sts_aug": {"argmax_kept": True}}},
        "clean": {"held_out": None, "summary": {"ts_clean": {"ece": 0.01, "nll": 0.1}, "sts_aug": {"ece": 0.016, "nll": 0.1}}},
    }
    row = loso_summary(conds, ["ts_clean", "sts_aug"])["rows"]["sts_aug"]
    assert row["mean_ece"] == pytest.approx(0.014) and row["ratio_to_ts_clean"] == pytest.approx(0.014 / 0.03)
    assert row["target_half_ece"] and row["nll_significantly_worse_than_ts_clean"] == ["ghosting-3"]
    assert row["clean_ece_minus_ts_clean"] == pytest.approx(0.006) and not row["target_clean_within_0.005"]


def test_mri_rows_quick_real(tmp_path):
    root = _hippocampus_root()
    cfg = MriShiftConfig(cache=str(tmp_path / "cache"), data_root=str(root), shifts=("gamma", "rician_noise"),
                         severities=(3,), seeds=(0,), calib_limit=2, test_limit=2, fit_voxels=20_000, n_boot=50)
    out = run_mri_rows(cfg)
    assert set(out["conditions"]) == {"gamma-3", "rician_noise-3", "clean"}
    assert out["cache"]["predicted_volumes"] == 2 + 2 + 2 * (2 + 2)
    for c in out["conditions"].values():
        uncal = c["summary"]["uncalibrated"]
        for m in ("ts_clean", "ts_aug", "sts_aug"):  # argmax preserving: Dice exactly kept
            assert c["summary"][m]["dice_ant"] == uncal["dice_ant"] and c["summary"][m]["flip_rate"] == 0.0
        assert set(c["bootstrap_vs_ts_clean"]) == {"uncalibrated", "ts_aug", "sts_aug"}
        if c["held_out"]:
            assert c["fitted_with"] == [s for s in ("gamma", "rician_noise") if s != c["held_out"]]
    # the held-out fold saw the other shift's copies only: 2 clean + 2 copies split in halves
    fit = next(f for f in out["fits"]["no-gamma"] if f["method"] == "ts_aug")
    assert len(fit["fit_cases"]) + len(fit["selection_cases"]) == 4
    assert not any("@gamma" in c for c in fit["fit_cases"] + fit["selection_cases"])
    sts = next(f for f in out["fits"]["no-gamma"] if f["method"] == "sts_aug")
    assert sts["fit_cases"]  # anchored on the clean cases of its fit half
    assert out["loso"]["rows"]["sts_aug"]["dice_kept_everywhere"]
    md = "\n".join(mri_sections(out))
    assert "### MRI targets (issue 17)" in md and "### MRI gamma-3" in md and "ΔDice ant" in md
