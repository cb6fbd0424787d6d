"""``segcal bench``: the calibration benchmarks.

``--dataset camvid`` (default): :mod:`segcal.pipeline.bench`; ``--dataset hippocampus``: the
medical table of :mod:`segcal.pipeline.medical_bench` (same protocol and columns, 3D volumes).
"""

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
        help="calibration benchmark (CamVid, or --dataset hippocampus): every calibrator, clean / shifted, HTML report",
        description=(
            "Fit every registered calibrator on CamVid val (fit / selection halves, seeds 0,1,2) for the "
            "in-domain ESPNet and the Cityscapes ESPNet, evaluate on CamVid test clean, corrupted and under "
            "the model shift, and write results.json, results.md and a self-contained report.html. "
            "Predictions are cached (--cache) so a rerun does not recompute logits. "
            "--dataset hippocampus runs the same protocol on the reference 3D U-Net (MSD hippocampus): "
            "calibrators fitted on the 50 calibration cases, evaluated on the 50 test cases clean and under "
            "the MRI shifts; --corruptions / --corruption-images / --val-limit / --fit-pixels then name the "
            "MRI shifts, shifted test cases, calibration cases and fit voxels."
        ),
    )
    p.add_argument("--dataset", choices=("camvid", "hippocampus"), default="camvid",
                   help="camvid (ESPNet, default) or hippocampus (3D U-Net, MSD Task04; needs segcal[medical])")
    add_common(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CI size: 8 test / 10 val images, 4 calibrators, 1 corruption (hippocampus: 4 calibration / "
                           "4 test cases, TS and DC, gamma severity 3)")
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


def medical_config_from_args(args: argparse.Namespace) -> Any:
    """:class:`~segcal.pipeline.medical_bench.MedicalBenchConfig` from the shared bench options."""
    from segcal.pipeline.medical_bench import MedicalBenchConfig

    if getattr(args, "models", None):
        raise ValueError("--models: the hippocampus bench has one model (unet3d-hippocampus)")
    if getattr(args, "eval_fraction", None) is not None:
        raise ValueError("--eval-fraction: the hippocampus bench evaluates every voxel")
    kw: dict[str, Any] = {}
    for src, dst in (("methods", "methods"), ("seeds", "seeds"), ("fit_pixels", "fit_voxels"),
                     ("corruptions", "shifts"), ("severities", "severities"), ("corruption_images", "shift_cases"),
                     ("test_limit", "test_limit"), ("val_limit", "calib_limit"), ("n_boot", "n_boot")):
        v = getattr(args, src, None)
        if v is not None:
            kw[dst] = v
    if kw.get("shifts") == ("none",):
        kw["shifts"] = ()
    if kw.get("fit_voxels") is not None and kw["fit_voxels"] < 100:
        raise ValueError(f"--fit-pixels: expected at least 100, got {kw['fit_voxels']}")
    kw.update(data_root=args.data_root, cache=args.cache, report=not args.no_report, threads=args.threads,
              progress=not args.quiet, command="segcal " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if
              sys.argv and sys.argv[0].endswith(("segcal", "__main__.py")) else "segcal bench --dataset hippocampus")
    if args.out:
        kw["out"] = args.out
    if getattr(args, "spatial", False):
        kw["spatial"] = True
    if getattr(args, "quick", False):
        return MedicalBenchConfig.quick_config(**kw)
    if getattr(args, "full", False):
        return MedicalBenchConfig.full_config(**kw)
    return MedicalBenchConfig(**kw)


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
    if getattr(args, "dataset", "camvid") == "hippocampus":
        from segcal.pipeline.medical_bench import run_medical_bench

        mcfg = medical_config_from_args(args)
        print_summary(run_medical_bench(mcfg), mcfg.out)
        return 0
    from segcal.pipeline.bench import run_bench

    cfg = config_from_args(args)
    res = run_bench(cfg)
    print_summary(res, cfg.out)
    return 0
