"""Loss tables (streaming = direct per-image computation, monotone in λ, 2D / 3D, torch, folders,
calibrator), the result file and :func:`apply_sets`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conformal_synthetic import IGNORE, image, pool

import segcal.calibrators as sc
from segcal.conformal import (
    ConformalResult,
    apply_sets,
    fit_threshold,
    folder_loss_table,
    loss_table,
)
from segcal.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
GRID = np.linspace(0.0, 1.0, 51)
SETTINGS = [("miscoverage", {}), ("fnr", {"class_index": 2}), ("coverage", {"tau": 0.9})]


def direct_row(p: np.ndarray, y: np.ndarray, risk: str, grid: np.ndarray, class_index=None, tau=None):
    """Reference: build each λ's sets explicitly and count, pixel by pixel (valid pixels only)."""
    p = p.astype(np.float64)
    valid = y != IGNORE
    losses, sizes = [], []
    for lam in grid:
        sets = p >= 1.0 - lam  # (C, *spatial)
        if risk == "fnr":
            pos = valid & (y == class_index)
            missed = pos & ~sets[class_index]
            losses.append(missed.sum() / pos.sum() if pos.any() else 0.0)
            sizes.append((sets[class_index] & valid).sum() / valid.sum())
            continue
        yy = np.where(valid, y, 0)
        covered = np.take_along_axis(sets, yy[None], axis=0)[0]
        miss = (valid & ~covered).sum() / valid.sum()
        losses.append(miss if risk == "miscoverage" else float(1.0 - miss < tau))
        sizes.append((sets & valid[None]).sum() / valid.sum())
    return np.array(losses), np.array(sizes)


@pytest.fixture(scope="module")
def images():
    return pool(np.random.default_rng(0), 24)


@pytest.mark.parametrize("risk,kw", SETTINGS)
def test_streaming_table_equals_direct_computation_and_is_monotone(images, risk, kw):
    table = loss_table(images, risk, grid=GRID, ignore_index=IGNORE, **kw)
    assert table.losses.shape == table.sizes.shape == (len(images), GRID.size)
    assert any(p.ndim == 4 for p, _ in images) and any(p.ndim == 3 for p, _ in images)  # 3D and 2D
    for i, (p, y) in enumerate(images):
        ref_l, ref_s = direct_row(p, y, risk, GRID, **kw)
        np.testing.assert_array_equal(table.losses[i], ref_l)
        np.testing.assert_allclose(table.sizes[i], ref_s, rtol=0, atol=1e-12)
        assert table.n_valid[i] == (y != IGNORE).sum()
    assert (np.diff(table.losses, axis=1) <= 0).all()  # non-increasing in lambda
    assert (np.diff(table.sizes, axis=1) >= 0).all()
    assert table.losses[:, -1].max() == 0.0  # lambda = 1: every class in every set


def test_fnr_images_without_the_class_have_zero_loss():
    rng = np.random.default_rng(2)
    p, y = image(rng, (8, 8))
    y[y == 1] = 0
    table = loss_table([(p, y)], "fnr", class_index=1, grid=GRID, ignore_index=IGNORE)
    assert table.losses.max() == 0.0 and table.sizes[0, -1] == 1.0


def test_torch_inputs_logits_and_stems(images):
    ref = loss_table(images, grid=GRID, ignore_index=IGNORE)
    tor = loss_table([(f"im{i}", torch.from_numpy(p), torch.from_numpy(y)) for i, (p, y) in enumerate(images)],
                     grid=GRID, ignore_index=IGNORE)
    np.testing.assert_array_equal(ref.losses, tor.losses)
    assert tor.stems[:2] == ["im0", "im1"]
    logit = loss_table([(np.log(p.astype(np.float64)), y) for p, y in images], grid=GRID, ignore_index=IGNORE,
                       input_type="logits")
    np.testing.assert_allclose(ref.losses, logit.losses, atol=0.05)  # float32 vs softmax(log p): ties move


def test_prediction_folder_and_calibrator(tmp_path, images):
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    two_d = [(p, y) for p, y in images if p.ndim == 3]
    for i, (p, y) in enumerate(two_d):
        np.save(pred / f"im{i:02d}.npy", np.log(p))
        np.save(lab / f"im{i:02d}.npy", y)
    folder = folder_loss_table(pred, lab, grid=GRID, ignore_index=IGNORE)  # logits by default
    direct = loss_table([(np.log(p), y) for p, y in two_d], grid=GRID, ignore_index=IGNORE, input_type="logits")
    np.testing.assert_array_equal(folder.losses, direct.losses)
    assert folder.stems[0] == "im00"
    x = torch.from_numpy(np.stack([np.log(p) for p, _ in two_d[:1]]))
    cal = sc.create("ts").fit(x, torch.from_numpy(np.where(two_d[0][1] == IGNORE, 0, two_d[0][1]))[None])
    through = folder_loss_table(pred, lab, grid=GRID, ignore_index=IGNORE, calibrator=cal)
    expect = loss_table([(cal.predict_proba(np.log(p)[None])[0], y) for p, y in two_d], grid=GRID,
                        ignore_index=IGNORE)
    np.testing.assert_array_equal(through.losses, expect.losses)


def test_result_roundtrip_and_apply_sets(tmp_path, images):
    table = loss_table(images, grid=GRID, ignore_index=IGNORE)
    res = fit_threshold(table, 0.3, meta={"source": "synthetic"})
    path = tmp_path / "cr.json"
    res.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "segcal-conformal" and doc["exchangeable_unit"] == "image"
    assert "at most alpha=0.3" in doc["guarantee"] and "never treated as exchangeable" in doc["guarantee"]
    back = ConformalResult.load(path)
    assert back == res
    j = int(np.flatnonzero(GRID == res.lam)[0])
    for i, (p, y) in enumerate(images[:6]):
        sets = apply_sets(res, p)
        masks = sets.masks()
        assert sets.packed.dtype == np.uint8 and sets.packed.shape == (1, *p.shape[1:])
        assert masks.shape == p.shape and np.array_equal(sets.sizes, masks.sum(0))
        valid = y != IGNORE
        covered = np.take_along_axis(masks, np.where(valid, y, 0)[None], axis=0)[0]
        assert (valid & ~covered).sum() / valid.sum() == table.losses[i, j]
    fnr = fit_threshold(loss_table(images, "fnr", class_index=1, grid=GRID, ignore_index=IGNORE), 0.3,
                        delta=0.2)
    s = apply_sets(fnr, images[0][0])
    assert s.num_masks == 1 and np.array_equal(s.masks()[0], images[0][0][1] >= 1 - fnr.lam)


def test_refused_inputs(tmp_path, images):
    with pytest.raises(InputError, match="class_index"):
        loss_table(images, "fnr")
    with pytest.raises(InputError, match="tau"):
        loss_table(images, "coverage")
    with pytest.raises(InputError, match="strictly increasing"):
        loss_table(images, grid=[0.5, 0.2])
    with pytest.raises(InputError, match="outside"):
        loss_table(images)  # 255 without ignore_index
    with pytest.raises(InputError, match="input_type='logits'"):
        loss_table([(np.log(images[0][0]), images[0][1])], ignore_index=IGNORE)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(InputError, match="not a segcal-conformal file"):
        ConformalResult.load(bad)


def test_docs_example_runs(tmp_path, monkeypatch):
    """The API example of docs/conformal.md is run as written."""
    text = (ROOT / "docs" / "conformal.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/conformal.md must hold a python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/conformal.md", "exec"), {})
