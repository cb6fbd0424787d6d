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


__all__ = ["foreground_region_mask"]
