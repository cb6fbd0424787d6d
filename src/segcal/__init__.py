"""segcal: post-hoc calibration of semantic segmentation models.

Layers (data flows one way, lower layers never import upper ones)::

    io -> metrics -> calibrators -> estimation -> pipeline / cli / report

Models (``segcal.models``) and covariate-shift corruptions (``segcal.shift``) are used by the
pipeline only.
"""

from __future__ import annotations

from segcal.version import __version__

__all__ = ["__version__", "load"]


def load(path, map_location="cpu"):
    """Load a calibrator saved with ``Calibrator.save`` (see :mod:`segcal.calibrators`)."""
    from segcal.calibrators import load as _load

    return _load(path, map_location=map_location)
