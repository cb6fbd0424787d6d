"""segcal: post-hoc calibration of semantic segmentation models.

``import segcal`` is light (no torch): :func:`load` (a calibrator saved with
``Calibrator.save``) is looked up in :mod:`segcal.calibrators` on first use (PEP 562). The layers
of the package and what each owns are described in ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any

from segcal.version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    """``segcal.load``: :func:`segcal.calibrators.load`, imported on first use."""
    if name == "load":
        from segcal.calibrators import load

        return load
    raise AttributeError(f"module 'segcal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "load"])
