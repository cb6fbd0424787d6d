"""Start-up time of the command line: ``segcal --version`` and ``segcal eval --help``.

Each command is run ``--repeat`` times in a fresh interpreter (``python -m segcal ...``, so the
figure does not depend on how the ``segcal`` script is installed); the median and the range of
the wall times are printed, next to ``python -c pass`` (the interpreter alone) and
``python -c "import torch"`` (what every command paid before the parser stopped importing it).

    python benchmarks/startup.py [--repeat 15]

Figures on the development machine (2 CPU cores, Python 3.11, torch 2.13 CPU) are in the README.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "segcal --version": [sys.executable, "-m", "segcal", "--version"],
    "segcal eval --help": [sys.executable, "-m", "segcal", "eval", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def wall_times(cmd: list[str], repeat: int) -> list[float]:
    """Wall time of ``repeat`` runs of ``cmd`` (after one untimed warm-up run)."""
    subprocess.run(cmd, check=True, capture_output=True)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7}  ({args.repeat} runs)")
    for name, cmd in CASES.items():
        t = wall_times(cmd, args.repeat)
        print(f"{name:<28} {statistics.median(t):>9.3f} {min(t):>7.3f} {max(t):>7.3f}")


if __name__ == "__main__":
    main()
