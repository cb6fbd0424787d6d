"""The one-machine commands under ``torchrun`` (issue 20): refused clearly, or run by rank 0 alone.

* ``segcal bench`` and ``segcal demo`` refuse to run as one of several
  ``torchrun`` processes (``segcal adapt`` runs distributed: ``test_distributed_adapt.py``): exit code 2 on every rank with one line naming torchrun
  and WORLD_SIZE, nothing written. No process group is opened, so each rank is tested here
  in-process with torchrun's variables set (the same code runs on every rank).
* ``segcal calibrators`` prints on rank 0 alone.
* ``segcal export`` works: rank 0 writes the one file while the other rank waits; the exported
  program equals one process's; a refusal on rank 0 stops both ranks with exit code 2.
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ranks import free_port
from segcal.calibrators import create
from segcal.cli import main
from segcal.models import register_model, unregister_model

MODEL = "tiny-export-dist"


def _as_rank(monkeypatch, rank: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never used: nothing connects


REFUSED = {
    "bench": lambda tmp: ["bench", "--quick", "--out", str(tmp / "out")],
    "demo": lambda tmp: ["demo", "--out", str(tmp / "out")],
}


@pytest.mark.parametrize("command", sorted(REFUSED))
@pytest.mark.parametrize("rank", [0, 1])
def test_one_machine_commands_refuse_several_processes(tmp_path, monkeypatch, capsys, command, rank):
    _as_rank(monkeypatch, rank)
    assert main(REFUSED[command](tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"segcal {command}: error: torchrun: segcal {command} runs in one process")
    assert "WORLD_SIZE=2" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_calibrators_listing_is_printed_by_rank_0_alone(monkeypatch, capsys, rank):
    _as_rank(monkeypatch, rank)
    assert main(["calibrators"]) == 0
    out = capsys.readouterr().out
    assert ("temperature" in out) == (rank == 0), out[:200]


def test_one_process_under_torchrun_is_not_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["adapt", "--model", "no-such-model", "--target", str(tmp_path), "--method", "tent",
                 "--out", str(tmp_path / "out")]) == 2
    assert "torchrun" not in capsys.readouterr().err  # refused for its input, not for torchrun


# ----------------------------------------------------------------------------------- export
class Quarter(nn.Module):
    """3 classes at 1/4 resolution, seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 4, stride=4)

    def forward(self, x):
        return self.conv(x)


def _export_args(cal, out) -> list[str]:
    return ["export", "--model", MODEL, "--calibrator", str(cal), "--out", str(out), "--example-shape",
            "2,3,16,16"]


def _export_worker(rank: int, ports: tuple[int, int], root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")
    register_model(MODEL, Quarter, num_classes=3, overwrite=True)
    codes = []
    for port, cal, out in ((ports[0], "cal3.pt", "two.pt2"), (ports[1], "cal4.pt", "bad.pt2")):
        os.environ["MASTER_PORT"] = str(port)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            codes.append((main(_export_args(f"{root}/{cal}", f"{root}/{out}")), err.getvalue()))
    torch.save(codes, f"{root}/rank{rank}.pt")


@pytest.mark.slow
def test_export_two_ranks_rank0_writes_the_one_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    for c in (3, 4):
        create("ts").fit(torch.randn(4, c, 8, 8, generator=g) * 2,
                         torch.randint(0, c, (4, 8, 8), generator=g)).save(tmp_path / f"cal{c}.pt")
    register_model(MODEL, Quarter, num_classes=3, overwrite=True)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(_export_args(tmp_path / "cal3.pt", tmp_path / "one.pt2")) == 0
    finally:
        unregister_model(MODEL)
    mp.spawn(_export_worker, args=((free_port(), free_port()), str(tmp_path)), nprocs=2, join=True)
    (ok0, err0), (bad0, bad_err0) = torch.load(tmp_path / "rank0.pt")
    (ok1, err1), (bad1, bad_err1) = torch.load(tmp_path / "rank1.pt")
    assert (ok0, ok1) == (0, 0) and "wrote" in err0 and err1 == ""
    x = torch.rand(2, 3, 16, 16, generator=g)
    one = torch.export.load(str(tmp_path / "one.pt2")).module()(x)
    two = torch.export.load(str(tmp_path / "two.pt2")).module()(x)
    torch.testing.assert_close(two, one, rtol=0, atol=0)
    assert (bad0, bad1) == (2, 2)  # a calibrator of 4 classes for a model of 3: refused on rank 0
    assert "4 classes" in bad_err0 and "rank 0 of 2 stopped" in bad_err1
    assert not (tmp_path / "bad.pt2").exists()
