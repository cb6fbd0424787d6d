"""The training script's Dice bookkeeping, and a two-iteration smoke run on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("monai")

from segcal.data import data_root
from segcal.pipeline.train_unet3d import dice_stats, main, summarise_dice


def test_dice_casewise_and_pooled():
    lab = np.zeros((4, 4, 4), int)
    lab[:2] = 1
    lab[3] = 2
    pred = lab.copy()
    pred[0, 0] = 0  # 4 voxels of class 1 missed
    s1 = dice_stats(pred, lab)
    np.testing.assert_array_equal(s1[1], [28, 28, 32])
    s2 = dice_stats(lab, lab)
    res = summarise_dice([s1, s2], ("background", "anterior", "posterior"))
    d1 = 2 * 28 / 60
    assert res["casewise_mean"]["anterior"] == pytest.approx((d1 + 1) / 2)
    assert res["pooled"]["anterior"] == pytest.approx(2 * 60 / (60 + 64))
    assert res["casewise_mean"]["posterior"] == 1.0
    assert res["casewise_mean"]["foreground_mean"] == pytest.approx(((d1 + 1) / 2 + 1) / 2)


@pytest.mark.realdata
@pytest.mark.slow
def test_training_smoke(tmp_path):
    root = data_root(required=False)
    if root is None or not (root / "msd_task04_hippocampus" / "imagesTr").is_dir():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    out = tmp_path / "w.pt"
    assert main(["--iters", "2", "--batch", "1", "--log-every", "1", "--limit-train", "2",
                 "--limit-test", "1", "--threads", "1", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert [r["iter"] for r in summary["log"]] == [1, 2]
    assert summary["test_dice"]["n_cases"] == 1 and summary["n_train"] == 2
    from segcal.models.unet3d import load_unet3d_hippocampus

    load_unet3d_hippocampus(out)
