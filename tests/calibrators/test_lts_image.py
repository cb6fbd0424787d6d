"""LTS / IBTS with the image branch (methods.md §3.11: the temperature net sees logits AND image),
through the one fitting loop; selective scaling on top of LTS (``base="lts"``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import segcal
import segcal.calibrators as sc
from segcal.calibrators.data import Batch, FitData
from segcal.calibrators.fitting import group_step
from segcal.calibrators.objectives import get_objective
from segcal.cli import main
from segcal.io.images import load_image_tensor

torch.set_num_threads(1)


def image_problem(n=6, c=3, shape=(12, 14), seed=0, noisy=0.5):
    """Over-confident logits whose labels are pure noise where the image is bright.

    ``z`` is spatially smooth; labels follow ``S(z)`` where image channel 0 is -1 and are uniform
    where it is +1 (a random rectangle per image, a ``noisy`` fraction of the width). The logits
    are scaled by 3 everywhere, so only the image tells where the temperature must be large.
    """
    g = torch.Generator().manual_seed(seed)
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    z = 3 * pool(1.5 * torch.randn(n, c, *shape, generator=g), 3, 1, 1)
    u = torch.rand(z.shape, generator=g).clamp_min(1e-20)
    y = (z - torch.log(-torch.log(u))).argmax(1)
    bright = torch.zeros(n, *shape, dtype=torch.bool)
    w = shape[-1]
    for i in range(n):
        s = int(torch.randint(0, w - int(noisy * w) + 1, (1,), generator=g))
        bright[i, ..., s : s + int(noisy * w)] = True
    y = torch.where(bright, torch.randint(0, c, y.shape, generator=g), y)
    img = torch.where(bright, 1.0, -1.0)[:, None].float()
    img = torch.cat([img, 0.1 * torch.randn(n, 2, *shape, generator=g)], 1) if len(shape) == 2 else img
    return 3 * z, y, img


@pytest.fixture(scope="module")
def fitted_pair():
    x, y, im = image_problem()
    xv, yv, imv = image_problem(seed=1)
    kw = dict(lr=3e-3, max_steps=120, batch_size=2, seed=0)
    with_img = sc.create("lts", use_image=True, **kw).fit(x, y, images=im, val=(xv, yv), val_images=imv)
    without = sc.create("lts", **kw).fit(x, y, val=(xv, yv))
    return with_img, without


def test_image_branch_changes_the_output_gets_gradients_and_helps(fitted_pair):
    cal = sc.LocalTemperatureScaling(num_classes=3, use_image=True)
    cal.is_fitted = True
    x, y, im = image_problem(n=2)
    loss = F.cross_entropy(cal(x, image=im), y)
    loss.backward()
    g = cal.tree.image_temp.weight.grad
    assert g is not None and float(g.abs().sum()) > 0  # the image conv gets gradients at init
    # (the image gate's gradient is 0 at init: t_z = t_img = 1, the gate mixes equal values)

    with_img, without = fitted_pair
    assert float(with_img.tree.image_temp.weight.detach().abs().sum()) > 0  # moved from its zero init
    xt, yt, imt = image_problem(seed=2)
    with torch.no_grad():
        a = with_img(xt, image=imt)
        b = with_img(xt, image=-imt)  # another image, same logits: another output
        nll_img = F.cross_entropy(a, yt).item()
        nll_no = F.cross_entropy(without(xt), yt).item()
        t = with_img.temperature_map(xt, image=imt)
    assert float((a - b).abs().max()) > 1e-3
    bright = imt[:, 0] > 0
    # the image says where labels are noise: hotter there, and a lower test NLL than without it
    assert float(t[:, 0][bright].mean()) > float(t[:, 0][~bright].mean())
    assert nll_img < nll_no, (nll_img, nll_no)
    assert torch.equal(a.argmax(1), xt.argmax(1))  # still argmax preserving (T > 0)


def test_image_branch_save_load_and_torchscript_round_trip(fitted_pair, tmp_path):
    cal = fitted_pair[0]
    x, _, im = image_problem(n=2, seed=3)
    cal.save(tmp_path / "lts_img.pt")
    back = segcal.load(tmp_path / "lts_img.pt")
    assert back.use_image and back.uses_image and back.get_config()["use_image"] is True
    with torch.no_grad():
        torch.testing.assert_close(back(x, image=im), cal(x, image=im))
        torch.testing.assert_close(back.predict_proba(x, image=im), cal.predict_proba(x, image=im))
    ts = cal.to_torchscript(tmp_path / "lts_img.ts")
    loaded = torch.jit.load(str(tmp_path / "lts_img.ts"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, im), cal(x, image=im), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ts(x, im), cal(x, image=im), atol=1e-5, rtol=1e-5)


def test_ibts_and_lts_ti_with_image_and_streamed_batches():
    x, y, im = image_problem(n=4)
    batches = [{"scores": x[i : i + 1], "labels": y[i : i + 1], "image": im[i : i + 1]} for i in range(4)]
    ibts = sc.create("ibts", use_image=True, lr=3e-3, max_steps=20).fit(batches)
    with torch.no_grad():
        t = ibts.temperature_map(x, image=im)
        torch.testing.assert_close(ibts(x, image=im), x / t)
    assert t.shape == (4, 1, 1, 1)
    ti = sc.create("lts_ti", use_image=True, lr=3e-3, max_steps=20).fit(x, y, images=im)
    shift = 5 * torch.rand(4, 1, *x.shape[2:])
    with torch.no_grad():  # TI also with the image branch: the image gate sees log S(z)
        d = (F.log_softmax(ti(x, image=im), 1) - F.log_softmax(ti(x + shift, image=im), 1)).abs().max()
    assert float(d) < 1e-3


def test_3d_lts_with_a_volume_image():
    x, y, vol = image_problem(n=3, shape=(6, 7, 8))
    assert vol.shape == (3, 1, 6, 7, 8)
    cal = sc.create("lts", use_image=True, image_channels=1, lr=1e-3, max_steps=30, batch_size=1)
    cal.fit(x, y, images=vol)
    assert cal.spatial_dims == 3 and isinstance(cal.tree.image_temp, torch.nn.Conv3d)
    assert float(cal.tree.image_temp.weight.abs().sum()) > 0
    with torch.no_grad():
        a, b = cal(x, image=vol), cal(x, image=torch.zeros_like(vol))
    assert a.shape == x.shape and float((a - b).abs().max()) > 0
    with pytest.raises(ValueError, match="images: expected shape"):
        sc.create("lts", use_image=True, lr=1e-3, max_steps=2).fit(x, y, images=vol)  # 3 channels expected


def test_clear_errors_for_missing_or_misshaped_images():
    x, y, im = image_problem(n=2)
    cal = sc.create("lts", use_image=True, max_steps=2)
    with pytest.raises(ValueError, match="images: this calibrator has an image branch"):
        cal.fit(x, y)
    with pytest.raises(ValueError, match=r"images: expected shape \(2, 3, 12, 14\)"):
        cal.fit(x, y, images=im[..., :-1])  # wrong spatial size
    with pytest.raises(ValueError, match="val images: this calibrator has an image branch"):
        cal.fit(x, y, images=im, val=(x, y))
    with pytest.raises(ValueError, match="val_images: given without val"):
        cal.fit(x, y, images=im, val_images=im)
    with pytest.raises(ValueError, match="images: this calibrator has an image branch"):
        cal.fit([(x, y)])  # streamed batches without an 'image'
    with pytest.raises(ValueError, match="images: pass each image inside its batch"):
        cal.fit([(x, y)], images=im)
    with pytest.raises(ValueError, match="no image branch"):
        sc.create("lts", max_steps=2).fit(x, y, images=im)
    with pytest.raises(ValueError, match="no image branch"):
        sc.create("ts").fit(x, y, images=im)
    cal.fit(x, y, images=im)
    with pytest.raises(ValueError, match="image: this lts calibrator has an image branch"):
        cal(x)
    with pytest.raises(ValueError, match="image: expected shape"):
        cal(x, image=im[:, :, :5])
    with pytest.raises(ValueError, match="image: expected shape"):
        cal.temperature_map(x, image=im[:1])
    plain = sc.create("lts", max_steps=2).fit(x, y)
    with pytest.raises(ValueError, match="image: given, but this lts calibrator has no image branch"):
        plain(x, image=im)


def test_spatial_adam_steps_take_batch_size_images():
    x, y, _ = image_problem(n=5)
    data = FitData(3, int(y.numel()), batches=[Batch(x[i : i + 1], y[i : i + 1], torch.ones_like(y[i : i + 1], dtype=torch.bool))
                                               for i in range(5)])
    assert [len(g) for g in data.iter_steps(2, torch.Generator().manual_seed(0))] == [2, 2, 1]
    assert [len(g) for g in data.iter_steps(2, images=1)] == [1] * 5
    # the step's loss is the mean over all pixels of the group, accumulated image by image
    cal = sc.LocalTemperatureScaling(num_classes=3)
    cal.is_fitted = True
    group = data.batches[:2]
    v = group_step(cal._stats_fn, group, get_objective("nll"), lambda: None)
    g1 = [p.grad.clone() for p in cal.parameters()]
    cal.zero_grad()
    ref = F.cross_entropy(cal(x[:2]), y[:2])
    ref.backward()
    assert v == pytest.approx(float(ref), rel=1e-5)
    for a, p in zip(g1, cal.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- selective + LTS
@pytest.mark.parametrize("base", ["lts", "lts_ti"])
def test_selective_on_top_of_lts_fits_declares_and_round_trips(base, tmp_path):
    x, y, _ = image_problem(n=6)
    xv, yv, _ = image_problem(n=4, seed=1)
    cal = sc.create("selective", base=base, base_config={"lr": 3e-3}, max_steps=30, batch_size=2,
                    selector_epochs=3, seed=0).fit(x, y, val=(xv, yv))
    assert cal.spatial and cal.base.is_fitted and cal.fit_info["base"]["name"] == base
    # the selector is trained on pixel rows of base-calibrated logits (one base pass per image)
    assert cal.fit_info["selector_training"]["data"] == "base-calibrated logits"
    assert cal.translation_invariant is (base == "lts_ti") and cal.argmax_preserving and cal.order_preserving
    # the base was fitted by the loop (30 Adam steps of 2 whole images; its best iterate on val
    # NLL is kept, which for raw LTS on 6 tiny images can be the initial T = 2)
    assert cal.base.fit_info["stages"][0]["steps"] == 30 and cal.base.fit_info["optimizer"] == "adam"
    xt, _, _ = image_problem(n=2, seed=2)
    with torch.no_grad():
        out = cal(xt)
        assert torch.equal(out.argmax(1), xt.argmax(1))
        if base == "lts_ti":  # TI as declared (selector on log-probabilities, base on log S(z))
            shift = 5 * torch.rand(2, 1, *xt.shape[2:])
            d = (F.log_softmax(cal(xt + shift), 1) - F.log_softmax(out, 1)).abs().max()
            assert float(d) < 1e-3
    cal.save(tmp_path / "sel.pt")
    back = segcal.load(tmp_path / "sel.pt")
    assert back.base.name == base and back.t_mispred == cal.t_mispred
    with torch.no_grad():
        torch.testing.assert_close(back(xt), out)


def test_selective_on_lts_with_image(tmp_path):
    x, y, im = image_problem(n=6)
    cal = sc.create("selective", base="lts", base_config={"use_image": True, "lr": 3e-3}, max_steps=20,
                    batch_size=2, selector_epochs=2)
    assert cal.uses_image
    with pytest.raises(ValueError, match="images: this calibrator has an image branch"):
        cal.fit(x, y)
    cal.fit(x, y, images=im)
    xt, _, imt = image_problem(n=2, seed=2)
    with torch.no_grad():
        out = cal(xt, image=imt)
    with pytest.raises(ValueError, match="image"):
        cal(xt)
    cal.save(tmp_path / "s.pt")
    with torch.no_grad():
        torch.testing.assert_close(segcal.load(tmp_path / "s.pt")(xt, image=imt), out)


# ----------------------------------------------------------------------------- CLI
def _image_folder(root, n=6, c=3, h=16, w=20):
    pred, lab, imgs = root / "pred", root / "labels", root / "images"
    for d in (pred, lab, imgs):
        d.mkdir()
    for i in range(n):
        z, y, im = image_problem(n=1, c=c, shape=(h, w), seed=20 + i)
        np.save(pred / f"im{i}.npy", z[0].numpy().astype(np.float16))
        yy = y[0].numpy().astype(np.uint8)
        yy[0, 0] = 255
        Image.fromarray(yy).save(lab / f"im{i}.png")
        rgb = np.where(im[0, 0].numpy()[..., None] > 0, 230, 20).astype(np.uint8).repeat(3, -1)
        Image.fromarray(rgb).save(imgs / f"im{i}.png")
    return pred, lab, imgs


def test_cli_fit_and_apply_with_images(tmp_path, capsys):
    pred, lab, imgs = _image_folder(tmp_path)
    out = tmp_path / "lts.pt"
    args = ["fit", "--pred", str(pred), "--labels", str(lab), "--method", "lts", "--images", str(imgs),
            "--out", str(out), "--ignore-index", "255", "--val-fraction", "0.34", "--no-progress"]
    assert main(args) == 0
    cal = segcal.load(out)
    assert cal.uses_image and cal.fit_info["images"]["folder"] == str(imgs)
    assert cal.fit_info["optimizer"] == "adam"  # the LTS default (§3.11), not L-BFGS
    capsys.readouterr()
    assert main(["apply", "--calibrator", str(out), "--pred", str(pred), "--out", str(tmp_path / "o1"),
                 "--no-progress"]) == 2
    assert "has an image branch" in capsys.readouterr().err
    assert main(["apply", "--calibrator", str(out), "--pred", str(pred), "--images", str(imgs),
                 "--out", str(tmp_path / "o2"), "--no-progress", "--dtype", "float32"]) == 0
    x = torch.from_numpy(np.load(pred / "im0.npy").astype(np.float32))[None]
    img = torch.from_numpy(load_image_tensor(imgs / "im0.png"))[None]
    with torch.no_grad():
        want = F.log_softmax(cal(x, image=img), 1)[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "o2" / "im0.npy"), want, atol=1e-5)
    # a missing image is named
    (imgs / "im3.png").unlink()
    capsys.readouterr()
    assert main(args) == 2
    assert "prediction(s) without an image: im3" in capsys.readouterr().err
    # selective on top of LTS with the image branch, from the CLI
    (imgs / "im3.png").write_bytes((imgs / "im2.png").read_bytes())
    out2 = tmp_path / "sel.pt"
    assert main(["fit", "--pred", str(pred), "--labels", str(lab), "--method", "selective", "--base", "lts",
                 "--images", str(imgs), "--out", str(out2), "--ignore-index", "255", "--no-progress"]) == 0
    sel = segcal.load(out2)
    assert sel.base.use_image and sel.uses_image
    assert main(["fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts", "--images", str(imgs),
                 "--out", str(tmp_path / "ts.pt"), "--no-progress"]) == 2
    assert "has no image branch" in capsys.readouterr().err
