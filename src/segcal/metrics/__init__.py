"""Streaming calibration and segmentation metrics (see :mod:`segcal.metrics.engine`)."""

from segcal.metrics.binning import bin_edges, bin_index

__all__ = ["bin_edges", "bin_index"]
