"""The collectives of a distributed fit (``torch.distributed``), below the launcher.

A fit on several processes: every rank of an initialised process group calls
:meth:`~segcal.calibrators.base.Calibrator.fit` inside :func:`sharded` with **its own shard**
of the data (contiguous blocks of the images, in rank order: rank 0's images, then rank 1's, ...
are the single-process data). The fitting loop (:mod:`segcal.calibrators.fitting`) then
all-reduces what one process would have summed:

* while preparing (:func:`segcal.calibrators.data.prepare_data`): the pixel counts, bytes and
  class counts of every rank (one ``all_gather_object``), so that the in-memory / streaming
  decision, ``FitData.n`` and the number of classes are those of the whole data on every rank;
* full-batch L-BFGS: the loss (or, for non-linear objectives, the additive statistics) and the
  gradients of every closure evaluation, each already weighted by the global pixel count, are
  summed file by file in a fixed pairwise tree over the files of all ranks (:class:`FileSums`:
  bitwise the single-process sums, so the L-BFGS path is the same even where it is
  ill-conditioned, with ``O(log files)`` vectors alive per rank);
* mini-batch Adam: the single-process sequence of steps is reproduced exactly -- a step's chunk of
  pixels lives on the rank that holds its image, that rank computes the step's loss and gradients,
  the others contribute zeros, and the sum is all-reduced (so Adam shards the data and its memory,
  not the compute);
* the monitored values (validation NLL) are all-reduced, the early-stopping and convergence
  decisions are taken on rank 0 and broadcast (:func:`decide`), and the restored best iterate is
  broadcast from rank 0 (:func:`broadcast_tensors`).

Without :func:`sharded` (or with one process) nothing here is called and a fit is exactly as
before. :func:`agree` is the failure protocol (also used by :mod:`segcal.pipeline.distributed`):
every rank says whether its local work failed, and all raise when any did, so no rank is left
waiting in a collective.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from segcal.errors import InputError, reason

__all__ = ["INPUT_ERRORS", "FileSums", "FitGroup", "RankError", "active", "agree", "all_gather", "all_sum",
           "broadcast_tensors", "decide", "sharded"]

#: the exceptions that count as refused input (the command line's exit code 2) when one rank
#: raises them; any other exception on a rank is a bug
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, EOFError, ImportError,
                                                  zipfile.BadZipFile, pickle.UnpicklingError)


class RankError(InputError):
    """Another rank refused its input (raised on the ranks that did not fail themselves)."""


@dataclass(frozen=True)
class FitGroup:
    """The process group a fit is spread over.

    Attributes
    ----------
    group
        The ``torch.distributed`` process group (``None``: the default group).
    rank, size
        This process's rank in ``group`` and the group's size.
    """

    group: Any
    rank: int
    size: int

    @property
    def src(self) -> int:
        """The global rank of the group's rank 0 (the source of broadcasts)."""
        return 0 if self.group is None else int(dist.get_global_rank(self.group, 0))


_ACTIVE: ContextVar[FitGroup | None] = ContextVar("segcal_fit_group", default=None)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def sharded(group: Any = None) -> Iterator[FitGroup | None]:
    """Fit on shards: inside this block every ``fit`` treats the data passed on each rank of
    ``group`` as that rank's shard of one data set.

    Parameters
    ----------
    group
        A ``torch.distributed`` process group (default: the default group, which must be
        initialised: ``torchrun`` + :func:`segcal.pipeline.distributed.world`).

    Yields
    ------
    FitGroup or None
        The group, or ``None`` when it has one process (then fits are single-process fits).

    Raises
    ------
    ValueError
        When no process group is initialised.
    """
    if not _initialized():
        raise ValueError("sharded: no torch.distributed process group is initialised (start the job "
                         "with torchrun and open segcal.pipeline.distributed.world())")
    fg = FitGroup(group, int(dist.get_rank(group)), int(dist.get_world_size(group)))
    token = _ACTIVE.set(fg if fg.size > 1 else None)
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def active() -> FitGroup | None:
    """The group of the enclosing :func:`sharded` block (``None`` outside one, or for one process)."""
    return _ACTIVE.get()


def all_gather(fg: FitGroup, obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    out: list[Any] = [None] * fg.size
    dist.all_gather_object(out, obj, group=fg.group)
    return out


def all_sum(fg: FitGroup, tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks, in place (one all-reduce per dtype and device, flattened)."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=fg.group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


class FileSums:
    """The sum of per-file parts over the files of every rank, in one fixed pairwise tree.

    File ``i`` (its global index: the files of rank 0, then rank 1's, ... -- the single-process
    order) is leaf ``i`` of a binary tree; node ``(level, j)`` is ``node(level - 1, 2j) +
    node(level - 1, 2j + 1)`` and the total is the sum of the roots of the complete subtrees
    that cover ``[0, files)``, added from left to right. Every addition is thus fixed by the
    file indices alone, whatever the number of ranks and wherever a shard starts: N processes
    are bitwise one process (the previous design -- every chunk's gradient kept until the
    previous rank's running sum arrived, ``acc = acc + part`` chunk after chunk -- held
    ``chunks x parameters`` values: ~480 MB for CMS-OP over Cityscapes val).

    Memory: :meth:`add` merges a subtree as soon as it is complete (a binary counter), so a
    rank holds at most ``2 log2(files) + 1`` partial sums, never one per file or per chunk;
    :meth:`total` passes those partial sums (not the files') from rank to rank. Pairwise
    summation is also more accurate than a running sum (error ``O(log files)`` instead of
    ``O(files)`` roundings).

    Parameters
    ----------
    first
        The global index of this rank's first file.
    """

    def __init__(self, first: int = 0) -> None:
        self.next = int(first)
        self.stack: list[tuple[int, int, list[torch.Tensor]]] = []  # (level, index, sums)

    @property
    def held(self) -> int:
        """The partial sums held now."""
        return len(self.stack)

    def add(self, parts: list[torch.Tensor]) -> None:
        """Add the next file's ``parts`` (tensors of fixed shapes, e.g. its gradient and value)."""
        self._push(0, self.next, parts)
        self.next += 1

    def follow(self, earlier: list[tuple[int, int, list[torch.Tensor]]]) -> None:
        """Put the partial sums of the files before this rank's (``earlier``: the ``stack`` of
        the previous ranks) under this rank's, merging the subtrees they complete."""
        mine, self.stack = self.stack, list(earlier)
        for level, index, parts in mine:
            self._push(level, index, parts)

    def _push(self, level: int, index: int, parts: list[torch.Tensor]) -> None:
        while self.stack and index % 2 == 1 and self.stack[-1][:2] == (level, index - 1):
            left = self.stack.pop()[2]
            parts = [a + b for a, b in zip(left, parts, strict=True)]
            level, index = level + 1, index // 2
        self.stack.append((level, index, parts))

    def total(self, fg: FitGroup | None, like: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The sums over the files of every rank, on every rank (zeros of ``like()`` without files).

        ``like()`` returns tensors of the parts' shapes; called only when needed (no file, or
        several ranks).

        Rank ``r`` receives the partial sums of ranks ``< r``, adds its own in order (merging
        the subtrees they complete) and passes them on; the last rank broadcasts the total.
        Communication: ``O(log files)`` tensors of ``like``'s shapes per rank.
        """
        shapes = like() if fg is not None and fg.size > 1 else None
        if fg is not None and fg.size > 1:
            ranks = [int(dist.get_global_rank(fg.group, r)) if fg.group is not None else r
                     for r in range(fg.size)]
            self.follow(_recv_stack(ranks[fg.rank - 1], fg.group, shapes) if fg.rank > 0 else [])  # type: ignore[arg-type]
            if fg.rank < fg.size - 1:
                _send_stack(self.stack, ranks[fg.rank + 1], fg.group)
        out = [torch.zeros_like(t) for t in (shapes or like())] if not self.stack else self.stack[0][2]
        for _, _, parts in self.stack[1:]:
            out = [a + b for a, b in zip(out, parts, strict=True)]
        if fg is not None and fg.size > 1:
            out = [t.contiguous().clone() for t in out]
            for t in out:
                dist.broadcast(t, src=ranks[-1], group=fg.group)
        return out


def _send_stack(stack: list[tuple[int, int, list[torch.Tensor]]], dst: int, group: Any) -> None:
    dist.send(torch.tensor([len(stack)], dtype=torch.int64), dst=dst, group=group)
    if stack:
        dist.send(torch.tensor([v for s in stack for v in s[:2]], dtype=torch.int64), dst=dst, group=group)
    for _, _, parts in stack:
        for t in parts:
            dist.send(t.detach().contiguous(), dst=dst, group=group)


def _recv_stack(src: int, group: Any, like: list[torch.Tensor]) -> list[tuple[int, int, list[torch.Tensor]]]:
    count = torch.zeros(1, dtype=torch.int64)
    dist.recv(count, src=src, group=group)
    if int(count) == 0:
        return []
    heads = torch.zeros(2 * int(count), dtype=torch.int64)
    dist.recv(heads, src=src, group=group)
    out = []
    for k in range(int(count)):
        parts = [torch.empty_like(t) for t in like]
        for t in parts:
            dist.recv(t, src=src, group=group)
        out.append((int(heads[2 * k]), int(heads[2 * k + 1]), parts))
    return out


def broadcast_tensors(fg: FitGroup, tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values, in place."""
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().contiguous().clone()
            dist.broadcast(buf, src=fg.src, group=fg.group)
            t.copy_(buf)


def decide(fg: FitGroup | None, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a decision taken once: stop early, converged)."""
    if fg is None:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    if dist.get_backend(fg.group) == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=fg.src, group=fg.group)
    return bool(t.item() > 0.5)


def agree(error: BaseException | None, info: Any = None, group: Any = None) -> list[Any]:
    """Collective: every rank reports whether its local work failed; all raise if any did.

    Parameters
    ----------
    error
        This rank's exception, or ``None`` when its work succeeded.
    info
        A small picklable value to share (e.g. the class count this rank read).
    group
        The process group (default: the default group).

    Returns
    -------
    list
        Every rank's ``info``, in rank order (``[info]`` without a process group).

    Raises
    ------
    BaseException
        ``error`` itself on a failing rank; on the others :class:`RankError` naming the lowest
        failing rank and its message when it refused input (:data:`INPUT_ERRORS`), else a
        ``RuntimeError``.
    """
    if not _initialized():
        if error is not None:
            raise error
        return [info]
    size = int(dist.get_world_size(group))
    kind = None if error is None else ("input" if isinstance(error, INPUT_ERRORS) else "bug")
    mine = (kind, "" if error is None else reason(error), info)
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, mine, group=group)
    if error is not None:
        raise error
    for r, (k, message, _) in enumerate(everyone):
        if k is not None:
            text = f"rank {r} of {size} stopped: {message}"
            raise RankError(text) if k == "input" else RuntimeError(text)
    return [e[2] for e in everyone]
