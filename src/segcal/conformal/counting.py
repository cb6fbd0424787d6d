"""Counting a chunk of probabilities below each threshold ``1 - λ``: the inner loop of every loss table.

:func:`count_chunk` adds, for one chunk of pixels, how many class probabilities (and how many
label probabilities) fall below each threshold; :func:`loss_row` turns one image's counts into its
losses and set sizes (definitions: :mod:`segcal.conformal.tables`). The counts are integers, so
they add over chunks, threads and processes exactly; the compiled kernel (numba) and the numpy
path give the same ones. :func:`engine_probabilities` is the one softmax of the logits: the metric
engine's, so that a table built inside ``segcal eval``'s pass and one built on its own agree bit
for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segcal.metrics.chunks import DEFAULT_CHUNK_PIXELS, compute_dtype, iter_chunks, single_thread

#: buckets of the lookup table that starts the compiled kernel's search (a power of two, so that
#: ``floor(v * B) / B <= v`` holds exactly in float64)
_LUT_BUCKETS = 4096


def _round_up(t: type, b: float) -> Any:
    """The smallest value of the float type ``t`` that is ``>= b`` (``b`` float64, possibly infinite)."""
    v = t(b)
    if math.isfinite(b) and float(v) < b:
        v = np.nextafter(v, t(np.inf))
    return v


@dataclass(frozen=True)
class Thresholds:
    """The sorted thresholds ``1 - λ`` of a grid and the lookup table of the compiled kernel."""

    order: np.ndarray  # argsort of 1 - grid
    ts: np.ndarray  # sorted thresholds, float64
    lut: np.ndarray  # (B + 1,): thresholds <= b / B; uint8 when there are at most 255 thresholds, else int64
    common: int  # the bin of the values just above 0
    lo: float  # the common bin is [lo, hi)
    hi: float
    tsp: np.ndarray  # ts padded with +inf
    one_step: bool  # no LUT bucket holds two thresholds: one comparison after the lookup
    cache: dict[Any, tuple[Any, Any]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, grid: np.ndarray) -> Thresholds:
        thresholds = 1.0 - np.asarray(grid, dtype=np.float64)
        order = np.argsort(thresholds, kind="stable")
        ts = np.ascontiguousarray(thresholds[order])
        lut = np.searchsorted(ts, np.arange(_LUT_BUCKETS + 1, dtype=np.float64) / _LUT_BUCKETS, side="right")
        # bytes where they suffice: the table then takes 4 KiB of the L1 cache instead of 32 (13 % of
        # the kernel's time on CamVid)
        lut = lut.astype(np.uint8 if ts.size <= 255 else np.int64)
        common = int(lut[1])
        lo = float(ts[common - 1]) if common > 0 else -math.inf
        hi = float(ts[common]) if common < ts.size else math.inf
        tsp = np.concatenate([ts, [np.inf]])
        return cls(order, ts, lut, common, lo, hi, tsp, bool((np.diff(lut.astype(np.int64)) <= 1).all()))

    def bounds(self, dtype: np.dtype) -> tuple[Any, Any]:
        """``(lo, hi)`` in ``dtype``, each the smallest value of the dtype not below the float64 one,
        so that ``v >= lo`` and ``v < hi`` in ``dtype`` are the float64 comparisons for every ``v``
        of the dtype."""
        found = self.cache.get(dtype)
        if found is None:  # once per dtype (this runs once per chunk)
            t = np.dtype(dtype).type
            found = self.cache[dtype] = (_round_up(t, self.lo), _round_up(t, self.hi))
        return found

    def below(self, hist: np.ndarray) -> np.ndarray:
        """Per threshold (grid order), the number of counted values strictly below it; ``hist`` of
        shape ``(..., g + 1)`` gives ``(..., g)`` (one row per image)."""
        hist = np.asarray(hist)
        out = np.empty((*hist.shape[:-1], self.ts.size), dtype=np.int64)
        out[..., self.order] = np.cumsum(hist, axis=-1)[..., : self.ts.size]
        return out


@functools.lru_cache(maxsize=1)
def count_kernel() -> dict[bool, Callable[..., Any]] | None:
    """The compiled counting kernels of one chunk of pixels, by ``one_step``, or None without numba
    (``segcal[fast]``).

    ``kernel[one_step](q, lab, valid, k_lo, k_hi, ts, tsp, lut, common, lo, hi, hist_all, hist_y, out)``
    adds, for every valid pixel ``i`` and class ``k`` in ``[k_lo, k_hi)``, one to ``hist_all[j]``
    and, when ``k`` is the pixel's label, to ``hist_y[j]``, where ``j`` is the number of sorted
    thresholds ``ts`` that are ``<= q[k, i]`` (the bin of ``np.searchsorted(ts, v, side="right")``).
    ``j`` is found from ``lut`` (the number of thresholds ``<= b / B`` per bucket ``b``) and exact
    float64 comparisons: one comparison with ``tsp`` (``ts`` padded with +inf) when ``one_step``
    (no bucket holds two thresholds: every grid of at most ~4096 even steps), else a search. Most
    values of a confident model fall in the *common* bin ``[lo, hi)`` just above 0, which is only
    counted. Each class row is scanned once over contiguous memory in blocks of 64 pixels: a
    branch-free loop (vector compares) builds one bit mask of the valid values outside the common
    bin and one of the pixels labelled with that class; then only the set bits are located, those
    of the label's pixels into both histograms. So the label's probability is placed in the same
    scan, without a gather ``q[y, i]`` over the rows, and the one unpredictable branch per value of
    a plain scan (13-29 % of ESPNet's probabilities lie outside the common bin, clustered but not
    predictably) becomes one loop exit per block (docs/conformal.md, Throughput). Labels are kept
    relative to ``k_lo`` in 16 bits (at most 65535 classes in the range; :func:`count_chunk`
    takes the numpy path beyond).
    ``lo`` / ``hi`` are given in ``q``'s dtype, rounded up, so the comparisons are the float64
    ones. ``out += (n_valid, n_label_in_range)``.

    NaN is not placed as numpy places it (last): the callers refuse NaN first (the metric engine
    rejects non-finite valid pixels before its ``on_chunk`` hook; :func:`segcal.conformal.image_row`
    takes the numpy path for them).
    """
    try:
        import numba as nb
        from numba.cpython.unsafe.numbers import trailing_zeros
    except ImportError:  # optional: the numpy path gives the same numbers
        return None

    @nb.njit(cache=True, inline="always")
    def step(v, ts, tsp, lut, g, buckets):  # pragma: no cover - compiled
        x = np.float64(v)  # one comparison after the lookup (no bucket holds two thresholds)
        if x >= 0.0:
            j = np.int64(lut[int(min(x, 1.0) * buckets)])
            return j + (tsp[j] <= x)
        return 0  # below every threshold (they lie in [0, 1]); no loop here: it would slow the kernel 3x

    @nb.njit(cache=True, inline="always")
    def search(v, ts, tsp, lut, g, buckets):  # pragma: no cover - compiled
        x = np.float64(v)
        j = np.int64(lut[int(min(max(x, 0.0), 1.0) * buckets)])  # the clamped bucket, then exact steps
        while j < g and ts[j] <= x:
            j += 1
        while j > 0 and ts[j - 1] > x:
            j -= 1
        return j

    def make(locate: Callable[..., int]) -> Callable[..., Any]:
        @nb.njit(cache=True, nogil=True, boundscheck=False)
        def kernel(q, lab, valid, k_lo, k_hi, ts, tsp, lut, common, lo, hi, hist_all, hist_y,
                   out):  # pragma: no cover - compiled
            n = q.shape[1]
            g = ts.shape[0]
            buckets = lut.shape[0] - 1
            blocks = n // 64
            # once per chunk: the label relative to k_lo (65535: invalid or outside the class
            # range) and the valid pixels as one bit per pixel, 64 per word
            rel = np.empty(n, np.uint16)
            n_valid = 0
            n_in = 0
            for i in range(n):
                y = lab[i]
                inside = valid[i] and k_lo <= y < k_hi
                n_valid += valid[i]
                n_in += inside
                rel[i] = np.uint16(y - k_lo) if inside else np.uint16(65535)
            words = np.empty(blocks, np.uint64)
            for b in range(blocks):
                m = np.uint64(0)
                for j in range(64):
                    m |= np.uint64(valid[b * 64 + j]) << np.uint64(j)
                words[b] = m
            n_out = 0
            n_y_out = 0
            for k in range(k_lo, k_hi):
                row = q[k]
                kk = np.uint16(k - k_lo)
                for b in range(blocks):
                    base = b * 64
                    m = np.uint64(0)  # values outside [lo, hi)
                    my = np.uint64(0)  # pixels labelled k
                    for j in range(64):  # branch-free: vector compares
                        v = row[base + j]
                        m |= np.uint64((v >= hi) | (v < lo)) << np.uint64(j)
                        my |= np.uint64(rel[base + j] == kk) << np.uint64(j)
                    m &= words[b]
                    m_y = m & my
                    m ^= m_y
                    while m != 0:  # the set bits, in order
                        j = trailing_zeros(m)
                        m &= m - np.uint64(1)
                        hist_all[locate(row[base + j], ts, tsp, lut, g, buckets)] += 1
                        n_out += 1
                    while m_y != 0:  # the label's probability: both histograms
                        j = trailing_zeros(m_y)
                        m_y &= m_y - np.uint64(1)
                        s = locate(row[base + j], ts, tsp, lut, g, buckets)
                        hist_all[s] += 1
                        hist_y[s] += 1
                        n_out += 1
                        n_y_out += 1
                for i in range(blocks * 64, n):
                    v = row[i]
                    if (v >= hi or v < lo) and valid[i]:
                        s = locate(v, ts, tsp, lut, g, buckets)
                        hist_all[s] += 1
                        n_out += 1
                        if rel[i] == kk:
                            hist_y[s] += 1
                            n_y_out += 1
            hist_all[common] += n_valid * (k_hi - k_lo) - n_out
            hist_y[common] += n_in - n_y_out
            out[0] += n_valid
            out[1] += n_in

        return kernel

    # two compilations of one loop: a search loop inlined into it slows the one-step case 3x
    return {True: make(step), False: make(search)}


def numpy_counts(q: np.ndarray, lab: np.ndarray, valid: np.ndarray, k_lo: int, k_hi: int, th: Thresholds,
                  hist_all: np.ndarray, hist_y: np.ndarray, out: np.ndarray) -> None:
    """The kernel's counts with numpy (the reference, and the path without numba)."""
    g = th.ts.size
    qv = np.asarray(q)[k_lo:k_hi][:, valid].astype(np.float64, copy=False)
    y = np.asarray(lab)[valid].astype(np.int64, copy=False)
    hist_all += np.bincount(np.searchsorted(th.ts, qv.reshape(-1), side="right"), minlength=g + 1)
    inside = (y >= k_lo) & (y < k_hi)
    qy = qv[y[inside] - k_lo, np.flatnonzero(inside)]
    hist_y += np.bincount(np.searchsorted(th.ts, qy, side="right"), minlength=g + 1)
    out[0] += y.size
    out[1] += int(inside.sum())


def count_chunk(q: np.ndarray, lab: np.ndarray, valid: np.ndarray, k_lo: int, k_hi: int, th: Thresholds,
                hist_all: np.ndarray, hist_y: np.ndarray, out: np.ndarray) -> None:
    """Add one chunk's counts (``q (C, P)`` without NaN in valid pixels, ``lab``, ``valid (P,)``,
    labels of valid pixels in ``[0, C)``): the compiled kernel when numba is there, else numpy;
    the same integers."""
    kernel = count_kernel()
    if kernel is None or k_hi - k_lo >= 65535:
        numpy_counts(q, lab, valid, k_lo, k_hi, th, hist_all, hist_y, out)
        return
    lo, hi = th.bounds(q.dtype)
    kernel[th.one_step](q, lab, valid, k_lo, k_hi, th.ts, th.tsp, th.lut, th.common, lo, hi, hist_all, hist_y, out)


def loss_rows(risk: str, tau: float | None, k_lo: int, k_hi: int, th: Thresholds, hist_all: np.ndarray,
              hist_y: np.ndarray, n_valid: np.ndarray, n_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The losses and set sizes ``(n, g)`` of ``n`` images from their counts (``hist_* (n, g + 1)``,
    ``n_valid``, ``n_in (n,)``); an image without a valid pixel gets zeros."""
    n_valid = np.asarray(n_valid, dtype=np.int64)
    n_in = np.asarray(n_in, dtype=np.int64)
    nv = np.maximum(n_valid, 1)[:, None].astype(np.float64)
    has = (n_valid > 0)[:, None]
    if risk == "fnr":
        sizes = (n_valid[:, None] - th.below(hist_all)) / nv
        losses = np.where((n_in > 0)[:, None], th.below(hist_y) / np.maximum(n_in, 1)[:, None], 0.0)
    else:
        miss = th.below(hist_y) / nv
        sizes = ((k_hi - k_lo) * n_valid[:, None] - th.below(hist_all)) / nv
        losses = miss if risk == "miscoverage" else ((1.0 - miss) < float(tau)).astype(np.float64)  # type: ignore[arg-type]
    return np.where(has, losses, 0.0), np.where(has, sizes, 0.0)


def loss_row(risk: str, tau: float | None, k_lo: int, k_hi: int, th: Thresholds,
             hist_all: np.ndarray, hist_y: np.ndarray, n_valid: int, n_in: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One image's losses, sizes and valid-pixel count from its counts (:func:`loss_rows` of one row)."""
    losses, sizes = loss_rows(risk, tau, k_lo, k_hi, th, np.asarray(hist_all)[None], np.asarray(hist_y)[None],
                              np.array([n_valid]), np.array([n_in]))
    return losses[0], sizes[0], int(n_valid)


def engine_probabilities(logits: torch.Tensor) -> np.ndarray:
    """The softmax of one image's logits ``(C, *spatial)`` exactly as the metric engine computes it.

    :class:`segcal.metrics.CalibrationMetrics` takes the softmax chunk by chunk
    (:func:`segcal.metrics.chunks.iter_chunks`, :data:`~segcal.metrics.chunks.DEFAULT_CHUNK_PIXELS`
    pixels) in the compute dtype (float32 for float16 / bfloat16 / float32 logits, float64 for
    float64 ones), single-threaded; this does the same, so a loss table built inside
    ``segcal eval``'s pass (:class:`LossTableBuilder` on the engine's chunks) and one built here
    (:func:`loss_table`, ``segcal conformal fit``) see the same values bit for bit, and
    :func:`~segcal.conformal.apply_sets` applies the threshold to them. Returns the probabilities
    in the compute dtype, shaped like ``logits``.
    """
    num_classes = int(logits.shape[0])
    x = logits.detach().cpu().reshape(1, num_classes, -1)
    unused = torch.from_numpy(np.empty((x.shape[0], x.shape[2]), dtype=np.uint8))  # iter_chunks' labels
    out = np.empty((num_classes, x.shape[2]), dtype=np.float64 if compute_dtype(x) == torch.float64 else np.float32)
    start = 0
    with single_thread():  # as the engine; numpy copies the chunks (single-threaded, no wait on torch's pool)
        for _, z, _, _ in iter_chunks(x, unused, None, torch.device("cpu"), DEFAULT_CHUNK_PIXELS):
            width = z.shape[1]
            out[:, start: start + width] = torch.softmax(z, dim=0).numpy()
            start += width
    return out.reshape(tuple(logits.shape))



__all__ = ["Thresholds", "count_chunk", "count_kernel", "engine_probabilities", "loss_row", "loss_rows", "numpy_counts"]
