"""The one binning routine of segcal.

Every histogram in the project (top-label ECE bins, class-wise bins, the fine histogram behind the
adaptive ECE, the differentiable ECE's hard bins, reliability diagrams) maps values to bins with
:func:`bin_index`, so the edge convention is the same everywhere.

Convention (Guo et al. 2017, the LTS, selective-scaling and Cal-SFDA code; ``../shared/methods.md``
§4): ``M`` equal-width bins on ``[0, 1]`` with edges ``linspace(0, 1, M + 1)``; bin ``b`` holds
``lo_b < c <= hi_b`` -- the ``(lo, hi]`` convention -- so a confidence of exactly 1.0 falls in the
last bin and a value of exactly 0 falls in the first.

The index is computed as ``ceil(c * M) - 1`` clipped to ``[0, M - 1]``, in float64. For float32 (and
lower precision) inputs this is *exact*: the product of a 24-bit mantissa and an integer
``M < 2**29`` is representable in float64, so a value is compared with the real edge ``b / M``.
For float64 inputs the product is rounded once, which can move a value lying within one ulp of an
edge to the neighbouring bin (``torch.bucketize`` against rounded float64 edges has the same
limitation in the other direction).
"""

from __future__ import annotations

import torch


def bin_index(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Map values in ``[0, 1]`` to equal-width ``(lo, hi]`` bin indices in ``[0, n_bins)``.

    Parameters
    ----------
    values
        Any floating tensor (values outside ``[0, 1]`` are clipped to the first/last bin).
    n_bins
        Number of bins ``M >= 1``.

    Returns
    -------
    torch.Tensor
        ``int64`` tensor of the same shape.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, got {n_bins}")
    v = values if values.dtype == torch.float64 else values.to(torch.float64)
    idx = torch.ceil(v * n_bins)
    idx = idx.sub_(1).clamp_(0, n_bins - 1)
    return idx.to(torch.int64)


def bin_edges(n_bins: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``n_bins + 1`` edges ``linspace(0, 1, n_bins + 1)`` matching :func:`bin_index`."""
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=dtype)
