"""``segcal demo``: the README's first command (the bench in quick mode, a few calibrators)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    from segcal.cli.bench_cmd import add_common

    p = subparsers.add_parser(
        "demo",
        help="find CamVid + ESPNet, predict, calibrate (TS, DC, CMSop, selective), print the table, write a report",
        description=(
            "A 1-3 minute tour: finds the data (--data-root, SEGCAL_DATA or ../shared/data), predicts a few "
            "CamVid images with the in-domain and the Cityscapes ESPNet, fits TS, DC, CMSop (and selective "
            "scaling when registered), prints the table and writes report.html."
        ),
    )
    add_common(p)
    p.set_defaults(func=run)
    return p


DEMO_METHODS = ("ts", "dc", "cmsop", "selective")


def run(args: argparse.Namespace) -> int:
    import segcal.calibrators as sc
    from segcal.cli.bench_cmd import config_from_args, print_summary
    from segcal.pipeline.bench import BenchDataError, find_camvid, run_bench

    try:
        root, _cam = find_camvid(args.data_root)
    except BenchDataError as exc:
        print(f"segcal demo: the demo needs CamVid and the ESPNet weights.\n  {exc}", file=sys.stderr)
        return 2
    names = {a["name"] for a in sc.available()}
    aliases = {al for a in sc.available() for al in a["aliases"]}
    methods = tuple(m for m in DEMO_METHODS if m in names or m in aliases)
    args.out = args.out or "segcal-out/demo"
    cfg = config_from_args(args, quick=True, argv0="demo")
    cfg.methods = methods
    print(f"segcal demo: data {root}; calibrators {', '.join(methods)}; output {cfg.out}", flush=True)
    res = run_bench(cfg)
    print_summary(res, cfg.out)
    return 0
