"""Local multi-process jobs for the distributed tests: a free loopback port, and
``python -m segcal <args>`` started as the ranks of an ``env://`` job (what ``torchrun`` sets)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


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
