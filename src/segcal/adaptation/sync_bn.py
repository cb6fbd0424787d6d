"""BatchNorm with batch statistics over every rank of a gloo or NCCL job (adaptation under ``torchrun``).

:func:`synced_batchnorm` makes every BatchNorm module of a model, for the duration of a ``with``
block, compute its **train-mode** statistics over the whole global batch of which each rank holds
a slice: per channel the sum, the sum of squares (both accumulated in float64) and the count are
summed over the ranks by :func:`all_reduce_sum`, an autograd-aware all-reduce, so that

* the forward output of every rank equals its rows of the one-process BatchNorm on the
  concatenated batch (biased variance for the normalisation),
* the backward gradients, summed over the ranks, equal the one-process gradients (the gradient of
  the summed statistics is itself summed over the ranks), and
* the running statistics are updated on every rank exactly as :class:`torch.nn.BatchNorm2d` does:
  ``num_batches_tracked += 1``, factor ``momentum`` (or ``1 / num_batches_tracked`` when
  ``momentum is None``, the cumulative average of the warm-up), the **unbiased** variance
  ``var · n / (n - 1)`` of the global batch.

A rank may hold no row of a batch (``(0, C, ...)`` input): it still takes part in every collective,
and its output is empty.

Why not :class:`torch.nn.SyncBatchNorm`: it refuses CPU tensors (gloo) in torch 2.13. Why not
:func:`torch.distributed.nn.functional.all_reduce`: the same autograd function, but deprecated in
torch 2.13 with a ``FutureWarning`` on every call, and its suggested replacement is a private torch
module; :class:`AllReduceSum` is the same ten lines.

Modules are not replaced: each BN module's class is swapped for a subclass of its own class (so
``isinstance`` checks, ``state_dict`` keys, hooks and parameters are untouched) and swapped back on
exit. In eval mode (running statistics) the subclass runs the module's own forward: those outputs
are per image and need no synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segcal.adaptation.bn import BN_TYPES

__all__ = ["AllReduceSum", "all_reduce_sum", "synced_batchnorm", "synced_forward"]

_CLASSES: dict[type, type] = {}


class AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` with a gradient: the backward all-reduces the incoming gradient.

    The output is the sum over the ranks of every rank's input; its gradient with respect to this
    rank's input is the sum over the ranks of the gradients arriving at the output, which is again
    an all-reduce (as ``torch.distributed.nn.functional.all_reduce``).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return AllReduceSum.apply(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every rank (autograd-aware; gloo tensors travel on the CPU)."""
    if dist.get_backend() == "gloo" and tensor.device.type != "cpu":
        return AllReduceSum.apply(tensor.cpu()).to(tensor.device)
    return AllReduceSum.apply(tensor)


def synced_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a BN module whose batch statistics are those of the global batch (every rank).

    Eval mode with running statistics: the module's own forward. Otherwise: the statistics of the
    rows of every rank, and (train mode, ``track_running_stats``) the running statistics updated
    as ``nn.BatchNorm`` does.
    """
    batch_stats = self.training or self.running_mean is None
    if not batch_stats:
        return self.unsynced_forward(x)
    c = x.shape[1]
    factor = 0.0 if self.momentum is None else float(self.momentum)
    track = self.training and self.track_running_stats and self.running_mean is not None
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
    dims = [0, *range(2, x.ndim)]
    count = torch.tensor([x.numel() // max(c, 1)], dtype=torch.float64, device=x.device)
    local = torch.cat([x.sum(dims, dtype=torch.float64), x.square().sum(dims, dtype=torch.float64), count])
    total = all_reduce_sum(local)
    n = float(total[2 * c].detach())
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} over every rank "
                         f"(input size {list(x.shape)} on this rank)")
    mean = total[:c] / n
    var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
    invstd = torch.rsqrt(var + self.eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
    if self.weight is not None:
        y = y * self.weight.view(shape)
    if self.bias is not None:
        y = y + self.bias.view(shape)
    if track:
        with torch.no_grad():
            m, v = mean.detach(), var.detach() * (n / (n - 1))
            self.running_mean.copy_((factor * m + (1.0 - factor) * self.running_mean.double()).to(self.running_mean.dtype))
            self.running_var.copy_((factor * v + (1.0 - factor) * self.running_var.double()).to(self.running_var.dtype))
    return y


def _synced_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Synced{cls.__name__}", (cls,),
                             {"forward": synced_forward, "unsynced_forward": cls.forward, "__module__": __name__})
    return _CLASSES[cls]


@contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block every BN module of ``model`` synchronises its batch statistics over the
    ranks (:func:`synced_forward`); yields the number of BN modules. ``enabled=False`` (one
    process): nothing changes and the block runs the model as it is."""
    if not enabled:
        yield 0
        return
    swapped = []
    for m in model.modules():
        if isinstance(m, BN_TYPES) and type(m) not in _CLASSES.values():
            swapped.append((m, type(m)))
            m.__class__ = _synced_class(type(m))
    try:
        yield len(swapped)
    finally:
        for m, cls in swapped:
            m.__class__ = cls
