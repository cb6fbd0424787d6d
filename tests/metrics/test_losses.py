"""The differentiable ECE losses of ``segcal.losses`` (methods.md §3.15(a)(b))."""

from __future__ import annotations

import math

import pytest
import torch

from segcal.losses import ClassLevelECE, DifferentiableECE

torch.set_num_threads(1)


def _data(n=3, c=4, h=5, w=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, c, h, w, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n, h, w), generator=g)
    return logits, y


def hard_ece(p, y, n_bins):
    """Reference top-label ECE, (lo, hi] bins, written independently of segcal."""
    conf, pred = p.max(1)
    acc = (pred == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    tot = 0.0
    for b in range(n_bins):
        sel = (conf.double() > edges[b]) & (conf.double() <= edges[b + 1])
        if b == 0:
            sel |= conf.double() == 0
        if sel.any():
            tot += sel.sum() / conf.numel() * abs(conf[sel].double().mean() - acc[sel].mean())
    return float(tot)


def test_value_matches_hard_ece_within_the_lse_bound():
    logits, y = _data(n=2, h=40, w=40)
    p = logits.softmax(1)
    loss = DifferentiableECE(n_bins=10)
    per = loss.per_image(p, y)
    for i in range(2):
        ref = hard_ece(p[i].reshape(4, -1).t(), y[i].reshape(-1), 10)
        assert abs(float(per[i]) - ref) <= loss.bound(4) + 1e-6
    pooled = loss.pooled(p, y)
    ref = hard_ece(p.movedim(1, -1).reshape(-1, 4), y.reshape(-1), 10)
    assert abs(float(pooled) - ref) <= loss.bound(4) + 1e-6
    assert loss.bound(4) == pytest.approx(1e-5 * math.log(4))


def test_gradcheck_float64():
    logits, y = _data(n=2, c=3, h=3, w=3, dtype=torch.float64)
    x = logits.softmax(1).detach().requires_grad_(True)
    f = DifferentiableECE(n_bins=5, t=1e-2)
    assert torch.autograd.gradcheck(lambda q: f(q, y), (x,), eps=1e-7, atol=1e-5)
    lg = logits.detach().requires_grad_(True)
    g = ClassLevelECE(n_bins=5, t=1e-2, input_type="logits")
    assert torch.autograd.gradcheck(lambda z: g(z, y), (lg,), eps=1e-7, atol=1e-5)


def test_reductions_ignore_and_per_image_form():
    logits, y = _data()
    f = DifferentiableECE(input_type="logits", reduction="none", ignore_index=255)
    per = f(logits, y)
    assert per.shape == (3,)
    assert float(DifferentiableECE(input_type="logits")(logits, y)) == pytest.approx(float(per.mean()))
    y2 = y.clone()
    y2[1] = 255  # image 1 fully ignored -> 0
    assert float(f(logits, y2)[1]) == 0.0


def test_class_level_ece_absent_classes_count_as_zero():
    logits, y = _data(n=1, c=4, h=8, w=8)
    y[:] = torch.where(y == 3, 0, y)  # class 3 absent
    z = ClassLevelECE(input_type="logits", reduction="none")(logits, y)
    s = ClassLevelECE(input_type="logits", reduction="none", absent="skip")(logits, y)
    assert float(z) == pytest.approx(float(s) * 3 / 4)
    # per class: the ECE of the pixels labelled k, correct when predicted k
    p = logits.softmax(1)
    manual = 0.0
    for k in range(3):
        sel = y[0] == k
        pk = p[0][:, sel].t()
        manual += hard_ece(pk, torch.full((pk.shape[0],), k), 10)
    assert float(z) == pytest.approx(manual / 4, abs=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_bins"):
        DifferentiableECE(n_bins=0)
    with pytest.raises(ValueError, match="reduction"):
        DifferentiableECE(reduction="avg")
    with pytest.raises(ValueError, match="does not match"):
        DifferentiableECE()(torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
