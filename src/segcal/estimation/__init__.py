"""Calibration without labels (Cal-SFDA components; ``../shared/methods.md`` §3.15).

* :mod:`~segcal.estimation.features` -- hooked feature maps of any ``nn.Module`` and a logits-only
  input builder;
* :mod:`~segcal.estimation.value_net` -- :class:`ECEEstimator` (the value net), its targets and
  BatchNorm warm-up on unlabeled target data;
* :mod:`~segcal.estimation.baselines` -- the label-free baselines (``1 - mean max-prob``, mean
  normalised entropy) and :func:`estimate_images`;
* :mod:`~segcal.estimation.selection` -- ECE-guided checkpoint/model ranking and its agreement
  with the true ranking;
* :mod:`~segcal.estimation.pseudolabels` -- ECE-weighted class-balanced pseudo-labels;
* :mod:`~segcal.estimation.target_adaptive` -- target-adaptive recalibration without target labels
  (PseudoCal, ECE-estimate search).

This package sits above :mod:`segcal.losses`/:mod:`segcal.io`; it does not import the pipeline or
the CLI.
"""

from segcal.estimation.baselines import BASELINES, ConfidenceBaseline, estimate_images
from segcal.estimation.features import FeatureExtractor, logit_features
from segcal.estimation.pseudolabels import (
    class_thresholds,
    maxprob_pseudo_labels,
    maxprob_threshold_for_coverage,
    proportion_schedule,
    pseudo_label,
)
from segcal.estimation.selection import rank_by_estimated_ece, ranking_agreement
from segcal.estimation.target_adaptive import adapt_to_target
from segcal.estimation.value_net import ECEEstimator, ece_targets, warmup_bn

__all__ = [
    "BASELINES",
    "ConfidenceBaseline",
    "ECEEstimator",
    "FeatureExtractor",
    "adapt_to_target",
    "class_thresholds",
    "ece_targets",
    "estimate_images",
    "logit_features",
    "maxprob_pseudo_labels",
    "maxprob_threshold_for_coverage",
    "proportion_schedule",
    "pseudo_label",
    "rank_by_estimated_ece",
    "ranking_agreement",
    "warmup_bn",
]


def load_estimator(path_or_baseline: str):
    """An :class:`ECEEstimator` file, or a baseline name (``"maxprob"``, ``"entropy"``)."""
    if path_or_baseline in BASELINES:
        return ConfidenceBaseline(path_or_baseline)
    return ECEEstimator.load(path_or_baseline)
