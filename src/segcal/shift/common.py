"""What the image corruptions and the MRI shifts share: argument checks, seeds, SciPy.

SciPy is optional (``pip install 'segcal[shift]'``): :func:`scipy_ndimage` and
:func:`scipy_signal` import it when a corruption first needs it, with the install hint otherwise.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from segcal.errors import missing_dependency

SEVERITIES = (1, 2, 3, 4, 5)


def scipy_ndimage() -> Any:
    """``scipy.ndimage``, or the install hint naming the ``shift`` extra."""
    try:
        import scipy.ndimage as ndi
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise missing_dependency("scipy", "shift", "this corruption") from exc
    return ndi


def scipy_signal() -> Any:
    """``scipy.signal``, or the install hint naming the ``shift`` extra."""
    try:
        import scipy.signal as sig
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise missing_dependency("scipy", "shift", "this corruption") from exc
    return sig


def check_severity(severity: Any) -> int:
    """``severity`` as an int in 1..5 (TypeError / ValueError naming the argument otherwise)."""
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise TypeError(
            f"severity: expected an integer in 1..5, got {type(severity).__name__} {severity!r}"
        )
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity: expected an integer in 1..5, got {severity}")
    return int(severity)


def check_seed(seed: Any) -> int:
    """``seed`` as a non-negative int (TypeError / ValueError naming the argument otherwise)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(
            f"seed: expected a non-negative integer, got {type(seed).__name__} {seed!r}"
        )
    if int(seed) < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed}")
    return int(seed)


def derive_seed(seed: int, stem: str) -> int:
    """Per-image seed from a global ``seed`` and an image ``stem``, independent of order.

    ``np.random.SeedSequence([seed, crc32(stem.encode('utf-8'))])`` -> one 63-bit integer. CRC-32
    is stable across processes and Python versions (unlike the salted built-in ``hash``).
    """
    seed = check_seed(seed)
    if not isinstance(stem, str):
        raise TypeError(f"stem: expected a str, got {type(stem).__name__}")
    crc = zlib.crc32(stem.encode("utf-8"))
    state = np.random.SeedSequence([seed, crc]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


__all__ = ["SEVERITIES", "check_seed", "check_severity", "derive_seed", "scipy_ndimage", "scipy_signal"]
