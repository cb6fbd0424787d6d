"""The ranks of an adaptation run under ``torchrun``: who computes what, and what is summed or gathered.

:func:`~segcal.adaptation.adapt` on ``N`` processes reproduces the one-process run (to float
rounding; ``tests/cli/test_distributed_adapt.py``). The schedule does not depend on ``N``: the
epoch order, the global batches and the random draws are those of one process, drawn identically
on every rank from the same seeded generator. What each rank does:

* **train-mode passes** (the BN warm-up, every training step): each global batch is cut into
  contiguous row slices (:meth:`Team.rows`, :func:`~segcal.pipeline.distributed.shard_bounds`;
  a rank may get no row of a small batch and still runs the model on an empty batch, so that it
  takes part in every collective). BatchNorm statistics are those of the global batch
  (:mod:`segcal.adaptation.sync_bn`); the loss of each rank is its share of the one-process
  loss, normalised by the global counts (:class:`~segcal.adaptation.losses.BatchShare`); the
  parameter gradients are summed over the ranks (:meth:`Team.sum_grads`) before the identical
  optimizer step of every rank; the logged losses are summed (:meth:`Team.sum`).
* **eval-mode passes** (per-image estimated ECE; the logits of the pseudo-labels): per image, so
  they are sharded -- the estimates by whole global batches (:meth:`Team.batches`, the same
  batches as one process), the logits by images (:meth:`Team.images`) -- and the per-image
  results gathered in image order (:meth:`Team.gather`), so every rank holds the estimates and
  the pseudo-labels of every image.
* **class-balanced thresholds**: each rank pools the sorted, subsampled confidences of its images
  per class (:func:`pool_confidences`, the first step of
  :func:`~segcal.estimation.class_thresholds`); the pools are gathered and every rank takes the
  same quantiles (:func:`pooled_thresholds`): exactly the one-process thresholds.

Rank 0 alone writes (checkpoints, ``adapt_log.json``, ``pseudo_roundR.npz``) and shows progress;
the others wait for it (:meth:`Team.main`, which also stops every rank when the write failed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from segcal.adaptation.target import TargetImages, stack
from segcal.errors import InputError
from segcal.estimation.pseudolabels import UNPREDICTED_THRESHOLD
from segcal.pipeline.distributed import (
    current,
    on_each,
    on_main,
    shard,
    shard_bounds,
    shard_weighted,
)

__all__ = ["Team", "batch_input", "check_empty_batches", "gather_rows", "pool_confidences", "pooled_thresholds"]

T = TypeVar("T")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Team:
    """This process's place among the ranks of an adaptation run (one process: rank 0 of 1).

    Attributes
    ----------
    rank, size
        The rank and the number of processes.
    device
        Where the tensors of the collectives live (the model's device under NCCL, else the CPU).
    """

    rank: int = 0
    size: int = 1
    device: torch.device = CPU

    @classmethod
    def here(cls, device: torch.device) -> Team:
        """The team of the initialised default process group (one process without one)."""
        w = current()
        comm = device if w.backend == "nccl" else CPU
        return cls(w.rank, w.size, comm)

    @property
    def distributed(self) -> bool:
        """True with more than one rank."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (it writes and shows progress)."""
        return self.rank == 0

    def rows(self, batch: Sequence[int]) -> tuple[int, int]:
        """``(start, stop)`` of this rank's contiguous rows of a global batch."""
        return shard_bounds(len(batch), self.rank, self.size)

    def part(self, batch: Sequence[int]) -> list[int]:
        """This rank's images of a global batch (possibly none)."""
        start, stop = self.rows(batch)
        return list(batch[start:stop])

    def images(self, n: int) -> list[int]:
        """This rank's contiguous block of the image indices ``0 .. n-1``."""
        return shard(list(range(n)), self.rank, self.size)

    def batches(self, batches: list[list[int]]) -> list[list[int]]:
        """This rank's whole batches (contiguous, balanced by images)."""
        return shard_weighted(batches, [len(b) for b in batches], self.rank, self.size)

    def gather(self, fn: Callable[[], T]) -> list[T]:
        """Every rank runs ``fn``; the results of every rank in rank order (all raise if one failed)."""
        return on_each(fn)

    def main(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs ``fn`` while the others wait; every rank gets its result (or its error)."""
        return on_main(fn)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def sum_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its sum over the ranks (one all-reduce).

        A parameter whose gradient is ``None`` on every rank keeps ``None`` (the optimizer skips
        it, as in one process); one with a gradient on some rank gets the sum of those.
        """
        params = [p for p in params if p.requires_grad]
        if not self.distributed or not params:
            return
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self.device) for p in params]
        had = torch.tensor([float(p.grad is not None) for p in params], dtype=flat[0].dtype, device=self.device)
        buf = torch.cat([*flat, had])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        any_grad = buf[-len(params):] > 0
        offset = 0
        for j, p in enumerate(params):
            k = p.numel()
            grad = buf[offset : offset + k].view_as(p).to(p.device)
            offset += k
            if p.grad is not None:
                p.grad.copy_(grad)
            elif bool(any_grad[j]):
                p.grad = grad.clone()


def batch_input(
    inputs: TargetImages, idx: Sequence[int], batch: Sequence[int], shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """This rank's rows ``idx`` of the global batch ``batch`` as one tensor; ``(0, 3, H, W)`` when none.

    Raises
    ------
    InputError
        The images of ``batch`` do not share one shape (one process would fail to stack them).
    """
    sizes = {tuple(shapes[i][1:]) for i in batch}
    if len(sizes) > 1:
        raise InputError(f"target images of different sizes {sorted(sizes)} in one batch of {len(batch)}; "
                         "use images of one size or --batch-size 1")
    if idx:
        return stack(inputs, idx, device)
    return torch.empty((0, *shapes[batch[0]][1:]), dtype=dtype, device=device)


def check_empty_batches(
    team: Team, module: nn.Module, lengths: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Refuse, on every rank, a model that cannot run on an empty batch when one will be needed.

    A global batch of fewer images than ranks leaves some rank without a row, and that rank runs
    the model on a ``(0, 3, H, W)`` batch to take part in the collectives; a model that fails on it
    would leave the other ranks waiting. Checked once, in eval mode, before any training.

    Raises
    ------
    InputError
        The model fails on an empty batch (every rank raises it).
    """
    short = sorted({n for n in lengths if n < team.size})
    if not team.distributed or not short:
        return

    def run() -> None:
        module.eval()
        try:
            with torch.no_grad():
                module(torch.empty((0, *shape[1:]), dtype=dtype, device=device))
        except Exception as exc:  # any failure of the model's own code
            raise InputError(
                f"the model cannot run on an empty batch ({type(exc).__name__}: {str(exc).splitlines()[0]}); with "
                f"{team.size} processes a batch of {short[0]} image(s) leaves a rank without one: choose --batch-size "
                f"and the number of target images so that every batch holds at least {team.size}, or use fewer "
                "processes") from exc

    team.gather(run)


def pool_confidences(
    scores: Iterable[tuple[int, torch.Tensor]], ece: Sequence[float], subsample: int
) -> dict[int, list[np.ndarray]]:
    """Per predicted class, the sorted ECE-weighted confidences of each image, every ``subsample``-th.

    ``scores`` yields ``(image index, logits (C, *spatial))``; ``ece`` holds the estimated ECE of
    every image (global index). The pooling step of :func:`~segcal.estimation.class_thresholds`,
    value for value.
    """
    pooled: dict[int, list[np.ndarray]] = {}
    for i, s in scores:
        p = F.softmax(s, dim=0)
        c = p.shape[0]
        w = 1.0 - float(ece[i])
        maxp, pred = p.reshape(c, -1).max(dim=0)
        conf = (w * maxp).numpy()
        pred = pred.numpy()
        for k in np.unique(pred):
            pooled.setdefault(int(k), []).append(np.sort(conf[pred == k])[::subsample])
    return pooled


def pooled_thresholds(
    pools: Sequence[dict[int, list[np.ndarray]]], prop: float, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class thresholds ``(C,)`` and pooled counts ``(C,)`` from the pools of every rank.

    The quantile step of :func:`~segcal.estimation.class_thresholds`: the same values as one
    process for the same pooled confidences (the order of the pools does not matter, the values
    are sorted).
    """
    if not 0 < prop <= 1:
        raise InputError(f"prop: expected a value in (0, 1], got {prop}")
    merged: dict[int, list[np.ndarray]] = {}
    for pool in pools:
        for k, parts in pool.items():
            merged.setdefault(k, []).extend(parts)
    thr = np.full(num_classes, UNPREDICTED_THRESHOLD, dtype=np.float64)
    counts = np.zeros(num_classes, dtype=np.int64)
    for k, parts in merged.items():
        if not 0 <= k < num_classes:
            raise InputError(f"a pseudo-label class {k} outside the model's {num_classes} classes")
        v = np.sort(np.concatenate(parts))
        counts[k] = v.size
        idx = int(v.size * prop)
        thr[k] = v[-idx] if idx > 0 else v[-1]
    return thr, counts


def gather_rows(team: Team, fn: Callable[[], list[Any]]) -> list[Any]:
    """The per-image results ``fn()`` of every rank, concatenated in rank (= image) order."""
    return [row for part in team.gather(fn) for row in part]
