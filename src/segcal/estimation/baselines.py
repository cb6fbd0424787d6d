"""Label-free ECE baselines and the common estimation entry point.

Two baselines that need no training and no features:

* ``"maxprob"`` -- ``1 - mean_i max_k p_ik`` (the ECE of an image whose pixels were all wrong
  would be its mean confidence; this is the "confidence gap" proxy);
* ``"entropy"`` -- the mean normalised entropy ``-Σ_k p_k log p_k / log C``.

:func:`estimate_images` is the one call shared by :class:`~segcal.estimation.value_net.ECEEstimator`
and the baselines: scores ``(N, C, H, W)`` and/or feature maps in, per-image estimates out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segcal.errors import InputError
from segcal.estimation.features import image_confidence_stats

__all__ = ["BASELINES", "ConfidenceBaseline", "estimate_images"]

BASELINES = ("maxprob", "entropy")


class ConfidenceBaseline:
    """A training-free ECE estimate from the scores alone (``kind`` in :data:`BASELINES`)."""

    input_kind = "scores"
    num_classes = None

    def __init__(self, kind: str = "maxprob") -> None:
        if kind not in BASELINES:
            raise InputError(f"baseline: expected one of {', '.join(BASELINES)}, got {kind!r}")
        self.kind = kind

    def __repr__(self) -> str:
        return f"ConfidenceBaseline({self.kind!r})"

    def predict_scores(self, scores: Any, input_type: str = "logits") -> np.ndarray:
        st = image_confidence_stats(scores, input_type)
        return 1.0 - st["mean_maxprob"] if self.kind == "maxprob" else st["mean_entropy"]


def estimate_images(
    estimator: Any, scores: Any = None, features: Any = None, *, input_type: str = "logits"
) -> np.ndarray:
    """Per-image ECE estimates ``(N,)`` from ``scores`` and/or ``features``.

    A features-trained :class:`ECEEstimator` needs ``features``; a logits-trained one and the
    baselines need ``scores``.
    """
    kind = getattr(estimator, "input_kind", None)
    if kind == "scores":
        if scores is None:
            raise InputError(f"{estimator!r} needs the predictions (scores)")
        return estimator.predict_scores(scores, input_type)
    if kind == "features":
        if features is None:
            raise InputError("this estimator was trained on features: pass the feature maps (--features DIR)")
        return estimator.predict(features)
    if kind == "logits":
        if scores is None:
            raise InputError("this estimator needs the predictions (scores)")
        return estimator.predict(estimator.inputs_from_scores(scores, input_type))
    raise TypeError(f"estimator: unsupported object {type(estimator).__name__}")
