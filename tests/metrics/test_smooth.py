"""smECE (segcal.metrics.smooth) against the reference implementation, relplot: exactly on
per-pixel data, and within 1e-4 from the fine histogram of the metric state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metric_reference import softmax
from segcal.metrics import CalibrationMetrics
from segcal.metrics.smooth import smooth_ece

relplot = pytest.importorskip("relplot")


def pixels(seed, scale, c=5, shape=(60, 60), n=3, agree=0.6):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c, *shape)) * scale
    y = rng.integers(0, c, size=(n, *shape))
    y = np.where(rng.random(y.shape) < agree, z.argmax(1), y)
    q = softmax(z)
    # relplot's top-label form: confidence of the argmax, correct = argmax equals the label
    f, a = relplot.multiclass_logits_to_confidences(np.moveaxis(q, 1, -1).reshape(-1, c), y.reshape(-1), probs=True)
    return z, y, f, a


@pytest.mark.parametrize("seed,scale", [(0, 0.5), (1, 2.0)])
def test_per_pixel_smooth_ece_equals_relplot(seed, scale):
    _, _, f, a = pixels(seed, scale, shape=(30, 30))
    want, sigma = relplot.smECE(f, a, return_width=True)
    got, got_sigma = smooth_ece(f, np.ones_like(f), f - a)
    assert got_sigma == sigma
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed,scale,agree", [(2, 0.7, 0.6), (3, 3.0, 0.6), (4, 6.0, 0.9)])
def test_histogram_smece_equals_relplot_within_1e_4(seed, scale, agree):
    z, y, f, a = pixels(seed, scale, agree=agree)
    m = CalibrationMetrics(5)
    m.update(torch.from_numpy(z), torch.from_numpy(y))
    r = m.compute()
    want, sigma = relplot.smECE(f, a, return_width=True)
    assert r["smece_sigma"] == sigma
    assert r["smece"] == pytest.approx(want, abs=1e-4)
    assert want > 0.01  # not a trivially calibrated case


def test_smece_of_a_calibrated_sample_is_small_and_of_a_shifted_one_is_the_shift():
    rng = np.random.default_rng(5)
    f = rng.uniform(0.2, 0.8, 200_000)
    a = (rng.random(f.size) < f).astype(float)
    assert smooth_ece(f, np.ones_like(f), f - a)[0] < 0.01
    g = np.clip(f + 0.1, 0, 1)  # overconfident by 0.1 everywhere
    assert smooth_ece(g, np.ones_like(g), g - a)[0] == pytest.approx(0.1, abs=0.01)
