"""Running a folder job on several ``torch.distributed`` processes (``torchrun``).

A command started by ``torchrun --nproc-per-node N segcal ...`` finds the launcher's ``env://``
variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``);
:func:`world` then opens the process group (gloo on the CPU, NCCL for a CUDA device) for the
command's lifetime and says which rank this process is. Without them it is one process, exactly
as before, and nothing is initialised.

Work is split by :func:`shard`: **contiguous** blocks of the (sorted) item list, the first
``n % world_size`` ranks taking one item more (5 items on 2 ranks: 3 and 2; 1 item: 1 and 0).
Contiguous blocks matter: :meth:`segcal.metrics.CalibrationMetrics.sync` concatenates the
per-image rows in rank order, so rank 0's rows then rank 1's reproduce the single-process order
of per-image values (image-wise ECE, ...).

A rank that fails must not leave the others waiting forever in a collective: :func:`agree` is the
first collective after the local work; every rank passes its exception (or ``None``) and a small
picklable value, and every rank raises when any rank failed -- the failing rank its own exception,
the others :class:`RankError` (an :class:`~segcal.errors.InputError`, so the command line exits
with code 2 on every rank) naming the failing rank and its message, or a ``RuntimeError`` when
the failure was not refused input (a bug: a traceback and exit code 1 on every rank).
:func:`agree`, :class:`RankError` and :data:`INPUT_ERRORS` live in
:mod:`segcal.calibrators.collective` (the distributed fitting loop needs them below this floor)
and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from segcal.calibrators.collective import INPUT_ERRORS, RankError, agree
from segcal.errors import InputError

T = TypeVar("T")

@dataclass(frozen=True)
class World:
    """This process's place in the job.

    Attributes
    ----------
    rank, size
        The global rank and the number of processes (``0`` and ``1`` for a single process).
    local_rank
        The rank on this machine (selects the GPU under NCCL).
    backend
        ``"gloo"``, ``"nccl"``, ... or ``None`` when no process group is initialised.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and writes summaries."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.size > 1


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or any ``env://`` launcher that sets
    ``RANK`` and ``WORLD_SIZE``)."""
    if not dist.is_available():
        return False
    return bool(dist.is_torchelastic_launched()) or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _launched_env(name: str, default: int) -> int:
    """The integer ``name`` of a launched job's environment, at least ``default``; ``default``
    when not launched or not an integer."""
    if not launched():
        return default
    try:
        return max(default, int(os.environ.get(name, str(default))))
    except ValueError:
        return default


def launched_rank() -> int:
    """This process's rank in a launched job (``RANK``); 0 when not launched (no group is opened)."""
    return _launched_env("RANK", 0)


def launched_size() -> int:
    """The number of processes of a launched job (``WORLD_SIZE``); 1 when not launched."""
    return _launched_env("WORLD_SIZE", 1)


def single_process(command: str, why: str) -> None:
    """Refuse ``command`` when it was started by ``torchrun`` with several processes.

    For the commands that are one machine's job (``segcal bench``, ``demo``): rather
    than every rank running the whole command and writing the same files, every rank raises the
    same :class:`~segcal.errors.InputError` at once (no process group is opened, so nothing
    waits): the command line exits with code 2 on every rank. ``torchrun --nproc-per-node 1`` is
    accepted (one process).

    Parameters
    ----------
    command
        The command as the user typed it (``"segcal bench"``).
    why
        Why it runs in one process (one clause).
    """
    n = launched_size()
    if n > 1:
        raise InputError(f"torchrun: {command} runs in one process ({why}); it was started as one of "
                         f"WORLD_SIZE={n} processes -- run it without torchrun (or with "
                         "--nproc-per-node 1)")


def current() -> World:
    """The :class:`World` of the initialised default process group (one process without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 str(dist.get_backend()))


def backend_for(device: str | torch.device | None) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str | torch.device | None, w: World) -> torch.device:
    """The device this rank computes on: ``cuda`` without an index becomes ``cuda:<local rank>``
    under several processes; any other device is used as it is."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None and w.distributed:
        return torch.device("cuda", w.local_rank)
    return dev


@contextmanager
def world(device: str | torch.device | None = None, timeout: timedelta | None = None) -> Iterator[World]:
    """The job's :class:`World` for the duration of a command.

    Under ``torchrun`` (:func:`launched`) the default process group is initialised from
    ``env://`` with the backend of :func:`backend_for` (``device``) and destroyed on exit; an
    already initialised group is used as it is (and left open); otherwise one process,
    ``World()``, and nothing is initialised.

    Parameters
    ----------
    device
        The command's device (NCCL for CUDA, gloo otherwise).
    timeout
        Timeout of the collectives (default: torch's). :func:`agree` keeps a failing rank from
        blocking the others; the timeout only bounds a rank that dies without raising.
    """
    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    if not launched():
        yield World()
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", **kwargs)
    try:
        yield current()
        # every rank done before any tears the group down: a rank that destroyed its gloo group
        # while a peer's last collective was still in flight made that peer abort at exit
        # (SIGABRT, "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous block of ``n`` items (see :func:`shard`)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} outside a world of {world_size} process(es)")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items``: a contiguous block, in order.

    The blocks of ranks ``0 .. world_size - 1`` concatenated are ``items``; their sizes differ
    by at most one (the first ``len(items) % world_size`` ranks take one more), and a rank may get
    none (fewer items than ranks).
    """
    start, stop = shard_bounds(len(items), rank, world_size)
    return list(items[start:stop])


def shard_weighted(items: Sequence[T], weights: Sequence[float], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous block of ``items`` with the blocks balanced by ``weights``.

    As :func:`shard` (the blocks of ranks ``0 .. world_size - 1`` concatenated are ``items``, in
    order), but the cut before rank ``r`` is the item boundary whose cumulative weight is nearest
    to ``r / world_size`` of the total (a tie goes to the later boundary: earlier ranks take more).
    Used for whole batches of images (weight: the images in the batch), so that batches of
    unequal sizes still give the ranks about equal numbers of images. The cuts depend only on
    ``weights`` and ``world_size``: every rank computes the same ones.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_weighted: rank {rank} outside a world of {world_size} process(es)")
    if len(weights) != len(items):
        raise ValueError(f"shard_weighted: {len(weights)} weights for {len(items)} items")
    cum = [0.0]
    for wt in weights:
        cum.append(cum[-1] + float(wt))
    total = cum[-1]
    cuts = [0]
    for r in range(1, world_size):
        target = total * r / world_size
        lo = cuts[-1]
        best = min(range(lo, len(items) + 1), key=lambda i: (abs(cum[i] - target), -i))
        cuts.append(best)
    cuts.append(len(items))
    return list(items[cuts[rank] : cuts[rank + 1]])


def on_main(fn: Callable[[], T]) -> T:
    """Collective: rank 0 alone runs ``fn`` (open or finalise an output folder's manifest, write a
    summary) while the others wait; every rank raises if it failed (:func:`agree`), and every
    rank gets rank 0's (picklable) result. One process: ``fn()``."""
    w = current()
    if not w.distributed:
        return fn()
    failure: BaseException | None = None
    result: Any = None
    if w.is_main:
        try:
            result = fn()
        except Exception as exc:  # shared with every rank, then raised
            failure = exc
    return agree(failure, result)[0]


def on_each(fn: Callable[[], T]) -> list[T]:
    """Collective: every rank runs ``fn`` (its share of the work); all raise if any failed
    (:func:`agree`); the (picklable) results of every rank, in rank order. One process:
    ``[fn()]``."""
    if not current().distributed:
        return [fn()]
    failure: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:  # shared with every rank, then raised
        failure = exc
    return agree(failure, result)


__all__ = [
    "INPUT_ERRORS",
    "RankError",
    "World",
    "agree",
    "backend_for",
    "current",
    "launched",
    "launched_rank",
    "launched_size",
    "on_each",
    "on_main",
    "rank_device",
    "shard",
    "shard_bounds",
    "shard_weighted",
    "single_process",
    "world",
]
