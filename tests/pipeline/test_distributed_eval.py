"""``segcal eval`` with two local gloo processes equals one process (issue 20).

The two processes are started the way ``torchrun`` starts them: either ``torchrun`` itself
(``python -m torch.distributed.run``) or two ``python -m segcal eval`` with the ``env://``
variables it sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
which gives each process's own exit code and stderr. Loopback address and a free port only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from ranks import free_port, two_ranks
from segcal.calibrators import create
from segcal.calibrators import load as load_calibrator
from segcal.cli import main
from segcal.errors import InputError
from segcal.metrics import CalibrationMetrics
from segcal.pipeline.distributed import World, agree, rank_device, shard, shard_bounds, world
from segcal.pipeline.evaluate import evaluate_folder, prefetched

TIMEOUT = 90  # seconds: a hang fails the test instead of blocking the suite


def _folder(tmp_path, n: int, c: int = 4, shape=(18, 14), seed: int = 0):
    rng = np.random.default_rng(seed)
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    for i in range(n):
        z = (rng.normal(size=(c, *shape)) * 3).astype(np.float16)
        y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, c, shape)).astype(np.uint8)
        y[rng.random(shape) < 0.05] = 255
        np.save(pred / f"img_{i:03d}.npy", z)
        Image.fromarray(y).save(lab / f"img_{i:03d}.png")
    return pred, lab


def _eval_args(pred, lab, out) -> list[str]:
    return ["eval", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "--bins", "10",
            "--json", str(out), "--no-progress"]


def _assert_same_json(got_path, ref_path) -> None:
    got, ref = json.loads(got_path.read_text()), json.loads(ref_path.read_text())
    assert got.keys() == ref.keys()
    assert got["config"] == ref["config"]
    assert got["n_images"] == ref["n_images"] and got["n_pixels"] == ref["n_pixels"]
    for key, want in ref.items():
        if isinstance(want, float):
            assert got[key] == pytest.approx(want, abs=1e-12, nan_ok=True), key
        elif isinstance(want, list) and want and isinstance(np.ravel(want)[0], float | int):
            # per-image values (image_ece_values, ...) in the single-process order
            np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(want, float), rtol=0, atol=1e-12,
                                       err_msg=key)
        else:
            assert got[key] == want, key


def _single(tmp_path, pred, lab):
    ref = tmp_path / "one.json"
    assert main(_eval_args(pred, lab, ref)) == 0
    return ref


# ---------------------------------------------------------------- sharding (no processes)
@pytest.mark.parametrize("n,world", [(5, 2), (1, 2), (0, 3), (7, 3), (4, 4), (2, 5)])
def test_shard_is_contiguous_covers_in_order_and_balanced(n, world):
    items = [f"s{i}" for i in range(n)]
    parts = [shard(items, r, world) for r in range(world)]
    assert [s for part in parts for s in part] == items  # rank-order concatenation == the single-process order
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [shard_bounds(n, r, world)[1] - shard_bounds(n, r, world)[0] for r in range(world)] == sizes


def test_shard_sizes_of_the_issue_cases():
    assert [len(shard(range(5), r, 2)) for r in range(2)] == [3, 2]
    assert [len(shard(range(1), r, 2)) for r in range(2)] == [1, 0]
    with pytest.raises(ValueError, match="rank 2 outside"):
        shard(range(3), 2, 2)


def test_without_a_process_group_one_process_and_a_clear_refusal(tmp_path):
    pred, lab = _folder(tmp_path, 2)
    assert agree(None, 7) == [7]
    with pytest.raises(KeyError):
        agree(KeyError("x"))
    assert rank_device("cuda", World(1, 2, 1)).index == 1 and rank_device("cpu", World(1, 2, 1)).type == "cpu"
    with pytest.raises(InputError, match=r"no torch\.distributed process group"):
        evaluate_folder(pred, lab, distributed=True)


# ---------------------------------------------------------------- two gloo processes
@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_unequal_shards(tmp_path):
    """5 images on 2 ranks (3 + 2), started by torchrun itself: rank 0's JSON == one process's."""
    pred, lab = _folder(tmp_path, 5)
    ref = _single(tmp_path, pred, lab)
    out = tmp_path / "two.json"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "segcal", *_eval_args(pred, lab, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ECE (pooled, top-label)") == 1  # rank 0 alone prints
    assert "5 / " in res.stdout
    _assert_same_json(out, ref)


@pytest.mark.slow
def test_a_rank_with_zero_images_takes_part(tmp_path):
    """1 image on 2 ranks: rank 1 reads nothing, syncs all the same; rank 0 alone writes the JSON."""
    pred, lab = _folder(tmp_path, 1)
    ref = _single(tmp_path, pred, lab)
    out = tmp_path / "two.json"
    ranks = two_ranks(_eval_args(pred, lab, out), timeout=TIMEOUT)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert "ECE (pooled, top-label)" in ranks[0].stdout and ranks[1].stdout == ""
    _assert_same_json(out, ref)


@pytest.mark.slow
def test_a_corrupted_file_on_one_rank_stops_both_with_exit_2(tmp_path):
    """img_004 is on rank 1's shard (3 + 2): both ranks exit 2 in time, rank 1 names the file, rank 0
    names rank 1; no JSON is written."""
    pred, lab = _folder(tmp_path, 5)
    (pred / "img_004.npy").write_bytes(b"not a numpy file")
    out = tmp_path / "two.json"
    ranks = two_ranks(_eval_args(pred, lab, out), timeout=TIMEOUT)
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    assert "img_004.npy" in ranks[1].stderr and "Traceback" not in ranks[1].stderr
    assert "rank 1 of 2 stopped" in ranks[0].stderr and "img_004.npy" in ranks[0].stderr
    assert not out.exists()


# ---------------------------------------------------------------- the overlapped input pipeline
def test_prefetched_keeps_order_bounds_look_ahead_and_raises_at_the_item():
    consumed: list[int] = []
    ahead: list[int] = []

    def read(i: int) -> int:
        ahead.append(i - len(consumed))  # how far the reader is ahead of the consumer
        if i == 6:
            raise OSError("bad file 6")
        return i * i

    got = []
    with pytest.raises(OSError, match="bad file 6"):
        for i, v in prefetched(read, range(10), depth=2):
            got.append((i, v))
            consumed.append(i)
    assert got == [(i, i * i) for i in range(6)]  # everything before the bad item, in order
    assert max(ahead) <= 3  # the current item plus at most depth=2 read ahead
    assert list(prefetched(lambda i: -i, range(4), depth=0)) == [(0, 0), (1, -1), (2, -2), (3, -3)]


def test_evaluate_folder_with_and_without_prefetch_is_identical(tmp_path):
    pred, lab = _folder(tmp_path, 6)
    states = [evaluate_folder(pred, lab, ignore_index=255, prefetch=d).metrics for d in (0, 1, 2)]
    ref = states[0].state_dict()
    for m in states[1:]:
        for key, value in m.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, ref[key]), key
    np.testing.assert_array_equal(states[2].compute()["image_ece_values"], states[0].compute()["image_ece_values"])


@pytest.mark.slow
def test_ranks_whose_files_disagree_on_the_class_count_are_refused_alike(tmp_path):
    """img_003/img_004 (rank 1's whole shard) have 5 classes, the others 4: each rank alone is
    consistent, the agreement refuses it on both ranks (exit 2) naming both files."""
    pred, lab = _folder(tmp_path, 5)
    rng = np.random.default_rng(1)
    for stem in ("img_003", "img_004"):
        np.save(pred / f"{stem}.npy", rng.normal(size=(5, 18, 14)).astype(np.float16))
    ranks = two_ranks(_eval_args(pred, lab, tmp_path / "two.json"), timeout=TIMEOUT)
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    for r in ranks:
        assert "img_003.npy has 5 classes" in r.stderr and "img_000.npy has 4" in r.stderr, r.stderr


def _fitted(seed: int = 3):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(2, 4, 12, 10)) * 3)
    return create("ts", num_classes=4).fit(x, x.argmax(1))  # over-confident labels: T != 1


def _api_worker(rank: int, port: int, pred: str, lab: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cal = load_calibrator(f"{out}/ts.pt")
    with world() as w:
        assert w.distributed and w.backend == "gloo"
        ev = evaluate_folder(pred, lab, calibrator=cal, ignore_index=255, distributed=True)
        assert ev.calibrated is not None
        torch.save({"before": ev.metrics.state_dict(), "after": ev.calibrated.state_dict(), "stems": ev.stems},
                   f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_api_world_and_a_calibrator_equal_one_process(tmp_path):
    """evaluate_folder(distributed=True, calibrator=...) inside world(): before and after states of
    both ranks equal one process's (3 + 2 images)."""
    pred, lab = _folder(tmp_path, 5)
    cal = _fitted()
    cal.save(tmp_path / "ts.pt")
    mp.spawn(_api_worker, args=(free_port(), str(pred), str(lab), str(tmp_path)), nprocs=2, join=True)
    one = evaluate_folder(pred, lab, calibrator=cal, ignore_index=255)
    assert one.calibrated is not None
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["stems"] == one.stems
        for key, ref in (("before", one.metrics), ("after", one.calibrated)):
            res = CalibrationMetrics.from_state_dict(got[key]).compute()
            want = ref.compute()
            for k in ("ece", "image_ece", "nll", "brier", "miou", "classwise_ece"):
                assert res[k] == pytest.approx(want[k], abs=1e-12), (rank, key, k)
            np.testing.assert_allclose(res["image_ece_values"], want["image_ece_values"], rtol=0, atol=1e-12)
    assert one.calibrated.compute()["ece"] != pytest.approx(one.metrics.compute()["ece"], abs=1e-6)
