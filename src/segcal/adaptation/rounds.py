"""The pseudo-labels of an adaptation round (§3.15(g)) and, under ``torchrun``, the sharded step.

:func:`round_labels` makes the labels, class weights and log entry of a round from the current
model: ``calsfda`` ECE-weighted class-balanced pseudo-labels (thresholds over every target image),
``selftrain`` max-probability labels. It writes ``pseudo_roundR.npz`` (rank 0) and reloads it
when a run is resumed in the middle of a round. With several ranks the logits are sharded by image
and the thresholds come from the gathered pools (:mod:`segcal.adaptation.distributed`); with one
process it is the code of the one-process loop.

:func:`sharded_step` is one training step of a global batch of which this rank holds a slice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segcal.adaptation.distributed import Team, gather_rows, pool_confidences, pooled_thresholds
from segcal.adaptation.losses import (
    IGNORE,
    BatchShare,
    CalSFDALoss,
    batch_share,
    class_weights,
    share_ce,
    share_entropy,
)
from segcal.estimation.pseudolabels import (
    class_thresholds,
    maxprob_pseudo_labels,
    proportion_schedule,
    pseudo_label,
)

__all__ = ["round_labels", "sharded_step"]

LogitsOf = Callable[[Sequence[int] | None], Iterator[torch.Tensor]]


def round_labels(
    cfg: Any,
    rnd: int,
    out: Path,
    logits_of: LogitsOf,
    evaluate: Callable[[], np.ndarray],
    num_classes: int,
    n: int,
    *,
    fresh: bool,
    team: Team,
) -> tuple[np.ndarray, torch.Tensor | None, dict[str, Any]]:
    """Pseudo-labels ``(n, H, W)`` uint8, class weights and the round's log entry.

    Parameters
    ----------
    cfg
        The run's :class:`~segcal.adaptation.AdaptConfig`.
    logits_of
        ``logits_of(indices)`` yields the eval-mode logits ``(C, H, W)`` of those images (``None``:
        every image).
    evaluate
        The per-image estimated ECE of the current model (a collective under several ranks).
    fresh
        False when resumed in the middle of the round: the saved labels are reloaded.
    """
    path = out / f"pseudo_round{rnd}.npz"
    if not fresh and path.is_file():  # resumed in the middle of a round
        z = np.load(path, allow_pickle=False)
        info = json.loads(str(z["info"]))
        w = torch.from_numpy(z["weights"]) if z["weights"].size else None
        return z["labels"], w, info
    info: dict[str, Any] = {"round": rnd}
    mine = team.images(n)
    if cfg.method == "calsfda":
        est = evaluate()
        prop, local_prop = proportion_schedule(rnd)
        if team.distributed:
            pools = team.gather(lambda: pool_confidences(zip(mine, logits_of(mine), strict=True), est, cfg.subsample))
            thr, _ = pooled_thresholds(pools, prop, num_classes)
            labels = np.stack(gather_rows(team, lambda: [pseudo_label(s, thr, local_prop=local_prop)[0]
                                                         for s in logits_of(mine)]))
        else:
            thr, _ = class_thresholds(logits_of(None), prop=prop, num_classes=num_classes, ece=list(est),
                                      subsample=cfg.subsample)
            labels = np.stack([pseudo_label(s, thr, local_prop=local_prop)[0] for s in logits_of(None)])
        w = class_weights(thr)
        info.update(prop=prop, local_prop=local_prop, thresholds=[float(t) for t in thr],
                    class_weights=[float(v) for v in w], estimated_ece=float(est.mean()))
    else:
        if team.distributed:
            labels = np.stack(gather_rows(team, lambda: [maxprob_pseudo_labels(s, cfg.selftrain_threshold)
                                                         for s in logits_of(mine)]))
        else:
            labels = np.stack([maxprob_pseudo_labels(s, cfg.selftrain_threshold) for s in logits_of(None)])
        w = None
        info.update(threshold=cfg.selftrain_threshold)
    for c in cfg.ignore_classes:
        labels[labels == c] = IGNORE
    total = labels.size
    counts = np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes]
    info["coverage"] = float(counts.sum() / total)
    info["coverage_per_class"] = [float(v / total) for v in counts]
    team.main(lambda: np.savez_compressed(path, labels=labels,
                                          weights=np.zeros(0, np.float32) if w is None else w.numpy(),
                                          info=np.array(json.dumps(info))))
    return labels, w, info


def sharded_step(
    team: Team,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    method: str,
    x: torch.Tensor,
    batch: Sequence[int],
    pseudo: np.ndarray | None,
    loss_fn: CalSFDALoss,
    generator: torch.Generator,
) -> tuple[float, dict[str, float]]:
    """One training step on this rank's rows ``x`` of the global batch ``batch``.

    The loss is this rank's share of the one-process loss of the batch (global normalisers,
    :class:`~segcal.adaptation.losses.BatchShare`), the gradients are summed over the ranks before
    the optimizer step (identical on every rank). Returns the loss of the global batch and its
    parts (``calsfda``), summed over the ranks.
    """
    start, stop = team.rows(batch)
    logits = module(x)
    parts: dict[str, float] = {}
    if method == "tent":
        loss = share_entropy(logits, BatchShare(start, stop, len(batch), 0, 0.0))
    else:
        full = pseudo[list(batch)]
        y = torch.from_numpy(full[start:stop].astype(np.int64)).to(x.device)
        share = batch_share(full, (start, stop), loss_fn.weights if method == "calsfda" else None)
        if method == "calsfda":
            loss, parts = loss_fn(logits, y, generator, share)
        else:
            loss = share_ce(logits, y, share)
    optimizer.zero_grad()
    loss.backward()
    team.sum_grads(params)
    optimizer.step()
    keys = list(parts)
    sums = team.sum([float(loss.detach()), *(parts[k] for k in keys)])
    return sums[0], dict(zip(keys, sums[1:], strict=True))
