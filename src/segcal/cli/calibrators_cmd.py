"""``segcal calibrators``: list the registered calibrators, their aliases and guarantees.

The arguments (none) are declared in :mod:`segcal.cli.parsers.calibrators`. Under ``torchrun``
rank 0 alone prints (no process group is needed for a listing).
"""

from __future__ import annotations

import argparse

from segcal.calibrators import available
from segcal.pipeline.distributed import launched_rank


def run(args: argparse.Namespace) -> int:
    """Print one row per registered calibrator (rank 0 alone under torchrun)."""
    if launched_rank() != 0:
        return 0
    rows = available()
    yn = {True: "yes", False: "no"}
    header = ("name", "aliases", "TI", "AP", "OP", "section", "description")
    table = [header] + [
        (r["name"], ", ".join(r["aliases"]), yn[r["translation_invariant"]], yn[r["argmax_preserving"]],
         yn[r["order_preserving"]], r["section"], r["description"])
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return 0
