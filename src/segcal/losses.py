"""Differentiable calibration losses (``../shared/methods.md`` §3.15(a)(b), Cal-SFDA).

:class:`DifferentiableECE` is the ECE with the LogSumExp trick of Cal-SFDA's ``ECELoss``:

* prediction ``ŷ_i = argmax_k P_ki``;
* confidence ``c_i = t · log Σ_k exp(P_ki / t)`` (``t = 1e-5``), a smooth upper bound of
  ``max_k P_ki`` that exceeds it by at most ``t · log C``;
* hard equal-width ``(lo, hi]`` bins from :func:`segcal.metrics.binning.bin_index` (the one binning
  routine of the project), empty bins skipped;
* ``ECE = Σ_b (n_b / N) · |mean_{i∈b} c_i − mean_{i∈b} 1[ŷ_i = y_i]|``.

Bin assignment and accuracy are hard, so gradients flow only through the mean confidence of each
bin (through the LSE). The value differs from the hard top-label ECE by at most ``t · log C`` when
no confidence crosses a bin edge because of the smoothing (the bins are assigned from the smooth
confidence, as in the reference code).

:class:`ClassLevelECE` is the training signal of Cal-SFDA (``class_level_ece_train``): for every
class ``k`` the ECE above restricted to pixels whose ground truth is ``k`` (accuracy there is
``1[ŷ = k]``), averaged over all ``C`` classes. A class absent from an image contributes **0** and
still counts in the denominator (the reference code's empty-bin guard leaves its ECE at 0); pass
``absent="skip"`` to average over present classes only. Ignored pixels are excluded.

Both losses work on probabilities ``(N, C, *spatial)`` (or logits with ``input_type="logits"``)
and labels ``(N, *spatial)``. ``reduction="mean"`` averages a per-image value over the batch (the
Cal-SFDA form), ``"none"`` returns the per-image values (label-free ECE estimation reuses this),
and :meth:`DifferentiableECE.pooled` treats all valid pixels of the batch as one set.

This module sits below :mod:`segcal.calibrators` and imports only :mod:`segcal.metrics.binning`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segcal.metrics.binning import bin_index

__all__ = ["ClassLevelECE", "DifferentiableECE", "smooth_confidence", "soft_binned_ece_stats"]


def smooth_confidence(probs: torch.Tensor, t: float = 1e-5, dim: int = 1) -> torch.Tensor:
    """LogSumExp smooth maximum ``t · log Σ_k exp(p_k / t)`` along ``dim``.

    Lies in ``[max_k p_k, max_k p_k + t · log C]``.
    """
    return t * torch.logsumexp(probs / t, dim=dim)


def soft_binned_ece_stats(
    conf: torch.Tensor, correct: torch.Tensor, n_bins: int
) -> torch.Tensor:
    """Per-bin sums ``(n_bins, 3)``: count, sum of confidences, sum of correctness.

    ``conf`` carries gradients; the bin of each value is taken from ``conf.detach()`` with
    :func:`bin_index`. The statistics are additive over chunks of pixels.
    """
    idx = bin_index(conf.detach(), n_bins)
    stats = conf.new_zeros((n_bins, 3))
    ones = torch.ones_like(conf)
    stats = stats.index_add(0, idx, torch.stack([ones, conf, correct.to(conf.dtype)], dim=1))
    return stats


def ece_from_stats(stats: torch.Tensor, n_total: torch.Tensor | float | None = None) -> torch.Tensor:
    """``Σ_b (n_b / N) |conf_b − acc_b|`` over non-empty bins from :func:`soft_binned_ece_stats`."""
    count = stats[:, 0]
    n = count.sum() if n_total is None else n_total
    nonempty = count > 0
    safe = torch.where(nonempty, count, torch.ones_like(count))
    gap = (stats[:, 1] - stats[:, 2]).abs() / safe
    per_bin = torch.where(nonempty, gap * count, torch.zeros_like(gap))
    if isinstance(n, torch.Tensor):
        n = torch.clamp(n, min=1.0)
    else:
        n = max(float(n), 1.0)
    return per_bin.sum() / n


def _prepare(
    preds: torch.Tensor,
    target: torch.Tensor,
    input_type: str,
    ignore_index: int | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if preds.ndim < 2:
        raise ValueError(f"preds: expected (N, C, *spatial) or (M, C), got {tuple(preds.shape)}")
    if preds.ndim == 2:  # (M, C) table -> one "image"
        preds = preds.t().unsqueeze(0)
        target = target.unsqueeze(0)
        if mask is not None:
            mask = mask.unsqueeze(0)
    if tuple(target.shape) != (preds.shape[0], *preds.shape[2:]):
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not match preds {tuple(preds.shape)}"
        )
    if input_type == "logits":
        probs = F.softmax(preds, dim=1)
    elif input_type == "probs":
        probs = preds
    else:
        raise ValueError(f"input_type: expected 'logits' or 'probs', got {input_type!r}")
    n, c = probs.shape[:2]
    probs = probs.reshape(n, c, -1)
    target = target.reshape(n, -1).long()
    valid = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        valid &= target != ignore_index
    if mask is not None:
        valid &= mask.reshape(n, -1).bool()
    return probs, target, valid


class DifferentiableECE(nn.Module):
    """Top-label ECE with a LogSumExp confidence (Cal-SFDA ``ECELoss``; methods.md §3.15(a)).

    Parameters
    ----------
    n_bins
        Number of equal-width ``(lo, hi]`` bins (10 in Cal-SFDA).
    t
        LSE temperature; the confidence exceeds ``max_k p_k`` by at most ``t · log C``.
    input_type
        ``"probs"`` (default, as in Cal-SFDA) or ``"logits"`` (softmax applied first).
    ignore_index
        Label value excluded from the loss (``None``: none).
    reduction
        ``"mean"`` over images (default), ``"sum"``, or ``"none"`` (per-image values ``(N,)``).
    """

    def __init__(
        self,
        n_bins: int = 10,
        t: float = 1e-5,
        *,
        input_type: str = "probs",
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins: expected a positive integer, got {n_bins}")
        if not t > 0:
            raise ValueError(f"t: expected a positive temperature, got {t}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        self.n_bins = int(n_bins)
        self.t = float(t)
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.reduction = reduction

    def bound(self, num_classes: int) -> float:
        """Largest possible excess of the smooth confidence over the max, ``t · log C``."""
        return self.t * math.log(num_classes)

    def per_image(
        self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ECE of each image over its valid pixels, shape ``(N,)`` (0 for an image with none)."""
        probs, target, valid = _prepare(preds, target, self.input_type, self.ignore_index, mask)
        out = []
        for i in range(probs.shape[0]):
            p = probs[i][:, valid[i]]  # (C, P)
            y = target[i][valid[i]]
            if p.shape[1] == 0:
                out.append(probs.new_zeros(()))
                continue
            conf = smooth_confidence(p, self.t, dim=0)
            correct = p.argmax(dim=0) == y
            out.append(ece_from_stats(soft_binned_ece_stats(conf, correct, self.n_bins)))
        return torch.stack(out)

    def pooled(
        self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ECE over all valid pixels of the batch taken together (a scalar)."""
        probs, target, valid = _prepare(preds, target, self.input_type, self.ignore_index, mask)
        p = probs.transpose(1, 2)[valid]  # (P, C)
        y = target[valid]
        if p.shape[0] == 0:
            return probs.new_zeros(())
        conf = smooth_confidence(p, self.t, dim=1)
        correct = p.argmax(dim=1) == y
        return ece_from_stats(soft_binned_ece_stats(conf, correct, self.n_bins))

    def forward(
        self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        v = self.per_image(preds, target, mask)
        if self.reduction == "mean":
            return v.mean()
        if self.reduction == "sum":
            return v.sum()
        return v


class ClassLevelECE(DifferentiableECE):
    """Class-averaged label-conditioned ECE (Cal-SFDA ``class_level_ece_train``; §3.15(b)).

    For each class ``k`` the :class:`DifferentiableECE` of the pixels whose label is ``k``
    (correct when predicted ``k``), averaged over the ``C`` classes per image.

    Parameters
    ----------
    absent
        ``"zero"`` (default, the reference behaviour): a class absent from an image contributes 0
        and still counts in the average over ``C``. ``"skip"``: average over present classes.
    """

    def __init__(self, n_bins: int = 10, t: float = 1e-5, *, absent: str = "zero", **kw) -> None:
        super().__init__(n_bins, t, **kw)
        if absent not in ("zero", "skip"):
            raise ValueError(f"absent: expected 'zero' or 'skip', got {absent!r}")
        self.absent = absent

    def per_image(
        self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        probs, target, valid = _prepare(preds, target, self.input_type, self.ignore_index, mask)
        c = probs.shape[1]
        out = []
        for i in range(probs.shape[0]):
            p = probs[i][:, valid[i]]
            y = target[i][valid[i]]
            conf = smooth_confidence(p, self.t, dim=0)
            pred = p.argmax(dim=0)
            per_class = []
            present = 0
            for k in range(c):
                sel = y == k
                if not bool(sel.any()):
                    per_class.append(probs.new_zeros(()))
                    continue
                present += 1
                stats = soft_binned_ece_stats(conf[sel], pred[sel] == k, self.n_bins)
                per_class.append(ece_from_stats(stats))
            total = torch.stack(per_class).sum()
            denom = c if self.absent == "zero" else max(present, 1)
            out.append(total / denom)
        return torch.stack(out)
