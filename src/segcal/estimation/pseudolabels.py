"""ECE-weighted, class-balanced pseudo-labels (Cal-SFDA ``gene_thres`` / ``save_pred``; §3.15(g)).

1. Per target image ``i``: ``conf = (1 - ê_i) · max_k P_k`` and the predicted class ``argmax_k P_k``
   (``ê_i``: the image's estimated ECE; ``None`` gives ``ê = 0``, i.e. plain CBST thresholds).
2. For every predicted class ``c`` the ``conf`` values of its pixels are sorted **per image** and
   every ``subsample``-th kept (5, as the reference code does to save memory; ``subsample=1``
   keeps all), then pooled over the target set.
3. ``thr_c`` = the value at rank ``int(N_c · prop)`` from the top of the pooled sorted values, the
   ``(1 - prop)`` quantile. Classes never predicted get ``0.5``. (Deviation: when
   ``int(N_c·prop) = 0`` the reference indexes ``[-0]``, i.e. the *smallest* value; the largest is
   used here.)
4. Class-balanced mask: a pixel is kept when some class's **unweighted** softmax probability
   strictly exceeds that class's threshold (``thres_cb_plabel`` with ``ece=None``).
5. Per-image mask: the ``local_prop`` fraction of pixels with the highest ``max_k P_k``
   (``gene_plabel_prop``; exactly ``int(local_prop · H·W)`` pixels, ties broken by position).
6. Pseudo-label = ``argmax_k P_k`` where mask 4 OR mask 5, else ``ignore_value`` (255).

Round ``r`` uses ``prop = 0.15 + 0.05·r`` and ``local_prop = 0.1 + 0.05·r``
(:func:`proportion_schedule`).

:func:`maxprob_pseudo_labels` is the baseline: one global max-probability threshold chosen so that
the coverage (fraction of labelled pixels) equals a given value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segcal.errors import InputError

__all__ = [
    "class_thresholds",
    "maxprob_pseudo_labels",
    "maxprob_threshold_for_coverage",
    "proportion_schedule",
    "pseudo_label",
    "pseudo_label_precision",
]

UNPREDICTED_THRESHOLD = 0.5


def proportion_schedule(round: int = 0, prop: float = 0.15, local_prop: float = 0.1, step: float = 0.05) -> tuple[float, float]:
    """``(prop, local_prop)`` of round ``round``: ``prop + step·round``, ``local_prop + step·round``."""
    if round < 0:
        raise InputError(f"round: expected >= 0, got {round}")
    p, lp = prop + step * round, local_prop + step * round
    if not (0 < p <= 1 and 0 <= lp <= 1):
        raise InputError(f"round {round}: proportions ({p:.2f}, {lp:.2f}) leave (0, 1]")
    return p, lp


def _probs(scores: Any, input_type: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores).float()
    if x.ndim < 2:
        raise InputError(f"scores: expected (C, *spatial), got {tuple(x.shape)}")
    if input_type == "logits":
        return F.softmax(x, dim=0)
    if input_type == "probs":
        return x
    raise InputError(f"input_type: expected 'logits' or 'probs', got {input_type!r}")


def class_thresholds(
    images: Iterable[Any],
    *,
    prop: float,
    num_classes: int | None = None,
    ece: Sequence[float] | None = None,
    subsample: int = 5,
    input_type: str = "logits",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class thresholds ``(C,)`` and the number of pooled values per class ``(C,)``.

    ``images`` yields per-image scores ``(C, *spatial)``; ``ece`` the per-image estimated ECE
    (same order; ``None``: no weighting).
    """
    if not 0 < prop <= 1:
        raise InputError(f"prop: expected a value in (0, 1], got {prop}")
    if subsample < 1:
        raise InputError(f"subsample: expected >= 1, got {subsample}")
    pooled: dict[int, list[np.ndarray]] = {}
    c_seen = None
    n_img = 0
    for i, s in enumerate(images):
        p = _probs(s, input_type)
        c = p.shape[0]
        if c_seen is None:
            c_seen = c
        elif c != c_seen:
            raise InputError(f"image {i}: {c} classes, the first image had {c_seen}")
        if ece is not None and i >= len(ece):
            raise InputError(f"ece: {len(ece)} values for more images")
        w = 1.0 - float(ece[i]) if ece is not None else 1.0
        maxp, pred = p.reshape(c, -1).max(dim=0)
        conf = (w * maxp).numpy()
        pred = pred.numpy()
        for k in np.unique(pred):
            v = np.sort(conf[pred == k])[::subsample]
            pooled.setdefault(int(k), []).append(v)
        n_img += 1
    if n_img == 0:
        raise InputError("class_thresholds: no images")
    if ece is not None and len(ece) != n_img:
        raise InputError(f"ece: {len(ece)} values for {n_img} images")
    c = num_classes if num_classes is not None else c_seen
    if c_seen != c:
        raise InputError(f"num_classes={num_classes} but the scores have {c_seen} classes")
    thr = np.full(c, UNPREDICTED_THRESHOLD, dtype=np.float64)
    counts = np.zeros(c, dtype=np.int64)
    for k, parts in pooled.items():
        v = np.sort(np.concatenate(parts))
        counts[k] = v.size
        idx = int(v.size * prop)
        thr[k] = v[-idx] if idx > 0 else v[-1]
    return thr, counts


def pseudo_label(
    scores: Any,
    thresholds: Sequence[float] | np.ndarray,
    *,
    local_prop: float,
    ignore_value: int = 255,
    input_type: str = "logits",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pseudo-label map of one image and its masks ``{"class_balanced", "local", "union"}``."""
    p = _probs(scores, input_type)
    c = p.shape[0]
    thr = torch.as_tensor(np.asarray(thresholds, dtype=np.float64)).float()
    if thr.shape != (c,):
        raise InputError(f"thresholds: expected {c} values, got {tuple(thr.shape)}")
    if not 0 <= local_prop <= 1:
        raise InputError(f"local_prop: expected a value in [0, 1], got {local_prop}")
    if not 0 <= ignore_value <= 65535 or ignore_value < c:
        raise InputError(f"ignore_value: {ignore_value} must be >= the number of classes ({c}) and <= 65535")
    spatial = p.shape[1:]
    flat = p.reshape(c, -1)
    maxp, pred = flat.max(dim=0)
    mask_cb = (flat > thr[:, None]).any(dim=0)
    k = int(local_prop * maxp.numel())
    mask_local = torch.zeros_like(mask_cb)
    if k > 0:
        mask_local[torch.topk(maxp, k, sorted=False).indices] = True
    union = mask_cb | mask_local
    dtype = np.uint8 if ignore_value <= 255 else np.uint16
    lab = np.where(union.numpy(), pred.numpy(), ignore_value).astype(dtype).reshape(spatial)
    masks = {
        "class_balanced": mask_cb.numpy().reshape(spatial),
        "local": mask_local.numpy().reshape(spatial),
        "union": union.numpy().reshape(spatial),
    }
    return lab, masks


def maxprob_threshold_for_coverage(images: Iterable[Any], coverage: float, *, input_type: str = "logits") -> float:
    """The global max-probability threshold whose coverage over ``images`` is ``coverage``."""
    if not 0 < coverage <= 1:
        raise InputError(f"coverage: expected a value in (0, 1], got {coverage}")
    vals = np.concatenate([_probs(s, input_type).max(dim=0).values.reshape(-1).numpy() for s in images])
    if vals.size == 0:
        raise InputError("maxprob_threshold_for_coverage: no images")
    k = max(round(coverage * vals.size), 1)
    return float(np.partition(vals, vals.size - k)[vals.size - k])


def maxprob_pseudo_labels(scores: Any, threshold: float, *, ignore_value: int = 255, input_type: str = "logits") -> np.ndarray:
    """Baseline: ``argmax`` where ``max_k P_k >= threshold``, else ``ignore_value``."""
    p = _probs(scores, input_type)
    maxp, pred = p.max(dim=0)
    dtype = np.uint8 if ignore_value <= 255 else np.uint16
    return np.where((maxp >= threshold).numpy(), pred.numpy(), ignore_value).astype(dtype)


def pseudo_label_precision(
    pseudo: np.ndarray, labels: np.ndarray, *, ignore_value: int = 255, label_ignore: int | None = None
) -> tuple[int, int, int]:
    """``(correct, selected, valid)`` pixel counts: selected = pseudo-labelled pixels whose true label
    is valid, correct = those equal to the true label, valid = pixels with a valid true label."""
    pseudo = np.asarray(pseudo)
    labels = np.asarray(labels)
    if pseudo.shape != labels.shape:
        raise InputError(f"pseudo/labels: shapes differ {pseudo.shape} vs {labels.shape}")
    valid = np.ones(labels.shape, dtype=bool) if label_ignore is None else labels != label_ignore
    sel = valid & (pseudo != ignore_value)
    return int((sel & (pseudo == labels)).sum()), int(sel.sum()), int(valid.sum())
