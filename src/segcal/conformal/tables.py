"""Per-image loss tables over a threshold grid: the one input of conformal risk control.

The exchangeable unit of every guarantee in :mod:`segcal.conformal` is the **image or volume,
never the pixel** (``../shared/methods.md`` §9.3: pixels of one image share the scene, the
acquisition and the model's mistakes, so they are not exchangeable). The API therefore never
sees pixels: :func:`loss_table` streams images one at a time and keeps, per image, one loss and
one set size per threshold, so a :class:`LossTable` has shape ``(n_images, n_grid)`` whatever the
image size (2D images and 3D volumes alike). The thresholds are fitted on these rows only.

Risks (each a per-image loss in ``[0, 1]``, non-increasing in λ; larger λ = larger sets; a pixel
is *valid* when its label is not ``ignore_index``; the comparisons are made in float64 against
``t = 1 - λ``, the same comparison :func:`segcal.conformal.apply_sets` makes):

``"miscoverage"``
    Multi-class pixel sets ``S(x) = {k : p_k(x) >= 1 - λ}`` (§9.3); the loss is the fraction of
    valid pixels whose label is outside the set. Size: the mean set size ``|S|`` over valid pixels.
``"fnr"``
    The mask ``{p_K >= 1 - λ}`` of one class ``K`` (§9.3, FNR control); the loss is the fraction
    of the image's valid pixels of class ``K`` that the mask misses. **Convention: an image
    without a valid pixel of class K has loss 0** (nothing to miss), so the controlled risk is
    ``E[missed fraction · 1{K present}]``. Size: the mask volume as a fraction of valid pixels.
``"coverage"``
    COSE (§9.5): the binary loss ``1[coverage(λ) < τ]`` with ``coverage = 1 - miscoverage`` of the
    multi-class sets. Size as for ``"miscoverage"``.

An image without any valid pixel has loss 0 and size 0 under every risk.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from segcal.calibrators import Calibrator
from segcal.conformal.counting import (
    Thresholds,
    count_chunk,
    count_kernel,
    engine_probabilities,
    loss_row,
)
from segcal.errors import InputError
from segcal.io import PredictionFolder
from segcal.metrics.chunks import DEFAULT_CHUNK_PIXELS
from segcal.validation import (
    EVERY_PIXEL_HINT,
    as_tensor,
    check_finite,
    check_probabilities,
    finite_where_valid,
)

#: torch dtypes whose tensors convert to numpy without a copy
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32,
                 torch.int64)

#: the risks a loss table can hold
RISKS: tuple[str, ...] = ("miscoverage", "fnr", "coverage")


def default_grid(size: int = 201) -> np.ndarray:
    """The default λ grid: ``size`` evenly spaced values from 0 to 1 (float64).

    λ = 1 gives the threshold ``1 - λ = 0``: every class is in every set, so every loss is 0 there.
    """
    if size < 2:
        raise InputError(f"grid: size {size} is too small; expected at least 2 points")
    return np.linspace(0.0, 1.0, int(size))


def check_grid(grid: Any) -> np.ndarray:
    """A λ grid as float64, refused unless 1-D, finite, strictly increasing and inside [0, 1]."""
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size < 1:
        raise InputError(f"grid: expected a non-empty 1-D sequence of thresholds, found shape {g.shape}")
    if not np.isfinite(g).all() or g.min() < 0.0 or g.max() > 1.0:
        raise InputError("grid: thresholds must be finite values in [0, 1]")
    if g.size > 1 and not (np.diff(g) > 0).all():
        raise InputError("grid: thresholds must be strictly increasing")
    return g


def check_risk(risk: str, class_index: int | None, tau: float | None, ignore_index: int | None = None) -> None:
    """Refuse an unknown risk or a missing / superfluous ``class_index`` / ``tau``, and an ``"fnr"``
    class that is the ``ignore_index``: its pixels are never valid, so every loss is 0 and the
    "guarantee" would hold for any mask, the empty one included."""
    if risk not in RISKS:
        raise InputError(f"risk: {risk!r} is not one of {', '.join(RISKS)}")
    if risk == "fnr" and class_index is None:
        raise InputError("class_index: risk 'fnr' needs the class whose mask is controlled (class_index=K)")
    if risk == "fnr" and ignore_index is not None and int(class_index) == int(ignore_index):  # type: ignore[arg-type]
        raise InputError(f"class_index: class {class_index} is the ignore_index: its pixels are left out of every "
                         "loss, so its false-negative rate is 0 for any mask; expected a labelled class")
    if risk == "coverage" and (tau is None or not 0.0 < float(tau) <= 1.0):
        raise InputError(f"tau: risk 'coverage' needs a coverage level tau in (0, 1], found {tau!r}")


def _below_counts(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many ``values`` are strictly below each threshold (any threshold order).

    Each value is located among the sorted thresholds (``O(N log G)``, no sort of the N values):
    with ``j(v)`` = the number of thresholds ``<= v``, ``v < t_k`` exactly when ``k >= j(v)``, so the
    count at ``t_k`` is the number of values with ``j(v) <= k``; the comparisons are the float64
    ``v < t`` of a direct count.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    j = np.searchsorted(t[order], np.asarray(values, dtype=np.float64).reshape(-1), side="right")
    out = np.empty(t.size, dtype=np.int64)
    out[order] = np.cumsum(np.bincount(j, minlength=t.size + 1))[: t.size]
    return out


def _fast_row(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray, risk: str, class_index: int | None,
              tau: float | None, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray, int] | None:
    """:func:`image_row` by the counting kernel (:func:`count_chunk`, the whole image as one chunk);
    None when the kernel is not available or the input needs the reference path (non-integer
    labels, a label outside the classes, a class index outside them: the reference path raises
    its message). Same counts, hence the same float64 results, as the reference path."""
    if count_kernel() is None:
        return None
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu" or lab.dtype == np.uint64:
        return None
    p = np.asarray(probs)
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float64)
    p = np.ascontiguousarray(p.reshape(p.shape[0], -1))
    y = np.ascontiguousarray(lab.reshape(-1)).astype(np.int64, copy=False)
    if y.size != p.shape[1]:
        return None
    num_classes = p.shape[0]
    valid = y != ignore_index if ignore_index is not None else np.ones(y.size, dtype=bool)
    if valid.any() and (y[valid].min() < 0 or y[valid].max() >= num_classes):
        return None
    if not np.isfinite(p).all():  # NaN / infinities: the numpy reference places them
        return None
    if risk == "fnr":
        k_lo = int(class_index)  # type: ignore[arg-type]
        if not 0 <= k_lo < num_classes:
            return None
        k_hi = k_lo + 1
    else:
        k_lo, k_hi = 0, num_classes
    th = Thresholds.of(grid)
    hist_all = np.zeros(th.ts.size + 1, dtype=np.int64)
    hist_y = np.zeros(th.ts.size + 1, dtype=np.int64)
    out = np.zeros(3, dtype=np.int64)
    step = DEFAULT_CHUNK_PIXELS  # blocks that stay in cache (the counts add up exactly)
    for a in range(0, y.size, step):
        count_chunk(np.ascontiguousarray(p[:, a: a + step]), y[a: a + step], valid[a: a + step], k_lo, k_hi, th,
                    hist_all, hist_y, out)
    return loss_row(risk, tau, k_lo, k_hi, th, hist_all, hist_y, int(out[0]), int(out[1]))


def image_row(
    probs: np.ndarray,
    labels: np.ndarray,
    grid: np.ndarray,
    risk: str,
    *,
    class_index: int | None = None,
    tau: float | None = None,
    ignore_index: int | None = None,
    fast: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One image's losses and sizes over ``grid`` (see the module docstring for the risks).

    Parameters
    ----------
    probs
        Probabilities ``(C, *spatial)`` (float; compared in float64).
    labels
        Integer labels ``(*spatial)``; ``ignore_index`` marks void pixels.
    grid
        Increasing thresholds λ in [0, 1] (:func:`check_grid`).

    Returns
    -------
    losses, sizes, n_valid
        Two float64 arrays of ``len(grid)`` and the number of valid pixels.

    With numba installed (``segcal[fast]``) a compiled kernel counts the values below each
    threshold in one pass over the pixels (no copies); it gives the same integer counts, hence
    the same floats, as the numpy path (``fast=False``), which is the reference.
    """
    if fast:
        row = _fast_row(probs, labels, grid, risk, class_index, tau, ignore_index)
        if row is not None:
            return row
    p = np.asarray(probs, dtype=np.float64).reshape(probs.shape[0], -1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = y != ignore_index
        p, y = p[:, keep], y[keep]
    n_valid = int(y.size)
    g = np.asarray(grid, dtype=np.float64)
    thresholds = 1.0 - g
    losses = np.zeros(g.size, dtype=np.float64)
    sizes = np.zeros(g.size, dtype=np.float64)
    if n_valid == 0:
        return losses, sizes, 0
    num_classes = p.shape[0]
    if y.min() < 0 or y.max() >= num_classes:
        bad = np.unique(y[(y < 0) | (y >= num_classes)])[:10].tolist()
        raise InputError(f"labels: values {bad} are outside [0, {num_classes}) and are not the "
                         f"ignore_index; pass ignore_index={bad[-1]} (command line: --ignore-index {bad[-1]}) "
                         "to leave them out, or fix the labels")
    if risk == "fnr":
        k = int(class_index)  # type: ignore[arg-type]
        if not 0 <= k < num_classes:
            raise InputError(f"class_index: {k} is outside [0, {num_classes})")
        pk = p[k]
        sizes[:] = (n_valid - _below_counts(pk, thresholds)) / n_valid
        pos = pk[y == k]
        if pos.size:
            losses[:] = _below_counts(pos, thresholds) / pos.size
        return losses, sizes, n_valid
    py = p[y, np.arange(n_valid)]
    miss = _below_counts(py, thresholds) / n_valid
    sizes[:] = (p.size - _below_counts(p.reshape(-1), thresholds)) / n_valid
    if risk == "miscoverage":
        losses[:] = miss
    else:
        losses[:] = ((1.0 - miss) < float(tau)).astype(np.float64)  # type: ignore[arg-type]
    return losses, sizes, n_valid


@dataclass
class LossTable:
    """Per-image losses over a λ grid (rows: images, the exchangeable units; columns: thresholds).

    Attributes
    ----------
    risk
        One of :data:`RISKS`.
    grid
        The thresholds λ, increasing, float64 ``(G,)``.
    losses
        ``(n_images, G)`` float64 in [0, 1], non-increasing along each row.
    sizes
        ``(n_images, G)``: mean set size (multi-class risks) or mask volume fraction (``"fnr"``).
    n_valid
        ``(n_images,)`` valid pixels per image.
    stems
        Image ids, in row order.
    class_index, tau, ignore_index
        The risk's settings.
    bound
        The loss bound B of §9.3 (1 for every risk here).
    num_classes
        The class count of the scores the rows were computed from (None when not known).
    """

    risk: str
    grid: np.ndarray
    losses: np.ndarray
    sizes: np.ndarray
    n_valid: np.ndarray
    stems: list[str] = field(default_factory=list)
    class_index: int | None = None
    tau: float | None = None
    ignore_index: int | None = None
    bound: float = 1.0
    num_classes: int | None = None

    @property
    def n_images(self) -> int:
        """The number of images (rows)."""
        return int(self.losses.shape[0])

    def subset(self, rows: Sequence[int] | np.ndarray) -> LossTable:
        """The table of some images (e.g. one calibration split), same grid and settings."""
        idx = np.asarray(rows, dtype=np.int64)
        return LossTable(self.risk, self.grid, self.losses[idx], self.sizes[idx], self.n_valid[idx],
                         [self.stems[i] for i in idx] if self.stems else [], self.class_index,
                         self.tau, self.ignore_index, self.bound, self.num_classes)


def as_probabilities(scores: Any, input_type: str, calibrator: Calibrator | None, name: str) -> np.ndarray:
    """Probabilities ``(C, *spatial)`` float64 of one image's scores: the calibrator's output when one
    is given, else the scores themselves (``"probs"``, checked) or their softmax (``"logits"``,
    :func:`engine_probabilities`: the metric engine's float32 softmax, widened to float64 exactly)."""
    return _probabilities(scores, input_type, calibrator, name).astype(np.float64, copy=False)


def _probabilities(scores: Any, input_type: str, calibrator: Calibrator | None, name: str,
                   valid: np.ndarray | None = None) -> np.ndarray:
    """:func:`as_probabilities` in the dtype they were computed in (float32 or float64; widening them
    changes no comparison, so the tables take them as they are).

    ``valid`` (the positions whose label is not ignored, with labels): without a calibrator, NaN /
    inf are accepted where it is False, as by the metrics (they enter no loss and no size;
    :func:`segcal.validation.finite_where_valid`); a calibrator is applied to every pixel, so its
    input must be finite everywhere (the message says so)."""
    t = as_tensor(scores, name)
    if t.ndim < 2:
        raise InputError(f"{name}: expected scores (C, *spatial), found shape {tuple(t.shape)}")
    if valid is not None and calibrator is None:
        t = finite_where_valid(t, valid, name, 0.0 if input_type == "logits" else 1.0 / t.shape[0])
    elif valid is not None:
        try:
            check_finite(t, name)
        except InputError as exc:
            raise InputError(f"{exc} (calibrator {calibrator.name}); {EVERY_PIXEL_HINT}") from exc
    with torch.no_grad():
        if calibrator is None and input_type == "logits":
            # one float64 sum finds a NaN or an infinity (a sum of finite float16 / float32 values
            # cannot overflow float64); only then, or on a float64 overflow, the element-wise check
            if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES:
                with np.errstate(over="ignore", invalid="ignore"):
                    total = float(t.detach().numpy().sum(dtype=np.float64))
            else:
                total = float(t.to(torch.float64).sum())
            if not math.isfinite(total):
                check_finite(t, name)
            return engine_probabilities(t)
        check_finite(t, name)
        if calibrator is not None:
            return np.asarray(calibrator.predict_proba(t.unsqueeze(0).cpu())[0].cpu().numpy(), dtype=np.float64)
    if input_type != "probs":
        raise InputError(f"input_type: {input_type!r} is not 'logits' or 'probs'")
    check_probabilities(t, name, dim=0)
    p = t.cpu().numpy()
    return p if p.dtype in (np.float32, np.float64) else p.astype(np.float64)


def _items(images: Iterable[Any]) -> Iterator[tuple[str, Any, Any]]:
    for i, item in enumerate(images):
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise InputError(f"images: item {i} is not (scores, labels) or (stem, scores, labels)")
        if len(item) == 2:
            yield str(i), item[0], item[1]
        else:
            yield str(item[0]), item[1], item[2]


def loss_table(
    images: Iterable[Any],
    risk: str = "miscoverage",
    *,
    grid: Any = None,
    class_index: int | None = None,
    tau: float | None = None,
    ignore_index: int | None = None,
    input_type: str = "probs",
    calibrator: Calibrator | None = None,
) -> LossTable:
    """Stream images into a per-image loss table (one image in memory at a time).

    Parameters
    ----------
    images
        Iterable of ``(scores, labels)`` or ``(stem, scores, labels)``: scores ``(C, *spatial)``
        (2D or 3D; numpy or torch), labels ``(*spatial)``. Each item is one exchangeable unit.
    risk, class_index, tau
        The risk (:data:`RISKS`; see the module docstring), the class of ``"fnr"``, the coverage
        level τ of ``"coverage"``.
    grid
        Increasing thresholds λ in [0, 1] (default :func:`default_grid`).
    ignore_index
        Label value of void pixels (left out of every loss and size).
    input_type
        ``"probs"`` (default) or ``"logits"`` (softmax over the class axis); ignored with a
        calibrator, which reads its own input type.
    calibrator
        Optional fitted segcal calibrator applied to each image first (its probabilities are used).

    Returns
    -------
    LossTable
        Memory ``O(n_images × len(grid))``, independent of the image size.
    """
    check_risk(risk, class_index, tau, ignore_index)
    probs = ((stem, _probabilities(x, input_type, calibrator, f"scores[{stem}]", _valid(x, y, ignore_index)), y)
             for stem, x, y in _items(images))
    return _build(probs, risk, default_grid() if grid is None else check_grid(grid), class_index, tau,
                  ignore_index)


def _build(images: Iterable[tuple[str, np.ndarray, Any]], risk: str, g: np.ndarray, class_index: int | None,
           tau: float | None, ignore_index: int | None) -> LossTable:
    """The table of ``(stem, probabilities, labels)`` items (the probabilities already checked)."""
    rows, sizes, valid, stems = [], [], [], []
    num_classes: int | None = None
    for stem, probs, labels in images:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if tuple(lab.shape) != tuple(probs.shape[1:]):
            raise InputError(f"labels[{stem}]: shape {tuple(lab.shape)} does not match the scores' "
                             f"spatial shape {tuple(probs.shape[1:])}")
        if num_classes is None:
            num_classes = int(probs.shape[0])
        elif probs.shape[0] != num_classes:
            raise InputError(f"scores[{stem}]: {probs.shape[0]} classes, expected {num_classes} classes "
                             "(the first image's)")
        loss, size, nv = image_row(probs, lab, g, risk, class_index=class_index, tau=tau,
                                   ignore_index=ignore_index)
        rows.append(loss)
        sizes.append(size)
        valid.append(nv)
        stems.append(stem)
    if not rows:
        raise InputError("images: no image given; expected at least one (scores, labels) pair")
    return LossTable(risk, g, np.stack(rows), np.stack(sizes), np.asarray(valid, dtype=np.int64), stems,
                     class_index, None if tau is None else float(tau), ignore_index, num_classes=num_classes)


def folder_loss_table(
    pred: str | os.PathLike | PredictionFolder,
    labels: str | os.PathLike | None = None,
    risk: str = "miscoverage",
    *,
    grid: Any = None,
    class_index: int | None = None,
    tau: float | None = None,
    ignore_index: int | None = None,
    input_type: str | None = None,
    calibrator: Calibrator | None = None,
    progress: bool = False,
    stems: Sequence[str] | None = None,
) -> LossTable:
    """:func:`loss_table` over a prediction folder and its labels, one file at a time (read by
    :class:`~segcal.io.PredictionFolder`: ``.npy`` / ``.npz``, nnU-Net cases, NIfTI labels).

    ``input_type`` as in :class:`~segcal.io.PredictionFolder` (default: the folder's manifest,
    then the ``.npz`` key, then logits); ``progress`` shows a bar over the files on stderr; the
    other arguments as in :func:`loss_table`. Each file is one exchangeable unit (an image or a
    volume). ``stems``: only these files (default: all), in the folder's order (e.g. one rank's
    block under ``torchrun``).
    """
    if isinstance(pred, PredictionFolder):
        folder = pred
    else:
        if labels is None:
            raise InputError("labels: a conformal loss table needs a label folder")
        folder = PredictionFolder(pred, labels, input_type=input_type)
    check_risk(risk, class_index, tau, ignore_index)
    want = None if stems is None else set(stems)
    items = [it for it in folder.items if want is None or it.stem in want]
    files = tqdm(items, total=len(items), desc="conformal", unit="file", leave=False,
                 disable=None if progress else True, file=sys.stderr)  # None: no bar off a terminal
    probs = ((it.stem, _probabilities(x, kind, calibrator, f"pred: {it.stem}", _valid(x, y, ignore_index)),
              _need_label(it.stem, y)) for it in files for x, y, kind in (folder.read(it),))
    try:
        return _build(probs, risk, default_grid() if grid is None else check_grid(grid), class_index, tau,
                      ignore_index)
    finally:
        files.close()


def _valid(scores: Any, labels: Any, ignore_index: int | None) -> np.ndarray | None:
    """The positions of ``scores`` whose label is not ``ignore_index`` (None without an ignore index
    or labels of another shape: then every value is checked, and the shape is refused later)."""
    if ignore_index is None or labels is None:
        return None
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if tuple(lab.shape) != tuple(np.shape(scores)[1:]):
        return None
    return lab != ignore_index


def _need_label(stem: str, labels: np.ndarray | None) -> np.ndarray:
    if labels is None:
        raise InputError(f"labels: no label for {stem!r}")
    return labels


__all__ = [
    "RISKS",
    "LossTable",
    "as_probabilities",
    "check_grid",
    "check_risk",
    "default_grid",
    "folder_loss_table",
    "image_row",
    "loss_table",
]
