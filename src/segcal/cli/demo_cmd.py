"""``segcal demo``: the README's first command (the bench in quick mode, a few calibrators).

Arguments in :mod:`segcal.cli.parsers.demo`. The output goes to ``--out`` (default
``segcal-out/demo`` under the current folder). Under ``torchrun`` with several processes it is
refused on every rank (exit code 2): one machine's job (:func:`segcal.pipeline.distributed.single_process`).
"""

from __future__ import annotations

import argparse
import sys

import segcal.calibrators as sc
from segcal.bench.cache import BenchDataError
from segcal.bench.camvid import find_camvid, run_bench
from segcal.cli.bench_cmd import check_outputs, config_from_args, print_summary
from segcal.pipeline.distributed import single_process
from segcal.report.outputs import write_outputs

DEMO_METHODS = ("ts", "dc", "cmsop", "selective")


def run(args: argparse.Namespace) -> int:
    single_process("segcal demo", "the quick CamVid benchmark of one machine; its timings and files are "
                   "one process's")
    args.out = args.out or "segcal-out/demo"
    check_outputs(args.out, args)
    try:
        root, _cam = find_camvid(args.data_root)
    except BenchDataError as exc:
        print(f"segcal demo: the demo needs CamVid and the ESPNet weights.\n  {exc}", file=sys.stderr)
        return 2
    names = {a["name"] for a in sc.available()}
    aliases = {al for a in sc.available() for al in a["aliases"]}
    methods = tuple(m for m in DEMO_METHODS if m in names or m in aliases)
    cfg = config_from_args(args, quick=True, argv0="demo")
    cfg.methods = methods
    print(f"segcal demo: data {root}; calibrators {', '.join(methods)}; output {cfg.out}", flush=True)
    print_summary(write_outputs(run_bench(cfg)), cfg.out)
    return 0
