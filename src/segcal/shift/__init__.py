"""Covariate-shift corruptions for robustness evaluation (a leaf module of the pipeline).

- :func:`corrupt` applies one ImageNet-C corruption (Hendrycks & Dietterich, ICLR 2019) to an
  ``H x W x 3`` ``uint8`` RGB image, deterministically under ``seed``.
- :func:`make_transform` builds the per-image hook ``(image_uint8, stem) -> image_uint8`` that
  ``segcal predict`` accepts; each image's seed derives from ``(seed, stem)``.

Only NumPy and Pillow are needed to import this module; blur, zoom, snow and elastic
corruptions also need SciPy (``pip install 'segcal[shift]'``), imported lazily.
Besides :mod:`segcal.errors` this package imports nothing else from segcal.
"""

from __future__ import annotations

from segcal.shift.common import SEVERITIES, derive_seed
from segcal.shift.corruptions import (
    CORRUPTIONS,
    PARAMETERS,
    STOCHASTIC,
    CorruptionTransform,
    available_corruptions,
    corrupt,
    make_transform,
)

__all__ = [
    "CORRUPTIONS",
    "PARAMETERS",
    "SEVERITIES",
    "STOCHASTIC",
    "CorruptionTransform",
    "available_corruptions",
    "corrupt",
    "derive_seed",
    "make_transform",
]
