"""``segcal conformal fit`` against ``segcal eval`` on one prediction folder, in one process
(issue 18: conformal fit and the new metrics within 15 % of eval).

Each repetition runs ``segcal eval`` and ``segcal conformal fit --risk miscoverage --alpha 0.1``
through the command-line entry point (``segcal.cli.app.main``, no process start), and with
``--previous`` also the loss-table path that ``conformal fit`` used before the compiled counting
kernel (element-wise finiteness check, torch float64 copy, ``image_row(..., fast=False)``), in an
order that rotates from one repetition to the next, after one warm-up of each. Every run is timed
in wall-clock seconds and in process CPU seconds (all threads); the load average is recorded
before each repetition. The ratios are formed within a repetition (neighbouring runs see the same
machine load) and summarised by their median and range. ``eval`` computes the new metrics
(failure detection, smECE) in its ``compute()``, so they are inside the eval figure.

``--previous`` also checks that the previous path and today's give the same loss table, bit for
bit, on the folder.

Usage::

    segcal predict --model espnet-camvid --images camvid:test --out /tmp/H/pred
    nice -n 10 python benchmarks/conformal_throughput.py --pred /tmp/H/pred \\
        --labels ../shared/data/camvid/testannot --ignore-index 11 --reps 4 --previous \\
        --out /tmp/H/conformal_throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from segcal.cli.app import main as segcal_main
from segcal.conformal import LossTable, default_grid, fit_threshold, folder_loss_table, image_row
from segcal.io import PredictionFolder
from segcal.io.files import atomic_write, to_jsonable
from segcal.validation import check_finite


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()`` (its output swallowed)."""
    w0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fn()
    return time.perf_counter() - w0, time.process_time() - c0


def cli(argv: list[str]) -> Callable[[], None]:
    def run() -> None:
        rc = segcal_main(argv)
        if rc != 0:
            raise SystemExit(f"segcal {' '.join(argv)} exited with {rc}")
    return run


def previous_table(pred: str, labels: str, ignore_index: int | None) -> LossTable:
    """The loss table as ``conformal fit`` built it before the compiled kernel."""
    g = default_grid()
    rows, sizes, valid, stems = [], [], [], []
    for stem, x, y, _kind in PredictionFolder(pred, labels):
        t = torch.as_tensor(np.asarray(x))
        check_finite(t, stem)
        p = torch.softmax(t.to(torch.float64), dim=0).numpy()
        loss, size, nv = image_row(p, y, g, "miscoverage", ignore_index=ignore_index, fast=False)
        rows.append(loss)
        sizes.append(size)
        valid.append(nv)
        stems.append(stem)
    return LossTable("miscoverage", g, np.stack(rows), np.stack(sizes), np.asarray(valid, dtype=np.int64), stems,
                     ignore_index=ignore_index)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--ignore-index", type=int, default=None)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--previous", action="store_true", help="also time the previous loss-table path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common = ["--pred", args.pred, "--labels", args.labels]
    if args.ignore_index is not None:
        common += ["--ignore-index", str(args.ignore_index)]
    res: dict = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "pred": args.pred, "reps": args.reps}
    with tempfile.TemporaryDirectory() as tmp:
        arms: dict[str, Callable[[], object]] = {
            "eval": cli(["eval", *common, "--no-progress"]),
            "conformal_fit": cli(["conformal", "fit", *common, "--risk", "miscoverage", "--alpha", "0.1",
                                  "--out", str(Path(tmp) / "cr.json")]),
        }
        if args.previous:
            def previous() -> None:
                table = previous_table(args.pred, args.labels, args.ignore_index)
                fit_threshold(table, 0.1).save(Path(tmp) / "cr_previous.json")
            arms["previous_conformal_fit"] = previous
            now = folder_loss_table(args.pred, args.labels, "miscoverage", ignore_index=args.ignore_index)
            before = previous_table(args.pred, args.labels, args.ignore_index)
            res["previous_table_identical"] = bool(
                np.array_equal(now.losses, before.losses) and np.array_equal(now.sizes, before.sizes)
                and np.array_equal(now.n_valid, before.n_valid))
            res["n_images"] = now.n_images
        for fn in arms.values():  # warm-up: imports, compiled kernels, page cache
            timed(fn)
        names = list(arms)
        runs: list[dict] = []
        for r in range(args.reps):
            order = names[r % len(names):] + names[: r % len(names)]
            rep: dict = {"loadavg": os.getloadavg()[0], "order": order}
            for name in order:
                rep[name] = dict(zip(("wall_s", "cpu_s"), timed(arms[name]), strict=True))
            runs.append(rep)
            print(f"rep {r + 1}: load {rep['loadavg']:.1f}, " + ", ".join(
                f"{n} {rep[n]['wall_s']:.1f} s wall / {rep[n]['cpu_s']:.1f} s cpu" for n in names), flush=True)
    res["runs"] = runs
    res["loadavg_end"] = os.getloadavg()
    ratios: dict = {}
    for name in names[1:]:
        for clock in ("wall_s", "cpu_s"):
            ratios[f"{name}/eval {clock[:-2]}"] = summary([rep[name][clock] / rep["eval"][clock] for rep in runs])
    ratios["(eval + conformal_fit)/eval wall"] = summary(
        [1 + rep["conformal_fit"]["wall_s"] / rep["eval"]["wall_s"] for rep in runs])
    res["ratios"] = ratios
    res["loadavg_range"] = [min(r["loadavg"] for r in runs), max(r["loadavg"] for r in runs)]
    for key, s in ratios.items():
        print(f"{key}: median {s['median']:.3f} (range {s['min']:.3f}-{s['max']:.3f})")
    if "previous_table_identical" in res:
        print(f"previous path's loss table identical: {res['previous_table_identical']}")
    text = json.dumps(to_jsonable(res), indent=2)
    if args.out:
        with atomic_write(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
