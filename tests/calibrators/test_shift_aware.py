"""Shift-conditioned temperature scaling (``sts``; issue 17, methods.md §9.1 + §3.1).

Synthetic images whose model is over-confident by an amount that grows with a hidden "shift"
level ``s`` (accuracy falls faster than confidence, as under a real corruption): the per-image
optimal temperature is ``(3 - s) / (3 - 2.5 s)``, known in closed form. ``sts`` must learn it
from the logits alone (no shift label), beat one global temperature on held-out shifted images,
reduce to TS when fitted on unshifted images only, and keep the contract (declared TI / AP / OP,
save / load, TorchScript, torch.export).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segcal
from segcal.calibrators import ShiftConditionedTemperature, check_calibrator, create
from segcal.calibrators.data import Batch
from segcal.calibrators.objectives import get_objective
from segcal.calibrators.shift_aware import (
    DEFAULT_FEATURES,
    FEATURES,
    SPATIAL_FEATURES,
    image_statistics,
)

torch.set_num_threads(1)
C = 4


def shifted_images(levels, hw=(12, 12), seed=0):
    """One image per shift level: true logits ``m u`` (labels drawn from them), model logits ``β u``
    with ``m = 3 - 2.5 s`` and ``β = 3 - s``; returns logits, labels and the optimal T ``β / m``."""
    g = torch.Generator().manual_seed(seed)
    zs, ys, t_opt = [], [], []
    for s in levels:
        u = torch.randn(C, *hw, generator=g)
        m, beta = 3 - 2.5 * s, 3 - s
        gumbel = -torch.log(-torch.log(torch.rand(C, *hw, generator=g).clamp_min(1e-20)))
        ys.append((m * u + gumbel).argmax(0))
        zs.append(beta * u)
        t_opt.append(beta / m)
    return torch.stack(zs), torch.stack(ys), np.array(t_opt)


@pytest.fixture(scope="module")
def fitted():
    z, y, _ = shifted_images(np.linspace(0, 1, 40), seed=1)
    return create("sts").fit(z, y), create("ts").fit(z, y)


def nll(logits, y):
    return float(F.cross_entropy(logits, y))


def test_the_contract_holds_exactly_as_declared():
    results = check_calibrator("sts", exact=True, on_fail=None)
    assert all(r.passed for r in results), [r.message for r in results if not r.passed]
    a = next(a for a in segcal.calibrators.available() if a["name"] == "sts")
    assert a["translation_invariant"] and a["argmax_preserving"] and a["order_preserving"] and a["spatial"]
    assert segcal.calibrators.resolve("shift-ts") is ShiftConditionedTemperature


def test_statistics_match_a_float64_numpy_reference():
    z = 2 * torch.randn(3, C, 5, 6, generator=torch.Generator().manual_seed(3))
    got = image_statistics(z, FEATURES[:5]).double().numpy()
    x = z.double().numpy()
    e = np.exp(x - x.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    maxp = p.max(1)
    ref = np.stack([
        1 - maxp.mean((1, 2)),
        (-(p * np.log(p)).sum(1) / math.log(C)).mean((1, 2)),
        (1 / (1 + np.exp(-(0.5 - maxp) / 0.05))).mean((1, 2)),
        (1 / (1 + np.exp(-(0.9 - maxp) / 0.05))).mean((1, 2)),
        -np.log(x.std(1) + 1e-6).mean((1, 2)),
    ], 1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert list(FEATURES[:5]) == ["uncertainty", "entropy", "low_conf_50", "low_conf_90", "logit_norm"]
    assert list(FEATURES[5:]) == list(SPATIAL_FEATURES)
    # translation invariant: a per-pixel constant changes nothing
    np.testing.assert_allclose(image_statistics(z + 7 * torch.randn(3, 1, 5, 6), FEATURES[:5]).numpy(), got, atol=2e-5)


def test_it_learns_the_shift_dependent_temperature(fitted):
    sts, ts = fitted
    z, y, t_opt = shifted_images(np.linspace(0, 1, 30), seed=2)  # held out
    t = sts.temperatures(z).numpy()
    # the temperature rises with the (hidden) shift, tracking the optimum; TS has one value
    assert np.corrcoef(np.log(t), np.log(t_opt))[0, 1] > 0.85
    assert t[-5:].mean() > 2.0 * t[:5].mean()
    assert np.all(sts.weights.numpy() >= 0)
    with torch.no_grad():
        assert nll(sts(z), y) < nll(ts(z), y) - 0.02
        oracle = nll(z / torch.tensor(t_opt, dtype=torch.float32).reshape(-1, 1, 1, 1), y)
        assert nll(sts(z), y) < oracle + 0.01  # within 0.01 nats of the per-image optimum
        # on the most shifted third the gain is larger; argmax is kept exactly
        k = slice(20, 30)
        assert nll(sts(z[k]), y[k]) < nll(ts(z[k]), y[k]) - 0.03
        assert torch.equal(sts(z).argmax(1), z.argmax(1))
    assert sts.fit_info["n_images"] == 40 and len(sts.fit_info["feature_mean"]) == len(DEFAULT_FEATURES)


def test_fitted_on_clean_images_only_it_is_ts():
    z, y, _ = shifted_images([0.0] * 30, seed=4)
    sts, ts = create("sts").fit(z, y), create("ts").fit(z, y)
    t = sts.temperatures(z).numpy()
    assert abs(float(np.median(t)) - ts.temperature) < 0.05 * ts.temperature
    with torch.no_grad():
        assert abs(nll(sts(z), y) - nll(ts(z), y)) < 0.01


@pytest.mark.parametrize("kw", [{"knots": 3}, {"monotone": False}, {"features": ["entropy"]},
                                {"features": [*DEFAULT_FEATURES, *SPATIAL_FEATURES]}])
def test_variants_fit_and_keep_argmax(kw):
    z, y, t_opt = shifted_images(np.linspace(0, 1, 24), seed=5)
    cal = create("sts", **kw).fit(z, y)
    n_basis = len(kw.get("features", DEFAULT_FEATURES)) * (1 + kw.get("knots", 0))
    assert cal.weights.shape == (n_basis,)
    t = cal.temperatures(z).numpy()
    assert np.corrcoef(np.log(t), np.log(t_opt))[0, 1] > 0.6
    with torch.no_grad():
        assert torch.equal(cal(z).argmax(1), z.argmax(1))


def test_streamed_batches_of_different_sizes_volumes_and_a_mask():
    g = torch.Generator().manual_seed(6)
    batches = [(2 * torch.randn(1, C, 5, 6, 7, generator=g), torch.randint(0, C, (1, 5, 6, 7), generator=g)),
               (3 * torch.randn(1, C, 4, 8, 5, generator=g), torch.randint(0, C, (1, 4, 8, 5), generator=g))]
    cal = create("sts", max_iter=20).fit(batches)
    assert cal.spatial_dims == 3
    z = batches[0][0]
    out = cal(z)
    t = cal.temperatures(z)
    torch.testing.assert_close(out, z / t.reshape(1, 1, 1, 1, 1))
    # the statistics use every pixel, the loss only the valid ones: a mask changes the fit, not T's inputs
    z2, y2, _ = shifted_images(np.linspace(0, 1, 8), seed=7)
    mask = torch.ones_like(y2, dtype=torch.bool)
    mask[:, :6] = False
    a = create("sts", max_iter=30).fit(z2, y2, mask=mask)
    np.testing.assert_allclose(a.statistics(z2).numpy(), image_statistics(z2, DEFAULT_FEATURES).numpy())


def test_the_loss_on_a_pixel_subset_fits_like_the_full_loss():
    z, y, _ = shifted_images(np.linspace(0, 1, 16), hw=(40, 40), seed=10)
    full = create("sts", loss_pixels=None).fit(z, y)
    sub = create("sts", loss_pixels=400).fit(z, y)  # a quarter of each image's 1600 pixels
    t_full, t_sub = full.temperatures(z).numpy(), sub.temperatures(z).numpy()
    assert np.max(np.abs(np.log(t_sub / t_full))) < 0.08
    assert not np.allclose(t_sub, t_full, rtol=1e-6)  # really a different (subsampled) objective
    with torch.no_grad():
        assert nll(sub(z), y) < nll(full(z), y) + 0.005
    assert sub.get_config()["loss_pixels"] == 400


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="features"):
        create("sts", features=["nope"])
    with pytest.raises(ValueError, match="t_bounds"):
        create("sts", t_bounds=(2.0, 5.0))
    with pytest.raises(ValueError, match="knots"):
        create("sts", knots=-1)
    with pytest.raises(ValueError, match="l2"):
        create("sts", l2=-1.0)
    with pytest.raises(ValueError, match="loss_pixels"):
        create("sts", loss_pixels=0)


def test_save_load_and_torch_export(fitted, tmp_path):
    sts, _ = fitted
    sts.save(tmp_path / "sts.pt")
    back = segcal.load(tmp_path / "sts.pt")
    z, _, _ = shifted_images([0.2, 0.9], seed=8)
    with torch.no_grad():
        torch.testing.assert_close(back(z), sts(z))
    assert back.get_config() == sts.get_config()
    dyn = torch.export.Dim.DYNAMIC
    program = torch.export.export(sts.eval(), (torch.randn(2, C, 16, 16),),
                                  dynamic_shapes=({0: dyn, 2: dyn, 3: dyn},)).module()
    for n, h, w in [(1, 12, 12), (3, 20, 9)]:
        x = 3 * torch.randn(n, C, h, w)
        with torch.no_grad():
            torch.testing.assert_close(program(x), sts(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- clean anchor
@pytest.fixture(scope="module")
def anchored():
    """Fitted on 20 clean + 40 shifted images, anchored on the clean ones; TS on the clean ones."""
    z, y, _ = shifted_images(np.linspace(0.05, 1, 40), seed=11)
    zc, yc, _ = shifted_images([0.0] * 20, seed=12)
    cal = create("sts").fit(torch.cat([zc, z]), torch.cat([yc, y]), anchor=(zc, yc))
    return cal, create("ts").fit(zc, yc), (zc, yc)


def test_anchored_falls_back_to_clean_ts_in_domain(anchored):
    cal, ts, (zc, _) = anchored
    assert cal.anchored and cal.get_config()["anchored"]
    t0 = cal.fit_info["anchor_temperature"]
    assert t0 == pytest.approx(ts.temperature, rel=1e-3)  # stage 1 is TS on the anchor images
    # every anchor image (anchor_quantile 1: the maximum) gets exactly T_0
    torch.testing.assert_close(cal.temperatures(zc), torch.full((20,), t0), rtol=1e-6, atol=0)
    # new clean images: (nearly) all at T_0, so the output is clean TS's
    z2, y2, _ = shifted_images([0.0] * 30, seed=13)
    t = cal.temperatures(z2).numpy()
    assert np.mean(np.isclose(t, t0, rtol=1e-6)) >= 0.8 and np.max(t) < 1.3 * t0
    with torch.no_grad():
        assert abs(nll(cal(z2), y2) - nll(ts(z2), y2)) < 0.003


def test_anchored_only_raises_the_temperature_and_learns_the_shift(anchored):
    cal, ts, _ = anchored
    z, y, t_opt = shifted_images(np.linspace(0, 1, 30), seed=14)
    t = cal.temperatures(z).numpy()
    t0 = cal.fit_info["anchor_temperature"]
    assert np.all(t >= t0 * (1 - 1e-6)) and np.all(cal.weights.numpy() >= 0)
    assert np.corrcoef(np.log(t), np.log(t_opt))[0, 1] > 0.85 and t[-5:].mean() > 2.0 * t0
    with torch.no_grad():
        assert nll(cal(z[20:]), y[20:]) < nll(ts(z[20:]), y[20:]) - 0.03
    # a statistic moving "the wrong way" (far more confident than any clean image) cannot lower T:
    # 10x the logits of clean images is below the anchor range in every feature -> exactly T_0
    zc, _, _ = shifted_images([0.0] * 4, seed=15)
    torch.testing.assert_close(cal.temperatures(10 * zc), torch.full((4,), t0), rtol=1e-6, atol=0)
    # logit_norm (opt-in) can likewise only raise T above T_0 when anchored
    z5, y5, _ = shifted_images(np.linspace(0, 1, 30), seed=16)
    zc5, yc5, _ = shifted_images([0.0] * 15, seed=17)
    ln = create("sts", features=FEATURES).fit(torch.cat([zc5, z5]), torch.cat([yc5, y5]), anchor=(zc5, yc5))
    assert torch.all(ln.temperatures(10 * zc5) >= ln.fit_info["anchor_temperature"] * (1 - 1e-6))


def test_anchored_map_is_translation_argmax_and_order_preserving(anchored):
    cal, _, _ = anchored
    z, _, _ = shifted_images(np.linspace(0, 1, 6), seed=18)
    with torch.no_grad():
        out = cal(z)
        shifted = cal(z + 5 * torch.randn(6, 1, *z.shape[2:], generator=torch.Generator().manual_seed(0)))
        # translation invariant up to the per-pixel constant the softmax ignores
        torch.testing.assert_close(F.log_softmax(shifted, 1), F.log_softmax(out, 1), atol=2e-4, rtol=1e-4)
        assert torch.equal(out.argmax(1), z.argmax(1))
        assert torch.equal(out.argsort(1), z.argsort(1))  # one positive scalar per image: every order kept


def test_anchored_save_load_and_refusals(anchored, tmp_path):
    cal, _, (zc, yc) = anchored
    cal.save(tmp_path / "a.pt")
    back = segcal.load(tmp_path / "a.pt")
    z, _, _ = shifted_images([0.1, 0.9], seed=19)
    assert back.anchored and back.get_config() == cal.get_config()
    with torch.no_grad():
        torch.testing.assert_close(back(z), cal(z))
    torch.testing.assert_close(back.anchor_values, cal.anchor_values)
    with pytest.raises(ValueError, match="anchor"):
        create("sts", anchored=True).fit(zc, yc)
    with pytest.raises(ValueError, match="anchor_quantile"):
        create("sts", anchor_quantile=0.0)
    with pytest.raises(ValueError, match="anchor_margin"):
        create("sts", anchor_margin=-1.0)
    # streamed anchors (one batch per image / volume) give the same map as the in-memory tuple
    z2, y2, _ = shifted_images(np.linspace(0, 1, 12), seed=20)
    a = create("sts").fit(torch.cat([zc, z2]), torch.cat([yc, y2]), anchor=(zc, yc))
    b = create("sts").fit(torch.cat([zc, z2]), torch.cat([yc, y2]), anchor=[(zc[i:i + 1], yc[i:i + 1]) for i in range(20)])
    torch.testing.assert_close(a.temperatures(z2), b.temperatures(z2), rtol=1e-5, atol=1e-6)


def test_anchor_range_widens_the_clean_range_without_changing_t0():
    z, y, _ = shifted_images(np.linspace(0.05, 1, 30), seed=24)
    zc, yc, _ = shifted_images([0.0] * 8, seed=25)
    more, _, _ = shifted_images([0.0] * 20 + [0.1] * 10, seed=26)  # unlabelled in-domain images
    data = (torch.cat([zc, z]), torch.cat([yc, y]))
    a = create("sts").fit(*data, anchor=(zc, yc))
    b = create("sts").fit(*data, anchor=(zc, yc), anchor_range=more)
    c = create("sts").fit(*data, anchor=(zc, yc), anchor_range=[more[i:i + 1] for i in range(30)])
    assert b.fit_info["anchor_temperature"] == pytest.approx(a.fit_info["anchor_temperature"], rel=1e-6)
    assert torch.all(b.anchor_values >= a.anchor_values) and torch.any(b.anchor_values > a.anchor_values)
    torch.testing.assert_close(b.anchor_values, c.anchor_values)
    t0 = b.fit_info["anchor_temperature"]
    torch.testing.assert_close(b.temperatures(more), torch.full((30,), t0), rtol=1e-6, atol=0)  # all inside
    with pytest.raises(ValueError, match="anchor_range"):
        create("sts").fit(*data, anchor_range=more)


def test_anchor_margin_widens_the_clean_range():
    z, y, _ = shifted_images(np.linspace(0.05, 1, 30), seed=21)
    zc, yc, _ = shifted_images([0.0] * 10, seed=22)
    new, _, _ = shifted_images([0.0] * 30 + [0.2] * 10, seed=23)
    fits = {m: create("sts", anchor_margin=m).fit(torch.cat([zc, z]), torch.cat([yc, y]), anchor=(zc, yc))
            for m in (0.0, 3.0)}
    at_t0 = {m: float(np.mean(np.isclose(c.temperatures(new).numpy(), c.fit_info["anchor_temperature"], rtol=1e-6)))
             for m, c in fits.items()}
    assert at_t0[3.0] > at_t0[0.0]  # more of the new clean / mildly shifted images get exactly T_0
    assert torch.all(fits[3.0].anchor_values > fits[0.0].anchor_values)
    assert fits[3.0].get_config()["anchor_margin"] == 3.0


# ----------------------------------------------------------------------------- TargetCorrected
@pytest.mark.parametrize("base", ["ts", "sts", "dc"])
def test_target_corrected_keeps_the_contract_of_its_base(base):
    """``base(z) / c``: declared properties are the base's (exactly: dc is neither AP nor OP)."""
    from segcal.calibrators import TargetCorrected

    template = TargetCorrected(base=base, max_iter=30)
    results = check_calibrator(template, exact=True, on_fail=None)
    assert all(r.passed for r in results), [r.message for r in results if not r.passed]
    assert template.argmax_preserving == (base != "dc") and template.spatial == (base == "sts")


def test_target_corrected_wraps_a_fitted_calibrator(fitted):
    from segcal.calibrators import TargetCorrected

    sts, ts = fitted
    z, y, _ = shifted_images([0.1, 0.8], seed=9)
    for cal in (sts, ts):
        wrapped = TargetCorrected.wrap(cal, correction=1.7)
        with torch.no_grad():
            torch.testing.assert_close(wrapped(z), cal(z) / 1.7, rtol=1e-5, atol=1e-5)
        assert TargetCorrected.wrap(wrapped, 2.0).correction == pytest.approx(3.4)
        # fitting the correction on labelled data is TS on the base's outputs
        refit = TargetCorrected.wrap(cal).fit(z, y)
        with torch.no_grad():
            t_on_top = create("ts").fit(cal(z), y).temperature
        assert refit.correction == pytest.approx(t_on_top, rel=1e-3)
        torch.testing.assert_close(refit.base(z), cal(z))  # the base stayed frozen
    with pytest.raises(ValueError, match="own base"):
        TargetCorrected(base="corrected")


def test_gathered_valid_pixels_give_the_full_map_loss():
    """The fit loop's cached valid pixels (stacked images with a loss mask, or one image under
    loss_pixels) give the loss of the full-map path, value and gradient."""
    g = torch.Generator().manual_seed(3)
    x = 3.0 * torch.randn(5, 4, 9, 11, generator=g) * torch.linspace(0.5, 2.0, 5)[:, None, None, None]
    y = torch.randint(0, 4, (5, 9, 11), generator=g)
    valid = torch.rand(5, 9, 11, generator=g) < 0.4
    cal = create("sts", max_iter=20).fit(x, y, mask=valid)
    cal.raw_weights.data += 0.3  # weights away from the optimum: non-zero gradients
    obj = get_objective("nll")
    batch = Batch(x, y, valid)
    pre = cal._precompute_batch(batch)
    assert len(pre) == 5 and pre[1].shape == (int(valid.sum()), 4)
    results = []
    for b in (batch, Batch(x, y, valid, None, pre)):
        cal.raw_weights.grad = None
        s = cal._stats_fn(b, obj)
        s.sum().backward()
        results.append((s.detach().clone(), cal.raw_weights.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- spatial statistics
def _two_regions(h=40, w=60, band=None, noise=0.0, seed=0):
    """Class 0 left, class 1 right (confident, max-prob ~0.98); ``band``: columns around the
    boundary made uncertain (max-prob ~0.4); ``noise``: logit noise on every pixel."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(1, 3, h, w)
    z[0, 0, :, : w // 2] = 5.0
    z[0, 1, :, w // 2:] = 5.0
    if band is not None:
        z[0, :2, :, w // 2 - band: w // 2 + band] = 0.5 + z[0, :2, :, w // 2 - band: w // 2 + band] * 0.05
    return z + noise * torch.randn(z.shape, generator=g)


def _reference_interior(z):
    """numpy: pixels farther (Chebyshev) than r from any pixel next to a change of the argmax."""
    a = z.argmax(1).numpy()[0]
    edge = np.zeros_like(a, dtype=bool)
    dv, dh = a[1:] != a[:-1], a[:, 1:] != a[:, :-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    r = max(1, round(0.02 * min(a.shape)))
    ii, jj = np.nonzero(edge)
    out = np.ones_like(edge)
    for i, j in zip(ii, jj, strict=True):
        out[max(0, i - r): i + r + 1, max(0, j - r): j + r + 1] = False
    return out


def test_spatial_statistics_against_a_numpy_reference():
    names = list(SPATIAL_FEATURES)
    g = torch.Generator().manual_seed(4)
    for z, step in ((_two_regions(band=3), 1), (_two_regions(noise=1.5, seed=1), 1),
                    (2 * torch.randn(1, 3, 30, 50, generator=g), 1),
                    (_two_regions(h=200, w=230, band=9, noise=0.5), 3)):  # shortest side 200: every 3rd pixel
        zs = z[:, :, ::step, ::step]
        inner = _reference_interior(zs)
        maxp = torch.softmax(zs.double(), 1).amax(1).numpy()[0]
        prior = 0.01 * maxp.size
        want = []
        for tau in (0.5, 0.9):
            low = 1 / (1 + np.exp(-(tau - maxp) / 0.05))
            want.append(((low * inner).sum() + prior * low.mean()) / (inner.sum() + prior))
        want.append(1 - inner.mean())
        np.testing.assert_allclose(image_statistics(z, names).double().numpy()[0], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(image_statistics(z + 3 * torch.randn(1, 1, *z.shape[2:]), names).numpy(),
                                   image_statistics(z, names).numpy(), atol=2e-5)  # translation invariant


def test_spatial_statistics_tell_boundary_uncertainty_from_uncertainty_everywhere():
    blur_like = _two_regions(band=1)  # uncertain along the boundary only (within the band)
    names = ["low_conf_50", "low_conf_90", *SPATIAL_FEATURES]
    g50, g90, i50, i90, frac = image_statistics(blur_like, names)[0].tolist()
    assert g50 > 0.02 and i50 < 0.1 * g50 and i90 < g90 - 0.02 and 0.05 < frac < 0.3
    noisy = _two_regions(noise=2.0, seed=2)  # uncertain everywhere, fragmented prediction
    h50, h90, j50, j90, frac2 = image_statistics(noisy, names)[0].tolist()
    assert j50 > 0.5 * h50 and j90 > 0.5 * h90 and frac2 > 0.5 and j50 > 10 * i50
    # no boundary: everything interior, the interior fractions are the whole-image ones
    flat = torch.zeros(2, 3, 9, 11)
    flat[:, 2] = torch.linspace(0.1, 4, 2)[:, None, None]
    st = image_statistics(flat, ["low_conf_50", "low_conf_90", *SPATIAL_FEATURES])
    torch.testing.assert_close(st[:, 2:4], st[:, :2])
    assert st[:, 4].abs().max() == 0
    # a pixel table: rows are isolated pixels (interior), a volume: the band along every axis
    rows = torch.randn(7, 3)
    st = image_statistics(rows, ["low_conf_50", "low_conf_90", *SPATIAL_FEATURES])
    torch.testing.assert_close(st[:, 2:4], st[:, :2])
    assert st[:, 4].abs().max() == 0
    vol = torch.zeros(1, 2, 8, 9, 10)
    vol[0, 0, :, :, :5] = 4.0
    vol[0, 1, :, :, 5:] = 4.0
    assert image_statistics(vol, ["boundary_fraction"])[0, 0] == pytest.approx(4 / 10)


def test_spatial_statistics_follow_the_map_scale():
    """Computed on the map subsampled to a shortest side <= 96: a 90 x 120 map and its 4x upsampled
    copy (nearest; 360 x 480, as CamVid's full maps vs the bench's stride-4 fit maps) give the same values."""
    z = _two_regions(h=90, w=120, band=5, noise=0.8, seed=3)
    up = z.repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.testing.assert_close(image_statistics(up, SPATIAL_FEATURES), image_statistics(z, SPATIAL_FEATURES))
    assert float(image_statistics(z, SPATIAL_FEATURES)[0, 2]) > 0.05


def test_spatial_features_keep_the_contract_and_export(tmp_path):
    feats = [*DEFAULT_FEATURES, *SPATIAL_FEATURES]
    results = check_calibrator(create("sts", features=feats), exact=True, on_fail=None)
    assert all(r.passed for r in results), [r.message for r in results if not r.passed]
    z, y, _ = shifted_images(np.linspace(0, 1, 16), seed=21)
    cal = create("sts", features=feats).fit(z, y)
    cal.save(tmp_path / "s.pt")
    back = segcal.load(tmp_path / "s.pt")
    assert back.get_config()["features"] == feats
    with torch.no_grad():
        torch.testing.assert_close(back(z), cal(z))
        script = cal.to_torchscript()
        torch.testing.assert_close(script(z), cal(z))
