"""Target-adaptive recalibration without target labels (issue 17; methods.md §9.2).

The target is a tempered version of the source: the same images' law with logits 1.5x larger
(over-confident), so the target's optimal temperature is 1.5x the source's, known here from the
labels the adaptation never sees. ``adapt_to_target`` must move T toward it (direction and a
tolerance), read no label file, and return an argmax-preserving calibrator that saves and loads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segcal
import segcal.io.predictions as predictions_io
from segcal.calibrators import TargetCorrected, create
from segcal.errors import InputError
from segcal.estimation import ConfidenceBaseline, ECEEstimator, ece_targets, logit_features
from segcal.estimation.target_adaptive import adapt_to_target, pseudo_target_set, read_unlabelled
from segcal.io.arrays import write_prediction

torch.set_num_threads(1)
C = 4
K = 1.5  # the target's logits are K times the source's: optimal T_target = K * T_source


def latent(n, seed, hw=(16, 16)):
    """Spatially smooth latent logits ``u`` and labels drawn from ``softmax(u)`` (calibrated)."""
    g = torch.Generator().manual_seed(seed)
    u = 4.5 * F.avg_pool2d(torch.randn(n, C, *hw, generator=g), 3, 1, 1)
    gumbel = -torch.log(-torch.log(torch.rand(n, C, *hw, generator=g).clamp_min(1e-20)))
    return u, (u + gumbel).argmax(1)


@pytest.fixture(scope="module")
def problem():
    u_s, y_s = latent(40, 0)
    u_t, y_t = latent(40, 1)
    zs, zt = 2.0 * u_s, 2.0 * K * u_t
    ts = create("ts").fit(zs, y_s)
    t_star = create("ts").fit(zt, y_t).temperature  # the target's optimum, from its labels
    return zs, zt, y_t, ts, t_star


def folder(tmp_path, name, z):
    d = tmp_path / name
    d.mkdir()
    for i in range(z.shape[0]):
        write_prediction(d / f"im{i:03d}.npy", z[i].numpy().astype(np.float16))
    return d


def test_pseudocal_from_unlabelled_folders_finds_the_target_temperature(problem, tmp_path, monkeypatch):
    zs, zt, _, ts, t_star = problem
    assert t_star > 1.3 * ts.temperature  # the target really is over-confident w.r.t. the source

    def no_labels(*a, **k):
        raise AssertionError("a label file was read")

    monkeypatch.setattr(predictions_io, "read_label", no_labels)
    tgt, src = folder(tmp_path, "target", zt), folder(tmp_path, "source", zs)
    out = adapt_to_target(ts, tgt, how="pseudocal", source=src)
    t_new = out.correction * ts.temperature
    assert abs(t_new - t_star) < 0.05 * t_star, (ts.temperature, t_new, t_star)
    info = out.fit_info["target_adaptation"]
    assert info["anchored"] and info["mode"].startswith("logit mixup") and info["n_images"] == 40
    assert info["correction"] == pytest.approx(info["c_target"] / info["c_source"], rel=1e-5)
    # the same folder passed as a PredictionFolder with labels: reopened without them
    from segcal.io import PredictionFolder

    lab = tmp_path / "labels"
    lab.mkdir()
    for i in range(zt.shape[0]):
        np.save(lab / f"im{i:03d}.npy", np.zeros((16, 16), np.uint8))
    again = adapt_to_target(ts, PredictionFolder(tgt, lab), source=src)
    assert again.correction == pytest.approx(out.correction, rel=1e-6)


def test_the_result_is_an_argmax_preserving_calibrator_that_saves(problem, tmp_path):
    zs, zt, y_t, ts, _ = problem
    out = adapt_to_target(ts, list(zt), source=zs)
    assert isinstance(out, TargetCorrected) and out.argmax_preserving and out.order_preserving
    with torch.no_grad():
        assert torch.equal(out(zt).argmax(1), zt.argmax(1))
        torch.testing.assert_close(out(zt), zt / (ts.temperature * out.correction), rtol=1e-5, atol=1e-5)
        # it is better calibrated on the target than the source calibrator (labels: only to check)
        assert F.cross_entropy(out(zt), y_t) < F.cross_entropy(ts(zt), y_t) - 0.005
    out.save(tmp_path / "c.pt")
    back = segcal.load(tmp_path / "c.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(zt), out(zt))
    assert back.fit_info["target_adaptation"]["how"] == "pseudocal"
    # re-adapting a corrected calibrator keeps its base and multiplies the corrections
    twice = adapt_to_target(out, list(zt), source=zs)
    assert type(twice.base) is type(ts) and twice.correction == pytest.approx(
        out.correction * twice.fit_info["target_adaptation"]["c_target"]
        / twice.fit_info["target_adaptation"]["c_source"], rel=1e-5)


class HomogeneousNet(nn.Module):
    """Bias-free conv-ReLU-conv: ``net(k x) = k net(x)`` for ``k > 0``, so scaled images give a
    tempered target exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, C, 1, bias=False)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_pseudocal_by_input_mixup_with_a_model():
    net = HomogeneousNet().eval()
    g = torch.Generator().manual_seed(3)
    imgs = [3 * torch.randn(3, 12, 12, generator=g).numpy() for _ in range(30)]

    def model(batch):
        with torch.no_grad():
            return net(torch.as_tensor(np.stack(batch)))

    z = model(imgs)
    gumbel = -torch.log(-torch.log(torch.rand(z.shape, generator=g).clamp_min(1e-20)))
    y = (z / 2 + gumbel).argmax(1)  # the model is over-confident by 2 on its source
    ts = create("ts").fit(z, y)
    targets = [K * im for im in imgs]  # -> logits K times larger: T* = K * T_source
    out = adapt_to_target(ts, how="pseudocal", model=model, images=targets, source_images=imgs)
    info = out.fit_info["target_adaptation"]
    assert info["mode"] == "input mixup" and info["anchored"]
    assert out.correction == pytest.approx(K, rel=0.05)
    # the paper's unanchored recipe rests on its cluster assumption, which random images do not
    # satisfy: mixed images are mostly "right" by their dominant image's labels and the fitted c
    # goes to the lower bound (measured: 0.2); it runs, is recorded as unanchored and bounded
    plain = adapt_to_target(ts, how="pseudocal", model=model, images=targets)
    assert not plain.fit_info["target_adaptation"]["anchored"] and 0.2 - 1e-6 <= plain.correction <= 5
    # the pseudo-labels are the model's predictions on the dominant image
    pseudo = pseudo_target_set(ts, model=model, images=imgs[:4], mix=0.65)
    assert len(pseudo) == 4 and all(p[1].shape == (1, 12, 12) for p in pseudo)
    doms = {tuple(model([im]).argmax(1).flatten().tolist()) for im in imgs[:4]}
    assert all(tuple(p[1].flatten().tolist()) in doms for p in pseudo)


def test_ece_estimate_search_with_a_label_free_lookup_estimator(problem):
    """A label-free estimator learnt on the (labelled) source: ECE as a function of the mean
    confidence over source images tempered at many T. On the tempered target it is exact, so the
    1-D search must land on the target's optimum."""
    zs, zt, y_t, ts, t_star = problem
    _, y_s = latent(40, 0)
    temps = np.geomspace(0.3, 12, 60)
    conf = [float(F.softmax(zs / t, 1).amax(1).mean()) for t in temps]
    ece = [float(ece_targets(zs / t, y_s).mean()) for t in temps]
    order = np.argsort(conf)

    def estimator(scores):
        c = F.softmax(torch.as_tensor(scores).float(), 1).amax(1).mean((1, 2)).numpy()
        return np.interp(c, np.asarray(conf)[order], np.asarray(ece)[order])

    out = adapt_to_target(ts, zt, how="ece-estimate", estimator=estimator)
    t_new = out.correction * ts.temperature
    true_best = temps[int(np.argmin([float(ece_targets(zt / t, y_t).mean()) for t in temps]))]
    assert abs(np.log(t_new / true_best)) < np.log(1.15), (t_new, true_best, t_star)
    info = out.fit_info["target_adaptation"]
    assert info["estimate_after"] < info["estimate_before"] and len(info["curve"]) == 13


def test_ece_estimate_with_a_value_net_moves_t_the_right_way(problem):
    zs, zt, _, ts, _ = problem
    _, y_s = latent(40, 0)
    temps = [0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6]
    x = torch.cat([logit_features(zs / t, grid=(8, 8)) for t in temps])
    y = torch.cat([ece_targets(zs / t, y_s) for t in temps])
    est = ECEEstimator(C + 3, input_kind="logits", num_classes=C, grid=(8, 8)).fit(x, y, epochs=120)
    out = adapt_to_target(ts, zt, how="ece-estimate", estimator=est)
    # direction only: this small value net is biased near the minimum (measured: T 2.07 -> 4.4,
    # optimum 3.0; the estimator, not the search, limits the accuracy)
    assert out.correction > 1.1
    assert out.fit_info["target_adaptation"]["estimate_after"] < out.fit_info["target_adaptation"]["estimate_before"]


def test_shift_conditioned_base_is_adapted_too(problem):
    zs, zt, _, _, _ = problem
    _, y_s = latent(40, 0)
    sts = create("sts").fit(zs, y_s)
    out = adapt_to_target(sts, list(zt), source=list(zs))
    assert out.spatial and out.base.name == "sts" and out.correction > 1.2
    with torch.no_grad():
        torch.testing.assert_close(out(zt[:2]), sts(zt[:2]) / out.correction, rtol=1e-5, atol=1e-5)


def test_refusals(problem):
    zs, zt, _, ts, _ = problem
    with pytest.raises(InputError, match="needs source="):
        adapt_to_target(ts, zt)
    with pytest.raises(InputError, match="baseline"):
        adapt_to_target(ts, zt, how="ece-estimate", estimator=ConfidenceBaseline("maxprob"))
    feats = ECEEstimator(8, input_kind="features")
    with pytest.raises(InputError, match="features"):
        adapt_to_target(ts, zt, how="ece-estimate", estimator=feats)
    with pytest.raises(InputError, match="estimator="):
        adapt_to_target(ts, zt, how="ece-estimate")
    with pytest.raises(InputError, match="mix"):
        adapt_to_target(ts, zt, source=zs, mix=0.4)
    with pytest.raises(InputError, match="how"):
        adapt_to_target(ts, zt, how="oracle")
    with pytest.raises(InputError, match="does not exist"):
        adapt_to_target(ts, "/nonexistent/folder", source=zs)
    with pytest.raises(InputError, match="same size"):
        pseudo_target_set(ts, [zt[:1]])
    with pytest.raises(segcal.calibrators.NotFittedError):
        adapt_to_target(create("ts"), zt, source=zs)
    scores, itype = read_unlabelled(zt, max_images=5, seed=1)
    assert len(scores) == 5 and itype is None and scores[0].shape == (1, C, 16, 16)


def test_min_correction_floors_the_factor_and_records_it(problem):
    zs, zt, _, ts, _ = problem
    soft = adapt_to_target(ts, list(zs / K), source=list(zs))  # an under-confident target: c < 1
    assert soft.correction < 0.9
    floored = adapt_to_target(ts, list(zs / K), source=list(zs), min_correction=1.0)
    info = floored.fit_info["target_adaptation"]
    assert floored.correction == 1.0 and info["min_correction"] == 1.0
    assert info["c_unclamped"] == pytest.approx(soft.correction, rel=1e-6)
    sharp = adapt_to_target(ts, list(zt), source=list(zs))  # over-confident: c > 1, the floor inactive
    again = adapt_to_target(ts, list(zt), source=list(zs), min_correction=1.0)
    assert sharp.correction > 1.2 and again.correction == pytest.approx(sharp.correction, rel=1e-6)
    with pytest.raises(InputError, match="min_correction"):
        adapt_to_target(ts, list(zt), source=list(zs), min_correction=10.0)
