"""Region masks for region-restricted calibration metrics (``../shared/methods.md`` §4).

In 3D medical segmentation most voxels are easy background, so the pooled ECE is dominated by
voxels the model gets right with confidence ~1 and says little about the structures that matter.
The **foreground-region ECE** (``fg_ece``) is the ECE restricted to

    R = dilate(true foreground ∪ predicted foreground, radius r),

the binary dilation by a **cube** of side ``2r + 1`` voxels (Chebyshev distance <= r; the default
``r = 3`` gives a 7x7x7 cube). The region uses the *prediction* as well as the label, so false
positives far from the true structure are counted. Pass the mask to
:class:`segcal.metrics.CalibrationMetrics` (``update(scores, labels, mask=region)``); every metric
it returns is then restricted to ``R`` (``ece`` -> foreground-region ECE, ``nll`` -> foreground-
region NLL, ...).

This is not MONAI's ``include_background=False`` (which drops the background *class* from
class-wise averages but keeps every voxel).

The **boundary band** of a 2D label map (:func:`boundary_band`, the CamVid bench's ``band_ece``)
is exactly the LTS code's: a pixel is in the band when its label differs from the label of any
pixel 1 or 2 steps away along x or y (8 shifted copies: +-1, +-2 along each axis). A 3-pixel image
border is then set to False (which also removes every pixel whose shifted neighbour would fall
outside the image). The band is computed from the labels only; ignore pixels are excluded from
metrics by the caller (a valid pixel next to an ignore region *is* in the band, as in LTS, which
compares raw label values).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _np(x: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(x)


def foreground_region_mask(
    labels: Any,
    preds: Any,
    radius: int = 3,
    background: int = 0,
    *,
    ignore_index: int | None = None,
    spatial_dims: int = 3,
) -> np.ndarray:
    """Boolean mask of the dilated union of true and predicted foreground.

    Parameters
    ----------
    labels
        Integer label map(s), ``(*batch, *spatial)`` with ``spatial_dims`` trailing spatial axes
        (e.g. ``(X, Y, Z)`` or ``(N, X, Y, Z)``); numpy or torch.
    preds
        Predicted label map(s) of the same shape (e.g. the argmax of the scores).
    radius
        Dilation radius ``r`` in voxels: dilation by a cube of side ``2r + 1`` (Chebyshev ball).
        ``0``: no dilation (the union itself).
    background
        The background label; every other label (and ``ignore_index``, if given, excluded) is
        foreground.
    ignore_index
        Label value that is neither foreground nor part of the returned mask.
    spatial_dims
        Number of trailing spatial axes (3 for volumes, 2 for images). The dilation never crosses
        leading (batch) axes.

    Returns
    -------
    numpy.ndarray
        Boolean array shaped like ``labels``; True inside the region.
    """
    from scipy import ndimage

    y = _np(labels)
    p = _np(preds)
    if y.shape != p.shape:
        raise ValueError(f"preds: expected the shape of labels {y.shape}, got {p.shape}")
    if y.ndim < spatial_dims:
        raise ValueError(f"labels: expected at least {spatial_dims} spatial axes, got shape {y.shape}")
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius: expected a non-negative integer, got {radius!r}")
    radius = int(radius)
    fg = (y != background) | (p != background)
    if ignore_index is not None:
        fg &= y != ignore_index
    batch = y.shape[: y.ndim - spatial_dims]
    fg = fg.reshape((-1, *y.shape[y.ndim - spatial_dims :]))
    if radius > 0:
        # dilation by a cube == a separable max filter of size 2r+1 (zeros outside the volume)
        size = (1, *(2 * radius + 1,) * spatial_dims)
        out = ndimage.maximum_filter(fg.astype(np.uint8), size=size, mode="constant", cval=0) > 0
    else:
        out = fg.copy()
    out = out.reshape((*batch, *out.shape[1:]))
    if ignore_index is not None:
        out &= y != ignore_index
    return out



#: shifts used by LTS ``find_boundary_nearby_areas_CamVid.py``
BAND_SHIFTS = (1, 2)
#: width of the zeroed image border
BORDER = 3


def boundary_band(labels: np.ndarray, shifts: tuple[int, ...] = BAND_SHIFTS, border: int = BORDER) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the +-2-pixel boundary band of an integer label map (see the module)."""
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


__all__ = ["BAND_SHIFTS", "BORDER", "boundary_band", "foreground_region_mask"]
