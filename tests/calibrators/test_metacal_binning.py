"""Meta-Cal* (methods.md §3.13), histogram binning and isotonic regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segcal.calibrators as sc
from segcal.metrics import expected_calibration_error

torch.set_num_threads(1)


def problem(n=4000, c=4, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, c, generator=g)
    u = torch.rand(n, c, generator=g).clamp_min(1e-20)
    return scale * z, (z - torch.log(-torch.log(u))).argmax(1)


def test_metacal_rejects_high_entropy_pixels_and_segmentation_keeps_argmax():
    x, y = problem()
    xv, yv = problem(seed=1)
    cal = sc.create("metacal").fit(x, y, val=(xv, yv))
    info = cal.fit_info
    assert info["tau_selected_by"] == "nll" and info["selection_split"] == "val"
    assert cal.tau == pytest.approx(info["tau"]) and len(info["tau_grid"]) >= 2
    xt, _ = problem(seed=2)
    with torch.no_grad():
        p = cal.predict_proba(xt)
    h = -(F.softmax(xt, 1) * F.log_softmax(xt, 1)).sum(1)
    rejected = h >= cal.tau
    assert bool(rejected.any()) and bool((~rejected).any())
    torch.testing.assert_close(p[rejected], torch.full_like(p[rejected], 0.25))
    torch.testing.assert_close(p[~rejected], F.softmax(xt[~rejected] / cal.temperature, 1))
    # AP holds on kept pixels only; segmentation() is the original argmax everywhere
    assert bool((p.argmax(1) == xt.argmax(1))[~rejected].all())
    img = xt[:60].t().reshape(1, 4, 6, 10).numpy()
    np.testing.assert_array_equal(cal.segmentation(img), img.argmax(1))
    assert "kept pixels only" in sc.available()[[a["name"] for a in sc.available()].index("metacal")][
        "preservation_note"]


def test_metacal_with_given_tau():
    x, y = problem()
    cal = sc.create("metacal", tau=0.5).fit(x, y)
    assert cal.tau == 0.5 and cal.fit_info["tau_selected_by"] == "given"
    assert cal.temperature > 1.2  # over-confident logits (scale 3)


@pytest.mark.parametrize("name", ["histogram_binning", "isotonic"])
def test_binning_from_streamed_batches_equals_in_memory_and_improves_ece(name):
    x, y = problem(6000)
    a = sc.create(name).fit(x, y)
    batches = [(x[i : i + 1000], y[i : i + 1000]) for i in range(0, 6000, 1000)]
    b = sc.create(name, memory_budget=1000).fit(batches)  # streamed
    assert b.fit_info["mode"] == "streaming"
    torch.testing.assert_close(a.table, b.table)
    xt, yt = problem(6000, seed=3)
    with torch.no_grad():
        out = a(xt)
    assert expected_calibration_error(out, yt) < 0.5 * expected_calibration_error(xt, yt)
    assert bool((out.argmax(1) == xt.argmax(1)).all())
    if name == "isotonic":
        assert bool((a.table[1:] >= a.table[:-1]).all())  # monotone


def test_histogram_binning_table_is_the_bin_accuracy():
    x, y = problem(3000)
    cal = sc.create("hb", n_bins=5).fit(x, y)
    conf, pred = F.softmax(x.double(), 1).max(1)
    b = torch.clamp(torch.ceil(conf * 5) - 1, 0, 4).long()
    for k in range(5):
        sel = b == k
        if sel.any():
            assert float(cal.table[k]) == pytest.approx(float((pred == y)[sel].double().mean()))


@pytest.mark.parametrize("name", ["histogram_binning", "isotonic"])
def test_binning_keeps_argmax_on_tied_inputs(name):
    """Ties (common with float16 logits) keep argmax's first-index decision after the map."""
    import segcal.calibrators as sc

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g)
    y = torch.randint(0, 5, (4000,), generator=g)
    cal = sc.create(name).fit(z, y)
    t = torch.randn(2000, 5, generator=g).half().float()
    t[:, 3] = t.max(1).values  # class 3 ties with the maximum everywhere
    assert torch.equal(cal(t).argmax(1), t.argmax(1))
