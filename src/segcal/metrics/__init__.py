"""Streaming calibration and segmentation metrics (see :mod:`segcal.metrics.engine`)."""

from segcal.io.files import to_jsonable
from segcal.metrics.binning import bin_edges, bin_index
from segcal.metrics.engine import (
    CalibrationMetrics,
    calibration_metrics,
    expected_calibration_error,
)
from segcal.metrics.failure import failure_detection
from segcal.metrics.regions import foreground_region_mask
from segcal.metrics.scores import bin_errors, compute_from_state, ece_from_bins, mce_from_bins

__all__ = [
    "CalibrationMetrics",
    "bin_edges",
    "bin_errors",
    "bin_index",
    "calibration_metrics",
    "compute_from_state",
    "ece_from_bins",
    "expected_calibration_error",
    "failure_detection",
    "foreground_region_mask",
    "mce_from_bins",
    "to_jsonable",
]
