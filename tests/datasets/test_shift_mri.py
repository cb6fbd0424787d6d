"""Tests of segcal.shift.mri: 3-D MRI shifts, five severities, deterministic under a seed."""

from __future__ import annotations

import itertools
import pickle
from functools import cache

import numpy as np
import pytest

from segcal.data import data_root
from segcal.shift import derive_seed
from segcal.shift.mri import (
    MRI_PARAMETERS,
    MRI_STOCHASTIC,
    available_mri_shifts,
    corrupt_volume,
    legendre_bias_field,
    make_volume_transform,
)

NAMES = available_mri_shifts()
SEVS = (1, 2, 3, 4, 5)


@cache
def synthetic() -> np.ndarray:
    """20 x 24 x 18 float32: a bright ellipsoid with texture on a dark background."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (20, 24, 18)), indexing="ij")
    body = ((z / 0.8) ** 2 + (y / 0.7) ** 2 + (x / 0.6) ** 2 < 1).astype(np.float64)
    v = 20 + 80 * body + 10 * np.sin(6 * x) * body + rng.normal(0, 2, body.shape)
    return np.clip(v, 0, None).astype(np.float32)


@cache
def real() -> np.ndarray:
    root = data_root(required=False)
    p = (
        None
        if root is None
        else root / "msd_task04_hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    )
    if p is None or not p.is_file():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    nib = pytest.importorskip("nibabel")
    return np.asarray(nib.load(p).dataobj)


VOLS = {"synthetic": synthetic, "real": real}
KINDS = [pytest.param("synthetic"), pytest.param("real", marks=pytest.mark.realdata)]


@cache
def out(kind: str, name: str, s: int, seed: int = 0) -> np.ndarray:
    return corrupt_volume(VOLS[kind](), name, s, seed=seed)


def _rms(kind, name, s):
    return float(np.sqrt(((out(kind, name, s) - VOLS[kind]().astype(np.float64)) ** 2).mean()))


def _hf(v):
    v = np.asarray(v, dtype=np.float64)
    return float(sum((np.diff(v, axis=a) ** 2).mean() for a in range(3)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_every_shift_and_severity(kind, name):
    v = VOLS[kind]()
    before = v.copy()
    for s in SEVS:
        y = out(kind, name, s)
        assert y.shape == v.shape
        assert y.dtype == (np.float32 if v.dtype == np.float32 else np.float64)
        assert np.all(np.isfinite(y))
        assert not np.allclose(y, v), (name, s)
    np.testing.assert_array_equal(v, before)
    np.testing.assert_array_equal(corrupt_volume(v, name, 3, seed=0), out(kind, name, 3))
    other = corrupt_volume(v, name, 3, seed=11)
    if name in MRI_STOCHASTIC:
        assert not np.array_equal(other, out(kind, name, 3))
    else:
        np.testing.assert_array_equal(other, out(kind, name, 3))
    # strength grows with severity: RMS deviation from the clean volume
    r = [_rms(kind, name, s) for s in SEVS]
    assert all(b > a for a, b in itertools.pairwise(r)), (name, r)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["gaussian_blur", "low_resolution"])
def test_smoothing_shifts_remove_high_frequencies(kind, name):
    hf = [_hf(out(kind, name, s)) for s in SEVS]
    assert hf[0] < _hf(VOLS[kind]())
    assert all(b < a for a, b in itertools.pairwise(hf))


def test_rician_noise_is_non_negative_and_scaled():
    v = np.full((16, 16, 16), 0.0)
    v[4:12, 4:12, 4:12] = 100.0
    y = corrupt_volume(v, "rician_noise", 2, seed=1)
    assert y.min() >= 0
    sigma = MRI_PARAMETERS["rician_noise"][1] * 100.0
    inside = y[5:11, 5:11, 5:11] - 100.0
    assert abs(inside.std() / sigma - 1) < 0.15
    # background follows a Rayleigh law: mean sigma * sqrt(pi / 2)
    bg = y[v == 0]
    assert abs(bg.mean() / (sigma * np.sqrt(np.pi / 2)) - 1) < 0.1


def test_gamma_keeps_range_and_ghosting_keeps_mean():
    v = synthetic()
    for s in SEVS:
        g = corrupt_volume(v, "gamma", s)
        assert np.isclose(g.min(), v.min(), atol=1e-4) and np.isclose(g.max(), v.max(), rtol=1e-5)
        gh = corrupt_volume(v, "ghosting", s, seed=2).astype(np.float64)
        assert gh.mean() >= v.mean() * 0.999  # magnitude of a mean-preserving complex image


def test_bias_field_is_smooth_positive_and_seeded():
    f = legendre_bias_field((10, 12, 14), 0.3, np.random.default_rng(0))
    assert f.shape == (10, 12, 14) and np.all(f > 0)
    g = legendre_bias_field((10, 12, 14), 0.3, np.random.default_rng(0))
    np.testing.assert_array_equal(f, g)


def test_volume_transform_per_case_seed():
    v = synthetic()
    t = make_volume_transform("rician_noise", 2, seed=5)
    a = t(v, "hippocampus_001")
    np.testing.assert_array_equal(
        a, corrupt_volume(v, "rician_noise", 2, seed=derive_seed(5, "hippocampus_001"))
    )
    assert not np.array_equal(a, t(v, "hippocampus_002"))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(t))(v, "hippocampus_001"), a)


def test_errors():
    v = synthetic()
    with pytest.raises(ValueError, match=r"name: unknown MRI shift 'motion'.*bias_field"):
        corrupt_volume(v, "motion", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt_volume(v, "gamma", 6)
    with pytest.raises(ValueError, match="volume: expected a 3-D"):
        corrupt_volume(v[0], "gamma", 1)
    with pytest.raises(TypeError, match="volume"):
        corrupt_volume(v.astype(np.complex64), "gamma", 1)
    bad = v.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        corrupt_volume(bad, "gamma", 1)
    with pytest.raises(ValueError, match="name"):
        make_volume_transform("nope", 1)
