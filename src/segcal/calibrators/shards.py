"""The step sequence of a distributed Adam fit (see :mod:`segcal.calibrators.collective`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from segcal.calibrators.data import Batch, FitData

__all__ = ["owned_steps"]


def owned_steps(data: FitData, batch_size: int, gen: torch.Generator) -> Iterator[Batch | None]:
    """The single-process sequence of :meth:`FitData.iter_steps` chunks (pointwise data) over
    the batches of all ranks: this rank's chunk where it holds the step's batch, else ``None``.

    Every rank draws the same random numbers in the same order as one process would (the order
    of the batches of in-memory data, the pixel permutation of every batch larger than
    ``batch_size``), so the steps are those of one process on the shards concatenated in rank
    order. A rank that does not hold a batch still draws its permutation (``O(pixels)`` work,
    no data).
    """
    assert data.group is not None and data.layout is not None
    me = data.group.rank
    flat = [(r, i, n) for r, ns in enumerate(data.layout) for i, n in enumerate(ns)]
    local: Iterator[Batch] | None = None
    if data.batches is not None:  # in memory: shuffled batch order (FitData.iter_chunks)
        order = torch.randperm(len(flat), generator=gen).tolist()
        seq = [flat[i] for i in order]
    else:  # streamed: the stream's order, rank 0's batches first
        seq = flat
        local = data.iter_batches()
    for r, i, n in seq:
        b = None
        if r == me:
            b = data.batches[i] if data.batches is not None else next(local)  # type: ignore[arg-type]
        if n <= batch_size:
            yield b
            continue
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            if b is None:
                yield None
            else:
                idx = perm[s : s + batch_size]
                yield Batch(b.x[idx], b.y[idx])
