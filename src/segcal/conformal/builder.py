"""Loss tables built inside the metric engine's pass (``segcal eval --conformal-*``).

:class:`LossTableBuilder` is a :data:`segcal.metrics.chunks.ChunkHook`: the engine hands it every
chunk's probabilities, and it counts them against the thresholds (:mod:`segcal.conformal.counting`),
one row per image. Its table equals :func:`segcal.conformal.loss_table`'s on the same logits.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from segcal.conformal.counting import Thresholds, count_chunk, loss_row
from segcal.conformal.tables import LossTable, check_grid, check_risk, default_grid
from segcal.errors import InputError


@functools.lru_cache(maxsize=1)
def block_kernel() -> Callable[..., Any] | None:
    """:func:`segcal.conformal.counting.count_kernel`'s one-step kernel, its class-row scan done
    in blocks of 64 pixels (None without numba).

    Same arguments, same counts (every count is an integer found by the same exact comparisons);
    only the scan differs: a branch-free loop over 64 values builds a bit mask of the valid values
    outside the common bin ``[lo, hi)`` (compiled to vector compares), then the set bits are
    visited in order. The one unpredictable branch per value of the plain scan (13-29 % of
    ESPNet's probabilities are outliers, clustered but not predictably) becomes one loop exit
    per block: 0.225 ms instead of 0.32 ms per 16384-pixel CamVid chunk (docs/conformal.md,
    Throughput).
    """
    try:
        import numba as nb
        from numba.cpython.unsafe.numbers import trailing_zeros
    except ImportError:  # optional: count_chunk's numpy path gives the same numbers
        return None

    @nb.njit(cache=True, inline="always")
    def step(v, tsp, lut, buckets):  # pragma: no cover - compiled
        x = np.float64(v)  # the one-step lookup of count_kernel
        if x >= 0.0:
            j = lut[int(min(x, 1.0) * buckets)]
            return j + (tsp[j] <= x)
        return 0

    @nb.njit(cache=True, nogil=True, boundscheck=False)
    def kernel(q, lab, valid, k_lo, k_hi, ts, tsp, lut, common, lo, hi, hist_all, hist_y,
               out):  # pragma: no cover - compiled
        n = q.shape[1]
        buckets = lut.shape[0] - 1
        blocks = n // 64
        n_out = 0
        for k in range(k_lo, k_hi):
            row = q[k]
            for b in range(blocks):
                base = b * 64
                m = np.uint64(0)
                for j in range(64):  # branch-free: vector compares
                    v = row[base + j]
                    m |= np.uint64(((v >= hi) | (v < lo)) & valid[base + j]) << np.uint64(j)
                while m != 0:
                    j = trailing_zeros(m)
                    m &= m - np.uint64(1)
                    hist_all[step(row[base + j], tsp, lut, buckets)] += 1
                    n_out += 1
            for i in range(blocks * 64, n):
                v = row[i]
                if (v >= hi or v < lo) and valid[i]:
                    hist_all[step(v, tsp, lut, buckets)] += 1
                    n_out += 1
        n_valid = 0
        n_in = 0
        n_y_out = 0
        for i in range(n):
            if valid[i]:
                n_valid += 1
                y = lab[i]
                if k_lo <= y < k_hi:
                    n_in += 1
                    v = q[y, i]
                    if v >= hi or v < lo:
                        hist_y[step(v, tsp, lut, buckets)] += 1
                        n_y_out += 1
        hist_all[common] += n_valid * (k_hi - k_lo) - n_out
        hist_y[common] += n_in - n_y_out
        out[0] += n_valid
        out[1] += n_in

    return kernel


def _count(q: np.ndarray, labels: np.ndarray, valid: np.ndarray, k_lo: int, k_hi: int, th: Thresholds,
           hist_all: np.ndarray, hist_y: np.ndarray, out: np.ndarray) -> None:
    """:func:`count_chunk`'s counts, with :func:`block_kernel` where it applies (numba, a one-step grid)."""
    kernel = block_kernel() if th.one_step else None
    if kernel is None:
        count_chunk(q, labels, valid, k_lo, k_hi, th, hist_all, hist_y, out)
        return
    lo, hi = th.bounds(q.dtype)
    kernel(q, labels, valid, k_lo, k_hi, th.ts, th.tsp, th.lut, th.common, lo, hi, hist_all, hist_y, out)


class LossTableBuilder:
    """A per-image loss table built from the metric engine's chunks, in ``segcal eval``'s pass.

    Pass :meth:`chunk` as ``on_chunk`` to :meth:`segcal.metrics.CalibrationMetrics.update`
    (:data:`segcal.metrics.chunks.ChunkHook`): it counts, for every chunk the engine accumulated,
    the probabilities below each threshold ``1 - λ``, from the engine's own softmax (no second
    read, no second softmax; :func:`engine_probabilities` gives the same values, so the table
    equals :func:`loss_table`'s on the same logits bit for bit). Per batch: :meth:`begin`, the
    update, :meth:`end` with the batch's stems (one row per image, the exchangeable unit).
    ``evaluate_folder(conformal=...)`` and ``segcal eval --conformal-*`` do this.

    Parameters
    ----------
    risk, grid, class_index, tau, ignore_index
        As in :func:`loss_table`; ``ignore_index`` must be the metric's (the valid pixels are the
        engine's).
    """

    def __init__(self, risk: str = "miscoverage", *, grid: Any = None, class_index: int | None = None,
                 tau: float | None = None, ignore_index: int | None = None) -> None:
        check_risk(risk, class_index, tau)
        self.risk, self.class_index, self.ignore_index = risk, class_index, ignore_index
        self.tau = None if tau is None else float(tau)
        self.grid = default_grid() if grid is None else check_grid(grid)
        self._th = Thresholds.of(self.grid)
        self._lock = threading.Lock()
        self._batch: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._n = 0
        self._range: tuple[int, int] | None = None
        self._rows: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        self._valid: list[int] = []
        self.stems: list[str] = []

    def check_num_classes(self, num_classes: int, flag: str = "class_index") -> None:
        """Fix the class count (before the first chunk); refuses a class index outside it, naming ``flag``."""
        if self.risk == "fnr":
            k = int(self.class_index)  # type: ignore[arg-type]
            if not 0 <= k < num_classes:
                raise InputError(f"{flag}: class {k} is outside [0, {num_classes}) (the predictions have "
                                 f"{num_classes} classes)")
            self._range = (k, k + 1)
        else:
            self._range = (0, int(num_classes))

    def begin(self, n_images: int = 1) -> None:
        """Open a batch of ``n_images`` images (counts start at zero)."""
        self._batch = {}
        self._n = int(n_images)

    def _buffers(self, worker: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        buf = self._batch.get(worker)
        if buf is None:
            g = self._th.ts.size + 1
            with self._lock:
                buf = self._batch.setdefault(worker, (np.zeros((self._n, g), dtype=np.int64),
                                                      np.zeros((self._n, g), dtype=np.int64),
                                                      np.zeros((self._n, 3), dtype=np.int64)))
        return buf

    def chunk(self, worker: int, image: Any, q: np.ndarray, pred: np.ndarray, labels: np.ndarray,
              valid: np.ndarray) -> None:
        """Count one chunk (the :data:`~segcal.metrics.chunks.ChunkHook` signature)."""
        if self._range is None:
            self.check_num_classes(q.shape[0])
        k_lo, k_hi = self._range  # type: ignore[misc]
        hist_all, hist_y, out = self._buffers(worker)
        if isinstance(image, int | np.integer):
            i = int(image)
            _count(q, labels, valid, k_lo, k_hi, self._th, hist_all[i], hist_y[i], out[i])
            return
        img = np.asarray(image)  # packed small images: runs of one image each
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(img)) + 1, [img.size]])
        for a, b in itertools.pairwise(cuts.tolist()):
            i = int(img[a])
            _count(np.ascontiguousarray(q[:, a:b]), np.ascontiguousarray(labels[a:b]), np.ascontiguousarray(valid[a:b]), k_lo, k_hi,
                         self._th, hist_all[i], hist_y[i], out[i])

    def end(self, stems: Sequence[str]) -> None:
        """Close the batch: one row per image, named by ``stems``."""
        if len(stems) != self._n:
            raise ValueError(f"stems: {len(stems)} names for a batch of {self._n} images")
        g = self._th.ts.size + 1
        hist_all = np.zeros((self._n, g), dtype=np.int64)
        hist_y = np.zeros((self._n, g), dtype=np.int64)
        out = np.zeros((self._n, 3), dtype=np.int64)
        for w in sorted(self._batch):
            a, y, o = self._batch[w]
            hist_all += a
            hist_y += y
            out += o
        k_lo, k_hi = self._range if self._range is not None else (0, 0)
        for i, stem in enumerate(stems):
            loss, size, nv = loss_row(self.risk, self.tau, k_lo, k_hi, self._th, hist_all[i], hist_y[i],
                                  int(out[i, 0]), int(out[i, 1]))
            self._rows.append(loss)
            self._sizes.append(size)
            self._valid.append(nv)
            self.stems.append(str(stem))
        self._batch = {}
        self._n = 0

    def rows(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """``(stems, losses, sizes, n_valid)`` of the images so far (e.g. to gather across ranks)."""
        g = self._th.ts.size
        return (list(self.stems), np.asarray(self._rows, dtype=np.float64).reshape(-1, g),
                np.asarray(self._sizes, dtype=np.float64).reshape(-1, g), np.asarray(self._valid, dtype=np.int64))

    def table(self, rows: tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None = None) -> LossTable:
        """The :class:`LossTable` of the images so far (or of ``rows``, e.g. every rank's, in order)."""
        stems, losses, sizes, valid = self.rows() if rows is None else rows
        if not stems:
            raise InputError("images: no image given; expected at least one (scores, labels) pair")
        return LossTable(self.risk, self.grid, losses, sizes, valid, list(stems), self.class_index, self.tau,
                         self.ignore_index)


__all__ = ["LossTableBuilder"]
