"""Source-side training with a calibration regulariser and ECE-based checkpoint selection.

§3.15(c): ``loss = CE(ignore) + alpha · mean_batch(ClassLevelECE)`` (alpha = 1 in the reference),
the class-level ECE of §3.15(b) computed from the softmax of the logits with ignored pixels
excluded (:class:`segcal.losses.ClassLevelECE`). Its gradient flows through the LSE confidence of
every bin (bins and accuracies are hard).

§3.15(d): source checkpoints are selected by the ECE on a **labelled source validation split**
(:func:`select_source_checkpoint`). Unlike the reference validation, ignored pixels are excluded.
This is for users who still have their source data; the target side never needs labels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcal.errors import InputError
from segcal.losses import ClassLevelECE, DifferentiableECE

__all__ = ["evaluate_source_ece", "select_source_checkpoint", "source_loss", "source_train_epoch"]


def source_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, alpha: float = 1.0, ignore_index: int | None = 255,
    n_bins: int = 10,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE + alpha · ClassLevelECE`` (§3.15(c)); returns the loss and its parts."""
    labels = labels.long()
    ce = F.cross_entropy(logits, labels, ignore_index=-100 if ignore_index is None else ignore_index)
    if alpha:
        dece = ClassLevelECE(n_bins, input_type="logits", ignore_index=ignore_index)(logits, labels)
        if ignore_index is not None and 0 <= ignore_index < logits.shape[1]:
            dece = dece * logits.shape[1] / (logits.shape[1] - 1)  # the ignore class is never a label
    else:
        dece = logits.new_zeros(())
    loss = ce + alpha * dece
    return loss, {"ce": float(ce.detach()), "class_ece": float(dece.detach()), "total": float(loss.detach())}


def source_train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    alpha: float = 1.0,
    ignore_index: int | None = 255,
) -> dict[str, float]:
    """One epoch of §3.15(c) training on labelled source ``(images, labels)`` batches; mean parts."""
    model.train()
    sums: dict[str, float] = {}
    nb = 0
    for x, y in batches:
        loss, parts = source_loss(model(x), y, alpha=alpha, ignore_index=ignore_index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        nb += 1
    if nb == 0:
        raise InputError("source_train_epoch: no batches")
    return {k: v / nb for k, v in sums.items()}


@torch.no_grad()
def evaluate_source_ece(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    ignore_index: int | None = 255,
    kind: str = "image",
    n_bins: int = 10,
) -> float:
    """Mean per-image ECE on labelled batches (``kind``: ``"image"`` top-label or ``"class_level"``)."""
    model.eval()
    if kind == "image":
        metric = DifferentiableECE(n_bins, input_type="logits", ignore_index=ignore_index, reduction="none")
    elif kind == "class_level":
        metric = ClassLevelECE(n_bins, input_type="logits", ignore_index=ignore_index, reduction="none")
    else:
        raise InputError(f"kind: expected 'image' or 'class_level', got {kind!r}")
    vals = [metric(model(x), y.long()) for x, y in batches]
    if not vals:
        raise InputError("evaluate_source_ece: no batches")
    return float(torch.cat(vals).mean())


def select_source_checkpoint(
    checkpoints: Sequence[str | os.PathLike | dict[str, torch.Tensor]],
    model: nn.Module,
    val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | Sequence[Any],
    *,
    ignore_index: int | None = 255,
    kind: str = "image",
) -> tuple[int, list[float]]:
    """Index of the checkpoint with the lowest source-validation ECE, and every checkpoint's ECE.

    ``checkpoints``: ``state_dict`` files (or dicts; an adaptation checkpoint's ``state_dict`` is
    taken), loaded in turn into ``model``; ``val_batches``: labelled ``(images, labels)`` batches or
    a callable returning them.
    """
    if not checkpoints:
        raise InputError("select_source_checkpoint: no checkpoints")
    eces = []
    for ck in checkpoints:
        sd = ck if isinstance(ck, dict) else torch.load(ck, map_location="cpu", weights_only=True)
        if "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        model.load_state_dict(sd)
        batches = val_batches() if callable(val_batches) else val_batches
        eces.append(evaluate_source_ece(model, batches, ignore_index=ignore_index, kind=kind))
    return int(np.argmin(eces)), eces
