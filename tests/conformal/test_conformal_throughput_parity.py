"""The fast loss-table path (compiled counting kernel, one-sum finiteness check) gives bit for bit
the tables of the reference path (``image_row(..., fast=False)``), both equal a direct float64
count, and the logits' probabilities are exactly the ones the metric engine computes (its chunked
float32 softmax: the one score function of fit, apply and ``segcal eval --conformal-*``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segcal.conformal import (
    as_probabilities,
    default_grid,
    folder_loss_table,
    image_row,
    loss_table,
)
from segcal.errors import InputError
from segcal.io import PredictionFolder
from segcal.metrics import CalibrationMetrics
from segcal.metrics.chunks import single_thread

CASES = [("miscoverage", {}), ("fnr", {"class_index": 2}), ("coverage", {"tau": 0.9})]


def reference_probabilities(scores: np.ndarray | torch.Tensor, backend: str = "auto") -> np.ndarray:
    """The probabilities the metric engine itself computes from these logits, captured through its
    ``on_chunk`` hook (one worker thread, so the chunks come in order), widened to float64."""
    t = torch.as_tensor(scores)
    assert bool(torch.isfinite(t.to(torch.float64)).all())
    parts: list[np.ndarray] = []
    metric = CalibrationMetrics(t.shape[0], backend=backend)
    with single_thread():
        metric.update(t[None], torch.zeros((1, *t.shape[1:]), dtype=torch.int64),
                      on_chunk=lambda w, i, q, pred, lab, valid: parts.append(q.copy()))
    return np.concatenate(parts, axis=1).astype(np.float64).reshape(tuple(t.shape))


def direct_row(p: np.ndarray, y: np.ndarray, grid: np.ndarray, risk: str, class_index: int | None = None,
               tau: float | None = None, ignore_index: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """An independent count: every (value, threshold) pair compared in float64."""
    p = np.asarray(p, dtype=np.float64).reshape(p.shape[0], -1)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    keep = np.ones(y.size, bool) if ignore_index is None else y != ignore_index
    p, y = p[:, keep], y[keep]
    t = 1.0 - np.asarray(grid, dtype=np.float64)
    n = y.size
    if n == 0:
        return np.zeros(t.size), np.zeros(t.size), 0
    inside = p[:, :, None] >= t[None, None, :]  # (C, n, G)
    if risk == "fnr":
        k = int(class_index)  # type: ignore[arg-type]
        sizes = inside[k].sum(0) / n
        pos = y == k
        losses = (~inside[k][pos]).sum(0) / pos.sum() if pos.any() else np.zeros(t.size)
        return losses, sizes, n
    miss = (~inside[y, np.arange(n)]).sum(0) / n
    sizes = inside.sum((0, 1)) / n
    losses = miss if risk == "miscoverage" else ((1.0 - miss) < tau).astype(np.float64)
    return losses, sizes, n


def tied_probs(rng: np.random.Generator, shape: tuple[int, ...], grid: np.ndarray) -> np.ndarray:
    """Probabilities with many values exactly on thresholds ``1 - λ``, at 0 and at 1."""
    c = shape[0]
    p = np.ascontiguousarray(rng.dirichlet(np.full(c, 0.3), size=int(np.prod(shape[1:]))).T.reshape(shape))
    flat = p.reshape(-1)  # a view: the ties below land in p
    assert np.shares_memory(flat, p)
    idx = rng.choice(flat.size, size=flat.size // 4, replace=False)
    flat[idx] = rng.choice(np.concatenate([1.0 - grid, [0.0, 1.0]]), size=idx.size)
    return p


@pytest.mark.parametrize("grid", [default_grid(), default_grid(17),
                                  np.array([0.0, 1e-17, 1e-9, 0.3, 0.5, 0.5 + 1e-12, 0.999999, 1.0]),
                                  np.array([0.1, 0.5, 0.9])],
                         ids=["default", "coarse", "uneven", "no-zero-threshold"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_fast_row_equals_reference_and_direct_count(grid: np.ndarray, dtype: type) -> None:
    pytest.importorskip("numba")  # without it both paths are the numpy one
    rng = np.random.default_rng(7)
    for shape in [(4, 9, 11), (4, 3, 5, 6)]:  # 2D image, 3D volume
        p = tied_probs(rng, shape, grid)
        y = rng.integers(0, 5, size=shape[1:]).astype(dtype)  # 4 = void
        y.reshape(-1)[:3] = 2  # class 2 present
        for ignore in (4, None):
            lab = y if ignore is not None else np.minimum(y, 3).astype(dtype)
            for risk, kw in CASES:
                fast = image_row(p, lab, grid, risk, ignore_index=ignore, **kw)
                ref = image_row(p, lab, grid, risk, ignore_index=ignore, fast=False, **kw)
                assert fast[2] == ref[2]
                assert np.array_equal(fast[0], ref[0]) and np.array_equal(fast[1], ref[1])
                direct = direct_row(p, lab, grid, risk, ignore_index=ignore, **kw)
                np.testing.assert_array_equal(fast[0], direct[0])
                np.testing.assert_array_equal(fast[1], direct[1])


def test_fast_row_edge_values_and_refusals() -> None:
    pytest.importorskip("numba")
    grid = default_grid(11)
    # values outside [0, 1] and NaN are placed as numpy's searchsorted places them
    p = np.array([[-0.5, 0.0, 1.0, 1.5, np.nan, np.inf, -np.inf, 0.7]])
    p = np.concatenate([p, 1.0 - p])
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.uint8)
    for risk, kw in [("miscoverage", {}), ("fnr", {"class_index": 1})]:
        fast = image_row(p, y, grid, risk, **kw)
        ref = image_row(p, y, grid, risk, fast=False, **kw)
        assert np.array_equal(fast[0], ref[0]) and np.array_equal(fast[1], ref[1])
    # an image of void pixels only, and the reference's messages for bad labels / class index
    assert image_row(p, np.full(8, 9, np.uint8), grid, "miscoverage", ignore_index=9)[2] == 0
    for labels, kw, risk in [(np.array([0, 1, 5, 1, 0, 1, 0, 1]), {}, "miscoverage"),
                             (y, {"class_index": 3}, "fnr")]:
        messages = []
        for fast in (True, False):
            with pytest.raises(InputError) as err:
                image_row(p[:, :8], labels, grid, risk, fast=fast, **kw)
            messages.append(str(err.value))
        assert messages[0] == messages[1]


def test_logits_probabilities_are_the_metric_engines() -> None:
    rng = np.random.default_rng(3)
    for shape in [(5, 6, 7), (4, 150, 250), (3, 5, 40, 90)]:  # one chunk; 3 chunks of 16384 px; 3D, 2 chunks
        for dtype in (np.float16, np.float32, np.float64):
            x = (rng.normal(size=shape) * 4).astype(dtype)
            ref = reference_probabilities(x)
            assert np.array_equal(as_probabilities(x, "logits", None, "s"), ref)
            assert np.array_equal(as_probabilities(torch.from_numpy(x), "logits", None, "s"), ref)
            assert np.array_equal(reference_probabilities(x, backend="torch"), ref)  # both engine kernels
    x = (rng.normal(size=(5, 6, 7)) * 4).astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1, 2, 3] = bad
        with pytest.raises(InputError, match="non-finite"):
            as_probabilities(y, "logits", None, "s")
    # finite float64 values whose sum overflows: accepted, as by the element-wise check (and by the
    # engine's torch kernel; its numba kernel refuses them)
    big = np.full((2, 2, 2), 1e308)
    assert np.array_equal(as_probabilities(big, "logits", None, "s"), reference_probabilities(big, "torch"))
    bf = torch.randn(3, 4, 4).to(torch.bfloat16)  # no numpy dtype: the torch sum, the engine's float32 softmax
    assert np.array_equal(as_probabilities(bf, "logits", None, "s"), reference_probabilities(bf))


def test_folder_table_equals_the_reference_path(tmp_path, monkeypatch) -> None:
    """A small float16 logits folder with PNG labels (void 11): the fast table equals the reference
    path's on the engine's probabilities, and the numpy path (no numba) gives the same table."""
    rng = np.random.default_rng(11)
    pred, lab = tmp_path / "pred", tmp_path / "lab"
    pred.mkdir()
    lab.mkdir()
    for i in range(5):
        np.save(pred / f"img{i}.npy", (rng.normal(size=(12, 24, 32)) * 3).astype(np.float16))
        y = rng.integers(0, 12, size=(24, 32)).astype(np.uint8)
        Image.fromarray(y).save(lab / f"img{i}.png")
    grid = default_grid()
    for risk, kw in CASES:
        fast = folder_loss_table(pred, lab, risk, ignore_index=11, **kw)
        rows = [image_row(reference_probabilities(x), y, grid, risk, ignore_index=11, fast=False, **kw)
                for _, x, y, _ in PredictionFolder(pred, lab)]
        assert np.array_equal(fast.losses, np.stack([r[0] for r in rows]))
        assert np.array_equal(fast.sizes, np.stack([r[1] for r in rows]))
        assert fast.n_valid.tolist() == [r[2] for r in rows]
        with monkeypatch.context() as m:
            m.setattr("segcal.conformal.tables.count_kernel", lambda: None)
            m.setattr("segcal.conformal.counting.count_kernel", lambda: None)
            slow = folder_loss_table(pred, lab, risk, ignore_index=11, **kw)
        assert np.array_equal(slow.losses, fast.losses) and np.array_equal(slow.sizes, fast.sizes)
    items = [(x, y) for _, x, y, _ in PredictionFolder(pred, lab)]
    table = loss_table(items, "miscoverage", ignore_index=11, input_type="logits")
    assert np.array_equal(table.losses, folder_loss_table(pred, lab, "miscoverage", ignore_index=11).losses)


def test_throughput_benchmark_runs_and_tables_agree(tmp_path, monkeypatch) -> None:
    """``benchmarks/conformal_throughput.py --check`` on a tiny folder: it writes its ratios and finds
    eval's cr.json identical to conformal fit's and the tables equal (no timing is asserted)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    rng = np.random.default_rng(5)
    pred, lab = tmp_path / "pred", tmp_path / "lab"
    pred.mkdir()
    lab.mkdir()
    for i in range(12):  # CRC at alpha 0.1 needs at least 9 calibration images
        np.save(pred / f"im{i}.npy", (rng.normal(size=(4, 8, 10)) * 3).astype(np.float16))
        Image.fromarray(rng.integers(0, 5, size=(8, 10)).astype(np.uint8)).save(lab / f"im{i}.png")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "conformal_throughput.py"
    spec = importlib.util.spec_from_file_location("conformal_throughput", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    out = tmp_path / "ct.json"
    monkeypatch.setattr(sys, "argv", ["ct", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "4",
                                      "--reps", "2", "--check", "--out", str(out)])
    mod.main()
    res = json.loads(out.read_text())
    assert res["files_identical"] is True and res["tables_identical"] is True and res["n_images"] == 12
    assert len(res["runs"]) == 2 and res["runs"][1]["order"][0] == "eval_conformal"
    assert set(res["ratios"]) >= {"eval_conformal/eval wall", "eval_conformal/eval cpu", "conformal_fit/eval wall",
                                  "(eval + conformal_fit)/eval wall"}
