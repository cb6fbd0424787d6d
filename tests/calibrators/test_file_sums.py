"""Bounded memory of the full-batch sums (issue 20): every file's chunk gradients are summed into
one per-file vector and the files into one fixed pairwise tree (``collective.FileSums``), so a
distributed many-parameter fit holds ``O(log files)`` gradient vectors instead of one per chunk,
and N processes stay bitwise one process."""

from __future__ import annotations

import gc
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import segcal.calibrators as sc
from ranks import free_port
from segcal.calibrators.collective import FileSums, sharded
from segcal.calibrators.data import Batch, prepare_data
from segcal.calibrators.fitting import value_and_grad
from segcal.calibrators.objectives import NLL, get_objective
from segcal.pipeline.distributed import world

C = 7
N_PARAMS = C * C + C  # matrix scaling
CHUNK = 50  # rows: ~24 chunks per file of ~1200 pixels
SPLIT = 4  # files of rank 0 (rank 1: the other 2)


def _leaves(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, generator=g) * 10 ** float(torch.randint(-3, 4, (1,), generator=g)),
             torch.randn(1, generator=g, dtype=torch.float64)] for _ in range(n)]


def _single(leaves: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    s = FileSums()
    for p in leaves:
        s.add(p)
    return s.total(None, lambda: [torch.zeros(5), torch.zeros(1, dtype=torch.float64)])


def test_the_tree_is_the_pairwise_sum_of_the_files():
    a = [p[0] for p in _leaves(7)]
    # written out, not computed: the complete subtrees of 4, 2 and 1 files, added left to right
    want = (((a[0] + a[1]) + (a[2] + a[3])) + (a[4] + a[5])) + a[6]
    (got, _) = _single(_leaves(7))
    assert torch.equal(got, want)
    zeros = FileSums().total(None, lambda: [torch.zeros(3)])
    assert torch.equal(zeros[0], torch.zeros(3))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11, 16])
def test_every_split_into_ranks_gives_the_bitwise_single_process_sum(n):
    leaves = _leaves(n, seed=n)
    want = _single(leaves)
    cuts = [(i, j) for i in range(n + 1) for j in range(i, n + 1)]  # 3 ranks, empty ones included
    for i, j in cuts:
        stack: list[Any] = []
        for lo, hi in ((0, i), (i, j), (j, n)):
            rank = FileSums(lo)
            for p in leaves[lo:hi]:
                rank.add(p)
            rank.follow(stack)
            stack = rank.stack
        got = rank.total(None, lambda: [])
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), (n, i, j)


def test_partial_sums_held_grow_with_log_files():
    s = FileSums()
    peak = 0
    for p in _leaves(1000):
        s.add(p)
        peak = max(peak, s.held)
    assert peak <= math.ceil(math.log2(1000)) + 1 and s.held == bin(1000).count("1")


def _files() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(6):
        shape = (30 + 2 * i, 40)
        z = (rng.normal(size=(C, *shape)) * 3).astype(np.float32)
        y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, C, shape)).astype(np.int64)
        y[rng.random(shape) < 0.05] = 255
        out.append((z[None], y[None]))
    return out


def _run(files: list, objective: str) -> dict[str, Any]:
    """value_and_grad of matrix scaling (perturbed, seeded) on ``files``, counting the live
    gradient-sized vectors (1-D float32 of ``N_PARAMS`` values) at every 6th chunk.

    The objects alive before the run are frozen (``gc.freeze``), so that a count walks only what
    the run created -- every gradient vector it could keep -- and not the whole test session's
    heap (the walk of a full pytest process dominated this test's time)."""
    cal = sc.create("ms", num_classes=C)
    cal._build_params(C)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in cal.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    params = [p for p in cal.parameters() if p.requires_grad]
    data = prepare_data(files, input_type="logits", ignore_index=255, num_classes=C, memory_budget=1.0)
    seen = {"calls": 0, "peak": 0}

    def stats(b: Batch, obj: Any) -> torch.Tensor:
        seen["calls"] += 1
        if seen["calls"] % 6 == 0:
            alive = sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.ndim == 1
                        and o.numel() == N_PARAMS and o.dtype == torch.float32)
            seen["peak"] = max(seen["peak"], alive)
        return cal._stats_fn(b, obj)

    gc.collect()
    gc.freeze()
    try:
        value = value_and_grad(stats, params, data, get_objective(objective), CHUNK, lambda: None)
    finally:
        gc.unfreeze()
    return {"value": value.detach().clone(), "grads": [p.grad.detach().clone() for p in params], **seen,
            "state": {k: v.detach().clone() for k, v in cal.state_dict().items()}}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    files = _files()
    mine = files[:SPLIT] if rank == 0 else files[SPLIT:]
    with world(), sharded():
        res = {obj: _run(mine, obj) for obj in ("nll", "dice")}
    torch.save(res, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_hold_log_files_gradients_and_equal_one_process_bitwise(tmp_path):
    torch.set_num_threads(1)
    files = _files()
    one = {obj: _run(files, obj) for obj in ("nll", "dice")}
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    chunks = sum(math.ceil(int((y != 255).sum()) / CHUNK) for _, y in files)
    assert chunks > 130 and one["nll"]["calls"] == chunks
    for obj in ("nll", "dice"):
        for r in range(2):
            got = ranks[r][obj]
            assert torch.equal(got["value"], one[obj]["value"]), (obj, r)
            assert all(torch.equal(a, b) for a, b in zip(got["grads"], one[obj]["grads"], strict=True)), (obj, r)
            # chunk gradients were kept until the previous rank's sum came: ~chunks of them
            assert 1 <= got["peak"] <= 4, (obj, r, got["peak"])  # >= 1: the count sees the run's vectors
        assert 1 <= one[obj]["peak"] <= 4
    # an independent float64 reference: the mean NLL of W z + b over every valid pixel
    st = one["nll"]["state"]
    z = torch.cat([torch.from_numpy(x).double().movedim(1, -1).reshape(-1, C) for x, _ in files])
    y = torch.cat([torch.from_numpy(t).reshape(-1) for _, t in files])
    z, y = z[y != 255], y[y != 255]
    w = st["W"].double().requires_grad_(True)
    b = st["b"].double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z @ w.t() + b, y)
    loss.backward()
    assert float(one["nll"]["value"]) == pytest.approx(float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(one["nll"]["grads"][0].double(), w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one["nll"]["grads"][1].double(), b.grad, rtol=1e-4, atol=1e-6)
    assert NLL().linear and not get_objective("dice").linear
