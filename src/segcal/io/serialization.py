"""Helpers for saving configurations that ``torch.load(weights_only=True)`` can read back."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_plain(x: Any) -> Any:
    """Recursively keep only values ``torch.load(weights_only=True)`` accepts (dict keys become str,
    tuples lists, numpy scalars Python scalars, anything else its ``str``)."""
    if isinstance(x, dict):
        return {str(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_plain(v) for v in x]
    if isinstance(x, bool | int | float | str) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
