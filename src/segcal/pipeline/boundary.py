"""The boundary band of a label map, exactly as in the LTS code (``methods.md`` §4).

A pixel is in the band when its label differs from the label of any pixel 1 or 2 steps away along
x or y (8 shifted copies: ±1, ±2 along each axis). A 3-pixel image border is then set to False
(which also removes every pixel whose shifted neighbour would fall outside the image). The band is
computed from the labels only; ignore pixels are excluded from metrics by the caller (a valid pixel
next to an ignore region *is* in the band, as in LTS, which compares raw label values).
"""

from __future__ import annotations

import numpy as np

#: shifts used by LTS ``find_boundary_nearby_areas_CamVid.py``
BAND_SHIFTS = (1, 2)
#: width of the zeroed image border
BORDER = 3


def boundary_band(labels: np.ndarray, shifts: tuple[int, ...] = BAND_SHIFTS, border: int = BORDER) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the ±2-pixel boundary band of an integer label map."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels: expected an (H, W) label map, got shape {lab.shape}")
    band = np.zeros(lab.shape, dtype=bool)
    for d in shifts:
        if d <= 0:
            raise ValueError(f"shifts: expected positive integers, got {shifts}")
        if lab.shape[0] > d:
            diff = lab[d:, :] != lab[:-d, :]  # pixel (i, j) vs (i - d, j), and (i - d, j) vs (i, j)
            band[d:, :] |= diff
            band[:-d, :] |= diff
        if lab.shape[1] > d:
            diff = lab[:, d:] != lab[:, :-d]
            band[:, d:] |= diff
            band[:, :-d] |= diff
    if border > 0:
        band[:border, :] = False
        band[-border:, :] = False
        band[:, :border] = False
        band[:, -border:] = False
    return band


__all__ = ["BAND_SHIFTS", "BORDER", "boundary_band"]
