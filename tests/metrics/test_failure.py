"""Failure-detection metrics (segcal.metrics.failure): the fine-histogram values against an exact
sort-based float64 reference and scikit-learn within the reported tie bound, the closed-form tie
expectations and bounds against every within-bin order, batch split / merge invariance, the
image-level rows, and the array function ``failure_detection``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from metric_reference import risk_coverage_reference, softmax
from segcal.errors import InputError
from segcal.metrics import CalibrationMetrics
from segcal.metrics.failure import (
    error_detection,
    failure_detection,
    group_values,
    harmonic,
    harmonic_diff,
)

KEYS = ["aurc", "eaurc", "augrc", "risk_at_coverage_50", "risk_at_coverage_80", "risk_at_coverage_90",
        "risk_at_coverage_95", "failure_auroc", "failure_aupr"]
BOUND = {"aurc": "aurc_tie_bound", "eaurc": "aurc_tie_bound", "augrc": "augrc_tie_bound",
         "failure_auroc": "failure_auroc_tie_bound", "failure_aupr": "failure_aupr_tie_bound",
         **{f"risk_at_coverage_{p}": "risk_at_coverage_tie_bound" for p in (50, 80, 90, 95)}}


def data(seed=0, n=3, c=6, shape=(40, 50), scale=2.5, ignore=None):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c, *shape)) * scale
    y = rng.integers(0, c, size=(n, *shape))
    y = np.where(rng.random(y.shape) < 0.7, z.argmax(1), y)
    if ignore is not None:
        y = np.where(rng.random(y.shape) < 0.1, ignore, y)
    return z, y


def pixels(z, y, ignore=None):
    q = softmax(z)
    conf, pred = q.max(1), q.argmax(1)
    v = np.ones(y.shape, bool) if ignore is None else y != ignore
    return conf[v], (pred != y)[v].astype(float)


@pytest.mark.parametrize("fine_bins,ignore", [(1 << 16, None), (1 << 16, 255), (256, None)])
def test_histogram_values_within_their_tie_bound_of_the_exact_sort(fine_bins, ignore):
    z, y = data(seed=fine_bins % 7, ignore=ignore)
    m = CalibrationMetrics(6, fine_bins=fine_bins, ignore_index=ignore)
    m.update(torch.from_numpy(z), torch.from_numpy(y))
    ours = m.compute()
    ref = risk_coverage_reference(*pixels(z, y, ignore))
    for k in KEYS:
        b = ours[BOUND[k]]
        assert abs(ours[k] - ref[k]) <= b + 1e-12, (k, ours[k], ref[k], b)
    if fine_bins == 1 << 16:  # the default resolution makes the bounds small on 6,000 pixels
        assert max(ours[BOUND[k]] for k in KEYS) < 2e-3
        for k in KEYS:
            assert ours[k] == pytest.approx(ref[k], abs=2e-3)
    else:  # a coarse histogram: the bound is what keeps the test honest, and it is not vacuous
        assert ours["failure_auroc_tie_bound"] > 1e-3


def test_histogram_on_one_confidence_per_bin_is_exact():
    # every pixel in its own fine bin: the sort is known, the bounds are 0 and the values exact
    rng = np.random.default_rng(3)
    u = (np.sort(rng.choice(60000, 2000, replace=False)) + 0.5) / 65536
    conf = 1 - np.exp(-u * 36.841361487904734)
    conf = conf[conf > 0.5]
    p = np.stack([conf, 1 - conf], 1)
    lab = (rng.random(len(conf)) < conf).astype(int)
    lab = np.where(lab == 1, 0, 1)
    out = CalibrationMetrics(2, input_type="probs")
    out.update(torch.from_numpy(p), torch.from_numpy(lab))
    ours = out.compute()
    ref = risk_coverage_reference(conf, (lab != 0).astype(float))
    for k in KEYS:
        assert ours[BOUND[k]] == pytest.approx(0, abs=1e-13)  # rounding only
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_tie_expectation_and_bound_over_every_within_group_order():
    n = np.array([3.0, 4.0, 2.0, 5.0])
    e = np.array([1.0, 2.0, 1.0, 4.0])
    vals = []
    per_group = [set(itertools.permutations([1] * int(ej) + [0] * int(nj - ej))) for nj, ej in zip(n, e, strict=True)]
    for combo in itertools.product(*per_group):
        seq = np.concatenate([np.array(g, float) for g in combo])
        conf = np.concatenate([10 - j + np.linspace(0.5, 0.1, len(g)) for j, g in enumerate(combo)])
        vals.append(risk_coverage_reference(conf, seq))
    got = {**group_values(n, e, binary=True), **error_detection(e, n - e)}
    for k in ["aurc", "augrc", "failure_auroc", "failure_aupr"]:
        v = np.array([d[k] for d in vals])
        assert got[k] == pytest.approx(v.mean(), abs=1e-12), k  # exact expectation over orders
        # the bound is attained by some order (errors first or last in every group)
        assert got[BOUND[k]] == pytest.approx(np.abs(v - got[k]).max(), abs=1e-12), k
    cov = [f"risk_at_coverage_{p}" for p in (50, 80, 90, 95)]
    dev = []
    for k in cov:
        v = np.array([d[k] for d in vals])
        assert got[k] == pytest.approx(v.mean(), abs=1e-12), k
        dev.append(np.abs(v - got[k]).max())
    assert got["risk_at_coverage_tie_bound"] == pytest.approx(max(dev), abs=1e-12)  # one bound for the four


def test_harmonic_numbers():
    for x in [0, 1, 7, 63, 64, 65, 500, 3000]:
        assert harmonic(x) == pytest.approx(sum(1.0 / t for t in range(1, x + 1)), rel=1e-14)
    a = np.array([10.0**7, 5.0 * 10**6])
    exact = [sum(1.0 / t for t in range(int(x) + 1, int(x) + 4)) for x in a]
    assert np.allclose(harmonic_diff(a, a + 3), exact, rtol=1e-12, atol=0)


def _flat(res):
    out = {}
    for k, v in res.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat(v).items()})
        elif k.startswith(("aurc", "eaurc", "augrc", "risk_at", "failure_", "smece", "image_error", "image_dice_v",
                           "image_mean_conf", "image_low", "image_failure", "risk_coverage")):
            out[k] = v
    return out


def test_new_keys_equal_under_batch_split_and_merge():
    z, y = data(seed=5, n=6, shape=(20, 30), ignore=255)
    whole = CalibrationMetrics(6, ignore_index=255)
    whole.update(torch.from_numpy(z), torch.from_numpy(y))
    parts = [CalibrationMetrics(6, ignore_index=255) for _ in range(3)]
    for p, sl in zip(parts, [slice(0, 1), slice(1, 4), slice(4, 6)], strict=True):
        for i in range(sl.start, sl.stop):  # one image per update
            p.update(torch.from_numpy(z[i : i + 1]), torch.from_numpy(y[i : i + 1]))
    merged = parts[0].merge(parts[1]).merge(parts[2])
    a, b = _flat(whole.compute()), _flat(merged.compute())
    assert set(a) == set(b) and len(a) > 40
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k], float), np.asarray(a[k], float), rtol=1e-12, atol=1e-14, err_msg=k)


def test_image_failure_rows_against_a_reference():
    z, y = data(seed=8, n=7, shape=(16, 16), ignore=255)
    m = CalibrationMetrics(6, ignore_index=255, n_bins=10)
    m.update(torch.from_numpy(z), torch.from_numpy(y))
    r = m.compute()
    q = softmax(z)
    err, conf, low, dice = [], [], [], []
    for i in range(len(z)):
        v = y[i] != 255
        c, p, lab = q[i].max(0)[v], q[i].argmax(0)[v], y[i][v]
        err.append(np.mean(p != lab))
        conf.append(c.mean())
        low.append(np.mean(c <= 0.5))
        d = [2 * np.sum((p == k) & (lab == k)) / (np.sum(p == k) + np.sum(lab == k))
             for k in range(6) if np.sum(p == k) + np.sum(lab == k) > 0]
        dice.append(np.mean(d))
    assert r["image_low_confidence_threshold"] == 0.5
    np.testing.assert_allclose(r["image_error_rate_values"], err, rtol=1e-12)
    np.testing.assert_allclose(r["image_mean_confidence_values"], conf, rtol=1e-12)
    np.testing.assert_allclose(r["image_low_confidence_fraction_values"], low, rtol=1e-12)
    np.testing.assert_allclose(r["image_dice_values"], dice, rtol=1e-12)
    ref = risk_coverage_reference(np.array(conf), np.array(err))
    got = r["image_failure"]["error_rate"]["mean_confidence"]
    for k in ["aurc", "eaurc", "augrc", "risk_at_coverage_50", "risk_at_coverage_90"]:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    # the low-confidence score (1 - fraction) against 1 - Dice is failure_detection on those arrays
    want = failure_detection(1 - np.array(low), 1 - np.array(dice))
    got_d = r["image_failure"]["one_minus_dice"]["low_confidence_fraction"]
    for k in ["aurc", "eaurc", "augrc", "risk_at_coverage_80"]:
        assert got_d[k] == pytest.approx(want[k], abs=1e-12), k
    assert got_d["n"] == len(z)


def test_failure_detection_on_arrays_equals_the_sort_reference():
    rng = np.random.default_rng(11)
    s = rng.random(300)
    risk = np.clip(0.6 - s + rng.normal(0, 0.2, 300), 0, 1)
    got = failure_detection(s, risk, failure_threshold=0.3)
    ref = risk_coverage_reference(s, (risk > 0.3) * 1.0)
    assert got["failure_auroc"] == pytest.approx(ref["failure_auroc"], abs=1e-12)
    assert got["failure_aupr"] == pytest.approx(ref["failure_aupr"], abs=1e-12)
    ref = risk_coverage_reference(s, risk)
    for k in ["aurc", "eaurc", "augrc", "risk_at_coverage_50", "risk_at_coverage_80", "risk_at_coverage_95"]:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    assert got["n"] == 300 and got["eaurc"] > 0
    # a perfect ranking has no excess
    assert failure_detection(-risk, risk)["eaurc"] == pytest.approx(0, abs=1e-12)


def test_failure_detection_ties_are_the_mean_over_orders():
    s = np.array([0.9, 0.9, 0.9, 0.5, 0.5, 0.1])
    r = np.array([0.0, 0.4, 1.0, 0.2, 0.7, 0.3])
    vals = [risk_coverage_reference(s[list(p)], r[list(p)]) for p in itertools.permutations(range(6))]
    got = failure_detection(s, r)
    for k in ["aurc", "augrc", "risk_at_coverage_50", "risk_at_coverage_80"]:
        assert got[k] == pytest.approx(np.mean([v[k] for v in vals]), abs=1e-12), k


@pytest.mark.parametrize("scores,risks,match", [
    (np.ones(3), np.ones(4), "risks"),
    (np.ones((2, 2)), np.ones(4), "scores"),
    (np.array([1.0, np.nan]), np.ones(2), "scores"),
    (np.ones(2), np.array([0.0, np.inf]), "risks"),
    (np.ones(0), np.ones(0), "scores"),
])
def test_failure_detection_refuses_bad_input(scores, risks, match):
    with pytest.raises(InputError, match=match):
        failure_detection(scores, risks)
