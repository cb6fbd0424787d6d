"""Scores from accumulated statistics: the one place where ECE and MCE are computed from bins.

:func:`bin_errors` (with :func:`ece_from_bins`, :func:`mce_from_bins`) is used by the streaming
engine (:mod:`segcal.metrics.engine`), the paired bootstrap and the selective-scaling selector
diagnostics; :func:`compute_from_state` turns a metric state (:mod:`segcal.metrics.state`) into
every metric of :class:`segcal.metrics.CalibrationMetrics`.

Definitions (``../shared/methods.md`` §4). For a valid pixel ``i`` (label not ``ignore_index`` and
mask True) with probabilities ``q_i = softmax(z_i)`` (or the given probabilities), prediction
``yhat_i = argmax_k z_ik`` (first index on ties), confidence ``c_i = q_{i, yhat_i}``, correctness
``a_i = 1[yhat_i = y_i]``; ``N`` valid pixels; ``M`` equal-width bins with the ``(lo, hi]``
convention of :func:`segcal.metrics.binning.bin_index` (confidence 1.0 in the last bin):

``ece``
    Top-label ECE pooled over the dataset: ``sum_b (n_b / N) |acc_b - conf_b|``.
``image_ece`` / ``image_ece_std``
    The same ECE computed on each image's valid pixels, then the mean and the population standard
    deviation (ddof=0) over images with at least one valid pixel ([SEL], LTS code).
``mce``
    ``max_b |acc_b - conf_b|`` over non-empty bins (pooled); ``image_mce`` is its image mean.
``rmsce``
    ``sqrt(sum_b (n_b / N) (acc_b - conf_b)^2)`` (pooled).
``ace_adaptive``
    Adaptive (equal-mass) ECE: ``M`` bins each holding ~``N / M`` pixels sorted by confidence,
    ``sum_b (n_b / N) |acc_b - conf_b|``. Computed from a fine histogram of ``fine_bins`` bins
    on ``u = -log(1 - c) / 36.84`` (fine resolution near confidence 1, where segmentation
    confidences concentrate); each fine bin is assigned whole to the adaptive bin where its first
    pixel falls. ``ace_adaptive_error_bound`` is a rigorous bound on the difference from the exact
    sort-based value: ``(2 / N) * sum`` of the counts of fine bins that straddle an equal-mass
    boundary (moving one pixel between two bins changes the sum by at most 2).
``ace_unweighted``
    The unweighted mean of ``|acc_b - conf_b|`` over non-empty equal-width bins: what [RPH] /
    Fiducio call "ACE" (average calibration error); pooled.
``classwise_ece`` / ``classwise_ece_per_class``
    Class-wise ECE (Nixon et al. static calibration error): for each class ``k``, bin the class-k
    probability ``q_ik`` of every valid pixel; ``ECE_k = sum_b (n_kb / N) |freq_kb - conf_kb|``
    with ``freq_kb`` the fraction of pixels in the bin labelled ``k``; ``classwise_ece`` is the mean
    of ``ECE_k`` over the averaged classes.
``sce_lts``
    The "SCE" of the LTS code: top-label bins restricted to pixels *predicted* as class ``k``,
    ``sum_k sum_b (n_kb / N) |acc_kb - conf_kb|`` (no 1/K factor).
``class_level_ece``
    Cal-SFDA's label-conditioned ECE (§3.15(b), hard max confidence): top-label ECE of the pixels
    whose label is ``k``, averaged over the averaged classes (classes without pixels count 0).
``ece_correct`` / ``ece_mispredicted``
    Top-label ECE restricted to correct (``acc = 1``) or mispredicted (``acc = 0``) pixels: the
    selective-scaling paper's analysis ([SEL] §6.3). ``image_ece_correct`` etc. are image means.
``nll``
    ``mean_i -log(max(q_{i, y_i}, nll_floor))``; with the default floor 1e-12 the per-pixel NLL is
    at most 27.63 (the Fiducio convention).
``brier``
    Multiclass sum form ``mean_i sum_k (q_ik - 1[y_i = k])^2`` (range [0, 2]).
``accuracy``, ``confusion_matrix`` (rows = label, cols = prediction), ``iou_per_class``,
``dice_per_class``, ``miou``, ``mdice``
    Dataset-pooled: TP, FP, FN summed over all valid pixels; ``IoU = TP / (TP + FP + FN)``,
    ``Dice = 2TP / (2TP + FP + FN)``; a class with ``TP + FP + FN = 0`` is NaN and left out of the
    means. A prediction of a class outside the averaged classes (e.g. a "void" output channel equal
    to ``ignore_index``) counts as a false negative of the true class.
``image_dice_per_class`` / ``image_iou_per_class``
    Per image (case) and class; NaN where the class is absent from both label and prediction.

``aurc``, ``eaurc``, ``augrc``, ``risk_at_coverage_P``, ``failure_auroc``, ``failure_aupr`` (and a
``*_tie_bound`` for each), ``risk_coverage``
    Pixel failure detection from the fine histogram: :mod:`segcal.metrics.failure`.
``image_failure``, ``image_error_rate_values``, ``image_dice_values``, ``image_mean_confidence_values``,
``image_low_confidence_fraction_values``, ``image_low_confidence_threshold``
    Image-level failure detection from the per-image rows: :func:`segcal.metrics.failure.image_failure`.
``smece``, ``smece_sigma``
    Smooth ECE at its automatic bandwidth (Błasiok & Nakkiran 2023): :mod:`segcal.metrics.smooth`.

Averaged classes: ``range(C)`` minus ``ignore_index`` when the ignore index is a channel index
(e.g. CamVid's 12-output ESPNet with void = 11), unless ``average_classes`` is given.

The ignore channel (``ignore_index`` a channel index, not among the averaged classes) is never a
label, so its per-class entries (``iou_per_class``, ``dice_per_class``, ``classwise_ece_per_class``,
``class_level_ece_per_class``, the columns of ``image_iou_per_class`` / ``image_dice_per_class``)
are NaN (``null`` in JSON, ``n/a`` / ``–`` in the table and report): the mean of the finite
entries of each list is its class mean (``miou``, ``mdice``, ``classwise_ece``; ``class_level_ece``
counts a class without labelled pixels as 0, its entry 0 too).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from segcal.metrics.failure import histogram_failure, image_failure
from segcal.metrics.smooth import histogram_smooth_ece


def _np(x: Any) -> np.ndarray:
    """A NumPy view of ``x`` for a torch tensor or array-like (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


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


def _adaptive_ece(fine: np.ndarray, n_bins: int) -> tuple[float, float]:
    count, sconf, sacc = fine[:, 0], fine[:, 1], fine[:, 2]
    N = count.sum()
    start = np.cumsum(count) - count  # pixels before each fine bin
    nz = count > 0
    # adaptive bin of each fine bin: where its first pixel falls among N/M-sized groups
    ab = np.minimum((start * n_bins) // N, n_bins - 1).astype(np.int64)
    acc_c = np.bincount(ab[nz], weights=count[nz], minlength=n_bins)
    acc_s = np.bincount(ab[nz], weights=(sacc - sconf)[nz], minlength=n_bins)
    ace = float(np.abs(acc_s).sum() / N)
    del acc_c
    # error bound: fine bins that straddle an exact boundary j*N/M (j = 1..M-1)
    end = start + count
    j = np.arange(1, n_bins) * (N / n_bins)
    straddle = np.zeros_like(count, dtype=bool)
    idx = np.searchsorted(end, j, side="right")  # first fine bin whose end > boundary
    for b_, i in zip(j, idx, strict=True):
        if i < len(count) and start[i] < b_ < end[i]:
            straddle[i] = True
    bound = float(2.0 * count[straddle].sum() / N)
    return ace, bound


def compute_from_state(state: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every metric of a metric state (see the module docstring for the definitions).

    Parameters
    ----------
    state
        A mapping holding every field of :data:`segcal.metrics.state.FIELDS` (tensors or arrays)
        and ``n_images``: :meth:`CalibrationMetrics.state_dict` or a loaded state file.
    config
        The metric configuration (``n_bins``, ``average_classes``, ``per_image``); default:
        ``state["config"]``.

    Returns
    -------
    dict
        Floats, and NumPy arrays for per-class, per-image and reliability-curve data.

    Raises
    ------
    ValueError
        If no valid pixel was accumulated.
    """
    cfg = state["config"] if config is None else config
    M = int(cfg["n_bins"])
    avg = np.asarray(cfg["average_classes"])
    pb = _np(state["pooled_bins"])  # (M, 2, 2)
    totals = _np(state["pooled_totals"])
    N = float(totals[0])
    if N <= 0:
        raise ValueError("no valid pixels were accumulated (every pixel ignored or masked, or no update)")
    count = pb[:, :, 0].sum(1)
    sconf = pb[:, :, 1].sum(1)
    sacc = pb[:, 1, 0]
    main = bin_errors(count, sconf, sacc)
    out: dict[str, Any] = {
        "n_pixels": int(N),
        "n_images": int(state["n_images"]),
        "n_bins": M,
        "ece": float(main["ece"]),
        "mce": float(main["mce"]),
        "rmsce": float(main["rmsce"]),
        "ace_unweighted": float(main["unweighted"]),
    }
    ace, bound = _adaptive_ece(_np(state["fine"]), M)
    out["ace_adaptive"] = ace
    out["ace_adaptive_error_bound"] = bound
    # failure detection and smECE from the same fine histogram (segcal.metrics.failure / .smooth)
    out.update(histogram_failure(_np(state["fine"])))
    out["smece"], out["smece_sigma"] = histogram_smooth_ece(_np(state["fine"]))
    # correct / mispredicted split
    n_c, n_w = pb[:, 1, 0].sum(), pb[:, 0, 0].sum()
    out["ece_correct"] = float(np.abs(pb[:, 1, 0] - pb[:, 1, 1]).sum() / n_c) if n_c > 0 else float("nan")
    out["ece_mispredicted"] = float(pb[:, 0, 1].sum() / n_w) if n_w > 0 else float("nan")
    out["fraction_mispredicted"] = float(n_w / N)
    out["accuracy"] = float(n_c / N)
    out["mean_confidence"] = float(sconf.sum() / N)
    out["nll"] = float(totals[1] / N)
    out["brier"] = float(totals[2] / N)
    # class-wise ECE (Nixon) over averaged classes
    cw = _np(state["classwise"])
    ece_k = np.abs(cw[:, :, 2] - cw[:, :, 1]).sum(1) / N
    out["classwise_ece"] = float(ece_k[avg].mean())
    out["classwise_ece_per_class"] = ece_k
    bp = _np(state["by_pred"])
    out["sce_lts"] = float(np.abs(bp[:, :, 2] - bp[:, :, 1]).sum() / N)
    bl = _np(state["by_label"])
    nk = bl[:, :, 0].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ece_lbl = np.where(nk > 0, np.abs(bl[:, :, 2] - bl[:, :, 1]).sum(1) / np.maximum(nk, 1), 0.0)
    out["class_level_ece"] = float(ece_lbl[avg].mean())
    out["class_level_ece_per_class"] = ece_lbl
    # segmentation
    cm = _np(state["confusion"])
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    out["confusion_matrix"] = cm.astype(np.int64)
    out["iou_per_class"] = iou
    out["dice_per_class"] = dice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["miou"] = float(np.nanmean(iou[avg])) if np.isfinite(iou[avg]).any() else float("nan")
        out["mdice"] = float(np.nanmean(dice[avg])) if np.isfinite(dice[avg]).any() else float("nan")
    # reliability diagram data
    with np.errstate(invalid="ignore", divide="ignore"):
        out["reliability"] = {
            "edges": np.linspace(0.0, 1.0, M + 1),
            "count": count.astype(np.int64),
            "confidence": np.where(count > 0, sconf / np.maximum(count, 1), np.nan),
            "accuracy": np.where(count > 0, sacc / np.maximum(count, 1), np.nan),
        }
    # image-wise
    if cfg["per_image"]:
        ib, it, ic = (_np(state[name]) for name in ("img_bins", "img_totals", "img_class"))
        icount = ib[:, :, :, 0].sum(2)
        iconf = ib[:, :, :, 1].sum(2)
        iacc = ib[:, :, 1, 0]
        s = bin_errors(icount, iconf, iacc)
        n_img = it[:, 0]
        has = n_img > 0
        out["image_ece_values"] = np.where(has, s["ece"], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out["image_ece"] = float(np.nanmean(out["image_ece_values"])) if has.any() else float("nan")
            out["image_ece_std"] = float(np.nanstd(out["image_ece_values"])) if has.any() else float("nan")
            out["image_mce"] = float(np.nanmean(np.where(has, s["mce"], np.nan))) if has.any() else float("nan")
            ic_c = ib[:, :, 1, 0].sum(1)
            ic_w = ib[:, :, 0, 0].sum(1)
            e_c = np.where(ic_c > 0, np.abs(ib[:, :, 1, 0] - ib[:, :, 1, 1]).sum(1) / np.maximum(ic_c, 1), np.nan)
            e_w = np.where(ic_w > 0, ib[:, :, 0, 1].sum(1) / np.maximum(ic_w, 1), np.nan)
            out["image_ece_correct"] = float(np.nanmean(e_c)) if np.isfinite(e_c).any() else float("nan")
            out["image_ece_mispredicted"] = float(np.nanmean(e_w)) if np.isfinite(e_w).any() else float("nan")
            out["image_nll_values"] = np.where(has, it[:, 1] / np.maximum(n_img, 1), np.nan)
            out["image_pixels"] = n_img.astype(np.int64)
            lc, tpi, pc = ic[:, :, 0], ic[:, :, 1], ic[:, :, 2]
            den = lc + pc
            out["image_dice_per_class"] = np.where(den > 0, 2 * tpi / np.maximum(den, 1), np.nan)
            out["image_iou_per_class"] = np.where(den - tpi > 0, tpi / np.maximum(den - tpi, 1), np.nan)
        out.update(image_failure(ib, ic, avg))
    _blank_ignore_channel(out, cfg.get("ignore_index"), avg, cm.shape[0])
    return out


#: the per-class entries (last axis = classes) that are NaN for the ignore channel
PER_CLASS_KEYS = ("iou_per_class", "dice_per_class", "classwise_ece_per_class", "class_level_ece_per_class",
                  "image_iou_per_class", "image_dice_per_class")


def _blank_ignore_channel(out: dict[str, Any], ignore_index: Any, avg: np.ndarray, num_classes: int) -> None:
    """NaN in every per-class entry of the ignore channel (an ``ignore_index`` that is a channel
    index and not averaged): a class that is never labelled has no IoU, Dice or class ECE, and
    its computed 0 would change the mean of the list (the module docstring)."""
    if ignore_index is None or not 0 <= int(ignore_index) < num_classes or int(ignore_index) in set(avg.tolist()):
        return
    for key in PER_CLASS_KEYS:
        if key in out:
            values = np.array(out[key], dtype=np.float64)
            values[..., int(ignore_index)] = np.nan
            out[key] = values


__all__ = ["bin_errors", "compute_from_state", "ece_from_bins", "mce_from_bins"]
