"""The label-free estimator part of ``segcal bench --shift-calibration`` (issue 17).

The logits-input value net (:class:`~segcal.estimation.ECEEstimator`, ``C + 3`` pooled maps of
:func:`~segcal.estimation.logit_features`) is trained on clean val only or on clean val plus
perturbed copies, and compared with the max-prob / entropy baselines on held-out sets: MAE, bias
and Spearman rank correlation of estimated vs true per-image ECE. The truth is the per-image
top-label ECE with 15 bins, void excluded, on every valid pixel
(:func:`~segcal.estimation.ece_targets`, ``kind="image"``) of the uncalibrated model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segcal.bench.protocol import ImageData
from segcal.bench.spec import CAMVID_IGNORE, IN_DOMAIN
from segcal.estimation import (
    ConfidenceBaseline,
    ECEEstimator,
    ece_targets,
    logit_features,
    ranking_agreement,
)


def estimator_data(imgs: Sequence[ImageData]) -> tuple[torch.Tensor, np.ndarray]:
    """Logits-input features ``(N, C + 3, 15, 20)`` and the true per-image ECE (15 bins, void excluded)."""
    xs, ys = [], []
    for im in imgs:
        z = torch.from_numpy(np.asarray(im.logits, dtype=np.float32))[None]
        xs.append(logit_features(z))
        ys.append(float(ece_targets(z, torch.from_numpy(im.labels.astype(np.int64))[None], kind="image",
                                    n_bins=15, ignore_index=CAMVID_IGNORE)[0]))
    return torch.cat(xs), np.asarray(ys)


def agreement(est: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAE, bias and Spearman rank correlation of estimated vs true per-image ECE."""
    rank = ranking_agreement(est, true) if len(true) > 2 else {"spearman": float("nan")}
    return {"mae": float(np.mean(np.abs(est - true))), "bias": float(np.mean(est - true)),
            "spearman": float(rank["spearman"]), "mean_estimate": float(np.mean(est)),
            "mean_true": float(np.mean(true)), "n_images": len(true)}


def fit_estimator(x: torch.Tensor, y: np.ndarray, num_classes: int, seed: int = 0) -> ECEEstimator:
    est = ECEEstimator(num_classes + 3, input_kind="logits", num_classes=num_classes,
                       meta={"model": IN_DOMAIN, "target": "image ECE (15 bins)"})
    return est.fit(x, torch.from_numpy(y).float(), seed=seed)


def estimate_all(ests: Mapping[str, Any], x: torch.Tensor, z_imgs: Sequence[ImageData],
                 y: np.ndarray) -> dict[str, Any]:
    """Every estimator and baseline on one held-out set."""
    out = {name: agreement(e.predict(x), y) for name, e in ests.items()}
    for b in ("maxprob", "entropy"):
        est = np.concatenate([ConfidenceBaseline(b).predict_scores(np.asarray(im.logits, dtype=np.float32)[None])
                              for im in z_imgs])
        out[b] = agreement(est, y)
    return out


__all__ = ["agreement", "estimate_all", "estimator_data", "fit_estimator"]
