"""torch.distributed synchronisation of the metric state, with two local gloo processes."""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ranks import free_port
from segcal.metrics import CalibrationMetrics

pytestmark = pytest.mark.slow


def _data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4, 10, 9)) * 2
    labels = rng.integers(0, 4, size=(5, 10, 9))
    labels[labels == 3] = np.where(rng.random((labels == 3).sum()) < 0.5, 255, 3)
    return logits, labels


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, labels = _data()
        parts = [slice(0, 2), slice(2, 5)]  # unequal image counts per rank
        m = CalibrationMetrics(4, ignore_index=255)
        m.update(logits[parts[rank]], labels[parts[rank]])
        m.sync()
        torch.save(m.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sync_equals_single_process(tmp_path):
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    logits, labels = _data()
    single = CalibrationMetrics(4, ignore_index=255)
    single.update(logits, labels)
    ref = single.compute()
    for rank in range(2):
        got = CalibrationMetrics.from_state_dict(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)).compute()
        for k in ("ece", "image_ece", "image_ece_std", "nll", "brier", "miou", "classwise_ece", "ace_adaptive"):
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (rank, k)
        np.testing.assert_allclose(got["image_ece_values"], ref["image_ece_values"], atol=1e-12)
        assert got["n_images"] == 5


SHARDS = {
    "zero-image-rank": [slice(0, 0), slice(0, 5)],
    "zero-image-rank-1": [slice(0, 5), slice(5, 5)],
    "unequal": [slice(0, 1), slice(1, 5)],
}


def _worker_twice(rank: int, world: int, port: int, out: str, shards: str) -> None:
    """Each rank updates its shard (possibly empty), then syncs TWICE and saves its state."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # a short timeout: a rank that fails must not leave the other one blocked for 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        logits, labels = _data()
        part = SHARDS[shards][rank]
        m = CalibrationMetrics(4, ignore_index=255)
        if part.stop > part.start:
            m.update(logits[part], labels[part])
        m.sync()
        m.sync()  # idempotent: must not add the total again
        torch.save(m.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shards", sorted(SHARDS))
def test_sync_with_an_empty_rank_and_twice_equals_single_process(tmp_path, shards):
    port = free_port()
    mp.spawn(_worker_twice, args=(2, port, str(tmp_path), shards), nprocs=2, join=True)
    logits, labels = _data()
    single = CalibrationMetrics(4, ignore_index=255)
    single.update(logits, labels)
    ref = single.compute()
    states = [CalibrationMetrics.from_state_dict(torch.load(tmp_path / f"rank{r}.pt", weights_only=True))
              for r in range(2)]
    for rank, st in enumerate(states):
        got = st.compute()
        assert got["n_images"] == 5 and got["n_pixels"] == ref["n_pixels"], rank
        for k in ("ece", "mce", "image_ece", "image_ece_std", "nll", "brier", "miou", "classwise_ece",
                  "ace_adaptive", "sce_lts", "class_level_ece"):
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (rank, k)
        np.testing.assert_allclose(got["image_ece_values"], ref["image_ece_values"], atol=1e-12)
        np.testing.assert_array_equal(got["confusion_matrix"], ref["confusion_matrix"])
        torch.testing.assert_close(st.image_bins(), single.image_bins(), rtol=0, atol=1e-12)
    # both ranks hold the same total: adding the two copies would count every pixel twice
    assert states[0].synced and states[0].sync_ids == states[1].sync_ids
    with pytest.raises(ValueError, match="same synchronised total"):
        states[0].merge(states[1])


def _worker_mismatch(rank: int, world: int, port: int, out: str, case: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        logits, labels = _data()
        n_bins = 10 if (case == "config" and rank == 1) else 15
        m = CalibrationMetrics(4, ignore_index=255, n_bins=n_bins)
        m.update(logits[rank : rank + 1], labels[rank : rank + 1])
        if case == "half-synced" and rank == 0:  # e.g. a state loaded from a synchronised file
            m.sync_ids = frozenset({1})
        try:
            m.sync()
            msg = "no error"
        except (ValueError, RuntimeError) as exc:
            msg = f"{type(exc).__name__}: {exc}"
        with open(f"{out}/rank{rank}.txt", "w") as fh:
            fh.write(msg)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("case", "match"), [("config", "ValueError: sync: the ranks' CalibrationMetrics have "
                                               "different configurations"),
                                              ("half-synced", "RuntimeError: sync: some ranks' states are already")])
def test_sync_mismatch_raises_on_every_rank_instead_of_hanging(tmp_path, case, match):
    mp.spawn(_worker_mismatch, args=(2, free_port(), str(tmp_path), case), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(match), rank
