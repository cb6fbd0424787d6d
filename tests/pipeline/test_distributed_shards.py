"""``shard_weighted``: contiguous blocks balanced by weight (the batches of ``segcal fit --model``)."""

from __future__ import annotations

import numpy as np
import pytest

from segcal.pipeline.distributed import shard, shard_weighted


@pytest.mark.parametrize("seed", range(20))
def test_blocks_concatenate_to_the_items_and_are_balanced(seed):
    rng = np.random.default_rng(seed)
    n, size = int(rng.integers(0, 12)), int(rng.integers(1, 5))
    weights = rng.integers(1, 5, n).tolist()
    items = [f"b{i}" for i in range(n)]
    blocks = [shard_weighted(items, weights, r, size) for r in range(size)]
    assert [x for b in blocks for x in b] == items  # contiguous, in order: the one-process order
    total = sum(weights)
    for r, b in enumerate(blocks):  # each cut within half the largest weight of an equal share
        done = sum(weights[: items.index(b[0])]) if b else None
        if done is not None and r > 0:
            assert abs(done - total * r / size) <= max(weights) / 2 + 1e-9


def test_examples():
    assert [shard_weighted([4, 4, 1], [4, 4, 1], r, 2) for r in range(2)] == [[4], [4, 1]]
    assert [shard_weighted(["a"], [2], r, 2) for r in range(2)] == [["a"], []]  # a tie: the earlier rank
    assert [shard_weighted([], [], r, 2) for r in range(2)] == [[], []]
    items = list(range(6))
    assert [shard_weighted(items, [1] * 6, r, 2) for r in range(2)] == [shard(items, r, 2) for r in range(2)]


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 outside"):
        shard_weighted([1], [1], 2, 2)
    with pytest.raises(ValueError, match="1 weights for 2 items"):
        shard_weighted([1, 2], [1], 0, 2)
