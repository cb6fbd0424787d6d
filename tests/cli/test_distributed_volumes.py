"""``segcal predict --model unet3d-hippocampus`` (3D NIfTI volumes) under two local gloo processes
(issue 20).

Two ``python -m segcal`` processes with torchrun's ``env://`` variables predict tiny random
volumes with the committed 3D U-Net: every rank writes its contiguous block of the sorted cases,
rank 0 finalises the manifest. The ``.npy`` files must be bitwise those of one process and the
manifest (cases with shape, affine and source, in order) equal and complete; with unequal shards
(2 + 1 volumes, the command line) and a rank without volumes (1 + 0, the library call
``predict_volumes(distributed=True)`` on a tiny random 3D conv in ``torch.multiprocessing``
workers). A corrupt volume on rank 1 stops both ranks (rank 1 its error, rank 0 ``rank 1 of 2
stopped``) and leaves the manifest incomplete. One process runs with one thread, as every rank
does under ``torchrun`` (``OMP_NUM_THREADS=1``): a 3D convolution's sums depend on the threads.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ranks import free_port, two_ranks
from segcal.cli import main
from segcal.errors import InputError
from segcal.io.predictions import read_folder_meta
from segcal.pipeline.distributed import RankError, world
from segcal.pipeline.predict import predict_volumes

nib = pytest.importorskip("nibabel")

MODEL = "unet3d-hippocampus"


def _volumes(tmp_path, n: int):
    rng = np.random.default_rng(0)
    vols = tmp_path / "vols"
    vols.mkdir()
    for i in range(n):
        shape = (12 + i, 14, 10)
        affine = np.diag([1.0, 1.0 + 0.1 * i, 1.5, 1.0])
        nib.save(nib.Nifti1Image((rng.normal(size=shape) * 50 + 100).astype(np.float32), affine),
                 str(vols / f"case{i}_0000.nii.gz"))
    return vols


def _args(vols, out) -> list[str]:
    return ["predict", "--model", MODEL, "--images", str(vols), "--out", str(out), "--no-progress"]


def _same_folder(a, b, n: int) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert [x for x in names if x.endswith(".npy")] == [f"case{i}.npy" for i in range(n)]
    for name in names:
        if name.endswith(".npy"):
            x, y = np.load(a / name), np.load(b / name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    one, two = read_folder_meta(a), read_folder_meta(b)
    assert two == one and two["complete"] is True
    assert list(two["cases"]) == [f"case{i}" for i in range(n)]


@pytest.mark.slow
def test_volume_predict_two_ranks_write_the_same_folder(tmp_path):
    pytest.importorskip("monai")  # here, not at the top: the library workers need no monai (8 s to import)
    vols = _volumes(tmp_path, 3)  # 2 + 1 volumes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (torchrun sets OMP_NUM_THREADS=1): the same conv kernels
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(_args(vols, tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    ranks = two_ranks(_args(vols, tmp_path / "two"))
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert "wrote 3 volume prediction(s)" in ranks[0].stderr and "wrote" not in ranks[1].stderr
    _same_folder(tmp_path / "one", tmp_path / "two", 3)


class TinyNet3d(torch.nn.Module):
    """A seeded random 3x3x3 conv, 1 -> 3 channels (the library call takes any module)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(3, generator=g))

    def forward(self, x):
        return self.conv(x)


def _library_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict[str, object] = {}
    with world() as w:
        written = predict_volumes(TinyNet3d(), f"{root}/one_vol", f"{root}/two", distributed=w.distributed)
        result["written"] = [p.name for p in written]
        try:
            predict_volumes(TinyNet3d(), f"{root}/bad_vols", f"{root}/bad", distributed=w.distributed)
        except (InputError, RankError) as exc:
            result["error"] = (type(exc).__name__, str(exc))
    torch.save(result, f"{root}/rank{rank}.pt")


@pytest.mark.slow
def test_volume_library_call_with_an_empty_rank_and_a_failing_rank(tmp_path):
    _volumes(tmp_path, 1).rename(tmp_path / "one_vol")  # 1 + 0 volumes
    (tmp_path / "bad").mkdir()
    bad = _volumes(tmp_path, 3)
    bad.rename(tmp_path / "bad_vols")
    (tmp_path / "bad_vols" / "case2_0000.nii.gz").write_bytes(b"not a NIfTI file")  # rank 1's block
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predict_volumes(TinyNet3d(), tmp_path / "one_vol", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_library_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    _same_folder(tmp_path / "one", tmp_path / "two", 1)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["written"] == r1["written"] == ["case0.npy"]
    assert r1["error"][0] == "InputError" and "case2_0000.nii.gz" in r1["error"][1]
    assert r0["error"][0] == "RankError" and "rank 1 of 2 stopped" in r0["error"][1]
    assert read_folder_meta(tmp_path / "bad")["complete"] is False
