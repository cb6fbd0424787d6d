"""Paired bootstrap over test images ([RPH] protocol, ``methods.md`` §5).

What is resampled: the *test images*. One bootstrap replicate draws ``n`` image indices with
replacement (seeded ``numpy.random.default_rng(seed)``); the same draw is used for every method,
so the differences are paired. Each metric is recomputed on the replicate from per-image
sufficient statistics, so a pooled metric stays pooled:

* pooled ECE / MCE: the per-image top-label bins (count, sum of confidence, sum of correct) are
  summed over the drawn images and the ECE/MCE is computed from the summed bins;
* NLL, Brier, flip rate: per-image sums and pixel counts, summed, then divided;
* mIoU: per-image per-class (label count, true positives, prediction count) summed, then IoU;
* image-wise ECE (and any per-image value: the 50-bin case ECE, case-wise Dice of a class in the
  medical bench): the mean of the drawn images' values;
* pooled Dice of a class (medical bench): per-image (label count, TP, prediction count) summed;
* foreground-region ECE (medical bench): the per-case bins of the region, summed.

A method's value on a replicate is the mean over the calibration repeats (the table's value), so
the CI is for the difference of the table's numbers: ``method - reference``. The 95 % interval is
the 2.5 / 97.5 percentile interval of the replicate differences.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def resample_weights(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_images)`` multiplicities of each image in each replicate (multinomial draws)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_images, size=(n_boot, n_images))
    w = np.zeros((n_boot, n_images), dtype=np.float64)
    rows = np.repeat(np.arange(n_boot), n_images)
    np.add.at(w, (rows, idx.ravel()), 1.0)
    return w


def ece_from_bins(count: np.ndarray, sconf: np.ndarray, sacc: np.ndarray) -> np.ndarray:
    """ECE from summed bins (last axis = bins); broadcasts over leading axes."""
    n = count.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(sacc - sconf).sum(-1) / n


def mce_from_bins(count: np.ndarray, sconf: np.ndarray, sacc: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(count > 0, np.abs(sacc - sconf) / np.maximum(count, 1e-300), -np.inf)
    return gap.max(-1)


def miou_from_class_stats(lab: np.ndarray, tp: np.ndarray, pred: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """mIoU from summed per-class (label count, TP, prediction count); last axis = classes."""
    union = lab + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    iou = iou[..., classes]
    return np.nanmean(iou, axis=-1)


def paired_ci(
    stat: Callable[[np.ndarray], np.ndarray],
    stat_ref: Callable[[np.ndarray], np.ndarray],
    weights: np.ndarray,
    level: float = 0.95,
) -> dict[str, float]:
    """Paired percentile CI of ``stat - stat_ref``.

    ``stat(w)`` / ``stat_ref(w)`` map an ``(B, n_images)`` weight matrix (the all-ones row gives
    the point estimate) to ``(B,)`` values.
    """
    ones = np.ones((1, weights.shape[1]))
    point = float(stat(ones)[0] - stat_ref(ones)[0])
    d = stat(weights) - stat_ref(weights)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return {"diff": point, "lo": float("nan"), "hi": float("nan"), "significant": False}
    a = (1 - level) / 2
    lo, hi = np.quantile(d, [a, 1 - a])
    return {"diff": point, "lo": float(lo), "hi": float(hi), "significant": bool(lo > 0 or hi < 0)}


__all__ = [
    "ece_from_bins",
    "mce_from_bins",
    "miou_from_class_stats",
    "paired_ci",
    "resample_weights",
]
