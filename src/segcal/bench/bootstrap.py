"""Paired bootstrap over test images ([RPH] protocol, ``../shared/methods.md`` §5) and seed summaries.

What is resampled: the *test images*. One bootstrap replicate draws ``n`` image indices with
replacement (seeded ``numpy.random.default_rng(seed)``); the same draw is used for every method,
so the differences are paired. Each metric is recomputed on the replicate from per-image
sufficient statistics, so a pooled metric stays pooled:

* pooled ECE / MCE: the per-image top-label bins (count, sum of confidence, sum of correct) are
  summed over the drawn images and the ECE/MCE is computed from the summed bins
  (:func:`segcal.metrics.scores.ece_from_bins` / :func:`~segcal.metrics.scores.mce_from_bins`);
* NLL, Brier, flip rate: per-image sums and pixel counts, summed, then divided;
* mIoU: per-image per-class (label count, true positives, prediction count) summed, then IoU;
* image-wise ECE (and any per-image value: the 50-bin case ECE, case-wise Dice of a class in the
  medical bench): the mean of the drawn images' values;
* pooled Dice of a class (medical bench): per-image (label count, TP, prediction count) summed;
* region ECE (CamVid boundary band, medical foreground region): the per-image bins of the
  region, summed.

A method's value on a replicate is the mean over the calibration repeats (the table's value), so
the CI is for the difference of the table's numbers: ``method - reference``. The 95 % interval is
the 2.5 / 97.5 percentile interval of the replicate differences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from segcal.metrics.scores import ece_from_bins, mce_from_bins

Stats = Mapping[str, np.ndarray]


def resample_weights(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_images)`` multiplicities of each image in each replicate (multinomial draws)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_images, size=(n_boot, n_images))
    w = np.zeros((n_boot, n_images), dtype=np.float64)
    rows = np.repeat(np.arange(n_boot), n_images)
    np.add.at(w, (rows, idx.ravel()), 1.0)
    return w


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


def _binned(w: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """ECE (or MCE) of the per-image bins ``b (n, 3, M)`` (count, sum_conf, sum_acc) summed with ``w``."""
    cnt, conf, acc = (w @ np.ascontiguousarray(b[:, j]) for j in range(3))
    return mce_from_bins(cnt, conf, acc) if metric == "mce" else ece_from_bins(cnt, conf, acc)


#: region ECE metric -> the per-image region bins of the stats
REGION_BINS = {"band_ece": "band_bins", "fg_ece": "fg_bins"}


def boot_stat(metric: str, stats: Sequence[Stats]) -> Callable[[np.ndarray], np.ndarray]:
    """``w (B, n) -> (B,)``: ``metric`` recomputed from weighted per-image ``stats``, mean over seeds.

    ``stats``: one per seed, the ``_stats`` of a run of :func:`segcal.bench.protocol.evaluate`.
    """

    def one(s: Stats, w: np.ndarray) -> np.ndarray:
        if metric in ("ece", "mce"):
            return _binned(w, s["bins"], metric)
        if metric in REGION_BINS:
            return _binned(w, s[REGION_BINS[metric]], "ece")
        if metric in ("nll", "brier"):
            col = 1 if metric == "nll" else 2
            return (w @ s["totals"][:, col]) / (w @ s["totals"][:, 0])
        if metric == "flip_rate":
            return (w @ s["flips"]) / (w @ s["totals"][:, 0])
        if metric in ("image_ece", "image_ece50") or metric.startswith("case_dice:"):
            # mean over the drawn images of a per-image value (images where it is undefined left out)
            if metric.startswith("case_dice:"):
                v = s["case_dice"][:, int(metric.split(":")[1])]
            else:
                v = s["img_ece50"] if metric == "image_ece50" else s["img_ece"]
            ok = np.isfinite(v)
            return (w[:, ok] @ v[ok]) / w[:, ok].sum(1)
        if metric.startswith("dice:"):  # pooled Dice of one class from summed per-image counts
            c = s["cls"][:, int(metric.split(":")[1])]
            lab, tp, pred = w @ c[:, 0], w @ c[:, 1], w @ c[:, 2]
            return 2 * tp / np.where(lab + pred > 0, lab + pred, np.nan)
        if metric == "miou":
            c = s["cls"]
            return miou_from_class_stats(w @ c[:, :, 0], w @ c[:, :, 1], w @ c[:, :, 2], s["avg"])
        raise ValueError(f"metric {metric!r}: no bootstrap statistic for it")

    def f(w: np.ndarray) -> np.ndarray:
        return np.mean([one(s, w) for s in stats], axis=0)

    return f


def bootstrap_condition(cond: Mapping[str, Any], methods: Sequence[str], *, n_boot: int, seed: int,
                        metrics: Sequence[str], reference: str = "ts") -> dict[str, Any]:
    """Paired bootstrap CIs over test images of ``method - reference`` for every metric of ``metrics``."""
    by_method: dict[str, list[Stats]] = {}
    for r in cond["runs"].values():
        by_method.setdefault(r["method"], []).append(r["_stats"])
    if reference not in by_method:
        return {}
    w = resample_weights(cond["n_images"], n_boot, seed)
    out: dict[str, Any] = {}
    for m in ["uncalibrated", *methods]:
        if m == reference or m not in by_method:
            continue
        out[m] = {}
        for metric in metrics:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[m][metric] = paired_ci(boot_stat(metric, by_method[m]), boot_stat(metric, by_method[reference]), w)
    return out


def summarize(cond: Mapping[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Mean / std over seeds of every metric, per method."""
    rows: dict[str, Any] = {}
    for m in ["uncalibrated", *methods]:
        rs = [r["metrics"] for r in cond["runs"].values() if r["method"] == m]
        if not rs:
            continue
        row: dict[str, Any] = {"n_seeds": len(rs)}
        for k in rs[0]:
            v = np.array([r[k] for r in rs], dtype=np.float64)
            row[k] = float(np.mean(v))
            row[k + "_seed_std"] = float(np.std(v)) if len(v) > 1 else 0.0
        rows[m] = row
    return rows


__all__ = [
    "REGION_BINS",
    "boot_stat",
    "bootstrap_condition",
    "miou_from_class_stats",
    "paired_ci",
    "resample_weights",
    "summarize",
]
