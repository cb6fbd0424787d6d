"""Medical (3D) calibration: foreground-region mask, per-case fitting without stacking, AP flips,
(the medical bench itself: ``tests/test_medical_bench.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segcal.calibrators import available, create
from segcal.data import data_root
from segcal.metrics import CalibrationMetrics
from segcal.metrics.regions import foreground_region_mask

ROOT = Path(__file__).resolve().parents[2]


def _hippocampus_dir():
    root = data_root(required=False)
    d = None if root is None else Path(root) / "msd_task04_hippocampus"
    if d is None or not (d / "imagesTr").is_dir():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    return d


def _direct_region(labels, preds, r, background=0):
    """Brute force: voxel v is in the region iff some fg voxel u has max_i |u_i - v_i| <= r."""
    fg = np.argwhere((labels != background) | (preds != background))
    out = np.zeros(labels.shape, dtype=bool)
    for v in np.ndindex(labels.shape):
        if len(fg) and np.abs(fg - np.asarray(v)).max(1).min() <= r:
            out[v] = True
    return out


def _direct_ece(probs, labels, n_bins):
    conf = probs.max(0)
    acc = probs.argmax(0) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    e = 0.0
    for k in range(n_bins):
        m = b == k
        if m.any():
            e += m.sum() / conf.size * abs(acc[m].mean() - conf[m].mean())
    return e


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_foreground_region_mask_matches_brute_force(radius):
    rng = np.random.default_rng(radius)
    y = np.zeros((9, 11, 8), dtype=np.int64)
    y[3:5, 4:6, 3:5] = 1
    y[6, 8, 2] = 2
    p = np.zeros_like(y)
    p[3:6, 4:6, 3:4] = 1
    p[0, 0, 7] = 2  # a far false positive: its neighbourhood must be in the region
    m = foreground_region_mask(y, p, radius=radius)
    assert m.dtype == bool and m.shape == y.shape
    np.testing.assert_array_equal(m, _direct_region(y, p, radius))
    assert m[0, 0, 7]
    # batch axes are not dilated across; torch input works
    mb = foreground_region_mask(torch.from_numpy(np.stack([y, np.zeros_like(y)])),
                                torch.from_numpy(np.stack([p, np.zeros_like(p)])), radius=radius)
    np.testing.assert_array_equal(mb[0], m)
    assert not mb[1].any()
    del rng


def test_fg_ece_equals_direct_computation():
    rng = np.random.default_rng(0)
    shape = (20, 22, 18)
    y = np.zeros(shape, dtype=np.int64)
    y[8:12, 9:13, 7:11] = 1
    y[10:12, 9:11, 7:9] = 2
    z = rng.normal(size=(3, *shape))
    z[0] += 5 * (y == 0)
    z[1] += 3 * (y == 1)
    z[2] += 3 * (y == 2)
    pred = z.argmax(0)
    region = foreground_region_mask(y, pred, radius=3)
    assert 0 < region.mean() < 1
    m = CalibrationMetrics(3, n_bins=15, per_image=False)
    m.update(torch.from_numpy(z)[None], torch.from_numpy(y)[None], mask=torch.from_numpy(region)[None])
    got = m.compute()
    q = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
    want = _direct_ece(q[:, region], y[region], 15)
    assert got["ece"] == pytest.approx(want, abs=1e-6)
    assert got["n_pixels"] == int(region.sum())


def test_region_mask_checks():
    with pytest.raises(ValueError, match="shape"):
        foreground_region_mask(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="radius"):
        foreground_region_mask(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), radius=-1)
    y = np.zeros((6, 6, 6), dtype=np.int64)
    y[2, 2, 2] = 1
    y[0, 0, 0] = 255
    m = foreground_region_mask(y, np.zeros_like(y), radius=2, ignore_index=255)
    assert not m[0, 0, 0] and m[1, 1, 1]


def _two_volumes(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for shape in ((7, 9, 6), (5, 8, 10)):  # different shapes: cannot be stacked
        y = rng.integers(0, 3, size=shape)
        z = rng.normal(size=(3, *shape)).astype(np.float32)
        z[y, *np.indices(shape)] += 2.0  # informative logits
        out.append((torch.from_numpy(z)[None], torch.from_numpy(y)[None]))
    return out


POINTWISE = [c["name"] for c in available() if not c["spatial"]]
SPATIAL = [c["name"] for c in available() if c["spatial"]]


@pytest.mark.parametrize("name", POINTWISE)
def test_pointwise_calibrators_fit_on_volumes_of_different_shapes(name):
    batches = _two_volumes()
    kw = {} if name == "selective" else {"max_iter": 20, "max_steps": 20}
    if name == "selective":
        kw = {"base": "ts", "base_config": {"max_iter": 20}, "selector_epochs": 1,
              "pixels_per_epoch": 256, "t_grid": (1.0, 2.0)}
    cal = create(name, **kw).fit(batches)
    assert cal.is_fitted
    for z, _ in batches:
        with torch.no_grad():
            out = cal(z)
        assert out.shape == z.shape and torch.isfinite(out).all()
        if cal.argmax_preserving:
            assert torch.equal(out.argmax(1), z.argmax(1))


@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_calibrators_fit_on_volumes_of_different_shapes(name):
    batches = _two_volumes(1)
    cal = create(name, spatial_dims=3, max_steps=3).fit(batches)
    for z, _ in batches:
        with torch.no_grad():
            out = cal(z)
        assert out.shape == z.shape and torch.equal(out.argmax(1), z.argmax(1))


@pytest.mark.realdata
@pytest.mark.slow
def test_ap_calibrators_do_not_flip_on_a_real_case():
    pytest.importorskip("monai")
    from segcal.datasets.hippocampus import load_case, load_split
    from segcal.models.unet3d import load_unet3d_hippocampus
    from segcal.pipeline.predict import predict_logits

    d = _hippocampus_dir()
    split = load_split()
    model = load_unet3d_hippocampus().eval()
    cases = [load_case(d, c) for c in (split["calibration"][0], split["calibration"][1], split["test"][0])]
    data = [(torch.from_numpy(predict_logits(model, c["image"]))[None], torch.from_numpy(c["label"])[None])
            for c in cases]
    ap = [c["name"] for c in available() if c["argmax_preserving"]]
    assert {"ts", "ets", "cmsap", "cmsop", "selective", "lts_ti"} <= set(ap)
    z_test = data[2][0]
    for name in ap:
        if name == "selective":
            kw = {"base": "ts", "base_config": {"max_iter": 30}, "selector_epochs": 1,
                  "pixels_per_epoch": 4096, "t_grid": (1.0, 2.0)}
        elif name in SPATIAL:
            kw = {"spatial_dims": 3, "max_steps": 5}
        else:
            kw = {"max_iter": 30}
        cal = create(name, **kw).fit(data[:2])
        with torch.no_grad():
            out = cal(z_test)
        flip = float((out.argmax(1) != z_test.argmax(1)).float().mean())
        assert flip == 0.0, name
