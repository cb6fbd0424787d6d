"""Source-free domain adaptation guided by estimated calibration (Cal-SFDA; methods.md §3.15).

* :mod:`~segcal.adaptation.losses` -- symmetric CE with class weights, negative learning and the
  (optional) entropy term of §3.15(h);
* :mod:`~segcal.adaptation.bn` -- BN-module train mode, BN-only parameter selection, TENT;
* :mod:`~segcal.adaptation.loop` -- :func:`adapt` (``"calsfda"``, ``"tent"``, ``"selftrain"``),
  per-epoch checkpoints, the JSON log and checkpoint selection;
* :mod:`~segcal.adaptation.source` -- source training with ``CE + alpha · class-level ECE``
  (§3.15(c)) and source checkpoint selection by ECE (§3.15(d)).

Layered on :mod:`segcal.estimation` and :mod:`segcal.losses`; models, datasets and corruptions
come in through arguments (the loop imports the dataset readers lazily to list image files).
"""

from segcal.adaptation.bn import (
    bn_parameters,
    bn_train_mode,
    mean_entropy,
    set_trainable,
    tent_step,
)
from segcal.adaptation.loop import (
    METHODS,
    AdaptConfig,
    AdaptResult,
    adapt,
    estimate_target_ece,
    load_adapted,
    load_checkpoint,
    resolve_target_images,
)
from segcal.adaptation.losses import (
    CalSFDALoss,
    class_weights,
    entropy_term,
    negative_labels,
    negative_learning_loss,
    reverse_ce,
    symmetric_ce,
)
from segcal.adaptation.source import (
    evaluate_source_ece,
    select_source_checkpoint,
    source_loss,
    source_train_epoch,
)

__all__ = [
    "METHODS",
    "AdaptConfig",
    "AdaptResult",
    "CalSFDALoss",
    "adapt",
    "bn_parameters",
    "bn_train_mode",
    "class_weights",
    "entropy_term",
    "estimate_target_ece",
    "evaluate_source_ece",
    "load_adapted",
    "load_checkpoint",
    "mean_entropy",
    "negative_labels",
    "negative_learning_loss",
    "resolve_target_images",
    "reverse_ce",
    "select_source_checkpoint",
    "set_trainable",
    "source_loss",
    "source_train_epoch",
    "symmetric_ce",
    "tent_step",
]
