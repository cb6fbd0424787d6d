"""Streaming calibration and segmentation metrics (see :mod:`segcal.metrics.engine`)."""

from segcal.metrics.binning import bin_edges, bin_index
from segcal.metrics.engine import (
    CalibrationMetrics,
    calibration_metrics,
    expected_calibration_error,
    to_jsonable,
)
from segcal.metrics.regions import foreground_region_mask

__all__ = [
    "CalibrationMetrics",
    "bin_edges",
    "bin_index",
    "calibration_metrics",
    "expected_calibration_error",
    "foreground_region_mask",
    "to_jsonable",
]
