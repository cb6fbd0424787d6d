"""``segcal bench``: the calibration benchmarks (arguments in :mod:`segcal.cli.parsers.bench`).

``--dataset camvid`` (default): :func:`segcal.bench.camvid.run_bench`; ``--dataset hippocampus``:
the medical table of :func:`segcal.bench.hippocampus.run_medical_bench` (same protocol and
columns, 3D volumes). The runner computes, :func:`segcal.report.outputs.write_outputs` writes
``results.json``, ``results.md`` and ``report.html``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from segcal.bench.camvid import BenchConfig, run_bench
from segcal.bench.hippocampus import MedicalBenchConfig, run_medical_bench
from segcal.bench.shift_calibration import run_shift_calibration
from segcal.bench.shift_config import ShiftCalConfig
from segcal.cli.common import check_out_path
from segcal.errors import InputError
from segcal.pipeline.distributed import single_process
from segcal.report.outputs import prepare_outputs, write_outputs
from segcal.report.shift_tables import summary_table, targets_table, write_shift_outputs
from segcal.report.tables import condition_table, describe_condition


def _command(default: str) -> str:
    """The command line as typed (recorded in ``results.json``), or ``default`` outside the CLI."""
    if sys.argv and sys.argv[0].endswith(("segcal", "__main__.py")):
        return "segcal " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return default


def config_from_args(args: argparse.Namespace, *, quick: bool = False, argv0: str = "bench") -> BenchConfig:
    """:class:`~segcal.bench.camvid.BenchConfig` from the parsed ``segcal bench`` / ``demo`` options."""
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
        raise InputError(f"--eval-fraction: expected a value in (0, 1], got {args.eval_fraction}")
    if getattr(args, "fit_pixels", None) is not None and args.fit_pixels < 100:
        raise InputError(f"--fit-pixels: expected at least 100, got {args.fit_pixels}")
    kw.update(data_root=args.data_root, cache=args.cache, report=not args.no_report, threads=args.threads,
              progress=not args.quiet, command=_command(f"segcal {argv0}"))
    if args.out:
        kw["out"] = args.out
    if getattr(args, "spatial", False) or getattr(args, "full", False):
        kw["spatial"] = True
    if quick or getattr(args, "quick", False):
        return BenchConfig.quick_config(**kw)
    if getattr(args, "full", False):
        return BenchConfig.full_config(**kw)
    return BenchConfig(**kw)


def medical_config_from_args(args: argparse.Namespace) -> MedicalBenchConfig:
    """:class:`~segcal.bench.hippocampus.MedicalBenchConfig` from the shared bench options."""
    if getattr(args, "models", None):
        raise InputError("--models: the hippocampus bench has one model (unet3d-hippocampus)")
    if getattr(args, "eval_fraction", None) is not None:
        raise InputError("--eval-fraction: the hippocampus bench evaluates every voxel")
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
        raise InputError(f"--fit-pixels: expected at least 100, got {kw['fit_voxels']}")
    kw.update(data_root=args.data_root, cache=args.cache, report=not args.no_report, threads=args.threads,
              progress=not args.quiet, command=_command("segcal bench --dataset hippocampus"))
    if args.out:
        kw["out"] = args.out
    if getattr(args, "spatial", False):
        kw["spatial"] = True
    if getattr(args, "quick", False):
        return MedicalBenchConfig.quick_config(**kw)
    if getattr(args, "full", False):
        return MedicalBenchConfig.full_config(**kw)
    return MedicalBenchConfig(**kw)


def shift_config_from_args(args: argparse.Namespace) -> ShiftCalConfig:
    """:class:`~segcal.bench.shift_calibration.ShiftCalConfig` from the ``--shift-calibration`` options."""
    if getattr(args, "dataset", "camvid") != "camvid":
        raise InputError("--shift-calibration: runs on CamVid only (--dataset camvid)")
    for opt in ("models", "corruptions", "spatial_max_steps", "spatial_selection_images"):
        if getattr(args, opt, None):
            raise InputError(f"--{opt.replace('_', '-')}: not an option of --shift-calibration "
                             "(it uses espnet-camvid and the Cityscapes ESPNet, and --families)")
    if getattr(args, "full", False) or getattr(args, "spatial", False):
        raise InputError("--full / --spatial: not options of --shift-calibration")
    if getattr(args, "eval_fraction", None) is not None and not (0 < args.eval_fraction <= 1):
        raise InputError(f"--eval-fraction: expected a value in (0, 1], got {args.eval_fraction}")
    if getattr(args, "fit_pixels", None) is not None and args.fit_pixels < 100:
        raise InputError(f"--fit-pixels: expected at least 100, got {args.fit_pixels}")
    kw: dict[str, Any] = {}
    for src, dst in (("methods", "methods"), ("seeds", "seeds"), ("fit_pixels", "fit_pixels"),
                     ("eval_fraction", "eval_fraction"), ("severities", "severities"),
                     ("corruption_images", "test_images"), ("test_limit", "test_limit"), ("val_limit", "val_limit"),
                     ("n_boot", "n_boot"), ("families", "families")):
        v = getattr(args, src, None)
        if v is not None:
            kw[dst] = tuple(v) if isinstance(v, list) else v
    kw.update(data_root=args.data_root, cache=args.cache, threads=args.threads, progress=not args.quiet,
              command=_command("segcal bench --shift-calibration"))
    if getattr(args, "no_mri", False):
        kw["mri"] = False
    if getattr(args, "sts_anchor_range", None):
        kw["sts_anchor_range"] = args.sts_anchor_range
    if args.out:
        kw["out"] = args.out
    return ShiftCalConfig.quick_config(**kw) if getattr(args, "quick", False) else ShiftCalConfig(**kw)


def check_outputs(out: str, args: argparse.Namespace) -> None:
    """Before the run: ``--out`` is not the prediction cache (nor inside / around it), not an existing
    file, and can be created. (A folder inside the data root is fine: the bench reads only its
    dataset sub-folders.)"""
    check_out_path(out, {"--cache": getattr(args, "cache", None)})
    prepare_outputs(out)


def print_summary(results: dict[str, Any], out: str) -> None:
    """The clean tables of a run and where its files are."""
    for tag in results["conditions"]:
        if results["conditions"][tag].get("corruption"):
            continue
        print(f"\n{tag}: {describe_condition(results, tag)}")
        print("\n".join(condition_table(results, tag)))
    t = results["timings"]
    print(f"\nwall time {t['total_s']:.0f} s; results: {out}/results.json, {out}/results.md"
          + (f", report: {out}/report.html" if results["config"]["report"] else ""))


def run(args: argparse.Namespace) -> int:
    single_process("segcal bench", "a benchmark of one machine: its timings and files are one process's")
    for opt in ("no_mri", "sts_anchor_range"):
        if getattr(args, opt, None) and not getattr(args, "shift_calibration", False):
            raise InputError(f"--{opt.replace('_', '-')}: an option of --shift-calibration only")
    if getattr(args, "shift_calibration", False):
        scfg = shift_config_from_args(args)
        check_outputs(scfg.out, args)
        res = write_shift_outputs(run_shift_calibration(scfg))
        print("\n".join(["pooled ECE, held-out families:", *summary_table(res, "ece"), "", *targets_table(res)]))
        print(f"\nwall time {res['timings']['total_s']:.0f} s; results: {scfg.out}/results.json, {scfg.out}/results.md")
        return 0
    if getattr(args, "dataset", "camvid") == "hippocampus":
        mcfg = medical_config_from_args(args)
        check_outputs(mcfg.out, args)
        print_summary(write_outputs(run_medical_bench(mcfg)), mcfg.out)
        return 0
    cfg = config_from_args(args)
    check_outputs(cfg.out, args)
    print_summary(write_outputs(run_bench(cfg)), cfg.out)
    return 0
