"""Applying a calibrator chunk by chunk: the body of :meth:`Calibrator.forward
<segcal.calibrators.base.Calibrator.forward>` once its input is checked.

Pointwise calibrators map ``(P, C)`` rows of at most :func:`~segcal.calibrators.settings.chunk_rows`
rows (the calibrator's ``chunk_size``, and 2^20 values) at a time into a preallocated float32
output; spatial calibrators map one image (or, for an ``(M, C)`` table, one chunk of isolated
pixels) at a time. Every chunk is checked finite (and a probability simplex for
``input_type="probs"``) on the calibrator's device before it is mapped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from segcal.calibrators.settings import chunk_rows
from segcal.validation import check_finite, check_probabilities

__all__ = ["calibrated_logits", "iter_row_chunks"]


def iter_row_chunks(t: torch.Tensor, chunk: int) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(index, rows)`` of ``(M, C)`` / ``(N, C, *spatial)`` scores in chunks of at most ``chunk``
    ``(P, C)`` rows; ``index`` addresses the chunk's output in an ``(M, C)`` / ``(N, C, S)`` array."""
    if t.ndim == 2:
        for s in range(0, t.shape[0], chunk):
            yield (slice(s, s + chunk),), t[s : s + chunk]
    else:
        flat = t.reshape(t.shape[0], t.shape[1], -1)
        for n in range(flat.shape[0]):
            for s in range(0, flat.shape[2], chunk):
                yield (n, slice(None), slice(s, s + chunk)), flat[n, :, s : s + chunk].t()


def _checked(cal: Any, x: torch.Tensor) -> torch.Tensor:
    check_finite(x, "logits")
    if cal.input_type == "probs":
        check_probabilities(x, "logits", dim=1)
    return x


def calibrated_logits(cal: Any, t: torch.Tensor, img: torch.Tensor | None) -> torch.Tensor:
    """Calibrated logits of the checked scores ``t`` (and input images ``img``, for a calibrator
    with an image branch), float32 on ``t``'s device, with autograd unless under ``no_grad``.

    Parameters
    ----------
    cal
        A fitted :class:`~segcal.calibrators.base.Calibrator`.
    t
        ``(N, C, *spatial)`` or ``(M, C)`` scores of ``cal.num_classes`` classes.
    img
        ``(N, C_img, *spatial)`` images, or None.

    Returns
    -------
    torch.Tensor
        Of ``t``'s shape.
    """
    dev = cal.device
    chunk = chunk_rows(cal.fit_settings["chunk_size"], int(t.shape[1]))
    if cal.spatial:
        outs = []
        step = chunk if t.ndim == 2 else 1  # tables: chunks of isolated pixels
        for n in range(0, t.shape[0], step):
            x = _checked(cal, t[n : n + step].to(dev))
            im = None if img is None else img[n : n + step].to(dev, torch.float32)
            outs.append(cal._apply_image_map(cal._canonical(x, dim=1), im).to(t.device))
        return torch.cat(outs, 0)
    shape = t.shape
    out = torch.empty(
        (shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64))) if t.ndim > 2 else shape,
        dtype=torch.float32,
        device=t.device,
    )
    for idx, rows in iter_row_chunks(t, chunk):
        res = cal._map(cal._canonical(_checked(cal, rows.to(dev)))).to(t.device)
        out[idx] = res if t.ndim == 2 else res.t()
    return out.reshape(shape)
