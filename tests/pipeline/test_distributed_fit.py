"""Distributed fitting (issue 20): two local gloo processes fitting on shards equal one process.

Each rank passes ``Calibrator.fit`` its contiguous shard of the images inside
``segcal.calibrators.collective.sharded()``; the fitted parameters of both ranks must equal the
single-process fit on all the images to 1e-6, with unequal shards and with a rank that holds no
training (or no validation) image, for full-batch L-BFGS in memory and mini-batch Adam (streamed
and in memory), linear (NLL) and non-linear (soft Dice) objectives; and from a folder of ``.npy``
files whose shapes' bound of bytes passes the memory budget (``sources.nbytes_bound``: streamed
without keeping anything, or -- the data under the budget -- read again and fitted in memory).
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ranks import free_port
from segcal.calibrators import FolderBatches, create
from segcal.calibrators.collective import RankError, sharded
from segcal.calibrators.data import Batch
from segcal.io import PredictionFolder
from segcal.pipeline.distributed import world

C = 4
#: (name, method, constructor kwargs, with validation images)
CASES = [
    ("ts_lbfgs", "ts", dict(optimizer="lbfgs"), True),
    ("vs_lbfgs", "vs", dict(optimizer="lbfgs"), True),
    ("cmsop_lbfgs", "cmsop", dict(optimizer="lbfgs"), False),
    ("ts_dice_lbfgs", "ts", dict(optimizer="lbfgs", objective="dice"), False),
    # streamed (memory_budget below the data): "auto" is Adam; 100-pixel steps shuffle within images
    ("ts_adam_streamed", "ts", dict(memory_budget=2000, batch_size=100, max_steps=30, eval_every=4,
                                    patience=2), True),
    ("dc_adam_memory", "dc", dict(optimizer="adam", batch_size=100, max_steps=25, eval_every=5), True),
]
#: (train bounds per rank, val bounds per rank): 5 fit images 3 + 2 / val 1 + 1, and 4 + 0 / 0 + 2
LAYOUTS = {
    "unequal": ([(0, 3), (3, 5)], [(0, 1), (1, 2)]),
    "empty_rank": ([(0, 4), (4, 4)], [(0, 0), (0, 2)]),
}


def _images(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(scores[None], labels[None])`` batches of unequal sizes, over-confident logits, ignored pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = (9 + i, 11)
        z = (rng.normal(size=(C, *shape)) * 3).astype(np.float32)
        y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, C, shape)).astype(np.int64)
        y[rng.random(shape) < 0.05] = 255
        out.append((z[None], y[None]))
    return out


def _write_folder(root: str) -> None:
    """The 5 training images of :func:`_images` as a prediction folder (float16 ``.npy``) with
    ``.npy`` labels (stems ``im0`` .. ``im4``, in order)."""
    os.makedirs(f"{root}/pred")
    os.makedirs(f"{root}/lab")
    for i, (z, y) in enumerate(_images(5, 0)):
        np.save(f"{root}/pred/im{i}.npy", z[0].astype(np.float16))
        np.save(f"{root}/lab/im{i}.npy", np.where(y[0] == 255, 255, y[0]).astype(np.uint8))


def _folder_fits(root: str, lo: int, hi: int, n_fit: int, count_alive: bool = False) -> dict:
    """TS (L-BFGS) on images ``lo:hi`` of the folder, at a budget under the data ("streamed"), one
    at the bound of the "unequal" layout's larger shard but under the data ("shards_fit"), and one between the data's
    bytes and their bound ("read_again"); computed from all ``n_fit`` images, so the same on every
    rank and in one process. ``alive`` (``count_alive``; the ranks only: a scan of every object of
    the process, which in the pytest process after a thousand tests takes seconds per file): the
    :class:`Batch` objects alive at each file read of the "shards_fit" fit (the counting pass must
    keep none: the whole data's bound passes the budget)."""
    folder = PredictionFolder(f"{root}/pred", f"{root}/lab")
    everything = _images(5, 0)[:n_fit]
    pixels = sum(int(y.size) for _, y in everything)
    valid = sum(int((y != 255).sum()) for _, y in everything)
    row = C * 2 + 8  # float16 scores and an int64 label
    shard = sum(int(y.size) for _, y in everything[:3]) * row  # the bound of the largest 3 + 2 shard
    assert shard < valid * row
    budgets = {"folder_streamed": 1000, "folder_shards_fit": shard,
               "folder_read_again": (valid + pixels) * row // 2}
    out: dict = {}
    alive: list[int] = []
    inner = folder.read

    def spy(item):
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if type(o) is Batch))
        return inner(item)

    for name, budget in budgets.items():
        folder.read = spy if name == "folder_shards_fit" and count_alive else inner
        cal = create("ts", optimizer="lbfgs", memory_budget=budget, num_classes=C, seed=5)
        cal.fit(FolderBatches(folder, folder.stems[lo:hi]), ignore_index=255)
        out[name] = _record(cal)
    out["alive"] = alive[: hi - lo]  # the counting pass
    return out


def _fit(method: str, kw: dict, train: list, val: list | None):
    cal = create(method, num_classes=C, seed=5, **kw)
    return cal.fit(train, ignore_index=255, val=val)


def _record(cal) -> dict:
    info = cal.fit_info
    return {"state": {k: v.detach().clone() for k, v in cal.state_dict().items()},
            "n_pixels": info["n_pixels"], "n_val_pixels": info["n_val_pixels"], "mode": info["mode"],
            "read_again": info.get("read_again"), "optimizer": info["optimizer"], "steps": [s["steps"] for s in info["stages"]],
            "stopped": [s["stopped_early"] for s in info["stages"]]}


def _worker(rank: int, port: int, layout: str, out: str, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train_all, val_all = _images(5, 0), _images(2, 1)
    (t0, t1), (v0, v1) = LAYOUTS[layout][0][rank], LAYOUTS[layout][1][rank]
    results = {}
    with world() as w, sharded() as fg:
        assert w.distributed and fg is not None and fg.size == 2
        for name, method, kw, with_val in CASES:
            cal = _fit(method, kw, train_all[t0:t1], val_all[v0:v1] if with_val else None)
            results[name] = _record(cal)
        results.update(_folder_fits(root, t0, t1, 4 if layout == "empty_rank" else 5, count_alive=True))
        try:  # subsampling would depend on the sharding: refused on every rank, before any collective
            create("ts", subsample=0.5).fit(train_all[t0:t1], ignore_index=255)
        except ValueError as exc:
            results["subsample_error"] = str(exc)
        for name, kw in (("histogram_binning", {}), ("cmsop", {"independent_experts": True})):
            try:  # local post-fit steps / own training targets: refused on every rank, not wrong
                create(name, **kw).fit(train_all[t0:t1], ignore_index=255)
            except ValueError as exc:
                results[f"refused {name}"] = str(exc)
        if layout == "unequal":  # a refused batch on rank 1: rank 1 its own error, rank 0 RankError
            bad = [(x, np.where(y == 255, 255, 7)) for x, y in train_all[t0:t1]] if rank == 1 else train_all[t0:t1]
            try:
                create("ts").fit(bad, ignore_index=255)
            except RankError as exc:
                results["failure"] = ("RankError", str(exc))
            except ValueError as exc:
                results["failure"] = ("ValueError", str(exc))
    torch.save(results, f"{out}/rank{rank}.pt")


FOLDER_CASES = ("folder_streamed", "folder_shards_fit", "folder_read_again")


def _reference(root: str) -> dict:
    train, val = _images(5, 0), _images(2, 1)
    return {**{name: _record(_fit(method, kw, train[:5], val if with_val else None))
               for name, method, kw, with_val in CASES}, **_folder_fits(root, 0, 5, 5)}


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("folder"))
    _write_folder(root)
    return root


@pytest.fixture(scope="module")
def reference(folder_root):
    return _reference(folder_root)


def _autograd_ts(train: list, val: list | None) -> dict:
    """The ``ts_lbfgs`` case through autograd's gradient of ``z / t`` instead of TS's fused NLL."""
    cal = create("ts", num_classes=C, seed=5, optimizer="lbfgs")
    cal._row_temperature = lambda: None
    return _record(cal.fit(train, ignore_index=255, val=val))


def _check(got: dict, want: dict, name: str, n_train: int) -> None:
    assert got["mode"] == want["mode"] and got["optimizer"] == want["optimizer"], name
    assert got["n_pixels"] == want["n_pixels"] and got["n_val_pixels"] == want["n_val_pixels"], name
    assert got["steps"] == want["steps"] and got["stopped"] == want["stopped"], name
    assert got["state"].keys() == want["state"].keys()
    for k, ref in want["state"].items():
        torch.testing.assert_close(got["state"][k], ref, rtol=0, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_fit_equals_one_process(tmp_path, reference, folder_root, layout):
    n_fit = 4 if layout == "empty_rank" else 5
    want = reference if n_fit == 5 else None
    if want is None:  # 4 training images (the fifth is nobody's): the reference on the same 4
        train, val = _images(5, 0)[:4], _images(2, 1)
        want = {name: _record(_fit(method, kw, train, val if with_val else None))
                for name, method, kw, with_val in CASES}
        want.update(_folder_fits(folder_root, 0, 4, 4))
    mp.spawn(_worker, args=(free_port(), layout, str(tmp_path), folder_root), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name in [c[0] for c in CASES] + list(FOLDER_CASES):
        for r in range(2):
            _check(ranks[r][name], want[name], f"{layout} rank {r} {name}", n_fit)
    plain = _autograd_ts(_images(5, 0)[:n_fit], _images(2, 1))  # the fused TS loss on 2 ranks = autograd's
    for r in range(2):
        torch.testing.assert_close(ranks[r]["ts_lbfgs"]["state"]["raw_t"], plain["state"]["raw_t"], rtol=1e-6, atol=0)
    assert want["ts_adam_streamed"]["mode"] == "streaming" and want["dc_adam_memory"]["mode"] == "in-memory"
    assert want["ts_adam_streamed"]["optimizer"] == "adam"
    assert want["folder_streamed"]["mode"] == "streaming" and want["folder_read_again"]["mode"] == "in-memory"
    assert want["folder_shards_fit"]["mode"] == "streaming"
    assert want["folder_read_again"]["read_again"]  # one process: the bound passed, the data did not
    for r in range(2):  # the whole data's bound decides on every rank: a rank's shard would fit
        assert ranks[r]["folder_read_again"]["read_again"], r
        alive = ranks[r]["alive"]
        assert len(alive) == ((3, 2) if layout == "unequal" else (4, 0))[r]
        assert alive == alive[:1] * len(alive), (r, alive)  # nothing kept while counting
    for r in range(2):
        assert "subsample: not supported by a distributed fit" in ranks[r]["subsample_error"]
        assert "not distributed yet" in ranks[r]["refused histogram_binning"]
        assert "not distributed yet" in ranks[r]["refused cmsop"]
    if layout == "unequal":
        assert ranks[1]["failure"][0] == "ValueError" and "labels" in ranks[1]["failure"][1]
        assert ranks[0]["failure"][0] == "RankError" and ranks[0]["failure"][1].startswith("rank 1 of 2 stopped")


def test_the_parameters_moved(reference):
    """The comparison is not between untouched initial values: every case changed its parameters."""
    for name, method, kw, _ in CASES:
        init = create(method, num_classes=C, seed=5, **kw)
        init._build_params(C)
        moved = max(float((reference[name]["state"][k] - v).abs().max())
                    for k, v in init.state_dict().items() if k in reference[name]["state"] and v.is_floating_point())
        assert moved > 1e-3, name


def test_sharded_needs_a_process_group():
    with pytest.raises(ValueError, match=r"no torch\.distributed process group"), sharded():
        pass
