"""The block-scan counting kernel (``segcal conformal fit`` and ``segcal eval --conformal-*``) gives
the numpy counts, for one-step grids and grids that need a search, float32 and float64, any tail."""

from __future__ import annotations

import numpy as np
import pytest

from segcal.conformal.counting import Thresholds, count_chunk, count_kernel, numpy_counts
from segcal.conformal.tables import default_grid

pytestmark = pytest.mark.skipif(count_kernel() is None, reason="numba not installed (segcal[fast])")


def _chunk(rng: np.random.Generator, c: int, n: int, dtype: type, th: Thresholds) -> np.ndarray:
    q = rng.dirichlet(np.full(c, 0.3), size=n).T.astype(dtype)
    # values exactly at, just below and just above thresholds, 0, 1 and negatives
    edge = np.concatenate([th.ts, np.nextafter(th.ts, -1), np.nextafter(th.ts, 2), [0.0, 1.0, -0.5, -0.0]])
    idx = rng.integers(0, q.size, size=min(q.size // 3, edge.size))
    q.reshape(-1)[idx] = edge[rng.integers(0, edge.size, size=idx.size)].astype(dtype)
    return np.ascontiguousarray(q)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 4096 + 17])
@pytest.mark.parametrize("k_range", [(0, 5), (2, 3)])
def test_block_kernel_counts_equal_numpy(dtype: type, n: int, k_range: tuple[int, int]) -> None:
    rng = np.random.default_rng(n)
    grids = [default_grid(), np.linspace(0.0, 1.0, 11), np.array([0.0, 0.25, 0.999, 1.0]),
             np.array([0.0, 0.5, 1.0 - 1e-5, 1.0 - 2e-5, 1.0 - 3e-5, 1.0])]  # the last needs a search
    seen = set()
    for grid in grids:
        th = Thresholds.of(grid)
        seen.add(th.one_step)
        q = _chunk(rng, 5, n, dtype, th)
        lab = rng.integers(0, 5, size=n).astype(np.int64)
        valid = rng.random(n) < 0.8
        lab[~valid] = rng.choice([255, -1, 5], size=int((~valid).sum()))  # ignored labels: any value
        g = th.ts.size + 1
        want = [np.zeros(g, np.int64), np.zeros(g, np.int64), np.zeros(3, np.int64)]
        got = [np.zeros(g, np.int64), np.zeros(g, np.int64), np.zeros(3, np.int64)]
        numpy_counts(q, lab, valid, *k_range, th, *want)
        count_chunk(q, lab, valid, *k_range, th, *got)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)
    assert seen == {True, False}
