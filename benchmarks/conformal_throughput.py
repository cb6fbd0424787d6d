"""``segcal eval`` with and without the conformal loss table in its pass, and ``segcal conformal
fit``, on one prediction folder, in one process (issue 18: conformal fit and the new metrics add at
most 15 % to eval).

Each repetition runs, through the command-line entry point (``segcal.cli.app.main``, no process
start): ``segcal eval``; ``segcal eval --conformal-risk miscoverage --conformal-alpha 0.1
--conformal-out cr.json`` (the loss table built from eval's own softmax in its one pass,
``eval_conformal``); and ``segcal conformal fit --risk miscoverage --alpha 0.1`` (a pass of its
own), in an order that rotates from one repetition to the next, after one warm-up of each. Every
run is timed in wall-clock seconds and in process CPU seconds (all threads); the load average is
recorded before each repetition. The ratios are formed within a repetition (neighbouring runs see
the same machine load) and summarised by their median and range. ``eval`` computes the new metrics
(failure detection, smECE) in its ``compute()``, so they are inside every eval figure. The issue's
figure is ``eval_conformal / eval``.

``--check`` also checks that the two ``cr.json`` files (eval's and conformal fit's) are identical
byte for byte and that the loss table of eval's pass equals :func:`segcal.conformal.folder_loss_table`'s.

Usage::

    segcal predict --model espnet-camvid --images camvid:test --out /tmp/H/pred
    nice -n 10 python benchmarks/conformal_throughput.py --pred /tmp/H/pred \\
        --labels ../shared/data/camvid/testannot --ignore-index 11 --reps 4 --check \\
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
from segcal.conformal import LossTableBuilder, folder_loss_table
from segcal.io import PredictionFolder
from segcal.io.files import atomic_write, to_jsonable
from segcal.pipeline.evaluate import evaluate_folder


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


def check_tables(pred: str, labels: str, ignore_index: int | None) -> bool:
    """The table of eval's pass equals :func:`folder_loss_table`'s, bit for bit."""
    builder = LossTableBuilder("miscoverage", ignore_index=ignore_index)
    fused = evaluate_folder(pred, labels, ignore_index=ignore_index, conformal=builder).conformal
    alone = folder_loss_table(pred, labels, "miscoverage", ignore_index=ignore_index)
    assert fused is not None
    return bool(np.array_equal(fused.losses, alone.losses) and np.array_equal(fused.sizes, alone.sizes)
                and np.array_equal(fused.n_valid, alone.n_valid) and fused.stems == alone.stems)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--ignore-index", type=int, default=None)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--check", action="store_true", help="also check that both paths give the same table and file")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common = ["--pred", args.pred, "--labels", args.labels]
    if args.ignore_index is not None:
        common += ["--ignore-index", str(args.ignore_index)]
    res: dict = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "pred": args.pred, "reps": args.reps}
    with tempfile.TemporaryDirectory() as tmp:
        conformal = ["--conformal-risk", "miscoverage", "--conformal-alpha", "0.1"]
        arms: dict[str, Callable[[], object]] = {
            "eval": cli(["eval", *common, "--no-progress"]),
            "eval_conformal": cli(["eval", *common, "--no-progress", *conformal, "--conformal-out",
                                   str(Path(tmp) / "cr_eval.json")]),
            "conformal_fit": cli(["conformal", "fit", *common, "--no-progress", "--risk", "miscoverage", "--alpha",
                                  "0.1", "--out", str(Path(tmp) / "cr.json")]),
        }
        for fn in arms.values():  # warm-up: imports, compiled kernels, page cache
            timed(fn)
        if args.check:
            res["files_identical"] = (Path(tmp) / "cr_eval.json").read_bytes() == (Path(tmp) / "cr.json").read_bytes()
            res["tables_identical"] = check_tables(args.pred, args.labels, args.ignore_index)
            res["n_images"] = len(PredictionFolder(args.pred, args.labels).stems)
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
    if "files_identical" in res:
        print(f"cr.json of eval and of conformal fit identical: {res['files_identical']}; "
              f"tables identical: {res['tables_identical']}")
    text = json.dumps(to_jsonable(res), indent=2)
    if args.out:
        with atomic_write(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
