"""The in-memory / streaming decision from the source's shapes (issue 20, docs/scaling.md): a source
whose upper bound of bytes passes ``memory_budget`` is streamed from its first batch and the
counting pass keeps nothing; within the budget it is kept as before; and the fit is the same."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import segcal.calibrators as sc
from segcal.calibrators.data import Batch, prepare_data
from segcal.calibrators.sources import nbytes_bound
from segcal.errors import InputError
from segcal.io import PredictionFolder

C, H, W, N = 5, 24, 30, 6


def make_folder(root: Path, void: float, seed: int = 0) -> Path:
    """``N`` float16 ``(C, H, W)`` logit maps and ``.npy`` uint8 labels with a ``void`` fraction of 255."""
    rng = np.random.default_rng(seed)
    (root / "pred").mkdir(parents=True)
    (root / "lab").mkdir()
    for i in range(N):
        y = rng.integers(0, C, size=(H, W))
        z = rng.normal(size=(C, H, W)).astype(np.float32)
        np.put_along_axis(z, y[None], 2.5, axis=0)
        z += rng.normal(size=(C, H, W)) * 1.5  # over-confident, not separable: T > 1
        lab = y.astype(np.uint8)
        lab[rng.random((H, W)) < void] = 255
        np.save(root / "pred" / f"im{i}.npy", (2.0 * z).astype(np.float16))
        np.save(root / "lab" / f"im{i}.npy", lab)
    return root


class Spy:
    """A folder whose ``read`` counts the files read and the :class:`Batch` objects alive (exact
    type, after a collection) when each file is read: what the counting pass is holding.

    :meth:`prepare` freezes the objects alive before it (``gc.freeze``), so that a count walks
    only what the preparation created, not the whole test session's heap."""

    def __init__(self, root: Path) -> None:
        self.folder = PredictionFolder(root / "pred", root / "lab")
        self.reads = 0
        self.alive: list[int] = []
        inner = self.folder.read

        def read(item: Any) -> Any:
            self.reads += 1
            gc.collect()
            self.alive.append(sum(1 for o in gc.get_objects() if type(o) is Batch))
            return inner(item)

        self.folder.read = read  # type: ignore[method-assign]

    def batches(self) -> sc.FolderBatches:
        return sc.FolderBatches(self.folder)

    def prepare(self, budget: float) -> Any:
        gc.collect()
        gc.freeze()
        try:
            return prepare(self.batches(), budget)
        finally:
            gc.unfreeze()


def prepare(src: Any, budget: float, **kw: Any):
    return prepare_data(src, input_type="logits", ignore_index=255, num_classes=None,
                        memory_budget=budget, **kw)


def fit_ts(src: Any, budget: float) -> sc.TemperatureScaling:
    return sc.create("ts", optimizer="lbfgs", memory_budget=budget).fit(src, ignore_index=255)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("dense"), void=0.05)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("sparse"), void=0.8, seed=1)


def test_bound_is_the_bytes_when_every_pixel_counts(tmp_path):
    root = make_folder(tmp_path, void=0.0)
    fb = sc.FolderBatches(PredictionFolder(root / "pred", root / "lab"))
    shapes = fb.batch_shapes()
    assert shapes == [((1, C, H, W), np.dtype(np.float16))] * N
    data = prepare(fb, 2**30)
    assert data.info["nbytes_bound"] == data.nbytes == N * H * W * (C * 2 + 8)
    sub = prepare(fb, 2**30, subsample=0.3)
    assert sub.info["nbytes_bound"] == sub.nbytes == N * round(H * W * 0.3) * (C * 2 + 8)
    # float32 / float64 scores are held as float32; the bound is an upper bound, never below
    for dt in (np.float32, np.float64):
        z = np.zeros((2, C, 3, 4), dt)
        y = np.zeros((2, 3, 4), np.int64)
        y[0, 0, 0] = 255
        got = prepare(z, 2**30, labels=y)
        assert got.info["nbytes_bound"] == nbytes_bound([(z.shape, z.dtype)]) == 24 * (C * 4 + 8)
        assert got.nbytes == 23 * (C * 4 + 8), dt
    assert nbytes_bound([((2, C, 3, 4), torch.bfloat16)]) == 24 * (C * 2 + 8)


def test_over_the_bound_nothing_is_kept_and_the_fit_is_the_kept_one(dense):
    big = prepare(sc.FolderBatches(PredictionFolder(dense / "pred", dense / "lab")), 2**30)
    assert big.info["mode"] == "in-memory" and not big.info["read_again"]
    nbytes, bound = big.nbytes, big.info["nbytes_bound"]
    assert nbytes < bound
    budget = nbytes - 1  # the data just do not fit: the old counting pass kept N - 1 files
    spy = Spy(dense)
    data = spy.prepare(budget)
    assert data.info["mode"] == "streaming" and data.batches is None and not data.info["read_again"]
    assert spy.reads == N  # one counting pass
    base = spy.alive[0]
    assert spy.alive == [base] * N, spy.alive  # no batch kept while counting
    kept = Spy(dense)
    kept.prepare(2**30)
    assert kept.alive == [kept.alive[0] + i for i in range(N)]  # within the budget: kept as before
    t_stream = fit_ts(sc.FolderBatches(PredictionFolder(dense / "pred", dense / "lab")), budget)
    t_mem = fit_ts(sc.FolderBatches(PredictionFolder(dense / "pred", dense / "lab")), 2**30)
    assert t_stream.fit_info["mode"] == "streaming" and t_mem.fit_info["mode"] == "in-memory"
    t1, t2 = float(t_stream.temperature), float(t_mem.temperature)
    assert abs(t1 - 1.0) > 0.05  # the fit moved
    assert math.isclose(t1, t2, rel_tol=1e-6), (t1, t2)


def test_bound_over_budget_data_within_read_again_in_memory(sparse):
    ref = prepare(sc.FolderBatches(PredictionFolder(sparse / "pred", sparse / "lab")), 2**30)
    nbytes, bound = ref.nbytes, ref.info["nbytes_bound"]
    assert nbytes < bound / 3  # 80 % void
    budget = (nbytes + bound) // 2
    spy = Spy(sparse)
    data = spy.prepare(budget)
    assert data.info["mode"] == "in-memory" and data.info["read_again"]
    assert spy.reads == 2 * N and spy.alive[:N] == [spy.alive[0]] * N  # counted keeping nothing, then read
    assert data.nbytes == nbytes and data.n == ref.n
    for a, b in zip(data.batches, ref.batches, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # the mode is the one the bytes decide, so "auto" chooses the same optimiser
    t1 = sc.create("ts", memory_budget=budget).fit(str(sparse / "pred"), str(sparse / "lab"), ignore_index=255)
    t2 = sc.create("ts").fit(str(sparse / "pred"), str(sparse / "lab"), ignore_index=255)
    assert t1.fit_info["optimizer"] == t2.fit_info["optimizer"] == "lbfgs"
    assert float(t1.temperature) == float(t2.temperature)


def test_subsample_read_again_keeps_the_same_pixels(sparse):
    fb = sc.FolderBatches(PredictionFolder(sparse / "pred", sparse / "lab"))
    ref = prepare(fb, 2**30, subsample=0.5, seed=3)
    again = prepare(fb, (ref.nbytes + ref.info["nbytes_bound"]) // 2, subsample=0.5, seed=3)
    assert again.info["read_again"] and again.info["mode"] == "in-memory"
    for a, b in zip(again.batches, ref.batches, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_in_memory_array_over_the_bound_is_streamed_without_a_copy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, C, 16, 16)).astype(np.float32) * 3
    y = rng.integers(0, C, size=(3, 16, 16))
    data = prepare(z, 1000, labels=y)
    assert data.info["nbytes_bound"] == 3 * 256 * (C * 4 + 8) and data.info["mode"] == "streaming"
    t_stream = sc.create("ts", optimizer="lbfgs", memory_budget=1000).fit(z, y)
    t_mem = sc.create("ts", optimizer="lbfgs").fit(z, y)
    assert math.isclose(float(t_stream.temperature), float(t_mem.temperature), rel_tol=1e-6)


def test_no_bound_without_cheap_shapes(dense, tmp_path):
    fb = sc.FolderBatches(PredictionFolder(dense / "pred", dense / "lab"))
    listed = list(fb)
    data = prepare(listed, 2**30)  # a list of batches: no bound, today's behaviour
    assert data.info["nbytes_bound"] is None and data.info["mode"] == "in-memory"
    # .npz predictions (compressed) give no bound either
    (tmp_path / "pred").mkdir()
    for p in sorted((dense / "pred").glob("*.npy")):
        np.savez_compressed(tmp_path / "pred" / f"{p.stem}.npz", logits=np.load(p))
    npz = sc.FolderBatches(PredictionFolder(tmp_path / "pred", dense / "lab"))
    assert npz.batch_shapes() is None
    assert prepare(npz, 2**30).info["nbytes_bound"] is None


def test_a_corrupt_header_is_named_by_the_reading_pass(tmp_path):
    root = make_folder(tmp_path, void=0.05)
    (root / "pred" / "im3.npy").write_bytes(b"\x93NUMPY garbage")
    fb = sc.FolderBatches(PredictionFolder(root / "pred", root / "lab"))
    assert fb.batch_shapes() is None
    with pytest.raises(InputError, match=r"im3\.npy"):
        prepare(fb, 2**30)
