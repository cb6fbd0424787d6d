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
  summed chunk after chunk in the single-process order (:func:`ordered_sum`: bitwise the
  single-process sums, so the L-BFGS path is the same even where it is ill-conditioned);
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from segcal.errors import InputError, reason

__all__ = ["INPUT_ERRORS", "FitGroup", "RankError", "active", "agree", "all_gather", "all_sum",
           "broadcast_tensors", "decide", "ordered_sum", "sharded"]

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


def ordered_sum(fg: FitGroup, parts: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``parts`` of every rank summed one after the other in rank order, on every rank.

    The sum is the one a single process computes when it adds the same parts in the same order
    (``acc = acc + part``, starting from zeros of ``like``'s shape, dtype and device): rank ``r``
    receives rank ``r - 1``'s running sum, adds its own parts and passes it on; the last rank
    broadcasts the total. So a distributed full-batch evaluation is bitwise the single-process
    one (a plain all-reduce adds in another order, and an ill-conditioned fit such as CMS-OP on
    few pixels then takes another L-BFGS path). Communication: ``O(like.numel())`` per rank.
    """
    acc = torch.zeros_like(like)
    ranks = [int(dist.get_global_rank(fg.group, r)) if fg.group is not None else r for r in range(fg.size)]
    if fg.rank > 0:
        dist.recv(acc, src=ranks[fg.rank - 1], group=fg.group)
    for part in parts:
        acc = acc + part
    if fg.rank < fg.size - 1:
        dist.send(acc.contiguous(), dst=ranks[fg.rank + 1], group=fg.group)
    dist.broadcast(acc, src=ranks[-1], group=fg.group)
    return acc


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
