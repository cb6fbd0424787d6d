"""Local multi-process jobs for the distributed tests: a free loopback port,
``python -m segcal <args>`` started as the ranks of an ``env://`` job (what ``torchrun`` sets), and
the comparison of a two-rank ``segcal fit`` with the one-process fit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segcal.calibrators import load as load_calibrator


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(args: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """``python -m segcal <args>`` as ranks 0 and 1 of an env:// job (loopback, a free port, one
    thread each as under torchrun); a rank still running after ``timeout`` seconds is killed, so a
    hang fails the test instead of blocking the suite."""
    port = free_port()
    procs = []
    for r in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "GROUP_RANK")}
        env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "segcal", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def assert_same_fit(folder: Path) -> None:
    """``folder/two.pt`` / ``two.json`` (two ranks) equal ``one.pt`` / ``one.json`` (one process):
    parameters to 1e-6, the split, pixel count and mode exactly, before/after metrics to 1e-12."""
    a, b = load_calibrator(folder / "one.pt"), load_calibrator(folder / "two.pt")
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    one = json.loads((folder / "one.json").read_text())
    two = json.loads((folder / "two.json").read_text())
    assert two["fit_info"]["split"] == one["fit_info"]["split"]
    assert two["fit_info"]["n_pixels"] == one["fit_info"]["n_pixels"]
    assert two["fit_info"]["mode"] == one["fit_info"]["mode"]
    assert two["metrics"].keys() == one["metrics"].keys()
    for key, ba in one["metrics"].items():
        for side in ("before", "after"):
            assert two["metrics"][key][side] == pytest.approx(ba[side], abs=1e-12), (key, side)
