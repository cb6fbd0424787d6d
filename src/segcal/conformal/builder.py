"""Loss tables built inside the metric engine's pass (``segcal eval --conformal-*``).

:class:`LossTableBuilder` is a :data:`segcal.metrics.chunks.ChunkHook`: the engine hands it every
chunk's probabilities, and it counts them against the thresholds (:mod:`segcal.conformal.counting`),
one row per image. Its table equals :func:`segcal.conformal.loss_table`'s on the same logits
(the same counting kernel, :func:`~segcal.conformal.counting.count_chunk`, on the same values).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from segcal.conformal.counting import Thresholds, count_chunk, loss_rows
from segcal.conformal.tables import LossTable, check_grid, check_risk, default_grid
from segcal.errors import InputError


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
        check_risk(risk, class_index, tau, ignore_index)
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
        self.num_classes: int | None = None  # fixed by check_num_classes

    def check_num_classes(self, num_classes: int, flag: str = "class_index") -> None:
        """Fix the class count (before the first chunk); refuses a class index outside it, naming ``flag``."""
        self.num_classes = int(num_classes)
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
            count_chunk(q, labels, valid, k_lo, k_hi, self._th, hist_all[i], hist_y[i], out[i])
            return
        img = np.asarray(image)  # packed small images: runs of one image each
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(img)) + 1, [img.size]])
        for a, b in itertools.pairwise(cuts.tolist()):
            i = int(img[a])
            count_chunk(np.ascontiguousarray(q[:, a:b]), np.ascontiguousarray(labels[a:b]), np.ascontiguousarray(valid[a:b]), k_lo, k_hi,
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
        losses, sizes = loss_rows(self.risk, self.tau, k_lo, k_hi, self._th, hist_all, hist_y, out[:, 0], out[:, 1])
        self._rows.extend(losses)
        self._sizes.extend(sizes)
        self._valid.extend(int(v) for v in out[:, 0])
        self.stems.extend(str(stem) for stem in stems)
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
                         self.ignore_index, num_classes=self.num_classes)


__all__ = ["LossTableBuilder"]
