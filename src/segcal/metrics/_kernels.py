"""Fused CPU accumulation kernel (numba) for :class:`segcal.metrics.CalibrationMetrics`.

The torch path of the engine issues ~40 small tensor operations per chunk of pixels; on the CPU
most of them are memory-bound and the whole set costs several passes over the chunk. This kernel
does everything after the softmax in one pass per pixel, reading the logits once (first-index
argmax) and the probabilities twice (top-label statistics, then the sparse class-wise bins), and
adds into the same float64 accumulators as the torch path. The softmax itself stays in torch
(vectorised ``exp``).

It is optional (``pip install 'segcal[fast]'``): without numba, or on a CUDA device, the engine uses
its torch path, which gives the same numbers (the test suite runs both and compares them).

Binning is :func:`segcal.metrics.binning.bin_index`'s rule, ``ceil(v * M) - 1`` clipped, evaluated
in float64 (exact for float32 confidences); ``_bin`` below is that rule compiled, and a test checks
that both agree on edge values.
"""

from __future__ import annotations

import math

import numpy as np

try:  # pragma: no cover - import guard
    import numba as nb

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on extras
    nb = None
    HAVE_NUMBA = False


def _bin_py(v: float, n: int) -> int:
    b = math.ceil(v * n) - 1
    if b < 0:
        return 0
    if b > n - 1:
        return n - 1
    return b


if HAVE_NUMBA:
    _bin = nb.njit(cache=True, inline="always")(_bin_py)

    @nb.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
    def accumulate_chunk(
        z,  # (C, P) float32/float64 logits (or probabilities)
        q,  # (C, P) same dtype, probabilities
        lab,  # (P,) int64 labels
        valid,  # (P,) bool
        img_idx,  # (P,) int64 image index per pixel, or length 0 -> img0 for all
        img0,
        n_bins,
        fine_bins,
        nll_floor,
        fine_span,
        img_bins,  # (n, M, 2, 2) float64
        img_totals,  # (n, 3)
        img_class,  # (n, C, 3)
        fine,  # (F, 3)
        classwise,  # (C, M, 3)
        by_pred,  # (C, M, 3)
        by_label,  # (C, M, 3)
        confusion,  # (C, C)
        work,  # (4, P) float64 scratch
        pred,  # (P,) int64 scratch
        bad,  # (3,) int64 out: [first bad label pixel + 1, non-finite count, bad label value]
    ):
        C, P = q.shape
        M = n_bins
        best = work[0]
        sumsq = work[1]
        zsum = work[2]
        # pass 1 over classes: first-index argmax of z, sum of q^2, sum of z (finite check)
        for p in range(P):
            best[p] = z[0, p]
            pred[p] = 0
            qq = q[0, p]
            sumsq[p] = qq * qq
            zsum[p] = z[0, p]
        for k in range(1, C):
            for p in range(P):
                zz = z[k, p]
                if zz > best[p]:
                    best[p] = zz
                    pred[p] = k
                qq = q[k, p]
                sumsq[p] += qq * qq
                zsum[p] += zz
        thr = (1.0 / M) * (1.0 - 1e-5)
        nonfinite = 0
        has_img = img_idx.shape[0] > 0
        # pass 2 over pixels: everything keyed by the top-label confidence
        for p in range(P):
            if not valid[p]:
                continue
            if not math.isfinite(zsum[p]):
                nonfinite += 1
                continue
            y = lab[p]
            if y < 0 or y >= C:
                if bad[0] == 0:
                    bad[0] = p + 1
                    bad[2] = y
                continue
            k = pred[p]
            i = img_idx[p] if has_img else img0
            conf = np.float64(q[k, p])
            qy = np.float64(q[y, p])
            corr = 1 if k == y else 0
            b = _bin(conf, M)
            img_bins[i, b, corr, 0] += 1.0
            img_bins[i, b, corr, 1] += conf
            img_totals[i, 0] += 1.0
            img_totals[i, 1] += -math.log(max(qy, nll_floor))
            img_totals[i, 2] += np.float64(sumsq[p]) - 2.0 * qy + 1.0
            img_class[i, y, 0] += 1.0
            img_class[i, y, 1] += corr
            img_class[i, k, 2] += 1.0
            confusion[y, k] += 1.0
            u = -math.log1p(-conf) / fine_span
            fb = _bin(u, fine_bins)
            fine[fb, 0] += 1.0
            fine[fb, 1] += conf
            fine[fb, 2] += corr
            by_pred[k, b, 0] += 1.0
            by_pred[k, b, 1] += conf
            by_pred[k, b, 2] += corr
            by_label[y, b, 0] += 1.0
            by_label[y, b, 1] += conf
            by_label[y, b, 2] += corr
            # class-wise: the predicted class's entry is the top-label one
            classwise[k, b, 0] += 1.0
            classwise[k, b, 1] += conf
            classwise[k, b, 2] += corr
            work[3, p] = 1.0 if conf < 1.0 - thr else 0.0
        # pass 3 over classes: other entries; only q_k > 1/M (possible when conf < 1 - 1/M)
        # leave bin 0, everything else is summed straight into bin 0
        for k in range(C):
            s0 = 0.0
            c0 = 0.0
            l0 = 0.0
            for p in range(P):
                if not valid[p] or pred[p] == k:
                    continue
                y = lab[p]
                if y < 0 or y >= C or not math.isfinite(zsum[p]):
                    continue
                qk = np.float64(q[k, p])
                isk = 1.0 if y == k else 0.0
                if work[3, p] > 0.0 and qk > thr:
                    b = _bin(qk, M)
                    classwise[k, b, 0] += 1.0
                    classwise[k, b, 1] += qk
                    classwise[k, b, 2] += isk
                else:
                    c0 += 1.0
                    s0 += qk
                    l0 += isk
            classwise[k, 0, 0] += c0
            classwise[k, 0, 1] += s0
            classwise[k, 0, 2] += l0
        bad[1] = nonfinite

else:  # pragma: no cover
    accumulate_chunk = None
