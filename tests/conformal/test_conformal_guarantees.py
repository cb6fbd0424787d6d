"""Monte-Carlo checks of the guarantees (``../shared/methods.md`` §9.3-9.4) on synthetic images.

The pool's loss table is built once; each of the 1000 splits only indexes rows of it (images are
the exchangeable units). Measured numbers are printed (``pytest -s``) and reported in
docs/conformal.md.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from conformal_synthetic import IGNORE, heterogeneous_pool, pool

from segcal.conformal import crc_index, fit_threshold, hb_pvalues, loss_table, ltt_index
from segcal.errors import InputError

N_SPLITS = 1000
GRID = np.linspace(0.0, 1.0, 101)


@pytest.fixture(scope="module")
def pool_table():
    return loss_table(pool(np.random.default_rng(18), 600), grid=GRID, ignore_index=IGNORE)


def reference_crc(losses: np.ndarray, grid: np.ndarray, alpha: float, bound: float = 1.0) -> float:
    """Independent reference (MAPIE is not installable here): the CRC rule of §9.3 written as a
    plain loop in exact rational arithmetic over the grid, smallest λ first."""
    n = losses.shape[0]
    a = Fraction(alpha)
    for j, lam in enumerate(grid):
        r = sum(Fraction(float(v)) for v in losses[:, j]) / n
        if Fraction(n, n + 1) * r + Fraction(bound) / (n + 1) <= a:
            return float(lam)
    raise AssertionError("no feasible lambda")


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_crc_mean_realised_risk_at_most_alpha(pool_table, alpha):
    rng = np.random.default_rng(int(alpha * 1000))
    n_cal = 100
    L = pool_table.losses
    realised = np.empty(N_SPLITS)
    for s in range(N_SPLITS):
        perm = rng.permutation(L.shape[0])
        j = crc_index(L[perm[:n_cal]], alpha)
        realised[s] = L[perm[n_cal:], j].mean()
    mean, se = realised.mean(), realised.std(ddof=1) / math.sqrt(N_SPLITS)
    print(f"CRC alpha={alpha}: mean realised risk {mean:.4f} (MC s.e. {se:.4f})")
    assert mean <= alpha + 3 * se
    # and not vacuous: within 2B/(n+1) plus the grid step's effect of alpha (§9.3 lower bound)
    assert mean >= alpha - 2 / (n_cal + 1) - 0.02


@pytest.mark.parametrize("risk,kw", [("fnr", {"class_index": 2}), ("coverage", {"tau": 0.8})])
def test_crc_other_risks(risk, kw):
    """Class-2 false-negative rate (images without class 2: loss 0) and the COSE loss, 2D + 3D."""
    L = loss_table(pool(np.random.default_rng(19), 600), risk, grid=GRID, ignore_index=IGNORE, **kw).losses
    rng = np.random.default_rng(2)
    alpha, n_cal = 0.1, 100
    realised = np.empty(N_SPLITS)
    for s in range(N_SPLITS):
        perm = rng.permutation(L.shape[0])
        realised[s] = L[perm[n_cal:], crc_index(L[perm[:n_cal]], alpha)].mean()
    mean, se = realised.mean(), realised.std(ddof=1) / math.sqrt(N_SPLITS)
    print(f"CRC {risk} alpha={alpha}: mean realised risk {mean:.4f} (MC s.e. {se:.4f})")
    assert alpha / 2 < mean <= alpha + 3 * se


@pytest.mark.parametrize("alpha,delta", [(0.1, 0.1), (0.2, 0.05)])
def test_ltt_violation_frequency_at_most_delta(pool_table, alpha, delta):
    """Calibration sets drawn iid (with replacement) from the pool, whose mean is the true risk."""
    rng = np.random.default_rng(7)
    L = pool_table.losses
    true_risk = L.mean(axis=0)
    n_cal = 200
    risks = np.empty(N_SPLITS)
    for s in range(N_SPLITS):
        j = ltt_index(L[rng.integers(0, L.shape[0], n_cal)], alpha, delta)
        risks[s] = true_risk[j]
    freq = float((risks > alpha).mean())
    print(f"LTT alpha={alpha} delta={delta}: violation frequency {freq:.4f}, mean true risk {risks.mean():.4f}")
    assert freq <= delta + 3 * math.sqrt(delta * (1 - delta) / N_SPLITS)
    assert risks.mean() > alpha / 2  # not vacuous (lambda = 1 would give risk 0)


def test_ltt_binary_cose_violation_frequency_at_most_delta():
    """The binary COSE loss uses the exact binomial p-value (no factor e): still at most delta."""
    L = loss_table(pool(np.random.default_rng(19), 600), "coverage", tau=0.8, grid=GRID, ignore_index=IGNORE).losses
    true_risk = L.mean(axis=0)
    rng = np.random.default_rng(8)
    alpha, delta, n_cal = 0.2, 0.1, 150
    risks = np.array([true_risk[ltt_index(L[rng.integers(0, L.shape[0], n_cal)], alpha, delta, binary=True)]
                      for _ in range(N_SPLITS)])
    freq = float((risks > alpha).mean())
    print(f"LTT coverage (binary) alpha={alpha} delta={delta}: violation frequency {freq:.4f}, "
          f"mean true risk {risks.mean():.4f}")
    assert freq <= delta + 3 * math.sqrt(delta * (1 - delta) / N_SPLITS)
    assert risks.mean() > alpha / 2


def test_pixel_pooled_threshold_breaks_the_image_guarantee():
    """The documented pitfall: pooling pixels (as if exchangeable) lets the many pixels of large
    easy images set the threshold; the small hard images then miss far more than alpha."""
    table = loss_table(heterogeneous_pool(np.random.default_rng(3), 400), grid=GRID)
    L, w = table.losses, table.n_valid.astype(np.float64)
    rng = np.random.default_rng(11)
    alpha, n_cal = 0.1, 100
    pooled, crc = np.empty(N_SPLITS), np.empty(N_SPLITS)
    for s in range(N_SPLITS):
        perm = rng.permutation(L.shape[0])
        cal, test = perm[:n_cal], perm[n_cal:]
        n_pix = w[cal].sum()
        pixel_rate = (L[cal] * w[cal, None]).sum(axis=0) / n_pix  # pooled pixel miscoverage
        jp = int(np.flatnonzero(n_pix / (n_pix + 1) * pixel_rate + 1 / (n_pix + 1) <= alpha)[0])
        pooled[s] = L[test, jp].mean()
        crc[s] = L[test, crc_index(L[cal], alpha)].mean()
    se_p, se_c = pooled.std(ddof=1) / math.sqrt(N_SPLITS), crc.std(ddof=1) / math.sqrt(N_SPLITS)
    print(f"pitfall alpha={alpha}: pixel-pooled {pooled.mean():.4f} (s.e. {se_p:.4f}), "
          f"image-level CRC {crc.mean():.4f} (s.e. {se_c:.4f})")
    assert pooled.mean() > alpha + 3 * se_p
    assert crc.mean() <= alpha + 3 * se_c


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_crc_equals_independent_reference(pool_table, alpha):
    rng = np.random.default_rng(5)
    for _ in range(5):
        rows = rng.choice(pool_table.n_images, 60, replace=False)
        sub = pool_table.subset(rows)
        lam = fit_threshold(sub, alpha).lam
        assert abs(lam - reference_crc(sub.losses, sub.grid, alpha)) <= 1e-12


def test_hb_pvalues_equal_exact_binomial_reference():
    n, alpha = 40, 0.1
    r = np.array([0.0, 0.01, 0.05, 0.0875, 0.1, 0.3])
    p = hb_pvalues(r, n, alpha)
    for ri, pi in zip(r, p, strict=True):
        a = min(ri, alpha)
        h = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
        k = math.ceil(n * ri)
        a_f = Fraction(alpha)
        cdf = sum(math.comb(n, i) * a_f**i * (1 - a_f) ** (n - i) for i in range(k + 1))
        ref = min(math.exp(-n * h), math.e * float(cdf), 1.0)
        assert pi == pytest.approx(ref, rel=1e-10, abs=1e-300)
    assert p[-1] == 1.0 and np.all(np.diff(p) >= 0)


def test_too_few_images_are_refused():
    table = loss_table(pool(np.random.default_rng(1), 10), grid=GRID, ignore_index=IGNORE)
    with pytest.raises(InputError, match="needs at least 19 images"):
        fit_threshold(table, 0.05)
    with pytest.raises(InputError, match="no threshold is certified"):
        fit_threshold(table, 0.05, delta=0.01)
    with pytest.raises(InputError, match="takes no delta"):
        fit_threshold(table, 0.1, delta=0.1, method="crc")
