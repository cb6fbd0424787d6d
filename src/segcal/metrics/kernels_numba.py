"""Fused CPU accumulation kernel (numba) for :class:`segcal.metrics.CalibrationMetrics`.

The torch path of the engine issues ~40 small tensor operations per chunk of pixels; on the CPU
most of them are memory-bound and the whole set costs several passes over the chunk. Here torch
does only the vectorised transcendental work (the softmax, one in-place ``log``) and two compiled
functions do the rest, adding into the same float64 accumulators as the torch path:

* :func:`prepare_chunk`: first-index argmax of the logits, finiteness, and the gathers
  ``conf = q[argmax]``, ``q_y`` (the arguments of the logarithms);
* :func:`accumulate_chunk`: float64 per-class totals and per-pixel ``sum_k q_k^2`` (one
  vectorised pass over the contiguous rows), every top-label statistic in one pass per pixel,
  then the class-wise bins of the non-top entries above ``1/M``: a per-pixel visit of the few
  unsure pixels for a confident model, or, when most pixels are unsure, a branch-free compaction
  of each class row followed by the binning of the candidates only (the threshold test is
  unpredictable there, and a mispredicted branch per entry cost more than the scan).

It is optional (``pip install 'segcal[fast]'``): without numba, or on a CUDA device, the engine uses
its torch path, which gives the same numbers (the test suite runs both and compares them).

Binning is :func:`segcal.metrics.binning.bin_index`'s rule, ``ceil(v * M) - 1`` clipped, evaluated
in float64 (exact for float32 confidences); ``bin_rule`` / ``bin_rule_jit`` below are that rule in Python and compiled, and a test checks
that both agree on edge values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from segcal.metrics.chunks import (
    FINE_LOG_SPAN,
    ChunkHook,
    Settings,
    check_chunk_probabilities,
    chunk_width,
    compute_dtype,
    count_chunks,
    iter_chunks,
    single_thread,
    valid_pixels,
)
from segcal.metrics.state import ACCUMULATED
from segcal.validation import check_finite, check_label_range

try:  # pragma: no cover - import guard
    import numba as nb  # optional dependency: segcal[fast]

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on extras
    nb = None
    HAVE_NUMBA = False


def bin_rule(v: float, n: int) -> int:
    if v >= 1.0:  # also +inf (the fine coordinate of a confidence of exactly 1): last bin
        return n - 1
    b = math.ceil(v * n) - 1
    if b < 0:
        return 0
    if b > n - 1:
        return n - 1
    return b


if HAVE_NUMBA:
    bin_rule_jit = nb.njit(cache=True, inline="always")(bin_rule)

    @nb.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
    def _valid_row_sums(q, valid, out, sumsq):  # pragma: no cover - compiled
        """``out[k] += sum_p q[k, p]`` over valid pixels and ``sumsq[p] = sum_k q[k, p]^2``, both
        in float64, row by row over contiguous memory (vectorised: fastmath only reassociates
        the float64 sums)."""
        C, P = q.shape
        for p in range(P):
            sumsq[p] = 0.0
        for k in range(C):
            s = 0.0
            for p in range(P):
                v = np.float64(q[k, p])
                s += v if valid[p] else 0.0
                sumsq[p] += v * v
            out[k] += s

    @nb.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def prepare_chunk(z, q, lab, nll_floor, work, pred, lg):  # pragma: no cover - compiled
        """First-index argmax of ``z`` (``pred``), the sum of ``z`` per pixel (finiteness test,
        ``work[1]``), the confidence ``q[pred]`` (``work[3]``) and the two arguments of the
        logarithms torch then takes in place: ``lg[0] = max(q_y, floor)`` (NLL) and
        ``lg[1] = 1 - conf`` (fine-histogram coordinate)."""
        C, P = q.shape
        best = work[0]
        zsum = work[1]
        conf = work[3]
        for p in range(P):
            best[p] = z[0, p]
            pred[p] = 0
            zsum[p] = z[0, p]
        for k in range(1, C):  # contiguous rows
            for p in range(P):
                zz = z[k, p]
                if zz > best[p]:
                    best[p] = zz
                    pred[p] = k
                zsum[p] += zz
        for p in range(P):
            c = np.float64(q[pred[p], p])
            y = min(max(lab[p], 0), C - 1)
            qy = np.float64(q[y, p])
            conf[p] = c
            lg[0, p] = qy if qy > nll_floor else nll_floor
            lg[1, p] = 1.0 - c

    @nb.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def accumulate_chunk(
        q,  # (C, P) probabilities
        lab,  # (P,) int64 labels
        valid,  # (P,) bool
        lg,  # (2, P) float64 from prepare_chunk after an in-place log: log q_y, log(1 - conf)
        fine_span,  # fine coordinate u = -log(1 - conf) / fine_span
        img_idx,  # (P,) int64 image index per pixel, or length 0 -> img0 for all
        img0,
        n_bins,
        fine_bins,
        img_bins,  # (n, M, 2, 2) float64
        img_totals,  # (n, 3)
        img_class,  # (n, C, 3)
        fine,  # (F, 3)
        classwise,  # (C, M, 3): the non-top entries; bin 0 holds "all valid minus those binned"
        by_pred,  # (C, M, 3)
        by_label,  # (C, M, 3)
        confusion,  # (C, C)
        work,  # (4, P) float64 scratch filled by prepare_chunk
        pred,  # (P,) int64 first-index argmax from prepare_chunk
        unsure,  # (P,) int64 scratch
        cand,  # (P,) int64 scratch
        ok,  # (P,) uint8 scratch
        bad,  # (3,) int64 out: [first bad label pixel + 1, non-finite count, bad label value]
    ):
        C, P = q.shape
        M = n_bins
        zsum = work[1]
        sumsq = work[2]
        conf = work[3]
        # every valid pixel's q_k starts in class k's bin 0 (float64 totals); pass 3 moves the
        # non-top entries above 1/M out of it, the engine moves the top entries (by_pred) out;
        # sum_k q_k^2 per pixel for the Brier score
        _valid_row_sums(q, valid, classwise[:, 0, 1], sumsq)
        thr = (1.0 / M) * (1.0 - 1e-5)
        nonfinite = 0
        n_unsure = 0
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
            c = conf[p]
            qy = np.float64(q[y, p])
            corr = 1 if k == y else 0
            b = bin_rule_jit(c, M)
            img_bins[i, b, corr, 0] += 1.0
            img_bins[i, b, corr, 1] += c
            img_totals[i, 0] += 1.0
            img_totals[i, 1] -= lg[0, p]
            # Brier: sum_k q_k^2 - 2 q_y + 1
            img_totals[i, 2] += sumsq[p] + 1.0 - 2.0 * qy
            img_class[i, y, 0] += 1.0
            img_class[i, y, 1] += corr
            img_class[i, k, 2] += 1.0
            confusion[y, k] += 1.0
            fb = bin_rule_jit(-lg[1, p] / fine_span, fine_bins)
            fine[fb, 0] += 1.0
            fine[fb, 1] += c
            fine[fb, 2] += corr
            by_pred[k, b, 0] += 1.0
            by_pred[k, b, 1] += c
            by_pred[k, b, 2] += corr
            by_label[y, b, 0] += 1.0
            by_label[y, b, 1] += c
            by_label[y, b, 2] += corr
            if c < 1.0 - thr:  # another class may exceed 1/M only here
                unsure[n_unsure] = p
                n_unsure += 1
        bad[1] = nonfinite
        # pass 3, class by class over contiguous rows: a non-top entry can exceed 1/M only in an
        # unsure pixel (q_k <= 1 - conf), so a plain scan finds them; the top entry is skipped
        if n_unsure == 0:
            return
        if n_unsure * 4 < P:  # few unsure pixels (the usual case for a trained model): visit them
            for j in range(n_unsure):
                p = unsure[j]
                y = lab[p]
                kp = pred[p]
                for k in range(C):
                    qk = np.float64(q[k, p])
                    if qk > thr and k != kp:
                        b = bin_rule_jit(qk, M)
                        isk = 1.0 if y == k else 0.0
                        classwise[k, b, 0] += 1.0
                        classwise[k, b, 1] += qk
                        classwise[k, b, 2] += isk
                        classwise[k, 0, 0] -= 1.0
                        classwise[k, 0, 1] -= qk
                        classwise[k, 0, 2] -= isk
            return
        # many unsure pixels (random or badly calibrated scores): per class, compact the candidate
        # pixels with a branch-free scan of the contiguous row, then bin only the candidates (the
        # threshold test is unpredictable here; branching on it per entry costs more than the scan)
        for p in range(P):
            ok[p] = 0
        for j in range(n_unsure):  # only unsure pixels can hold a non-top entry above 1/M
            ok[unsure[j]] = 1
        thr32 = np.float32(thr)
        for k in range(C):
            row = q[k]
            n = 0
            for p in range(P):
                cand[n] = p
                n += (row[p] > thr32) & (pred[p] != k) & (ok[p] != 0)
            e0 = 0.0
            e1 = 0.0
            e2 = 0.0
            for j in range(n):
                p = cand[j]
                qk = np.float64(row[p])
                b = bin_rule_jit(qk, M)
                isk = 1.0 if lab[p] == k else 0.0
                classwise[k, b, 0] += 1.0
                classwise[k, b, 1] += qk
                classwise[k, b, 2] += isk
                e0 += 1.0
                e1 += qk
                e2 += isk
            classwise[k, 0, 0] -= e0
            classwise[k, 0, 1] -= e1
            classwise[k, 0, 2] -= e2

else:  # pragma: no cover
    accumulate_chunk = None
    prepare_chunk = None
    bin_rule_jit = None



# --------------------------------------------------------------------------- the thread driver
def update(cfg: Settings, x: torch.Tensor, y: torch.Tensor, mk: torch.Tensor | None,
           take: Callable[[int], list[dict[str, torch.Tensor]]],
           on_chunk: ChunkHook | None = None) -> dict[str, torch.Tensor]:
    """Accumulate an ``(n, C, S)`` CPU batch with the compiled kernel; returns the batch's statistics.

    ``take(k)`` gives ``k`` zeroed accumulator sets (:class:`segcal.metrics.state.Workspace`), one
    per worker thread. Chunk j goes to thread j mod k (the kernel releases the GIL); the
    workers' sets are added into the first one in worker order, which is returned. torch runs
    single-threaded meanwhile (restored afterwards), so the threads do not oversubscribe the cores
    and the softmax values do not depend on torch's thread count (see :mod:`segcal.metrics.chunks`).
    """
    n, _, S = x.shape
    workers = max(1, min(torch.get_num_threads(), count_chunks(n, S, cfg.chunk_pixels)))
    # single-threaded torch for everything here, the zeroing and the sums of the accumulators
    # included: torch's intra-op threads on a 1.5 MiB zero_/add_ cost 40x a plain loop when the
    # cores are busy (2.8 ms vs 0.07 ms per zero_ of the fine histogram, measured on 2 loaded cores)
    with single_thread():
        return run_workers(cfg, x, y, mk, take(workers), on_chunk)


def run_workers(cfg: Settings, x: torch.Tensor, y: torch.Tensor, mk: torch.Tensor | None,
                accs: list[dict[str, torch.Tensor]], on_chunk: ChunkHook | None = None) -> dict[str, torch.Tensor]:
    """The body of :func:`update`: one worker thread per accumulator set (torch single-threaded);
    ``on_chunk`` is called by the worker that accumulated each chunk (its index first)."""
    n, _, S = x.shape
    workers = len(accs)
    acc = accs[0]
    cd = compute_dtype(x)
    P = chunk_width(n, S, cfg.chunk_pixels)

    def work(w: int) -> None:
        # worker w takes chunks w, w + workers, ...: a fixed assignment, so every worker's sums,
        # and the batch's, are the same from run to run (a shared queue made the float64 sums
        # depend on thread timing in the last bits)
        wacc = accs[w]
        # per-worker buffers, allocated once per update and reused by every chunk (bounded,
        # steady memory instead of a fresh allocation per chunk)
        C = cfg.num_classes
        scratch = {
            "z": torch.empty(C * P, dtype=cd),
            "q": torch.empty(C * P, dtype=cd),
            "work": np.empty(4 * P, dtype=np.float64),
            "lg": np.empty(2 * P, dtype=np.float64),
            "pred": np.empty(P, dtype=np.int64),
            "unsure": np.empty(P, dtype=np.int64),
            "cand": np.empty(P, dtype=np.int64),
            "ok": np.empty(P, dtype=np.uint8),
        }
        for j, item in enumerate(iter_chunks(x, y, mk, torch.device("cpu"), cfg.chunk_pixels, raw=True)):
            if j % workers == w:
                accumulate(cfg, *item, wacc, scratch, on_chunk, w)

    if workers == 1:
        work(0)
    else:
        with ThreadPoolExecutor(workers) as ex:
            for f in [ex.submit(work, w) for w in range(workers)]:
                f.result()
    for wacc in accs[1:]:
        for f in ACCUMULATED:
            acc[f.name] += wacc[f.name]
    # class-wise ECE, completed from the batch's statistics: the top entries are the
    # by-predicted-class bins; bin 0 gets every valid pixel's remaining count and label mass
    top = acc["by_pred"]
    cw = acc["classwise"]
    cw += top
    img_class = acc["img_class"]
    n_valid = img_class[:, :, 0].sum()
    lab_hist = img_class[:, :, 0].sum(0)
    cw[:, 0, 0] += n_valid - top[:, :, 0].sum(1)
    cw[:, 0, 1] -= top[:, :, 1].sum(1)
    cw[:, 0, 2] += lab_hist - top[:, :, 2].sum(1)
    return acc


def accumulate(
    cfg: Settings,
    img: int | torch.Tensor,
    z: torch.Tensor,
    lab: torch.Tensor,
    m: torch.Tensor | None,
    acc: dict[str, torch.Tensor],
    scratch: dict[str, Any],
    on_chunk: ChunkHook | None = None,
    worker: int = 0,
) -> None:
    """One chunk through the compiled kernel: the statistics of
    :func:`segcal.metrics.kernels_torch.accumulate`, except the class-wise top entries, which
    :func:`update` adds once per batch; then ``on_chunk(worker, ...)`` sees the chunk
    (:data:`segcal.metrics.chunks.ChunkHook`).

    torch does the vectorised transcendental work (softmax, log); the kernel does the argmax, the
    float64 row sums, the binning and every scatter-add.
    """
    C, M = cfg.num_classes, cfg.n_bins
    lab = lab.to(torch.int64)
    valid = valid_pixels(lab, m, cfg.ignore_index)
    if valid is None:
        valid = torch.ones_like(lab, dtype=torch.bool)
    P = lab.numel()
    zb = scratch["z"][: C * P].view(z.shape)
    zb.copy_(z)  # contiguous, in the compute dtype (float16/bfloat16 are upcast here)
    z = zb.view(C, P)
    if cfg.input_type == "logits":
        q = torch.softmax(z, dim=0, out=scratch["q"][: C * P].view(C, P))
    else:
        if cfg.validate and bool(valid.any()):
            check_chunk_probabilities(cfg, z[:, valid])
        q = z
    work = scratch["work"][: 4 * P].reshape(4, P)
    pred = scratch["pred"][:P]
    lg = scratch["lg"][: 2 * P].reshape(2, P)
    zn, qn, labn = z.numpy(), q.numpy(), lab.numpy()
    prepare_chunk(zn, qn, labn, cfg.nll_floor, work, pred, lg)
    torch.from_numpy(lg).log_()  # vectorised: log max(q_y, floor) and log(1 - conf)
    unsure = scratch["unsure"][:P]
    cand = scratch["cand"][:P]
    ok = scratch["ok"][:P]
    bad = np.zeros(3, dtype=np.int64)
    if isinstance(img, int):
        img_idx, img0 = np.empty(0, dtype=np.int64), img
    else:
        img_idx, img0 = img.numpy(), 0
    accumulate_chunk(
        qn, labn, valid.numpy(), lg, FINE_LOG_SPAN, img_idx, img0, M, cfg.fine_bins,
        acc["img_bins"].numpy(), acc["img_totals"].numpy(), acc["img_class"].numpy(), acc["fine"].numpy(),
        acc["classwise"].numpy(), acc["by_pred"].numpy(), acc["by_label"].numpy(), acc["confusion"].numpy(),
        work, pred, unsure, cand, ok, bad,
    )
    if bad[1] > 0:
        check_finite(z[:, valid], "preds")
        raise ValueError(f"preds: contains non-finite values ({int(bad[1])} pixels)")
    if bad[0] > 0:  # the kernel found one; the shared check builds the message
        check_label_range(lab, valid, C, "target")
        raise AssertionError("kernel flagged a label the range check accepts")  # pragma: no cover
    if on_chunk is not None:
        on_chunk(worker, img if isinstance(img, int) else img_idx, qn, pred, labn, valid.numpy())


__all__ = [
    "HAVE_NUMBA", "accumulate", "accumulate_chunk", "bin_rule", "bin_rule_jit", "prepare_chunk", "run_workers", "update",
]
