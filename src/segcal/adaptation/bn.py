"""BatchNorm utilities for adaptation: the warm-up epoch (§3.15(f)) and TENT.

Unlike the reference code, which sets ``track_running_stats`` / ``running_mean`` as attributes on
*parameter tensors* (a no-op, §7 item 6), everything here acts on the **BN modules**:

* :func:`bn_modules` / :func:`bn_parameters` -- the BatchNorm layers and their affine parameters;
* :func:`set_trainable` -- ``requires_grad`` on the chosen parameters only (``"bn"``: BN affine
  parameters; ``"all"``; ``"all-but"`` a frozen name component such as ``"encoder"``);
* :func:`bn_train_mode` -- the whole model in eval mode except the BN modules (train mode:
  batch statistics, running statistics updated);
* :func:`tent_step` -- TENT (Wang et al., ICLR 2021): one gradient step minimising the mean
  per-pixel softmax entropy with respect to the BN affine parameters only, BN in train mode.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from segcal.errors import InputError

__all__ = [
    "BN_TYPES",
    "bn_modules",
    "bn_parameters",
    "bn_train_mode",
    "mean_entropy",
    "set_trainable",
    "tent_step",
]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Affine parameters (weight, bias) of every BN module of ``model``."""
    out = []
    for m in bn_modules(model):
        out += [p for p in (m.weight, m.bias) if p is not None]
    return out


def set_trainable(model: nn.Module, which: str = "all", freeze: Iterable[str] = ()) -> list[nn.Parameter]:
    """Set ``requires_grad`` and return the trainable parameters.

    ``which="bn"``: BN affine parameters only. ``which="all"``: every parameter whose dotted name
    has no component in ``freeze`` (e.g. ``freeze=("encoder",)`` freezes ``encoder.*`` and
    ``model.encoder.*``, as the reference freezes the encoder after the warm-up).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if which == "bn":
        params = bn_parameters(model)
        if not params:
            raise InputError(f"{type(model).__name__} has no BatchNorm affine parameters to train")
    elif which == "all":
        frozen = set(freeze)
        params = [p for n, p in model.named_parameters() if not frozen.intersection(n.split("."))]
        if not params:
            raise InputError(f"no trainable parameters left after freezing {sorted(frozen)}")
    else:
        raise InputError(f"which: expected 'bn' or 'all', got {which!r}")
    for p in params:
        p.requires_grad_(True)
    return params


def bn_train_mode(model: nn.Module, *, momentum: float | str | None = "keep", reset: bool = False) -> int:
    """Eval mode everywhere except the BN modules (train mode). Returns the number of BN layers.

    ``momentum``: ``"keep"`` (default), a float, or ``None`` (cumulative average); ``reset``
    resets the running statistics first (the warm-up re-estimates them on target data).
    """
    bns = bn_modules(model)
    if not bns:
        raise InputError(f"{type(model).__name__} has no BatchNorm layers")
    model.eval()
    for m in bns:
        m.train()
        m.track_running_stats = True
        if momentum != "keep":
            m.momentum = momentum
        if reset:
            m.reset_running_stats()
    return len(bns)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy of ``softmax(logits)`` over the class axis 1 (nats)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


def tent_step(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """One TENT update on batch ``x``: minimise :func:`mean_entropy`; returns the loss before it.

    The caller sets :func:`bn_train_mode` and an optimizer over :func:`bn_parameters` only.
    """
    loss = mean_entropy(model(x))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())
