"""The streamed fit's working memory (issue 20, docs/scaling.md "segcal fit ... full resolution"):
chunks bounded by values (rows x classes), one file's data alive at a time, the checks of a
streamed file still made, and the same fit in memory and streamed."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import segcal.calibrators as sc
from segcal.calibrators.data import Batch, FitData, prepare_data
from segcal.calibrators.fitting import value_and_grad
from segcal.calibrators.objectives import NLL
from segcal.calibrators.settings import CHUNK_ELEMENTS, FitSettings, chunk_rows
from segcal.errors import InputError
from segcal.io import PredictionFolder


def settings(**kw: Any) -> FitSettings:
    base = dict(optimizer="lbfgs", lr=None, max_iter=20, max_steps=10, batch_size=1000,
                chunk_size=2**20, patience=None, lr_patience=None, lr_factor=0.5, min_delta=0.0,
                eval_every=1, seed=0, monitor="nll")
    base.update(kw)
    return FitSettings(**base)  # type: ignore[arg-type]


def maps(n: int, c: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Peaked float16 logits ``(n, c, h, w)`` and uint8 labels with 255 as void."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=(n, h, w))
    z = rng.normal(size=(n, c, h, w)).astype(np.float32)
    np.put_along_axis(z, y[:, None], 3.0, axis=1)
    lab = y.astype(np.uint8)
    lab[rng.random((n, h, w)) < 0.1] = 255
    return (2.0 * z).astype(np.float16), lab


def write_folder(root: Path, z: np.ndarray, y: np.ndarray) -> PredictionFolder:
    (root / "pred").mkdir(parents=True)
    (root / "lab").mkdir()
    for i in range(z.shape[0]):
        np.save(root / "pred" / f"im{i}.npy", z[i])
        Image.fromarray(y[i]).save(root / "lab" / f"im{i}.png")
    return PredictionFolder(root / "pred", root / "lab")


def test_chunk_rows_bound_rows_by_values():
    s = settings()
    assert CHUNK_ELEMENTS == 2**20
    assert s.chunk_rows(19) == 2**20 // 19 == 55188
    assert s.chunk_rows(12) == 87381
    assert s.chunk_rows(1) == 2**20  # chunk_size binds
    assert settings(chunk_size=1000).chunk_rows(19) == 1000
    assert settings(chunk_elements=10).chunk_rows(19) == 1  # never empty
    assert chunk_rows(2**20, 19) == 55188 and chunk_rows(100, 19, 19 * 50) == 50


def test_full_batch_chunks_hold_at_most_chunk_elements_values_and_give_the_same_fit():
    torch.manual_seed(0)
    x = torch.randn(3000, 19) * 3
    y = torch.where(torch.rand(3000) < 0.6, x.argmax(1), torch.randint(0, 19, (3000,)))
    seen: list[int] = []

    def fit(elements: int) -> float:
        cal = sc.create("ts", optimizer="lbfgs")
        cal._build_params(19)
        data = prepare_data(x, y, input_type="logits", ignore_index=None, num_classes=19)
        params = [cal.raw_t]

        def stats(b: Batch, objective: Any) -> torch.Tensor:
            seen.append(int(b.x.shape[0]))
            return cal._stats_fn(b, objective)

        sc.fitting.minimize(params, stats, data, NLL(), settings(chunk_elements=elements))
        return cal.temperature

    one_chunk = fit(2**20)
    assert set(seen) == {3000}
    seen.clear()
    many = fit(19 * 256)  # 256 rows per chunk
    assert max(seen) == 256 and len(set(seen)) == 2  # 11 chunks of 256, one of 184
    assert 0.5 < one_chunk < 5
    # float32 sums in another order: ~1e-7 of the loss, so ~sqrt(1e-7) of a flat optimum's T
    assert many == pytest.approx(one_chunk, rel=1e-4)


def test_streamed_pass_frees_each_file_before_reading_the_next(tmp_path):
    z, y = maps(3, 19, 48, 64)
    folder = write_folder(tmp_path, z, y)
    maps_read: list[weakref.ref] = []
    alive_at_read: list[int] = []
    inner = folder.read

    def read(item: Any) -> Any:
        gc.collect()  # only cycles; plain references are what is checked
        alive_at_read.append(sum(r() is not None for r in maps_read))
        scores, labels, itype = inner(item)
        maps_read.append(weakref.ref(scores))
        return scores, labels, itype

    folder.read = read  # type: ignore[method-assign]
    data = prepare_data(sc.FolderBatches(folder), input_type="logits", ignore_index=255,
                        num_classes=None, memory_budget=1.0)
    assert data.info["mode"] == "streaming"
    rows_seen: list[weakref.ref] = []
    alive_rows: list[int] = []
    cal = sc.create("ts")
    cal._build_params(19)

    def stats(b: Batch, objective: Any) -> torch.Tensor:
        base = b.x if b.x._base is None else b.x._base
        if not rows_seen or rows_seen[-1]() is not base:
            alive_rows.append(sum(r() is not None for r in rows_seen))
            rows_seen.append(weakref.ref(base))
        return cal._stats_fn(b, objective)

    alive_at_read.clear()
    value_and_grad(stats, [cal.raw_t], data, NLL(), 500, lambda: None)  # 2764-2788 rows per file
    assert alive_at_read == [0, 0, 0]  # the previous memory map is closed when the next is read
    assert len(rows_seen) >= 6 and max(alive_rows) <= 1  # at most the last chunk's own copy


def test_streamed_and_in_memory_fits_of_a_folder_are_equal(tmp_path):
    z, y = maps(3, 19, 40, 56, seed=1)
    folder = write_folder(tmp_path, z, y)
    mem = sc.create("ts", optimizer="lbfgs", chunk_size=700).fit(sc.FolderBatches(folder), ignore_index=255)
    st = sc.create("ts", optimizer="lbfgs", chunk_size=700, memory_budget=1.0).fit(
        sc.FolderBatches(folder), ignore_index=255)
    assert mem.fit_info["mode"] == "in-memory" and st.fit_info["mode"] == "streaming"
    assert st.temperature == mem.temperature  # the same chunks in the same order: bitwise
    ref = sc.create("ts", optimizer="lbfgs", chunk_size=700).fit(z, y.astype(np.int64), ignore_index=255)
    # one (N, C, H, W) batch: other chunks and other sums, so float noise, which the flat float32
    # NLL amplifies at L-BFGS's stop (measured: 4.5e-5 in T at bitwise equal float32 NLL values);
    # both are the float64 optimum (golden-section search) to the float32 objective's resolution
    zz = torch.from_numpy(z.astype(np.float64)).permute(0, 2, 3, 1).reshape(-1, 19)
    yy = torch.from_numpy(y.astype(np.int64)).reshape(-1)
    zz, yy = zz[yy != 255], yy[yy != 255]

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(zz / t, yy))

    lo, hi = 0.05, 5.0
    for _ in range(120):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    for t in (ref.temperature, st.temperature):
        assert abs(t - lo) < 2e-4 * lo and nll(t) - nll(lo) < 1e-7


def test_streamed_fit_still_refuses_non_finite_logits_and_bad_labels(tmp_path):
    z, y = maps(2, 5, 16, 16)
    z[1, 2, 3, 4] = np.inf
    folder = write_folder(tmp_path / "a", z, y)
    with pytest.raises(InputError, match=r"im1\.npy.*non-finite"):
        sc.create("ts", memory_budget=1.0).fit(sc.FolderBatches(folder), ignore_index=255)
    z, y = maps(2, 5, 16, 16)
    y[0, 0, 0] = 7
    folder = write_folder(tmp_path / "b", z, y)
    with pytest.raises(InputError, match=r"labels \[7\] are outside \[0, 5\)"):
        sc.create("ts", memory_budget=1.0).fit(sc.FolderBatches(folder), ignore_index=255)


def test_fitdata_of_a_streamed_source_keeps_no_batch():
    z, y = maps(2, 4, 8, 8)
    src = [(z[i : i + 1], y[i : i + 1].astype(np.int64)) for i in range(2)]
    data = prepare_data(src, input_type="logits", ignore_index=255, num_classes=None, memory_budget=1.0)
    assert isinstance(data, FitData) and data.batches is None and data.info["mode"] == "streaming"
    assert sum(b.n for b in data.iter_chunks(10)) == data.n
