"""λ̂ and the Hoeffding–Bentkus p-values equal MAPIE's risk-control implementation on the same
per-image loss tables (MAPIE is in the ``test`` extra; skipped without it)."""

from __future__ import annotations

import numpy as np
import pytest
from conformal_synthetic import IGNORE, pool

from segcal.conformal import crc_index, fit_threshold, hb_pvalues, loss_table, ltt_index

methods = pytest.importorskip("mapie.risk_control.methods")
base = pytest.importorskip("mapie.risk_control._base_controller")

GRID = np.linspace(0.0, 1.0, 101)
ties: list[tuple[str, float, int]] = []


@pytest.fixture(scope="module")
def tables_obj():
    imgs = pool(np.random.default_rng(31), 300)
    return {risk: loss_table(imgs, risk, grid=GRID, ignore_index=IGNORE, **kw)
            for risk, kw in (("miscoverage", {}), ("fnr", {"class_index": 1}), ("coverage", {"tau": 0.85}))}


@pytest.fixture(scope="module")
def tables(tables_obj):
    return {risk: t.losses for risk, t in tables_obj.items()}


@pytest.mark.parametrize("risk", ["miscoverage", "fnr", "coverage"])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_crc_lambda_equals_mapie(tables, risk, alpha):
    rng = np.random.default_rng(int(alpha * 100))
    for n in (40, 99, 250):
        L = tables[risk][rng.choice(300, n, replace=False)]
        _, r_plus = methods.get_r_hat_plus(L, GRID, "crc", None, None, None)
        lam_mapie = float(methods.find_best_predict_param(GRID, r_plus, np.array([alpha]))[0])
        lam = GRID[crc_index(L, alpha)]
        if np.all(np.abs(r_plus - alpha) > 1e-12):
            assert abs(lam - lam_mapie) <= 1e-12
        else:  # a tie: the paper's rule (methods.md §9.3) is "<= alpha", MAPIE's "< alpha"
            ties.append((risk, alpha, n))
            assert lam == GRID[np.flatnonzero(r_plus <= alpha + 1e-12)[0]]
            assert lam_mapie == GRID[np.flatnonzero(r_plus < alpha - 1e-12)[0]]


@pytest.mark.parametrize("risk", ["miscoverage", "fnr", "coverage"])
@pytest.mark.parametrize("alpha,delta", [(0.1, 0.1), (0.2, 0.05)])
def test_ltt_lambda_and_pvalues_equal_mapie(tables, tables_obj, risk, alpha, delta):
    rng = np.random.default_rng(3)
    for n in (100, 250):
        rows = rng.choice(300, n, replace=False)
        L = tables[risk][rows]
        r_hat = L.mean(axis=0)
        binary = risk == "coverage"  # 0/1 losses: exact binomial p-value (MAPIE's binary=True)
        p_mapie = methods.compute_hoeffding_bentkus_p_value(r_hat, n, alpha, binary)[:, 0]
        np.testing.assert_allclose(hb_pvalues(r_hat, n, alpha, binary), np.minimum(p_mapie, 1.0), rtol=1e-9,
                                   atol=1e-300)
        valid, _ = base.ltt_procedure(r_hat[None], np.array([[alpha]]), delta, np.full((1, GRID.size), n),
                                      binary=binary, fwer_method="fixed_sequence")
        assert valid[0], "MAPIE certifies no lambda"
        lam = GRID[ltt_index(L, alpha, delta, binary)]
        assert abs(lam - GRID[min(valid[0])]) <= 1e-12
        assert lam == fit_threshold(tables_obj[risk].subset(rows), alpha, delta=delta).lam


def test_ties_are_rare():
    """The tie branch above is the exception (binary COSE losses only), not the rule."""
    print(f"CRC ties with MAPIE's strict rule: {ties}")
    assert all(risk == "coverage" for risk, _, _ in ties) and len(ties) <= 3
