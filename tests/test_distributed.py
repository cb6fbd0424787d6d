"""torch.distributed synchronisation of the metric state, with two local gloo processes."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcal.metrics import CalibrationMetrics

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
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
