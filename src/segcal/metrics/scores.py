"""Scores from accumulated bin statistics: the one place where ECE and MCE are computed from bins.

Used by the streaming engine (:mod:`segcal.metrics.engine`), the paired bootstrap, and the
selective-scaling selector diagnostics. Definitions: ``../shared/methods.md`` §1 (ECE, MCE,
RMSCE, unweighted / class-wise CE).
"""

from __future__ import annotations

import numpy as np


def bin_errors(count: np.ndarray, sum_conf: np.ndarray, sum_acc: np.ndarray) -> dict[str, np.ndarray]:
    """ECE, MCE, RMSCE and unweighted CE of summed bins (last axis = bins; broadcasts).

    Parameters
    ----------
    count, sum_conf, sum_acc
        Per bin: number of pixels, sum of confidences, sum of correctness (float arrays of the same
        shape; the last axis indexes the bins).

    Returns
    -------
    dict
        ``ece`` = ``sum_b |sum_acc_b - sum_conf_b| / N``; ``mce`` = max over non-empty bins of
        ``|acc_b - conf_b|``; ``rmsce`` = count-weighted root-mean-square gap; ``unweighted`` =
        mean gap over non-empty bins. NaN where there are no pixels.
    """
    count = np.asarray(count, dtype=np.float64)
    sum_conf = np.asarray(sum_conf, dtype=np.float64)
    sum_acc = np.asarray(sum_acc, dtype=np.float64)
    n = count.sum(-1)
    nz = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(nz, np.abs(sum_acc - sum_conf) / np.where(nz, count, 1), np.nan)
        ece = np.abs(sum_acc - sum_conf).sum(-1) / n
        rms = np.sqrt((np.where(nz, count, 0) * np.nan_to_num(gap) ** 2).sum(-1) / n)
        nonempty = nz.sum(-1)
        mce = np.where(nonempty > 0, np.max(np.where(nz, gap, -np.inf), axis=-1), np.nan)
        unweighted = np.where(nonempty > 0, np.nansum(gap, axis=-1) / np.maximum(nonempty, 1), np.nan)
    return {"ece": ece, "mce": mce, "rmsce": rms, "unweighted": unweighted}


def ece_from_bins(count: np.ndarray, sum_conf: np.ndarray, sum_acc: np.ndarray) -> np.ndarray:
    """Expected calibration error of summed bins (see :func:`bin_errors`)."""
    return bin_errors(count, sum_conf, sum_acc)["ece"]


def mce_from_bins(count: np.ndarray, sum_conf: np.ndarray, sum_acc: np.ndarray) -> np.ndarray:
    """Maximum calibration error of summed bins (see :func:`bin_errors`)."""
    return bin_errors(count, sum_conf, sum_acc)["mce"]


__all__ = ["bin_errors", "ece_from_bins", "mce_from_bins"]
