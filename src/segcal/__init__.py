"""segcal: post-hoc calibration of semantic segmentation models.

``import segcal`` is light (no torch): :func:`load` (a calibrator saved with
``Calibrator.save``) and :class:`CalibratedModel` (a network and its calibrator as one exportable
module) are looked up on first use (PEP 562). The layers
of the package and what each owns are described in ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any

from segcal.version import __version__

__all__ = ["CalibratedModel", "__version__", "load"]


def __getattr__(name: str) -> Any:
    """``segcal.load`` (:func:`segcal.calibrators.load`) and ``segcal.CalibratedModel``
    (:class:`segcal.models.CalibratedModel`), imported on first use."""
    if name == "load":
        from segcal.calibrators import load

        return load
    if name == "CalibratedModel":
        from segcal.models import CalibratedModel

        return CalibratedModel
    raise AttributeError(f"module 'segcal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "CalibratedModel", "load"])
