"""LTS / IBTS / lts_ti (methods.md §3.11): exact architecture, 2D and 3D, whole-image training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import segcal
import segcal.calibrators as sc

torch.set_num_threads(1)


def images(n=4, c=3, shape=(10, 12), scale=3.0, seed=0):
    """Over-confident logits ``scale·z`` with labels drawn from ``S(z)`` (spatially smooth z)."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, c, *shape, generator=g)
    z = F.avg_pool2d(z, 3, 1, 1) * 3 if len(shape) == 2 else F.avg_pool3d(z, 3, 1, 1) * 3
    u = torch.rand(z.shape, generator=g).clamp_min(1e-20)
    y = (z - torch.log(-torch.log(u))).argmax(1)
    return scale * z, y


def test_initial_temperature_is_exactly_two_and_parameter_count():
    for c in (3, 7):
        cal = sc.LocalTemperatureScaling(num_classes=c, use_image=True)
        assert sum(p.numel() for p in cal.parameters()) == 200 * c + 84  # 8·(25C+1) + 76
        cal.is_fitted = True
        x = torch.randn(2, c, 9, 11)
        t = cal.temperature_map(x, image=torch.randn(2, 3, 9, 11))
        assert t.shape == (2, 1, 9, 11) and bool((t == 2.0).all())
        torch.testing.assert_close(cal(x, image=torch.randn(2, 3, 9, 11)), x / 2)
    no_img = sc.LocalTemperatureScaling(num_classes=5)
    assert sum(p.numel() for p in no_img.parameters()) == 7 * (25 * 5 + 1)
    vol = sc.LocalTemperatureScaling(num_classes=5, spatial_dims=3)
    assert sum(p.numel() for p in vol.parameters()) == 7 * (125 * 5 + 1)
    conv = vol.tree.temps[0]
    assert isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == (5, 5, 5) and conv.dilation == (2, 2, 2)


@pytest.mark.parametrize("shape", [(10, 12), (6, 7, 8)])
def test_lts_fits_whole_images_2d_and_3d(shape):
    x, y = images(shape=shape)
    xv, yv = images(shape=shape, seed=1)
    y[(0,) * y.ndim] = 255
    cal = sc.create("lts", lr=1e-3, max_steps=80, batch_size=1).fit(x, y, ignore_index=255, val=(xv, yv))
    assert cal.spatial_dims == len(shape)
    assert cal.fit_info["mode"] == "in-memory" and cal.fit_info["n_pixels"] == y.numel() - 1
    before = F.cross_entropy(xv, yv).item()
    with torch.no_grad():
        after = F.cross_entropy(cal(xv), yv).item()
        t = cal.temperature_map(xv)
    assert after < before and t.shape == (4, 1, *shape) and float(t.std()) > 0  # a local map
    with pytest.raises(ValueError, match="spatial_dims"):
        cal(torch.randn(1, 3, *((9,) * (5 - len(shape)))))


def test_ibts_one_temperature_per_image_and_save_load(tmp_path):
    x, y = images()
    cal = sc.create("ibts", lr=1e-3, max_steps=40).fit(x, y)
    with torch.no_grad():
        t = cal.temperature_map(x)
        out = cal(x)
    assert t.shape == (4, 1, 1, 1)
    torch.testing.assert_close(out, x / t)
    cal.save(tmp_path / "ibts.pt")
    back = segcal.load(tmp_path / "ibts.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(x), out)


def test_raw_lts_is_not_translation_invariant_but_lts_ti_is():
    x, y = images()
    shift = 10 * torch.rand(4, 1, 10, 12)  # a different constant per pixel
    diffs = {}
    for name in ("lts", "lts_ti"):
        cal = sc.create(name, lr=1e-3, max_steps=40).fit(x, y)
        with torch.no_grad():
            a = F.log_softmax(cal(x), 1)
            b = F.log_softmax(cal(x + shift), 1)
        diffs[name] = float((a - b).abs().max())
    assert diffs["lts"] > 0.05, diffs
    assert diffs["lts_ti"] < 1e-3, diffs
    assert sc.resolve("lts(logs)") is sc.LocalTemperatureScalingTI


def test_image_branch_needs_an_image():
    cal = sc.LocalTemperatureScaling(num_classes=3, use_image=True)
    cal.is_fitted = True
    with pytest.raises(ValueError, match="image"):
        cal(torch.randn(1, 3, 9, 9))
    with pytest.raises(ValueError, match="image: expected shape"):
        cal(torch.randn(1, 3, 9, 9), image=torch.randn(1, 1, 9, 9))
