"""Source-free domain adaptation guided by estimated calibration (Cal-SFDA; methods.md §3.15).

* :mod:`~segcal.adaptation.losses` -- symmetric CE with class weights, negative learning and the
  (optional) entropy term of §3.15(h);
* :mod:`~segcal.adaptation.bn` -- BN-module train mode, BN-only parameter selection, TENT;
* :mod:`~segcal.adaptation.loop` -- :func:`adapt` (``"calsfda"``, ``"tent"``, ``"selftrain"``):
  the training loop and the pseudo-labels of each round;
* :mod:`~segcal.adaptation.target` -- the unlabeled target images (listing, subsets, batches);
* :mod:`~segcal.adaptation.estimates` -- per-image ECE estimates of a model on target images;
* :mod:`~segcal.adaptation.checkpoints` -- per-epoch checkpoints, the JSON log, checkpoint
  selection and loading an adapted model back;
* :mod:`~segcal.adaptation.sync_bn`, :mod:`~segcal.adaptation.distributed`,
  :mod:`~segcal.adaptation.rounds` -- the same run on several ``torchrun`` processes: BatchNorm
  statistics over every rank, each rank's rows of a batch, the gathers and sums, the sharded
  pseudo-labels of a round;
* :mod:`~segcal.adaptation.source` -- source training with ``CE + alpha · class-level ECE``
  (§3.15(c)) and source checkpoint selection by ECE (§3.15(d)).

Layered on :mod:`segcal.estimation`, :mod:`segcal.models`, :mod:`segcal.losses` and the dataset
readers; corruptions come in through arguments.
"""

from segcal.adaptation.bn import (
    bn_parameters,
    bn_train_mode,
    mean_entropy,
    set_trainable,
    tent_step,
)
from segcal.adaptation.checkpoints import CHECKPOINT_FORMAT, LOG_NAME, load_adapted, load_checkpoint
from segcal.adaptation.estimates import estimate_target_ece
from segcal.adaptation.loop import METHODS, AdaptConfig, AdaptResult, adapt
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
from segcal.adaptation.target import quick_subset, resolve_target_images

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOG_NAME",
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
    "quick_subset",
    "resolve_target_images",
    "reverse_ce",
    "select_source_checkpoint",
    "set_trainable",
    "source_loss",
    "source_train_epoch",
    "symmetric_ce",
    "tent_step",
]
