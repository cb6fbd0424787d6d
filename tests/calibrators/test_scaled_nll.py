"""The closed-form NLL of ``softmax(z / t)`` (objectives.ScaledNLL) used by per-row scaling
calibrators: its value and ``t``-gradient against autograd in float64, and the same TS fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segcal.calibrators as sc
from segcal.calibrators.data import Batch
from segcal.calibrators.objectives import NLL, ScaledNLL, get_objective


def _rows(n: int = 500, c: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    y = torch.where(torch.rand(n, generator=g) < 0.6, z.argmax(1), torch.randint(0, c, (n,), generator=g))
    return z, y


def test_value_and_gradient_equal_autograd_in_float64():
    z, y = _rows()
    for t0 in (0.3, 1.0, 2.7):
        t = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
        v = ScaledNLL.apply(z, t, y)
        (g,) = torch.autograd.grad(v, t)
        t2 = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
        ref = F.cross_entropy(z / t2, y, reduction="sum")
        (g2,) = torch.autograd.grad(ref, t2)
        assert float(v) == pytest.approx(float(ref), rel=1e-12)
        assert float(g) == pytest.approx(float(g2), rel=1e-10)
        assert abs(float(g)) > 1e-3  # not at a stationary point: the comparison means something
    t = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: ScaledNLL.apply(z, s, y), (t,))


def test_the_ts_chunk_statistics_and_fit_are_those_of_autograd():
    z, y = _rows(4000, 19, seed=1)
    x = z.to(torch.float16)
    fused = sc.create("ts", init_temperature=1.7)
    fused._build_params(19)
    plain = sc.create("ts", init_temperature=1.7)
    plain._build_params(19)
    fused._row_temperature = fused._t  # what TemperatureScaling declares (map rows / T)
    plain._row_temperature = lambda: None  # the autograd path through the map
    assert isinstance(get_objective("nll"), NLL)
    b = Batch(x, y)
    for cal in (fused, plain):
        s = cal._stats_fn(b, NLL())
        s.backward()
    sf, sp = fused._stats_fn(b, NLL()), plain._stats_fn(b, NLL())
    assert torch.equal(sf, sp)  # the value bitwise (what the validation monitor compares)
    assert float(fused.raw_t.grad) == pytest.approx(float(plain.raw_t.grad), rel=1e-5)
    # other objectives keep the map: the same Brier statistics bitwise
    assert torch.equal(fused._stats_fn(b, get_objective("brier")), plain._stats_fn(b, get_objective("brier")))
    zz = x.numpy().astype(np.float32)
    a = sc.create("ts", optimizer="lbfgs", chunk_size=700)
    a._row_temperature = lambda: a._t()
    a.fit(zz, y.numpy(), ignore_index=None)
    p = sc.create("ts", optimizer="lbfgs", chunk_size=700)
    p._row_temperature = lambda: None
    p.fit(zz, y.numpy(), ignore_index=None)
    assert a.temperature == pytest.approx(p.temperature, rel=1e-4) and abs(a.temperature - 1.0) > 0.05
