"""ECE-guided checkpoint / model selection on unlabeled target data (§3.15(d)).

:func:`rank_by_estimated_ece` scores every candidate (checkpoint, model, calibrator ...) by its
mean estimated ECE over the unlabeled images and sorts them, lowest first.
:func:`ranking_agreement` reports how well an estimated ranking agrees with the true one where
labels exist (Spearman's rho and Kendall's tau-b, via :mod:`scipy.stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segcal.errors import InputError, missing_dependency
from segcal.estimation.baselines import estimate_images

__all__ = ["RankedCandidate", "rank_by_estimated_ece", "ranking_agreement"]


@dataclass
class RankedCandidate:
    name: str
    estimated_ece: float
    rank: int
    per_image: np.ndarray = field(repr=False)


def _split(out: Any) -> tuple[Any, Any]:
    if isinstance(out, tuple):
        if len(out) != 2:
            raise InputError("a candidate must return scores or (scores, features)")
        return out
    return out, None


def rank_by_estimated_ece(
    candidates: Mapping[str, Callable[[Any], Any] | Iterable[Any]],
    unlabeled_data: Iterable[Any] | None,
    estimator: Any,
    *,
    input_type: str = "logits",
) -> list[RankedCandidate]:
    """Rank candidates by mean estimated ECE on unlabeled data (lowest first).

    Parameters
    ----------
    candidates
        ``name -> f(batch)`` returning scores ``(N, C, H, W)`` or ``(scores, features)`` for one
        element of ``unlabeled_data``; or, with ``unlabeled_data=None``, ``name -> iterable`` of
        precomputed scores or ``(scores, features)`` batches.
    unlabeled_data
        Iterable of inputs (e.g. image batches); re-iterated once per candidate (pass a list).
    estimator
        An :class:`~segcal.estimation.value_net.ECEEstimator` or a
        :class:`~segcal.estimation.baselines.ConfidenceBaseline`.
    """
    if not candidates:
        raise InputError("candidates: nothing to rank")
    data = list(unlabeled_data) if unlabeled_data is not None else None
    scored: list[tuple[str, np.ndarray]] = []
    for name, cand in candidates.items():
        if data is not None:
            if not callable(cand):
                raise TypeError(f"candidate {name!r}: expected a callable when unlabeled_data is given")
            outs = (cand(b) for b in data)
        else:
            if callable(cand):
                raise TypeError(f"candidate {name!r}: unlabeled_data is needed to call it")
            outs = iter(cand)
        vals = []
        for out in outs:
            s, f = _split(out)
            vals.append(np.atleast_1d(estimate_images(estimator, s, f, input_type=input_type)))
        if not vals:
            raise InputError(f"candidate {name!r}: no unlabeled data")
        scored.append((name, np.concatenate(vals)))
    order = sorted(scored, key=lambda t: (float(np.mean(t[1])), t[0]))
    return [RankedCandidate(n, float(np.mean(v)), i + 1, v) for i, (n, v) in enumerate(order)]


def ranking_agreement(
    estimated: Sequence[float] | Mapping[str, float] | Sequence[RankedCandidate],
    true: Sequence[float] | Mapping[str, float],
) -> dict[str, float]:
    """Spearman and Kendall (tau-b) correlation between estimated and true values.

    Dicts are matched by key (they must hold the same keys); sequences by position. Returns
    ``spearman``, ``spearman_p``, ``kendall``, ``kendall_p``, ``n`` and whether the top choice
    agrees (``top1_agree``: the lowest estimated is also the lowest true value).
    """
    try:
        from scipy import stats
    except ImportError as exc:
        raise missing_dependency("scipy", "stats", "ranking_agreement (Spearman / Kendall p-values)") from exc

    if isinstance(estimated, Sequence) and estimated and isinstance(estimated[0], RankedCandidate):
        estimated = {c.name: c.estimated_ece for c in estimated}
    if isinstance(estimated, Mapping) != isinstance(true, Mapping):
        raise TypeError("estimated and true: pass two mappings or two sequences")
    if isinstance(estimated, Mapping):
        if set(estimated) != set(true):
            raise InputError(f"estimated/true: keys differ: {sorted(set(estimated) ^ set(true))}")
        keys = sorted(estimated)
        e = np.array([float(estimated[k]) for k in keys])
        t = np.array([float(true[k]) for k in keys])
    else:
        e = np.asarray(estimated, dtype=float)
        t = np.asarray(true, dtype=float)
    if e.shape != t.shape or e.ndim != 1:
        raise InputError(f"estimated/true: shapes differ {e.shape} vs {t.shape}")
    if e.size < 2:
        raise InputError("ranking_agreement: need at least 2 candidates")
    rho = stats.spearmanr(e, t)
    tau = stats.kendalltau(e, t)
    return {
        "spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
        "kendall": float(tau.statistic), "kendall_p": float(tau.pvalue), "n": int(e.size),
        "top1_agree": bool(np.argmin(e) == np.argmin(t)),
    }
