"""Label-free calibration: features, value net, selection, pseudo-labels (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segcal.estimation import (
    ConfidenceBaseline,
    ECEEstimator,
    FeatureExtractor,
    class_thresholds,
    ece_targets,
    estimate_images,
    logit_features,
    maxprob_pseudo_labels,
    maxprob_threshold_for_coverage,
    proportion_schedule,
    pseudo_label,
    rank_by_estimated_ece,
    ranking_agreement,
    warmup_bn,
)
from segcal.estimation.pseudolabels import pseudo_label_precision
from segcal.losses import ClassLevelECE
from segcal.metrics import CalibrationMetrics


class TinySeg(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, c, 1)

    def forward(self, x):
        return self.head(self.body(x))


# ---------------------------------------------------------------- features
def test_feature_extractor_hooks_any_module_and_pools():
    m = TinySeg().eval()
    x = torch.randn(2, 3, 16, 20)
    with FeatureExtractor(m, "body.2", grid=(4, 5)) as fx:
        out, feats = fx(x)
        assert out.shape == (2, 4, 16, 20) and feats.shape == (2, 8, 4, 5)
        full = m.body(x)
        torch.testing.assert_close(feats, nn.functional.adaptive_avg_pool2d(full, (4, 5)))
    assert not m.body[2]._forward_hooks  # removed on exit
    with pytest.raises(ValueError, match="not a sub-module"):
        FeatureExtractor(m, "encoder.b3")


def test_logit_features_channels():
    x = torch.randn(2, 5, 12, 12)
    f = logit_features(x, grid=(3, 3))
    assert f.shape == (2, 8, 3, 3)
    p = x.softmax(1)
    torch.testing.assert_close(f[:, 5], nn.functional.adaptive_avg_pool2d(p.max(1).values[:, None], 3)[:, 0])
    assert (f[:, 6] >= 0).all() and (f[:, 6] <= 1 + 1e-6).all()  # normalised entropy


# ---------------------------------------------------------------- targets
def test_targets_exclude_ignore_pixels_and_are_detached():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (2, 8, 8), generator=g)
    y_ign = y.clone()
    y_ign[:, :2] = 255
    t_img = ece_targets(logits, y_ign, kind="image", ignore_index=255)
    assert not t_img.requires_grad and t_img.grad_fn is None
    # equals the hard image ECE of the valid pixels (LSE within t·log C)
    m = CalibrationMetrics(3, n_bins=10, ignore_index=255)
    m.update(logits.detach(), y_ign)
    hard = m.compute()["image_ece_values"]
    np.testing.assert_allclose(t_img.numpy(), hard, atol=1e-4 * np.log(3) + 1e-6)
    # class-level: the ignore pixels are excluded, not counted as errors
    t_cl = ece_targets(logits, y_ign, kind="class_level", ignore_index=255)
    ref = ClassLevelECE(10, input_type="logits", reduction="none")(logits.detach()[:, :, 2:], y[:, 2:])
    torch.testing.assert_close(t_cl, ref)
    # MSE against the detached target sends no gradient into the logits through the target
    est = torch.full((2,), 0.3, requires_grad=True)
    loss = ((est - ece_targets(logits, y, kind="class_level")) ** 2).mean()
    loss.backward()
    assert logits.grad is None and est.grad is not None


def test_class_level_target_ignore_class_inside_the_class_range():
    logits = torch.randn(1, 4, 6, 6)
    y = torch.randint(0, 3, (1, 6, 6))
    y[0, 0] = 3  # class 3 = void, ignored
    t = ece_targets(logits, y, kind="class_level", ignore_index=3)
    raw = ClassLevelECE(10, input_type="logits", ignore_index=3, reduction="none")(logits, y)
    torch.testing.assert_close(t, raw * 4 / 3)  # averaged over the 3 real classes
    with pytest.raises(ValueError, match="kind"):
        ece_targets(logits, y, kind="pooled")


# ---------------------------------------------------------------- value net
def _toy_data(n=40, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) * 2 - 1
    x = torch.randn(n, c, 6, 6, generator=g) * 0.3
    x[:, 0] += u[:, None, None]
    y = torch.sigmoid(2 * u - 1)
    return x, y


def test_value_net_shapes_range_reproducible_and_save_load(tmp_path):
    x, y = _toy_data()
    a = ECEEstimator(6).fit(x, y, epochs=30, seed=3, val_fraction=0)
    b = ECEEstimator(6).fit(x, y, epochs=30, seed=3, val_fraction=0)
    pa = a.predict(x)
    assert pa.shape == (40,) and ((pa > 0) & (pa < 1)).all()
    np.testing.assert_array_equal(pa, b.predict(x))
    assert a.conv.weight.shape == (128, 6, 1, 1) and a.conv.bias is None and a.fc.in_features == 128 * 16
    a.save(tmp_path / "e.pt")
    c = ECEEstimator.load(tmp_path / "e.pt")
    np.testing.assert_allclose(c.predict(x), pa)
    assert c.fit_info["seed"] == 3
    # the fit learns the signal: far better than predicting the mean
    assert np.mean((pa - y.numpy()) ** 2) < 0.2 * np.var(y.numpy())
    # early stopping on a held-out part restores the best epoch's weights
    d = ECEEstimator(6).fit(x, y, epochs=6, seed=1, patience=2)
    assert d.fit_info["n_val"] == 8 and d.fit_info["best_epoch"] < d.fit_info["epochs_run"]
    with pytest.raises(ValueError, match="channels"):
        a.predict(torch.randn(2, 5, 6, 6))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a segcal ECE estimator"):
        ECEEstimator.load(tmp_path / "bad.pt")


def test_value_net_bilinear_resize_and_bad_args():
    e = ECEEstimator(6, resize="bilinear")
    assert e(torch.randn(3, 6, 9, 9)).shape == (3,)
    with pytest.raises(ValueError, match="num_classes"):
        ECEEstimator(7, input_kind="logits")
    with pytest.raises(ValueError, match="targets"):
        ECEEstimator(6).fit(torch.randn(4, 6, 3, 3), torch.tensor([0.1, 2.0, 0.1, 0.1]))


def test_bn_warmup_changes_running_stats_only():
    x, y = _toy_data()
    e = ECEEstimator(6).fit(x, y, epochs=5)
    conv, fc = e.conv.weight.clone(), e.fc.weight.clone()
    gamma = e.bn.weight.clone()
    before = e.bn.running_mean.clone()
    shifted = [x[i : i + 8] * 2 + 5 for i in range(0, 40, 8)]
    n = e.warmup_bn(shifted)
    assert n == 5 and not e.training and not e.bn.training
    torch.testing.assert_close(e.bn.running_mean, torch.cat(shifted).mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, e.bn.running_mean)
    assert torch.equal(conv, e.conv.weight) and torch.equal(fc, e.fc.weight) and torch.equal(gamma, e.bn.weight)
    assert e.bn.momentum == 0.1
    # generic: any module (the segmenter's own BN)
    m = TinySeg().eval()
    w = m.body[0].weight.clone()
    warmup_bn(m, [torch.randn(2, 3, 8, 8) + 3])
    assert m.body[1].running_mean.mean() != 0 and torch.equal(w, m.body[0].weight) and not m.training
    with pytest.raises(ValueError, match="no BatchNorm"):
        warmup_bn(nn.Linear(2, 2), [torch.randn(1, 2)])


def test_logits_estimator_and_common_interface():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(10, 4, 8, 8, generator=g) * 3
    e = ECEEstimator(7, input_kind="logits", num_classes=4, grid=(2, 2))
    inp = e.inputs_from_scores(scores)
    assert inp.shape == (10, 7, 2, 2)
    e.fit(inp, torch.rand(10, generator=g), epochs=3)
    assert estimate_images(e, scores).shape == (10,)
    with pytest.raises(ValueError, match="3 classes"):
        estimate_images(e, scores[:, :3])
    fe = ECEEstimator(8)
    with pytest.raises(ValueError, match="features"):
        estimate_images(fe, scores)
    mp = estimate_images(ConfidenceBaseline("maxprob"), scores)
    np.testing.assert_allclose(mp, 1 - scores.softmax(1).max(1).values.mean((1, 2)).numpy(), rtol=1e-5)
    ent = estimate_images(ConfidenceBaseline("entropy"), scores)
    assert ((ent > 0) & (ent < 1)).all()
    with pytest.raises(ValueError, match="baseline"):
        ConfidenceBaseline("margin")


# ---------------------------------------------------------------- selection
def test_selection_recovers_known_order():
    # underconfident logits: the ECE grows with the temperature, and so does 1 - mean max-prob
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (4, 16, 16), generator=g)
    logits = torch.randn(4, 3, 16, 16, generator=g) + 1.5 * nn.functional.one_hot(y, 3).permute(0, 3, 1, 2)
    logits = logits * 0.7
    temps = [1.0, 1.5, 2.5, 4.0]
    cands = {f"T={t}": (lambda b, t=t: b / t) for t in temps}
    true = {}
    for t in temps:
        m = CalibrationMetrics(3, n_bins=10)
        m.update(logits / t, y)
        true[f"T={t}"] = m.compute()["image_ece"]
    assert sorted(true, key=true.get) == ["T=1.0", "T=1.5", "T=2.5", "T=4.0"]
    ranked = rank_by_estimated_ece(cands, [logits[:2], logits[2:]], ConfidenceBaseline("maxprob"))
    assert [r.rank for r in ranked] == [1, 2, 3, 4] and ranked[0].per_image.shape == (4,)
    agree = ranking_agreement(ranked, true)
    assert agree["spearman"] == pytest.approx(1.0) and agree["kendall"] == pytest.approx(1.0) and agree["top1_agree"]
    rev = ranking_agreement([1, 2, 3], [3, 2, 1])
    assert rev["spearman"] == pytest.approx(-1.0) and rev["kendall"] == pytest.approx(-1.0)
    # precomputed form
    pre = rank_by_estimated_ece({"a": [logits], "b": [logits / 4]}, None, ConfidenceBaseline("maxprob"))
    assert pre[0].name == "a"
    with pytest.raises(ValueError, match="keys differ"):
        ranking_agreement({"a": 1, "b": 2}, {"a": 1, "c": 2})


# ---------------------------------------------------------------- pseudo-labels
def test_proportion_schedule():
    assert proportion_schedule(0) == (0.15, 0.1)
    p, lp = proportion_schedule(2)
    assert p == pytest.approx(0.25) and lp == pytest.approx(0.2)
    with pytest.raises(ValueError):
        proportion_schedule(-1)


def _probs_image(maxp, pred, c=3):
    """(C, 1, W) probabilities with the given max-prob and class per pixel."""
    maxp, pred = np.asarray(maxp, float), np.asarray(pred)
    p = np.tile(((1 - maxp) / (c - 1))[None], (c, 1))
    p[pred, np.arange(maxp.size)] = maxp
    return p[:, None, :]


def test_class_thresholds_hand_checked():
    # class 0 predicted on 10 pixels (conf 0.50..0.95), class 1 on 4, class 2 never
    img = _probs_image(np.r_[np.linspace(0.5, 0.95, 10), [0.6, 0.7, 0.8, 0.9]], [0] * 10 + [1] * 4)
    thr, counts = class_thresholds([img], prop=0.2, input_type="probs", subsample=1)
    # class 0: sorted 10 values, index int(10*0.2)=2 from the top -> 0.90; class 1: int(0.8)=0 -> max
    np.testing.assert_allclose(thr, [0.90, 0.90, 0.5])
    np.testing.assert_array_equal(counts, [10, 4, 0])
    # ECE weighting scales the confidences of the image by (1 - e)
    thr_w, _ = class_thresholds([img], prop=0.2, input_type="probs", subsample=1, ece=[0.5])
    np.testing.assert_allclose(thr_w[:2], [0.45, 0.45])
    # every 5th value per image (the reference's memory saving)
    _, c5 = class_thresholds([img], prop=0.2, input_type="probs", subsample=5)
    np.testing.assert_array_equal(c5, [2, 1, 0])
    with pytest.raises(ValueError, match="ece"):
        class_thresholds([img, img], prop=0.2, input_type="probs", ece=[0.1])


def test_pseudo_label_union_and_ignore_value():
    # 3 classes, 10 pixels
    maxp = [0.95, 0.9, 0.5, 0.6, 0.4, 0.8, 0.45, 0.99, 0.55, 0.7]
    pred = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    img = _probs_image(maxp, pred)
    thr = [0.92, 0.75, 0.5]  # class-balanced keeps pixels 0 (0.95>0.92), 5 (0.8>0.75), 7, 8 (>0.5)
    lab, masks = pseudo_label(img, thr, local_prop=0.2, input_type="probs", ignore_value=254)
    np.testing.assert_array_equal(masks["class_balanced"][0], [1, 0, 0, 0, 0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(masks["local"][0], [1, 0, 0, 0, 0, 0, 0, 1, 0, 0])  # top 2 by max-prob
    lab2, _ = pseudo_label(img, thr, local_prop=0.3, input_type="probs")
    np.testing.assert_array_equal(lab2[0], [0, 0, 255, 255, 255, 1, 255, 2, 2, 255])  # + pixel 1 (0.9)
    np.testing.assert_array_equal(lab[0], [0, 254, 254, 254, 254, 1, 254, 2, 2, 254])
    assert lab.dtype == np.uint8
    # strict inequality (torch.gt in the reference)
    lab3, _ = pseudo_label(img, [0.95, 1, 1], local_prop=0.0, input_type="probs")
    assert (lab3 == 255).all()
    with pytest.raises(ValueError, match="ignore_value"):
        pseudo_label(img, thr, local_prop=0.1, ignore_value=2, input_type="probs")
    # baseline at matched coverage
    t = maxprob_threshold_for_coverage([img], 0.4, input_type="probs")
    base = maxprob_pseudo_labels(img, t, input_type="probs")
    assert (base != 255).sum() == 4
    correct, sel, valid = pseudo_label_precision(lab2, np.array([pred]), label_ignore=None)
    assert (correct, sel, valid) == (5, 5, 10)


@pytest.mark.realdata
@pytest.mark.slow
def test_espnet_b3_features_on_one_camvid_image():
    from segcal.data import data_root

    root = data_root(required=False)
    if root is None:
        pytest.skip("../shared/data not available")
    from segcal.datasets import camvid_split
    from segcal.models import create_model

    lm = create_model("espnet-camvid", device="cpu")
    item = camvid_split(root, "val", check_sizes=False)[0]
    x = lm.preprocess(item.load_image())
    with FeatureExtractor(lm.module, "encoder.b3") as fx:
        logits, feats = fx(x)
    assert logits.shape == (1, 12, 360, 480) and feats.shape == (1, 256, 15, 20)
    e = ECEEstimator(256)
    assert e(feats).shape == (1,)
