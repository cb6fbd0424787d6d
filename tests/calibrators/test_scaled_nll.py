"""The closed-form NLL of ``softmax(z / t)`` (objectives.ScaledNLL) used by per-row scaling
calibrators: its value and ``t``-gradient against autograd in float64, and the same TS fit
(TemperatureScaling declares ``_row_temperature``): in memory, streamed and from probabilities,
against the autograd path and against the float64 optimum found by bisection."""

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
    assert fused._row_temperature() is not None  # what TemperatureScaling declares (map rows / T)
    assert float(fused._row_temperature()) == pytest.approx(1.7, rel=1e-6)
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
    a.fit(zz, y.numpy(), ignore_index=None)
    p = sc.create("ts", optimizer="lbfgs", chunk_size=700)
    p._row_temperature = lambda: None
    p.fit(zz, y.numpy(), ignore_index=None)
    assert a.temperature == pytest.approx(p.temperature, rel=1e-4) and abs(a.temperature - 1.0) > 0.05


def _optimum(x: torch.Tensor, y: torch.Tensor) -> float:
    """The NLL-optimal temperature of rows ``x`` in float64, independently of segcal: the NLL is
    convex in ``b = 1 / T`` with derivative ``sum_i (E_q z_i - z_iy)``, increasing in ``b``:
    bisection on its sign."""
    z = x.double()
    zy = z.gather(1, y[:, None]).squeeze(1)
    lo, hi = 1e-3, 1e3
    for _ in range(90):
        mid = (lo * hi) ** 0.5 if hi / lo > 4 else (lo + hi) / 2
        if float(((torch.softmax(mid * z, 1) * z).sum(1) - zy).sum()) > 0:
            hi = mid
        else:
            lo = mid
    return 2 / (lo + hi)


def _calibrated_source(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 over-confident logits ``3 z`` with labels drawn from ``softmax(z)``: ``T`` near 3."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, c, generator=g)
    gumbel = -torch.log(-torch.log(torch.rand(n, c, generator=g).clamp_min(1e-20)))
    return (3 * z).to(torch.float16), (z + gumbel).argmax(1)


def _fit(data, *, fused: bool, **kw):
    cal = sc.create("ts", optimizer="lbfgs", **kw)
    if not fused:
        cal._row_temperature = lambda: None  # the autograd path through the map
    return cal.fit(data) if not isinstance(data, tuple) else cal.fit(*data)


@pytest.mark.parametrize("c", [19, 4])
def test_fused_ts_fit_is_the_optimum_in_memory_and_streamed(c):
    x, y = _calibrated_source(12_000, c, seed=c)
    want = _optimum(x, y)
    assert abs(want - 3.0) < 0.2  # the data's temperature: a fit that moved
    batches = [(x[i : i + 2_500], y[i : i + 2_500]) for i in range(0, x.shape[0], 2_500)]  # (M, C) tables
    got = {
        "memory fused": _fit((x, y), fused=True),
        "memory autograd": _fit((x, y), fused=False),
        "streamed fused": _fit(batches, fused=True, memory_budget=10_000, chunk_size=1_000),
        "streamed autograd": _fit(batches, fused=False, memory_budget=10_000, chunk_size=1_000),
    }
    assert got["streamed fused"].fit_info["mode"] == "streaming"
    assert got["memory fused"].fit_info["mode"] == "in-memory"
    for name, cal in got.items():  # the optimum up to L-BFGS's stopping rule (a decrease < 1e-7 relative)
        assert cal.fit_info["n_pixels"] == x.shape[0], name
        assert cal.temperature == pytest.approx(want, rel=1e-4), name
    for where in ("memory", "streamed"):
        assert got[f"{where} fused"].temperature == pytest.approx(got[f"{where} autograd"].temperature, rel=1e-6)


def test_fused_ts_fit_from_probabilities():
    x, y = _calibrated_source(10_000, 6, seed=2)
    p = torch.softmax(x.float(), 1)
    fused, plain = _fit((p, y), fused=True, input_type="probs"), _fit((p, y), fused=False, input_type="probs")
    want = _optimum(torch.log(p.clamp_min(1e-12)), y)  # probabilities are fitted as log p / T
    assert fused.temperature == pytest.approx(want, rel=1e-4)
    assert fused.temperature == pytest.approx(plain.temperature, rel=1e-6)


def test_a_wrong_closed_form_gradient_is_caught(monkeypatch):
    """The comparison with the optimum fails when the fused gradient takes ``E_q z`` under the
    wrong distribution (``softmax(z)`` instead of ``softmax(z / t)``), and the comparison of
    gradients fails when it is mis-scaled (``/ t`` instead of ``/ t^2``): both checks bite."""
    x, y = _calibrated_source(8_000, 5, seed=3)

    def wrong_q(ctx, z, t, labels):
        ctx.save_for_backward(z, t, labels, F.log_softmax(z, dim=1))  # q of z, not of z / t
        return F.cross_entropy(z / t, labels, reduction="sum")  # the value right

    with monkeypatch.context() as m:
        m.setattr(ScaledNLL, "forward", staticmethod(wrong_q))
        assert _fit((x, y), fused=True).temperature != pytest.approx(_optimum(x, y), rel=1e-2)
    backward = ScaledNLL.backward

    def wrong_scale(ctx, grad):
        a, g, b = backward(ctx, grad)
        return a, g * ctx.saved_tensors[1], b

    z, yy = x.double(), y
    t = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    ref = torch.autograd.grad(F.cross_entropy(z / t, yy, reduction="sum"), t)[0]
    t2 = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert float(torch.autograd.grad(ScaledNLL.apply(z, t2, yy), t2)[0]) == pytest.approx(float(ref), rel=1e-10)
    monkeypatch.setattr(ScaledNLL, "backward", staticmethod(torch.autograd.function.once_differentiable(wrong_scale)))
    t3 = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert float(torch.autograd.grad(ScaledNLL.apply(z, t3, yy), t3)[0]) != pytest.approx(float(ref), rel=1e-3)
