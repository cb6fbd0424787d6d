"""Smooth ECE (smECE) of Błasiok & Nakkiran (2023) from the fine confidence histogram.

"Smooth ECE: Principled Reliability Diagrams via Kernel Smoothing" (ICLR 2024, arXiv 2309.12236):
with a Gaussian kernel of bandwidth ``σ`` reflected at 0 and 1, the kernel-smoothed residual
``r̂(t) = sum_i K(t, f_i) (f_i - y_i) / sum_i K(t, f_i)`` and the smoothed density
``δ̂(t) = sum_i K(t, f_i)`` give ``smECE_σ = ∫ |r̂(t)| δ̂(t) dt / ∫ δ̂(t) dt``; the reported value
uses the automatic bandwidth ``σ*``, the fixed point ``smECE_σ* = σ*`` (unique: ``smECE_σ``
decreases in ``σ``). Top-label form, as relplot's ``multiclass_logits_to_confidences``:
``f_i`` = confidence of the predicted class, ``y_i`` = 1 if the prediction is correct.

The computation follows the reference implementation, ``relplot`` 1.0.3 (by the paper's authors;
``relplot.metrics.smECE`` with its default reflected Gaussian kernel), step by step, so that the
two agree: masses are split linearly onto a grid of ``max(2000, round(20 / σ)) // 2 + 1`` points,
convolved with the Gaussian (truncated at distance 0.5) after reflecting the grid at both ends,
interpolated at ``max(round(10 / σ), 200)`` evaluation points, the density floored by ``+1e-4``;
``σ*`` is found by bisection of ``[0, 1]`` in 10 steps (precision 1/1024), keeping the upper end
(relplot's ``search_param``), with ``σ < 0.001`` accepted outright.

From the histogram: each non-empty fine bin is one mass at its mean confidence (``sum conf /
count``), of weight ``count`` (density) and ``sum conf - sum correct`` (residual). The only
difference from the per-pixel computation is the position of pixels inside a bin (at most
``5.6e-4 (1 - c)`` in confidence for 65,536 bins, against a grid step of 1e-3 and ``σ* >= 1e-3``);
``tests/metrics/test_smooth.py`` checks the agreement with relplot to 1e-4.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: relplot's floor added to the smoothed density
DENSITY_EPS = 1e-4


def _grid(loc: np.ndarray, w: np.ndarray, points: int) -> np.ndarray:
    """Split each mass ``w`` at ``loc`` linearly between its two neighbouring grid points."""
    pos = loc * (points - 1)
    b = np.clip(pos.astype(np.int64), 0, points - 2)
    frac = pos - b
    out = np.bincount(b, weights=(1 - frac) * w, minlength=points)
    out += np.bincount(b + 1, weights=frac * w, minlength=points)
    return out


def _smoothed(loc: np.ndarray, w: np.ndarray, sigma: float, t: np.ndarray) -> np.ndarray:
    """Reflected-Gaussian kernel sum of the masses, evaluated at ``t`` (linear interpolation)."""
    points = max(2000, round(20 / sigma)) // 2 + 1
    values = _grid(loc, w, points)
    g = np.linspace(0, 1, points)
    ker = np.exp(-(g - 0.5) ** 2 / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    ext = np.concatenate([values[::-1][:-1], values, values[::-1][1:]])
    sm = np.convolve(ext, ker, "valid")[points // 2 : points // 2 + points]
    idx = np.clip((t * (points - 1)).astype(np.int64), 0, points - 2)
    res = (t - idx / (points - 1)) * (points - 1)
    return sm[idx] * (1 - res) + sm[idx + 1] * res


def smooth_ece_at(loc: np.ndarray, count: np.ndarray, residual: np.ndarray, sigma: float) -> float:
    """``smECE_σ`` of masses at ``loc`` (counts ``count``, residual sums ``sum (f - y)``)."""
    t = np.linspace(0, 1, max(round(10 / sigma), 200))
    dens = _smoothed(loc, count, sigma, t) + DENSITY_EPS
    rs = _smoothed(loc, residual, sigma, t) / dens
    return float(np.sum(np.abs(rs) * dens) / np.sum(dens))


def smooth_ece(loc: Any, count: Any, residual: Any, *, eps: float = 1e-3) -> tuple[float, float]:
    """smECE at the automatic bandwidth and that bandwidth (see the module docstring).

    Parameters
    ----------
    loc, count, residual
        1-D arrays: confidence of each mass (in ``[0, 1]``), its pixel count and its residual sum
        ``sum (conf - correct)``. Per-pixel data: ``count = 1``, ``residual = conf - correct``.
    eps
        Smallest bandwidth searched (relplot's ``eps``).

    Returns
    -------
    tuple
        ``(smece, sigma)``.
    """
    loc = np.asarray(loc, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    residual = np.asarray(residual, dtype=np.float64)
    cache: dict[float, float] = {}

    def value(s: float) -> float:
        if s not in cache:
            cache[s] = smooth_ece_at(loc, count, residual, s)
        return cache[s]

    def fixed(s: float) -> bool:  # bandwidth at or below the fixed point
        return s < eps or s < value(s)

    start = 1.0
    if not fixed(start):
        end = 0.0
        for _ in range(10):
            mid = (start + end) / 2
            if fixed(mid):
                end = mid
            else:
                start = mid
    return value(start), start


def histogram_smooth_ece(fine: Any) -> tuple[float, float]:
    """smECE and its bandwidth from a fine histogram (count, sum conf, sum correct per bin).

    NaN, NaN when the histogram holds no pixel.
    """
    f = np.asarray(fine, dtype=np.float64)
    keep = f[:, 0] > 0
    if not keep.any():
        return float("nan"), float("nan")
    n, sc, sa = f[keep, 0], f[keep, 1], f[keep, 2]
    return smooth_ece(np.clip(sc / n, 0.0, 1.0), n, sc - sa)


__all__ = ["DENSITY_EPS", "histogram_smooth_ece", "smooth_ece", "smooth_ece_at"]
