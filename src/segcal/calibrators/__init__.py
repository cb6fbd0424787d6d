"""Calibrators: one contract, one fitting loop, one registry (``../shared/methods.md`` §1-§3).

``create("ts")`` builds a calibrator by name or alias, ``available()`` lists them with their
declared properties, ``load(path)`` reads one saved with ``Calibrator.save``,
``check_calibrator(cal)`` checks any calibrator (a user's own subclass too) against its declared
properties (:mod:`segcal.calibrators.checks`).
"""

from segcal.calibrators.affine import (
    DirichletCalibration,
    MatrixScaling,
    TIMatrixScaling,
    VectorScaling,
)
from segcal.calibrators.base import Calibrator, NotFittedError
from segcal.calibrators.binning import HistogramBinning, IsotonicCalibration
from segcal.calibrators.checks import CalibratorCheckError, check_calibrator
from segcal.calibrators.class_conditional import (
    ArgmaxPreservingCMS,
    ClassConditionalDirichlet,
    OrderPreservingCMS,
)
from segcal.calibrators.data import Batch, FolderBatches
from segcal.calibrators.ensemble import EnsembleTemperatureScaling
from segcal.calibrators.local_temperature import (
    ImageBasedTemperatureScaling,
    LocalTemperatureScaling,
    LocalTemperatureScalingTI,
)
from segcal.calibrators.metacal import MetaCalScaling
from segcal.calibrators.objectives import get_objective
from segcal.calibrators.registry import available, create, load, register, resolve
from segcal.calibrators.selective import SelectiveScaling, ece_vs_selector_accuracy
from segcal.calibrators.shift_aware import ShiftConditionedTemperature
from segcal.calibrators.target_corrected import TargetCorrected
from segcal.calibrators.temperature import TemperatureScaling
from segcal.calibrators.wrappers import MatrixScalingTI, VectorScalingTI, translation_invariant

__all__ = [
    "ArgmaxPreservingCMS",
    "Batch",
    "Calibrator",
    "CalibratorCheckError",
    "ClassConditionalDirichlet",
    "DirichletCalibration",
    "EnsembleTemperatureScaling",
    "FolderBatches",
    "HistogramBinning",
    "ImageBasedTemperatureScaling",
    "IsotonicCalibration",
    "LocalTemperatureScaling",
    "LocalTemperatureScalingTI",
    "MatrixScaling",
    "MatrixScalingTI",
    "MetaCalScaling",
    "NotFittedError",
    "OrderPreservingCMS",
    "SelectiveScaling",
    "ShiftConditionedTemperature",
    "TIMatrixScaling",
    "TargetCorrected",
    "TemperatureScaling",
    "VectorScaling",
    "VectorScalingTI",
    "available",
    "check_calibrator",
    "create",
    "ece_vs_selector_accuracy",
    "get_objective",
    "load",
    "register",
    "resolve",
    "translation_invariant",
]
