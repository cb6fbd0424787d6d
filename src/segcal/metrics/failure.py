"""Failure detection: risk-coverage curves, AURC, E-AURC, AUGRC, risk at coverage, AUROC / AUPR.

Two entry points share one computation on *groups* (pixels or images of equal rank, most confident
first: a count ``n_j`` and a risk sum ``r_j`` per group):

:func:`histogram_failure`
    Pixels, from the fine histogram of the metric state (:mod:`segcal.metrics.state`, field
    ``"fine"``: count, sum of confidences, sum of correctness per bin of
    ``u = -log(1 - conf) / 36.84``). The risk of a pixel is its error ``1 - a_i``. Mergeable and
    distributed like every state; ``O(fine_bins)`` NumPy at compute time, nothing at update time.
:func:`failure_detection`
    Any 1-D arrays ``scores`` (higher = more trustworthy) and ``risks`` (e.g. per-image error rate
    or ``1 - Dice``), exact (sort-based); used for image-level failure detection.

Definitions (``N`` units sorted by decreasing score; ``R_k`` = sum of the risks of the first ``k``):

``aurc``
    Area under the risk-coverage curve, the discrete form of Geifman & El-Yaniv (2017):
    ``(1/N) sum_{k=1}^{N} R_k / k`` (selective risk averaged over the coverages ``k/N``).
``eaurc``
    Excess AURC: ``aurc`` minus the AURC of the optimal ranking (units sorted by increasing risk,
    the same discrete sum; for pixels: every correct pixel before every error).
``augrc``
    Area under the generalized risk-coverage curve (Traub et al., "Overcoming common flaws in the
    evaluation of selective classification systems", NeurIPS 2024): the generalized risk is the
    joint probability of a failure and its acceptance, ``R_k / N``; ``augrc = (1/N) sum_k R_k / N``.
``risk_at_coverage_P``
    Selective risk ``R_k / k`` of the ``k = ceil(P N / 100)`` most confident units, for ``P`` in
    :data:`COVERAGES` (50, 80, 90, 95 %).
``failure_auroc`` / ``failure_aupr``
    Errors are the positives and low confidence is the detection score: AUROC =
    ``P(conf_error < conf_correct) + P(tie) / 2`` (Mann-Whitney), AUPR = average precision (the
    mean over errors of the precision among the pixels at most as confident as that error).

Ties. Units of one group (pixels of one fine bin, or images with equal scores) are taken in a
uniformly random order and every value is its *expected* value over that order: the standard
tie handling of AUROC (scikit-learn's ``roc_auc_score``). The expectations are exact, in closed
form with harmonic numbers: within a group of ``n`` units, ``r`` risk, after ``S`` units and
``R`` risk, the expected cumulative risk after ``t`` of its units is ``R + t r / n``.

Bound on the histogram's ties (``*_tie_bound``). The exact sort-based value orders the pixels of a
fine bin by their confidences; the histogram does not know that order. For binary risks every
value is a sum over groups, and within a group the number of errors among its first ``t`` pixels
lies between ``max(0, t - c)`` and ``min(e, t)`` (``e`` errors, ``c`` correct), both attained
together by the orders "correct first" and "errors first". Since each bin's order is free, the
total deviation from the expectation lies between the sums over bins of the two one-sided
deviations; the bound is the larger of the two sums (attained by one order), so ``|value - exact| <= value_tie_bound`` for
*every* order of the pixels inside the bins (in closed form: AUROC ``sum_j e_j c_j / (2 E C)``,
AUGRC ``sum_j e_j c_j / (2 N^2)``; AURC and AUPR with harmonic numbers). A bin whose pixels share
one confidence contributes no deviation in fact (those are real ties), so the bound is conservative
there. The fine histogram's bins are ``36.84 (1 - c) / fine_bins`` wide in confidence
(``5.6e-4 (1 - c)`` for the default 65,536 bins: 2.8e-4 at ``c = 0.5``, 5.6e-5 at ``c = 0.9``),
which makes the bounds small (``docs/metrics.md`` reports them on CamVid).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segcal.errors import InputError
from segcal.validation import as_tensor

#: the coverages (in %) of ``risk_at_coverage_P``
COVERAGES: tuple[int, ...] = (50, 80, 90, 95)
#: the coverages (in %) of the risk-coverage curve (``risk_coverage``)
CURVE_PERCENTS = np.arange(1, 101)

_EULER = 0.57721566490153286061
_SMALL = 64
_H_TABLE = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, _SMALL + 1))])


def harmonic(x: np.ndarray) -> np.ndarray:
    """Harmonic numbers ``H(x) = sum_{t=1}^{x} 1/t`` of non-negative integers (float64 array).

    A table below 64, the asymptotic series (error below 1e-17) above.
    """
    x = np.asarray(x, dtype=np.float64)
    small = x < _SMALL
    xs = np.where(small, _SMALL, x)
    inv2 = 1.0 / (xs * xs)
    big = np.log(xs) + _EULER + 0.5 / xs - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252))
    return np.where(small, _H_TABLE[np.clip(x, 0, _SMALL).astype(np.int64)], big)


def harmonic_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``H(b) - H(a) = sum_{t=a+1}^{b} 1/t`` for integers ``0 <= a <= b``, without cancellation
    for large ``a`` (``log1p`` and the differences of the series' terms)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    large = a >= _SMALL
    al = np.where(large, a, _SMALL)
    bl = np.where(large, b, _SMALL)
    d = bl - al
    far = (np.log1p(d / al) - d / (2 * al * bl) + d * (al + bl) / (12 * al * al * bl * bl)
           + (1 / bl**4 - 1 / al**4) / 120 - (1 / bl**6 - 1 / al**6) / 252)
    return np.where(large, far, harmonic(b) - harmonic(a))


def _sum_over_rank(S: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``sum_{t=1}^{n} t / (S + t) = n - S (H(S + n) - H(S))``."""
    return n - S * harmonic_diff(S, S + n)


def group_values(n: np.ndarray, r: np.ndarray, binary: bool) -> dict[str, Any]:
    """Every risk-coverage value of groups ordered from the most to the least trustworthy.

    ``n``: units per group (> 0), ``r``: risk sum per group; ``binary``: risks are 0/1 (then
    ``r`` is an error count and tie bounds are returned).
    """
    N = float(n.sum())
    S = np.cumsum(n) - n  # units before the group
    R = np.cumsum(r) - r  # risk before the group
    # expected sum over the group's positions of (R + t r / n) / (S + t)
    per = R * harmonic_diff(S, S + n) + r / n * _sum_over_rank(S, n)
    out: dict[str, Any] = {"aurc": float(per.sum() / N)}
    out["augrc"] = float((n * R + r * (n + 1) / 2).sum() / (N * N))
    if binary:
        e, c = r, n - r
        first = e - S * harmonic_diff(S, S + e) + e * harmonic_diff(S + e, S + n)  # errors first
        last = e - (S + c) * harmonic_diff(S + c, S + n)  # errors last
        mean = r / n * _sum_over_rank(S, n)
        # every group's order is free: the total deviation lies in [-sum(mean - last), sum(first - mean)]
        out["aurc_tie_bound"] = float(max((first - mean).sum(), (mean - last).sum(), 0.0) / N)
        out["augrc_tie_bound"] = float((e * c).sum() / (2 * N * N))
    # risk at fixed coverages, and the curve
    end = S + n

    def at(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        j = np.searchsorted(end, k, side="left")  # group holding position k
        t = k - S[j]
        risk = (R[j] + t * r[j] / n[j]) / k
        if not binary:
            return risk, np.zeros_like(risk)
        e_, c_ = r[j], n[j] - r[j]
        up = np.minimum(e_, t) - t * e_ / n[j]
        down = t * e_ / n[j] - np.maximum(0.0, t - c_)
        return risk, np.maximum(np.maximum(up, down), 0) / k

    pct = np.asarray(COVERAGES, dtype=np.int64)
    Ni = round(N)
    k = np.maximum(-(-pct * Ni // 100), 1).astype(np.float64)
    risk, bound = at(k)
    for p, v in zip(COVERAGES, risk, strict=True):
        out[f"risk_at_coverage_{p}"] = float(v)
    if binary:
        out["risk_at_coverage_tie_bound"] = float(bound.max())
    kc = np.maximum(-(-CURVE_PERCENTS * Ni // 100), 1).astype(np.float64)
    rc, _ = at(kc)
    out["risk_coverage"] = {"coverage": kc / N, "risk": rc, "generalized_risk": rc * kc / N}
    return out


def _optimal_aurc(risks_sorted_ascending: np.ndarray) -> float:
    """The discrete AURC of units taken in increasing risk (the optimal ranking)."""
    x = np.asarray(risks_sorted_ascending, dtype=np.float64)
    k = np.arange(1, len(x) + 1, dtype=np.float64)
    return float((np.cumsum(x) / k).mean())


def error_detection(e: np.ndarray, c: np.ndarray) -> dict[str, float]:
    """AUROC and AUPR of errors (positives) against low confidence, groups most confident first."""
    E, C = float(e.sum()), float(c.sum())
    nan = float("nan")
    if E <= 0 or C <= 0:
        return {"failure_auroc": nan, "failure_aupr": nan, "failure_auroc_tie_bound": nan,
                "failure_aupr_tie_bound": nan}
    c_above = np.cumsum(c) - c
    auroc = float((e * (c_above + 0.5 * c)).sum() / (E * C))
    # average precision, least confident first
    e_r, c_r = e[::-1], c[::-1]
    n_r = e_r + c_r
    S = np.cumsum(n_r) - n_r
    Ep = np.cumsum(e_r) - e_r
    a = np.where(n_r > 1, (e_r - 1) / np.maximum(n_r - 1, 1), 0.0)
    expv = e_r / n_r * ((Ep + 1 - a - a * S) * harmonic_diff(S, S + n_r) + a * n_r)
    hi = e_r - (S - Ep) * harmonic_diff(S, S + e_r)
    lo = e_r - (S + c_r - Ep) * harmonic_diff(S + c_r, S + n_r)
    ap_bound = max((hi - expv).sum(), (expv - lo).sum(), 0.0)
    return {
        "failure_auroc": auroc,
        "failure_aupr": float(expv.sum() / E),
        "failure_auroc_tie_bound": float((e * c).sum() / (2 * E * C)),
        "failure_aupr_tie_bound": float(ap_bound / E),
    }


def histogram_failure(fine: Any) -> dict[str, Any]:
    """Pixel failure-detection metrics of a fine histogram (see the module docstring).

    Parameters
    ----------
    fine
        ``(fine_bins, 3)`` array: per bin of ``u = -log(1 - conf) / 36.84`` the pixel count, the
        sum of confidences and the sum of correctness (the ``"fine"`` field of a metric state).

    Returns
    -------
    dict
        ``aurc``, ``eaurc``, ``augrc``, ``risk_at_coverage_P`` (P in :data:`COVERAGES`),
        ``failure_auroc``, ``failure_aupr``, the ``*_tie_bound`` of each (``eaurc``'s is
        ``aurc_tie_bound``: the optimal AURC has no ties), and ``risk_coverage``: the curve at
        coverages 1 %, ..., 100 % (``coverage``, selective ``risk``, ``generalized_risk``).
        NaN values when there are no pixels.
    """
    f = np.asarray(fine, dtype=np.float64)
    n_all, acc_all = f[:, 0], f[:, 2]
    keep = n_all > 0
    n = n_all[keep][::-1]  # most confident (largest u) first
    corr = acc_all[keep][::-1]
    e = np.clip(n - corr, 0, None)
    if n.size == 0:
        return {}
    out = group_values(n, e, binary=True)
    N, E = float(n.sum()), float(e.sum())
    Cn = N - E
    opt = group_values(np.array([Cn, E])[[Cn > 0, E > 0]], np.array([0.0, E])[[Cn > 0, E > 0]], binary=False)
    out["eaurc"] = out["aurc"] - opt["aurc"]
    out.update(error_detection(e, n - e))
    return out


def _vector(x: Any, name: str) -> np.ndarray:
    a = as_tensor(x, name).detach().cpu().to(dtype=torch.float64).numpy()
    if a.ndim != 1:
        raise InputError(f"{name}: expected a 1-D array (one value per image), got shape {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise InputError(f"{name}: holds {int((~np.isfinite(a)).sum())} non-finite values, expected finite values")
    return a


def failure_detection(scores: Any, risks: Any, *, failure_threshold: float | None = None) -> dict[str, Any]:
    """Failure-detection metrics of per-unit scores against per-unit risks (exact, sort-based).

    Parameters
    ----------
    scores
        1-D array, one score per unit (image, volume); higher = more trustworthy (accepted first),
        e.g. the mean confidence, or minus an estimated ECE (``segcal.estimation``).
    risks
        1-D array of the same length: the risk of each unit (e.g. its pixel error rate, or
        ``1 - Dice``); any finite values (AURC / AUGRC are means of them).
    failure_threshold
        If given, a unit with ``risk > failure_threshold`` is a failure, and ``failure_auroc`` /
        ``failure_aupr`` (failures as positives, low score as detector) are returned too.

    Returns
    -------
    dict
        ``n``, ``aurc``, ``eaurc``, ``augrc``, ``risk_at_coverage_P`` (P in :data:`COVERAGES`),
        ``risk_coverage`` (see :func:`histogram_failure`), and with ``failure_threshold`` the two
        detection values. Units with equal scores are taken in a random order (expected values,
        as scikit-learn's AUROC); with distinct scores every value is the exact sort-based one.

    Raises
    ------
    InputError
        If the arrays are not 1-D, differ in length, are empty or hold non-finite values.
    """
    s = _vector(scores, "scores")
    r = _vector(risks, "risks")
    if s.shape != r.shape:
        raise InputError(f"risks: has {r.size} values, expected one per score ({s.size})")
    if s.size == 0:
        raise InputError("scores: is empty, expected at least one unit")
    uniq, inv = np.unique(-s, return_inverse=True)  # ascending -score = most trustworthy first
    n = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    rs = np.bincount(inv, weights=r, minlength=len(uniq))
    out: dict[str, Any] = {"n": int(s.size)}
    out.update(group_values(n, rs, binary=False))
    out["eaurc"] = out["aurc"] - _optimal_aurc(np.sort(r))
    if failure_threshold is not None:
        fail = (r > float(failure_threshold)).astype(np.float64)
        e = np.bincount(inv, weights=fail, minlength=len(uniq))
        det = error_detection(e, n - e)
        out["failure_auroc"] = det["failure_auroc"]
        out["failure_aupr"] = det["failure_aupr"]
    return out


def image_failure(img_bins: Any, img_class: Any, average_classes: Any) -> dict[str, Any]:
    """Image-level failure detection from the per-image rows of a metric state.

    Parameters
    ----------
    img_bins
        ``(n_images, M, 2, 2)``: top-label bins x [wrong, correct] x [count, sum conf] per image.
    img_class
        ``(n_images, C, 3)``: [label count, true positives, prediction count] per image and class.
    average_classes
        The classes averaged in the image Dice.

    Returns
    -------
    dict
        ``image_error_rate_values``, ``image_dice_values`` (mean Dice over the averaged classes
        present in the label or the prediction), ``image_mean_confidence_values``,
        ``image_low_confidence_fraction_values`` (fraction of pixels with confidence
        ``<= image_low_confidence_threshold = ceil(M / 2) / M``, a bin edge) -- NaN for images
        without valid pixels -- and ``image_failure``: for each risk (``error_rate``,
        ``one_minus_dice``) and each score (``mean_confidence``, ``low_confidence_fraction``:
        ranked by ``1 -`` the fraction) the :func:`failure_detection` values ``aurc``, ``eaurc``,
        ``augrc``, ``risk_at_coverage_P`` over the images that have the risk.
    """
    ib = np.asarray(img_bins, dtype=np.float64)
    ic = np.asarray(img_class, dtype=np.float64)
    M = ib.shape[1]
    count = ib[:, :, :, 0].sum((1, 2))
    has = count > 0
    den = np.maximum(count, 1)
    low_bins = -(-M // 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(has, ib[:, :, 0, 0].sum(1) / den, np.nan)
        conf = np.where(has, ib[:, :, :, 1].sum((1, 2)) / den, np.nan)
        low = np.where(has, ib[:, :low_bins, :, 0].sum((1, 2)) / den, np.nan)
        tp = ic[:, :, 1]
        d = ic[:, :, 0] + ic[:, :, 2]
        dice = np.where(d > 0, 2 * tp / np.maximum(d, 1), np.nan)[:, np.asarray(average_classes)]
        n_cls = np.isfinite(dice).sum(1)
        img_dice = np.where(has & (n_cls > 0), np.nansum(dice, 1) / np.maximum(n_cls, 1), np.nan)
    out: dict[str, Any] = {
        "image_error_rate_values": err,
        "image_dice_values": img_dice,
        "image_mean_confidence_values": conf,
        "image_low_confidence_fraction_values": low,
        "image_low_confidence_threshold": low_bins / M,
    }
    table: dict[str, dict[str, Any]] = {}
    for risk_name, risk in (("error_rate", err), ("one_minus_dice", 1 - img_dice)):
        ok = np.isfinite(risk)
        table[risk_name] = {}
        for score_name, score in (("mean_confidence", conf), ("low_confidence_fraction", 1 - low)):
            if not ok.any():
                table[risk_name][score_name] = {}
                continue
            res = failure_detection(score[ok], risk[ok])
            res.pop("risk_coverage")
            table[risk_name][score_name] = res
    out["image_failure"] = table
    return out


__all__ = ["COVERAGES", "error_detection", "failure_detection", "group_values", "harmonic", "harmonic_diff", "histogram_failure", "image_failure"]
