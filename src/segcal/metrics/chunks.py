"""Settings and pixel chunking shared by the two accumulation kernels of the metric engine.

Both kernels (:mod:`segcal.metrics.kernels_torch`, :mod:`segcal.metrics.kernels_numba`) see the
same chunks, in the same compute dtype, so they compute the same float32 softmax values and hence
the same float64 sums. The softmax of a chunk is computed with torch's intra-op parallelism off
(:func:`single_thread`): torch splits the pixels of a ``(C, P)`` softmax between its threads and
each thread's last few pixels take a scalar code path whose ``exp`` differs from the vectorised
one in the last bit, so the values would otherwise depend on the number of torch threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from segcal.validation import check_probabilities

#: the default number of pixels per chunk of :class:`segcal.metrics.CalibrationMetrics`
DEFAULT_CHUNK_PIXELS = 1 << 14

#: ``u = -log(1 - c) / FINE_LOG_SPAN`` maps confidences to [0, 1] for the fine histogram;
#: 36.84 = -log(1e-16), beyond float64 resolution of 1 - c.
FINE_LOG_SPAN = 36.841361487904734


class Settings(NamedTuple):
    """What a kernel needs to know of the metric's configuration."""

    num_classes: int
    n_bins: int
    fine_bins: int
    ignore_index: int | None
    input_type: str
    nll_floor: float
    validate: bool
    chunk_pixels: int
    #: dtype of the scores as given (a chunk is processed in float32 / float64): the tolerance
    #: of the sum-to-one check of probabilities is the stored dtype's
    score_dtype: torch.dtype = torch.float32


#: one chunk: (image index, or a per-pixel image index tensor for packed small images;
#: scores (C, P) -- or the raw view of the input; labels (P,); mask (P,) or None)
Chunk = tuple[int | torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


#: ``on_chunk(worker, image, q, pred, labels, valid)``: what
#: :meth:`segcal.metrics.CalibrationMetrics.update` hands a caller for every chunk it accumulated
#: (after the chunk passed its checks), so that a per-pixel statistic of the same probabilities
#: needs no second softmax (conformal loss tables, :mod:`segcal.conformal`). ``worker``: the
#: accumulation thread (chunks of one image may be seen by several threads at once); ``image``:
#: the image's index in the batch, or an int64 array of it per pixel (packed small images);
#: ``q``: the ``(C, P)`` probabilities in the compute dtype (numpy, contiguous); ``pred``: the
#: ``(P,)`` first-index argmax; ``labels``: ``(P,)`` int64; ``valid``: ``(P,)`` bool (the
#: counted pixels). The arrays are scratch buffers reused for the next chunk: copy what is kept.
ChunkHook = Callable[[int, Any, Any, Any, Any, Any], None]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 scores, float32 otherwise (float16 / bfloat16 are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block (restored afterwards)."""
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def chunk_width(n: int, S: int, chunk_pixels: int) -> int:
    """The largest number of pixels :func:`iter_chunks` yields at once."""
    if S >= chunk_pixels // 2:
        return min(chunk_pixels, S)
    return min(n, max(1, chunk_pixels // S)) * S


def count_chunks(n: int, S: int, chunk_pixels: int) -> int:
    """Number of chunks :func:`iter_chunks` yields (1 when small images are packed)."""
    return n * -(-S // chunk_pixels) if S >= chunk_pixels // 2 else 1


def iter_chunks(
    x: torch.Tensor, y: torch.Tensor, mk: torch.Tensor | None, dev: torch.device, chunk_pixels: int,
    raw: bool = False,
) -> Iterator[Chunk]:
    """Yield the chunks of an ``(n, C, S)`` batch.

    Images of at least ``chunk_pixels / 2`` pixels are cut into blocks of ``chunk_pixels``; smaller
    images are packed ``chunk_pixels // S`` at a time. ``z`` is a contiguous ``(C, P)`` block in
    the compute dtype; with ``raw=True`` it is the view of ``x`` instead (``(C, P)`` or
    ``(C, k, S)`` for packed images), which the caller copies into its own buffer.
    """
    n, C, S = x.shape
    cd = compute_dtype(x)
    P = chunk_pixels
    if S >= P // 2:
        for i in range(n):
            for p0 in range(0, S, P):
                p1 = min(S, p0 + P)
                # a (C, P) view with row stride S: one copy to a contiguous block is cheaper
                # than a strided softmax and strided reads (and both backends see the same)
                z = x[i, :, p0:p1]
                if not raw:
                    z = z.to(device=dev, dtype=cd).contiguous()
                lab = y[i, p0:p1].to(dev)
                m = mk[i, p0:p1].to(dev) if mk is not None else None
                yield i, z, lab, m
    else:
        k = max(1, P // S)
        for i0 in range(0, n, k):
            i1 = min(n, i0 + k)
            z = x[i0:i1].permute(1, 0, 2)
            if not raw:
                z = z.to(device=dev, dtype=cd).reshape(C, -1)
            lab = y[i0:i1].to(dev).reshape(-1)
            m = mk[i0:i1].to(dev).reshape(-1) if mk is not None else None
            img = torch.arange(i0, i1, device=dev).repeat_interleave(S)
            yield img, z, lab, m


def check_chunk_probabilities(cfg: Settings, q: torch.Tensor) -> None:
    """The sum-to-one check of probability scores, with the tolerance of the dtype they were
    stored in (a float16 file's rows sum to one only within float16 rounding)."""
    check_probabilities(q if q.dtype == cfg.score_dtype else q.to(cfg.score_dtype), "preds", dim=0)


def valid_pixels(lab: torch.Tensor, m: torch.Tensor | None, ignore_index: int | None) -> torch.Tensor | None:
    """The mask of counted pixels (not ``ignore_index``, mask True); ``None`` when all count."""
    valid = m
    if ignore_index is not None:
        keep = lab != ignore_index
        valid = keep if valid is None else (valid & keep)
    return valid


__all__ = [
    "DEFAULT_CHUNK_PIXELS",
    "FINE_LOG_SPAN",
    "Chunk",
    "ChunkHook",
    "Settings",
    "check_chunk_probabilities",
    "chunk_width",
    "compute_dtype",
    "count_chunks",
    "iter_chunks",
    "single_thread",
    "valid_pixels",
]
