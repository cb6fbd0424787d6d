"""Target-side adaptation losses of Cal-SFDA (``../shared/methods.md`` §3.15(h)).

* :func:`class_weights` -- ``softmax_c(1 / thr_c)`` over the class-balanced pseudo-label
  thresholds of §3.15(g) (a threshold of 0 is replaced by 0.01 first, as in the reference).
* :func:`symmetric_ce` -- ``alpha·CE_w + beta·RCE`` with ``alpha = 0.1``, ``beta = 1.0``
  (§3.15(h)). ``CE_w`` is the class-weighted cross-entropy on pseudo-labelled pixels
  (``ignore_index`` = unlabelled); the reverse cross-entropy ``RCE = -Σ_k p_k log q_k`` uses the
  one-hot pseudo-label ``q`` clamped to ``[1e-4, 1]`` (so ``log q`` is 0 on the label and
  ``log 1e-4`` elsewhere) and the softmax ``p`` clamped to ``[1e-7, 1]``.
* :func:`negative_labels` / :func:`negative_learning_loss` -- per pixel the class ranked
  ``k = C//2 + U{-3..3}`` (0 = most probable; clamped to ``[1, C-1]`` so it is never the
  prediction) is a "negative label"; the loss is ``-log(1 - p_neg)`` averaged over the pixels.
  The reference applies it to every pixel of the batch; so does this module.
* :func:`entropy_term` -- ``mean(((H / log C)²)²)`` with ``H`` the entropy of the **softmax
  probabilities**, computed once from the logits (the reference helper applies ``log_softmax``
  to already-softmaxed probabilities; §7 item 6). Its weight ``eta`` is not given by the
  reference config; it defaults to 0 (off) here.

:class:`CalSFDALoss` combines them and returns the parts for logging.

Under ``torchrun`` each rank holds a slice of every batch (:mod:`segcal.adaptation.distributed`);
given a :class:`BatchShare` (this rank's rows and the global batch's counts, :func:`batch_share`)
every mean above becomes this rank's **sum divided by the global count** (labelled pixels, class
weights of the labelled pixels, or all pixels), so that the ranks' losses add up to the one-process
loss of the batch and their summed gradients to its gradient; the negative-label ranks are drawn
for the whole batch from the shared generator and sliced (:func:`negative_labels` ``rows=``), so
the draws do not depend on the number of ranks. :func:`share_ce` and :func:`share_entropy` are
the self-training and TENT losses in the same form. Without a share nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcal.errors import InputError
from segcal.validation import valid_labels

__all__ = [
    "BatchShare",
    "CalSFDALoss",
    "batch_share",
    "class_weights",
    "entropy_term",
    "negative_labels",
    "negative_learning_loss",
    "reverse_ce",
    "share_ce",
    "share_entropy",
    "symmetric_ce",
]

IGNORE = 255
ONEHOT_FLOOR = 1e-4
PROB_FLOOR = 1e-7


def class_weights(thresholds: Any) -> torch.Tensor:
    """``softmax_c(1 / thr_c)`` with ``thr_c = 0`` replaced by ``0.01`` (§3.15(h))."""
    thr = torch.as_tensor(np.asarray(thresholds, dtype=np.float64)).clone()
    if thr.ndim != 1 or thr.numel() < 1:
        raise InputError(f"thresholds: expected a 1-D array of per-class values, got shape {tuple(thr.shape)}")
    if (thr < 0).any() or not torch.isfinite(thr).all():
        raise InputError("thresholds: expected finite values >= 0")
    thr[thr == 0] = 0.01
    return torch.softmax(1.0 / thr, dim=0).float()


def _valid(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return valid_labels(target, ignore_index)


def reverse_ce(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean over labelled pixels of ``-Σ_k p_k log clamp(onehot_k, 1e-4, 1)``."""
    c = logits.shape[1]
    valid = _valid(target, ignore_index)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    p = F.softmax(logits, dim=1).clamp(PROB_FLOOR, 1.0)
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    onehot = F.one_hot(t, c).movedim(-1, 1).float().clamp(ONEHOT_FLOOR, 1.0)
    rce = -(p * torch.log(onehot)).sum(dim=1)
    return rce[valid].mean()


def symmetric_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """``alpha · CE_w + beta · RCE`` over the pseudo-labelled pixels (§3.15(h); 0 if none)."""
    if logits.ndim < 2 or tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
        raise InputError(f"target: shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    target = target.long()
    valid = _valid(target, ignore_index)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
        if weights.shape != (logits.shape[1],):
            raise InputError(f"weights: expected {logits.shape[1]} class weights, got {tuple(weights.shape)}")
    ce = F.cross_entropy(logits, target, weight=weights, ignore_index=ignore_index)
    return alpha * ce + beta * reverse_ce(logits, target, ignore_index=ignore_index)


def negative_labels(
    probs: torch.Tensor, generator: torch.Generator | None = None, spread: int = 3,
    rows: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Per pixel, the class ranked ``C//2 + U{-spread..spread}`` by probability (rank 0 = top).

    The rank is clamped to ``[1, C-1]``: the negative label is never the predicted class.
    ``rows=(start, stop, total)``: ``probs`` are rows ``start:stop`` of a batch of ``total``; the
    offsets are drawn for the whole batch and sliced (the same draws as one process). Returns
    ``(N, *spatial)`` class indices.
    """
    c = probs.shape[1]
    if c < 2:
        raise InputError("negative learning needs at least 2 classes")
    order = probs.detach().argsort(dim=1, descending=True)
    shape = (probs.shape[0] if rows is None else rows[2], 1, *probs.shape[2:])
    off = torch.randint(-spread, spread + 1, shape, generator=generator, device="cpu")
    off = (off if rows is None else off[rows[0] : rows[1]]).to(probs.device)
    rank = (c // 2 + off).clamp(1, c - 1)
    return order.gather(1, rank).squeeze(1)


def negative_learning_loss(logits: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log(1 - p_neg)`` (probabilities from one softmax of ``logits``)."""
    p = F.softmax(logits, dim=1)
    pn = p.gather(1, neg.long().unsqueeze(1)).squeeze(1)
    return -torch.log((1.0 - pn).clamp_min(PROB_FLOOR)).mean()


def entropy_term(logits: torch.Tensor) -> torch.Tensor:
    """``mean(((H / log C)²)²)``, ``H = -Σ p log p`` with ``p = softmax(logits)`` (softmax once)."""
    c = logits.shape[1]
    logp = F.log_softmax(logits, dim=1)
    h = -(logp.exp() * logp).sum(dim=1) / math.log(c)
    return (h**2).pow(2).mean()


@dataclass(frozen=True)
class BatchShare:
    """This rank's rows ``start:stop`` of a global batch of ``total`` images and its global counts.

    Attributes
    ----------
    start, stop, total
        This rank's rows and the number of images of the global batch.
    valid
        Labelled pixels (target not ``ignore_index``) of the global batch.
    weight
        Their summed class weights (``valid`` without class weights): the denominator of the
        weighted cross-entropy.
    """

    start: int
    stop: int
    total: int
    valid: int
    weight: float


def batch_share(
    target: Any, rows: tuple[int, int], weights: torch.Tensor | None = None, *, ignore_index: int = IGNORE
) -> BatchShare:
    """The :class:`BatchShare` of rows ``rows`` of a global batch whose pseudo-labels are ``target``.

    ``target``: the ``(N, *spatial)`` integer labels of the **whole** batch (every rank holds them).
    """
    t = np.asarray(target)
    lab = t[t != ignore_index].astype(np.int64).ravel()
    if weights is None:
        weight = float(lab.size)
    else:
        w = torch.as_tensor(weights).double().numpy()
        weight = float(np.bincount(lab, minlength=w.size)[: w.size] @ w)
    return BatchShare(int(rows[0]), int(rows[1]), int(t.shape[0]), int(lab.size), weight)


def _pixels(logits: torch.Tensor, share: BatchShare) -> int:
    return share.total * math.prod(logits.shape[2:])


def share_ce(logits: torch.Tensor, target: torch.Tensor, share: BatchShare, *, ignore_index: int = IGNORE) -> torch.Tensor:
    """This rank's part of the batch's ``F.cross_entropy`` (mean over its labelled pixels; 0 if none)."""
    if share.valid == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum") / share.valid


def share_entropy(logits: torch.Tensor, share: BatchShare) -> torch.Tensor:
    """This rank's part of the batch's mean per-pixel softmax entropy (TENT's loss)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum() / _pixels(logits, share)


def _share_sce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, share: BatchShare,
               alpha: float, beta: float, ignore_index: int) -> torch.Tensor:
    if share.valid == 0:
        return logits.sum() * 0.0
    target = target.long()
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    ce = F.cross_entropy(logits, target, weight=weights, ignore_index=ignore_index, reduction="sum") / share.weight
    valid = _valid(target, ignore_index)
    p = F.softmax(logits, dim=1).clamp(PROB_FLOOR, 1.0)
    t = torch.where(valid, target, torch.zeros_like(target))
    onehot = F.one_hot(t, logits.shape[1]).movedim(-1, 1).float().clamp(ONEHOT_FLOOR, 1.0)
    rce = -(p * torch.log(onehot)).sum(dim=1)[valid].sum() / share.valid
    return alpha * ce + beta * rce


class CalSFDALoss(nn.Module):
    """The §3.15(h) objective ``alpha·CE_w + beta·RCE + gamma·NL + eta·Ent``.

    Parameters
    ----------
    weights
        Class weights (:func:`class_weights` of the round's thresholds) or ``None``.
    alpha, beta
        Symmetric CE weights (0.1 and 1.0 in the reference).
    gamma
        Weight of the negative-learning term (1.0; the reference adds it unweighted).
    eta
        Weight of the entropy term (default 0: the reference config does not set it).
    """

    def __init__(
        self,
        weights: torch.Tensor | None = None,
        *,
        alpha: float = 0.1,
        beta: float = 1.0,
        gamma: float = 1.0,
        eta: float = 0.0,
        ignore_index: int = IGNORE,
        spread: int = 3,
    ) -> None:
        super().__init__()
        self.register_buffer("weights", None if weights is None else torch.as_tensor(weights).float())
        self.alpha, self.beta, self.gamma, self.eta = float(alpha), float(beta), float(gamma), float(eta)
        self.ignore_index = int(ignore_index)
        self.spread = int(spread)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None,
        share: BatchShare | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and its parts; with ``share``, this rank's part of the global batch's loss."""
        if share is None:
            sce = symmetric_ce(logits, target, self.weights, alpha=self.alpha, beta=self.beta,
                               ignore_index=self.ignore_index)
        else:
            sce = _share_sce(logits, target, self.weights, share, self.alpha, self.beta, self.ignore_index)
        total = sce
        parts = {"sce": float(sce.detach())}
        if self.gamma:
            rows = None if share is None else (share.start, share.stop, share.total)
            neg = negative_labels(F.softmax(logits, 1), generator, self.spread, rows)
            if share is None:
                nl = negative_learning_loss(logits, neg)
            else:
                pn = F.softmax(logits, dim=1).gather(1, neg.long().unsqueeze(1)).squeeze(1)
                nl = -torch.log((1.0 - pn).clamp_min(PROB_FLOOR)).sum() / _pixels(logits, share)
            total = total + self.gamma * nl
            parts["nl"] = float(nl.detach())
        if self.eta:
            if share is None:
                ent = entropy_term(logits)
            else:
                logp = F.log_softmax(logits, dim=1)
                h = -(logp.exp() * logp).sum(dim=1) / math.log(logits.shape[1])
                ent = (h**2).pow(2).sum() / _pixels(logits, share)
            total = total + self.eta * ent
            parts["entropy"] = float(ent.detach())
        parts["total"] = float(total.detach())
        return total, parts
