"""The engine's reusable per-batch accumulators (segcal.metrics.state.Workspace).

An update accumulates apart from the state in zeroed workspace tensors that live across updates;
nothing of one batch may leak into the next, a refused batch must leave both the state and the
next update untouched, and the threaded kernel's fixed chunk assignment makes the float64 sums the
same from run to run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.metrics import CalibrationMetrics
from segcal.metrics.kernels_numba import HAVE_NUMBA
from segcal.metrics.state import Dims, Workspace

BACKENDS = ["torch", "numba"] if HAVE_NUMBA else ["torch"]


def batch(seed: int, n: int = 2, c: int = 5, hw: tuple[int, int] = (96, 130)):
    g = np.random.default_rng(seed)
    z = (g.normal(size=(n, c, *hw)) * 3).astype(np.float32)
    y = g.integers(0, c, size=(n, *hw))
    y[:, :3] = 255
    return z, y


def state(m: CalibrationMetrics) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in m.tensors().items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_do_not_leak_into_each_other(backend):
    one = CalibrationMetrics(5, ignore_index=255, backend=backend, chunk_pixels=4096)
    parts = []
    for s in range(3):
        z, y = batch(s)
        one.update(z, y)
        m = CalibrationMetrics(5, ignore_index=255, backend=backend, chunk_pixels=4096)
        m.update(z, y)
        parts.append(m)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for k, v in state(one).items():
        np.testing.assert_allclose(v, state(merged)[k], rtol=1e-12, atol=0, err_msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_batch_leaves_state_and_next_update_untouched(backend):
    z, y = batch(0)
    ref = CalibrationMetrics(5, ignore_index=255, backend=backend)
    ref.update(z, y)
    m = CalibrationMetrics(5, ignore_index=255, backend=backend)
    bad = y.copy()
    bad[0, -1, -1] = 7  # a label outside [0, 5): refused after part of the batch was accumulated
    with pytest.raises(ValueError):
        m.update(z, bad)
    assert m.n_images == 0 and all(not v.any() for v in state(m).values())
    m.update(z, y)
    for k, v in state(ref).items():
        np.testing.assert_array_equal(v, state(m)[k], err_msg=k)


def test_threaded_sums_are_the_same_every_run():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z, y = batch(3, n=3, hw=(256, 320))
        runs = []
        for _ in range(4):
            m = CalibrationMetrics(5, ignore_index=255, chunk_pixels=2048)
            m.update(z, y)
            runs.append(state(m))
    finally:
        torch.set_num_threads(prev)
    for r in runs[1:]:
        for k, v in runs[0].items():
            np.testing.assert_array_equal(v, r[k], err_msg=k)


def test_workspace_zeroes_in_place_and_follows_the_device():
    ws = Workspace()
    dims = Dims(4, 10, 64)
    a = ws.take(dims, torch.device("cpu"), 2, n_images=3)
    a[0]["fine"].fill_(5.0)
    b = ws.take(dims, torch.device("cpu"), 2, n_images=1)
    assert b[0]["fine"].data_ptr() == a[0]["fine"].data_ptr()  # reused, not reallocated
    assert not b[0]["fine"].any() and b[0]["img_bins"].shape[0] == 1
    c = ws.take(Dims(4, 10, 128), torch.device("cpu"), 1, n_images=0)
    assert c[0]["fine"].shape[0] == 128  # other dims: fresh tensors
