"""Specific facts about the calibrators and the fitting loop (the generic checks are in
``test_calibrator_checks.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segcal
import segcal.calibrators as sc
from segcal.calibrators.affine import odir
from segcal.calibrators.base import Calibrator
from segcal.calibrators.data import prepare_data
from segcal.calibrators.fitting import value_and_grad
from segcal.calibrators.objectives import get_objective
from segcal.io import PredictionFolder

torch.set_num_threads(1)
FIX = Path(__file__).parent / "fixtures" / "calibrators"


def problem(n=20000, c=5, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, c, generator=g)
    y = (z - torch.log(-torch.log(torch.rand(n, c, generator=g).clamp_min(1e-20)))).argmax(1)
    return scale * z, y


def test_ts_recovers_temperature_three_from_z_times_three():
    x, y = problem(100000)
    cal = sc.create("ts").fit(x, y)
    assert abs(cal.temperature - 3.0) < 0.06, cal.temperature


def test_bounded_ts_clips_the_temperature_and_round_trips(tmp_path):
    x, y = problem(20000)  # the unbounded answer is T = 3
    cal = sc.create("ts", bounds=(0.05, 2.0)).fit(x, y)
    assert 1.95 < cal.temperature <= 2.0
    assert sc.create("ts", bounds=(0.05, 5.0)).fit(x, y).temperature == pytest.approx(3.0, abs=0.1)
    cal.save(tmp_path / "ts.pt")
    back = segcal.load(tmp_path / "ts.pt")
    assert back.bounds == (0.05, 2.0) and back.temperature == pytest.approx(cal.temperature, rel=1e-7)
    for bad, arg in [({"bounds": (2.0, 1.0)}, "bounds"), ({"bounds": (0.5, 2.0), "init_temperature": 3.0},
                     "init_temperature"), ({"init_temperature": 0.0}, "init_temperature")]:
        with pytest.raises(ValueError, match=arg):
            sc.create("ts", **bad)
    with pytest.raises(ValueError, match="init_temperature"):
        sc.create("ets", init_temperature=-1.0)


def test_independent_experts_fit_each_expert_on_its_own_pixels():
    """independent_experts=True: expert c minimises its own (mean NLL over its routed pixels +
    reg_c), i.e. what a fit on those pixels alone reaches when the regulariser (a mean over the C
    experts) is scaled by C; the joint fit weights each expert's data term by its pixel count, so
    a small expert ends further from its own optimum. (The parameters themselves are only weakly
    identified, so the per-expert objectives are compared.)"""
    c, lam, mu = 3, 0.05, 0.05
    x, y = problem(30000, c=c, seed=3)
    x = x + torch.tensor([1.5, 0.0, -1.5]) * 3  # unbalanced routing
    top = torch.log_softmax(x, 1).argmax(1)
    counts = torch.bincount(top, minlength=c)
    assert counts.min() > 500 and counts.max() > 3 * counts.min()

    def own_objective(cal, e):
        sub = top == e
        with torch.no_grad():
            nll = F.cross_entropy(torch.as_tensor(cal(x[sub])), y[sub])
            return float(nll + odir(cal.A[e : e + 1], cal.bias[e : e + 1], lam, mu))

    ind = sc.create("cdc", independent_experts=True, lambda_reg=lam, mu_reg=mu).fit(x, y)
    joint = sc.create("cdc", lambda_reg=lam, mu_reg=mu).fit(x, y)
    for e in range(c):
        sub = top == e
        alone = sc.create("cdc", lambda_reg=c * lam, mu_reg=c * mu).fit(x[sub], y[sub])
        assert own_objective(ind, e) == pytest.approx(own_objective(alone, e), abs=1e-3)
        assert own_objective(ind, e) <= own_objective(joint, e) + 1e-4
    small = int(counts.argmin())
    assert own_objective(ind, small) < own_objective(joint, small) - 2e-3
    assert ind.get_config()["independent_experts"] is True
    with pytest.raises(ValueError, match="independent_experts"):
        sc.create("cmsop", independent_experts=True, objective="dice").fit(x, y)


def test_monitor_objective_selects_by_the_fitting_objective():
    """Soft Dice sharpens TS here (T < 1) while the NLL wants T = 3: scored by validation NLL the
    best iterate is the start (T = 1); scored by the objective the fit moves."""
    x, y = problem(20000)
    xv, yv = problem(20000, seed=1)
    by_nll = sc.create("ts", objective="dice").fit(x, y, val=(xv, yv))
    by_obj = sc.create("ts", objective="dice", monitor="objective").fit(x, y, val=(xv, yv))
    assert by_nll.fit_info["stages"][0]["monitor"] == "val_nll"
    assert by_obj.fit_info["stages"][0]["monitor"] == "val_dice"
    assert by_nll.temperature == pytest.approx(1.0, abs=1e-6)
    assert by_obj.temperature < 0.9
    assert by_obj.get_config()["monitor"] == "objective"
    with pytest.raises(ValueError, match="monitor"):
        sc.create("ts", monitor="ece")


def test_ts_recovers_t_on_images_with_ignore_and_mask():
    x, y = problem(4 * 16 * 16, c=4, seed=1)
    imgs = x.reshape(4, 16, 16, 4).movedim(-1, 1)
    lab = y.reshape(4, 16, 16).clone()
    lab[:, 0] = 255
    mask = torch.ones(4, 16, 16, dtype=torch.bool)
    mask[:, :, :2] = False
    cal = sc.create("ts").fit(imgs, lab, ignore_index=255, mask=mask)
    valid = (lab != 255) & mask
    ref = sc.create("ts").fit(imgs.movedim(1, -1)[valid], lab[valid])
    assert cal.temperature == pytest.approx(ref.temperature, rel=1e-5)
    assert cal.fit_info["n_pixels"] == int(valid.sum())


def test_msc_has_equal_row_sums_and_init_is_identity():
    cal = sc.create("msc", num_classes=4)
    W = cal.weight().detach()
    torch.testing.assert_close(W, torch.eye(4))
    x, y = problem(3000, c=4)
    cal.fit(x, y)
    W = cal.weight().detach()
    rs = W.sum(1)
    torch.testing.assert_close(rs, rs[0].expand(4))


@pytest.mark.parametrize("name", ["cmsap", "cmsop", "cdc", "dc"])
def test_log_space_calibrators_start_at_identity(name):
    cal = sc.create(name, num_classes=4)
    cal.is_fitted = True
    x = torch.randn(100, 4)
    with torch.no_grad():
        torch.testing.assert_close(F.softmax(cal(x), 1), F.softmax(x, 1), atol=1e-4, rtol=0)


def test_ets_two_stage_weights_on_simplex():
    x, y = problem(20000)
    cal = sc.create("ets").fit(x, y)
    assert [r["stage"] for r in cal.fit_info["stages"]] == ["temperature", "weights"]
    assert abs(cal.temperature - 3.0) < 0.1
    w = cal.weights
    assert abs(sum(w) - 1) < 1e-6 and min(w) >= 0
    with torch.no_grad():
        out = cal(x[:10])
    torch.testing.assert_close(out.exp().sum(1), torch.ones(10), atol=1e-5, rtol=0)  # log of a mixture


def test_streaming_fit_matches_in_memory_and_memory_budget_switches_mode():
    x, y = problem(40000, c=4)
    batches = [(x[i : i + 5000], y[i : i + 5000]) for i in range(0, 40000, 5000)]
    mem = sc.create("ts").fit(x, y)
    assert mem.fit_info["mode"] == "in-memory" and mem.fit_info["optimizer"] == "lbfgs"
    lb = sc.create("ts", memory_budget=2e5, optimizer="lbfgs").fit(batches)
    assert lb.fit_info["mode"] == "streaming"
    assert lb.temperature == pytest.approx(mem.temperature, rel=1e-3)
    ad = sc.create("ts", memory_budget=2e5, max_steps=150, batch_size=5000).fit(batches)
    assert ad.fit_info["optimizer"] == "adam" and ad.fit_info["mode"] == "streaming"
    assert ad.temperature == pytest.approx(mem.temperature, rel=0.05)
    with pytest.raises(ValueError, match=r"can only\s+be read once"):
        sc.create("ts", memory_budget=2e5).fit(b for b in batches)


def test_adam_is_seeded_and_reproducible_and_early_stopping_restores_best():
    x, y = problem(20000, c=4)
    xv, yv = problem(5000, c=4, seed=9)
    kw = dict(optimizer="adam", batch_size=2000, max_steps=200, patience=3, eval_every=5, seed=3)
    a = sc.create("vs", **kw).fit(x, y, val=(xv, yv))
    b = sc.create("vs", **kw).fit(x, y, val=(xv, yv))
    torch.testing.assert_close(a.w, b.w, rtol=0, atol=0)
    rec = a.fit_info["stages"][0]
    assert rec["monitor"] == "val_nll"
    with torch.no_grad():
        val_nll = F.cross_entropy(a(xv), yv).item()
    assert val_nll == pytest.approx(rec["best_monitor"], rel=1e-5)
    assert min(h["monitor"] for h in rec["history"]) == pytest.approx(rec["best_monitor"])


def test_subsample_is_explicit_recorded_and_deterministic():
    x, y = problem(20000, c=4)
    a = sc.create("ts", subsample=0.25, seed=1).fit(x, y)
    b = sc.create("ts", subsample=0.25, seed=1).fit(x, y)
    assert a.fit_info["n_pixels"] == 5000 and a.get_config()["subsample"] == 0.25
    assert a.temperature == b.temperature
    with pytest.raises(ValueError, match="subsample"):
        sc.create("ts", subsample=1.5)


@pytest.mark.parametrize("objective", ["brier", "dice", "dece"])
def test_alternative_objectives_fit_and_lower_their_own_loss(objective):
    x, y = problem(8000, c=4)
    obj = get_objective(objective)
    cal = sc.create("ts", objective=objective, chunk_size=3000).fit(x, y)
    with torch.no_grad():
        assert float(obj(cal(x), y)) < float(obj(x, y))


def test_chunked_nonlinear_objective_gradient_is_exact():
    x, y = problem(3000, c=4)
    grads = []
    for chunk in (3000, 700):
        cal = sc.create("vs", objective="dice", chunk_size=chunk, num_classes=4)
        with torch.no_grad():
            cal.w.mul_(0.5)
        data = prepare_data(x, y, input_type="logits", ignore_index=None, num_classes=4)
        value_and_grad(cal._stats_fn, list(cal.parameters()), data, get_objective("dice"), chunk, lambda: None)
        grads.append(cal.w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_refit_with_other_class_count_and_failed_fit_keeps_state():
    x, y = problem(2000, c=4)
    cal = sc.create("dc").fit(x, y)
    before = {k: v.clone() for k, v in cal.state_dict().items()}
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError):
        cal.fit(bad, y)
    for k, v in cal.state_dict().items():
        torch.testing.assert_close(v, before[k])
    x3, y3 = problem(2000, c=3)
    cal.fit(x3, y3)
    assert cal.num_classes == 3
    with pytest.raises(ValueError, match="expected 3 classes"):
        sc.create("dc", num_classes=3).fit(x, y)


def test_version1_fixtures_still_load_and_give_the_same_outputs():
    exp = torch.load(FIX / "expected_v1.pt", weights_only=True)
    for name in ("ts", "dc", "ets", "cmsop"):
        cal = segcal.load(FIX / f"{name}_v1.pt")
        assert cal.name == name
        with torch.no_grad():
            torch.testing.assert_close(cal(exp["x"]), exp[name])


def test_load_rejects_foreign_and_future_files(tmp_path):
    torch.save({"format": "other"}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="not a segcal calibrator"):
        segcal.load(tmp_path / "a.pt")
    torch.save({"format": "segcal-calibrator", "version": 99, "name": "ts"}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="version 99"):
        segcal.load(tmp_path / "b.pt")


def test_prediction_folder_fit(tmp_path):
    x, y = problem(6 * 100, c=3)
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    for i in range(6):
        np.save(tmp_path / "p" / f"{i}.npy", x[i * 100 : (i + 1) * 100].t().reshape(3, 10, 10).numpy().astype(np.float16))
        np.save(tmp_path / "l" / f"{i}.npy", y[i * 100 : (i + 1) * 100].reshape(10, 10).numpy().astype(np.uint8))
    a = sc.create("ts").fit(PredictionFolder(tmp_path / "p", tmp_path / "l"))
    b = sc.create("ts").fit(str(tmp_path / "p"), str(tmp_path / "l"))
    assert a.temperature == b.temperature and a.fit_info["n_pixels"] == 600


class ImageTS(Calibrator):
    """A test-only spatial calibrator: checks that whole-image calibrators plug into the loop."""

    name = "image_ts_test"
    spatial = True
    translation_invariant = True

    def _build(self, num_classes):
        self.t = torch.nn.Parameter(torch.ones(()))

    def _map_image(self, x):
        return x / self.t

    def _map(self, rows):
        return rows / self.t


def test_spatial_calibrators_are_fitted_on_whole_images():
    x, y = problem(4 * 8 * 8, c=3)
    imgs = x.reshape(4, 8, 8, 3).movedim(-1, 1)
    lab = y.reshape(4, 8, 8).clone()
    lab[0, 0, 0] = 255
    cal = ImageTS().fit(imgs, lab, ignore_index=255)
    ref = sc.create("ts").fit(imgs, lab, ignore_index=255)
    assert float(cal.t) == pytest.approx(ref.temperature, rel=1e-3)
    assert cal(imgs).shape == imgs.shape


@pytest.mark.parametrize("name", ["cdc", "cmsap", "cmsop"])
def test_cached_features_give_the_same_fit(name):
    """The L-BFGS feature cache (sort / expert routing computed once) changes speed, not results."""
    g = torch.Generator().manual_seed(3)
    z = 2 * torch.randn(3000, 6, generator=g)
    y = (z + -torch.log(-torch.log(torch.rand(3000, 6, generator=g)))).argmax(1)
    x = 3 * z
    cal = sc.create(name, num_classes=6)
    rows = F.log_softmax(x[:500], 1)
    torch.testing.assert_close(cal._map_features(cal._features(rows)), cal._map(rows), rtol=0, atol=0)
    data_bytes = x.numel() * 4 + y.numel() * 8
    cached = sc.create(name, max_iter=30).fit(x, y)
    plain = sc.create(name, max_iter=30, memory_budget=data_bytes + 1).fit(x, y)  # in memory, no room for a cache
    assert cached.fit_info["mode"] == plain.fit_info["mode"] == "in-memory"
    assert cached.fit_info["stages"][-1]["cached_feature_mb"] > 0
    assert plain.fit_info["stages"][-1]["cached_feature_mb"] == 0
    for (k, a), (_, b) in zip(cached.state_dict().items(), plain.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
