"""``segcal bench``: the CamVid calibration benchmark (see :mod:`segcal.pipeline.bench`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(s))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from exc


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="folder holding camvid/ and espnet/ (default: SEGCAL_DATA or ../shared/data)")
    p.add_argument("--out", help="output folder for results.json, results.md, report.html")
    p.add_argument("--cache", help="prediction cache folder (default: ~/.cache/segcal/bench)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report (no matplotlib needed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: fastest on a shared 2-core machine)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="CamVid benchmark: every calibrator, clean / corrupted / model shift, HTML report",
        description=(
            "Fit every registered calibrator on CamVid val (fit / selection halves, seeds 0,1,2) for the "
            "in-domain ESPNet and the Cityscapes ESPNet, evaluate on CamVid test clean, corrupted and under "
            "the model shift, and write results.json, results.md and a self-contained report.html. "
            "Predictions are cached (--cache) so a rerun does not recompute logits."
        ),
    )
    add_common(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CI size: 8 test / 10 val images, 4 calibrators, 1 corruption")
    mode.add_argument("--full", action="store_true",
                      help="everything: all corruptions x severities 1-5 on all test images, all test pixels")
    p.add_argument("--methods", type=_csv,
                   help="comma-separated calibrators (default: every registered one except the whole-image "
                        "calibrators, which --spatial adds); also the bench variants lts_image, ibts_image, "
                        "selective_lts")
    p.add_argument("--spatial", action="store_true",
                   help="with the default method list, also fit LTS / IBTS / LTS(log S), LTS with the "
                        "image branch (lts_image) and selective scaling on LTS (selective_lts); minutes per fit")
    p.add_argument("--spatial-max-steps", type=int,
                   help="Adam step budget of the whole-image calibrators (default: theirs, 500 for LTS)")
    p.add_argument("--spatial-selection-images", type=int,
                   help="selection-half images (seeded subset) for the whole-image calibrators' early stopping")
    p.add_argument("--models", type=_csv, help="comma-separated models (default: espnet-camvid,espnet-cityscapes-camvid)")
    p.add_argument("--seeds", type=_ints, help="comma-separated split seeds (default 0,1,2)")
    p.add_argument("--fit-pixels", type=int, help="valid pixels per fit (and per selection half)")
    p.add_argument("--eval-fraction", type=float, help="fraction of valid test pixels evaluated (seeded)")
    p.add_argument("--corruptions", type=_csv, help="comma-separated corruptions ('none' for no corruption)")
    p.add_argument("--severities", type=_ints, help="comma-separated severities 1-5")
    p.add_argument("--corruption-images", type=int, help="test images per corrupted set (seeded subset)")
    p.add_argument("--test-limit", type=int, help="only the first N test images")
    p.add_argument("--val-limit", type=int, help="only the first N val images")
    p.add_argument("--n-boot", type=int, help="bootstrap replicates (1000)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace, *, quick: bool = False, argv0: str = "bench") -> Any:
    from segcal.pipeline.bench import BenchConfig

    kw: dict[str, Any] = {}
    for name in ("methods", "models", "seeds", "fit_pixels", "eval_fraction", "corruptions", "severities",
                 "corruption_images", "test_limit", "val_limit", "n_boot", "spatial_max_steps",
                 "spatial_selection_images"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    if kw.get("corruptions") == ("none",):
        kw["corruptions"] = ()
    if getattr(args, "eval_fraction", None) is not None and not (0 < args.eval_fraction <= 1):
        raise ValueError(f"--eval-fraction: expected a value in (0, 1], got {args.eval_fraction}")
    if getattr(args, "fit_pixels", None) is not None and args.fit_pixels < 100:
        raise ValueError(f"--fit-pixels: expected at least 100, got {args.fit_pixels}")
    kw.update(data_root=args.data_root, cache=args.cache, report=not args.no_report, threads=args.threads,
              progress=not args.quiet, command="segcal " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if
              sys.argv and sys.argv[0].endswith(("segcal", "__main__.py")) else f"segcal {argv0}")
    if args.out:
        kw["out"] = args.out
    if getattr(args, "spatial", False) or getattr(args, "full", False):
        kw["spatial"] = True
    if quick or getattr(args, "quick", False):
        return BenchConfig.quick_config(**kw)
    if getattr(args, "full", False):
        return BenchConfig.full_config(**kw)
    return BenchConfig(**kw)


def print_summary(results: dict[str, Any], out: str) -> None:
    from segcal.report.tables import condition_table, describe_condition

    for tag in results["conditions"]:
        if results["conditions"][tag].get("corruption"):
            continue
        print(f"\n{tag}: {describe_condition(results, tag)}")
        print("\n".join(condition_table(results, tag)))
    t = results["timings"]
    print(f"\nwall time {t['total_s']:.0f} s; results: {out}/results.json, {out}/results.md"
          + (f", report: {out}/report.html" if results["config"]["report"] else ""))


def run(args: argparse.Namespace) -> int:
    from segcal.pipeline.bench import run_bench

    cfg = config_from_args(args)
    res = run_bench(cfg)
    print_summary(res, cfg.out)
    return 0
