"""``segcal eval``: stream a prediction folder against labels and report calibration metrics.

The evaluation is :func:`segcal.pipeline.evaluate.evaluate_folder`; this module checks the output
paths, calls it and prints the table (arguments: :mod:`segcal.cli.parsers.eval`). Under
``torchrun --nproc-per-node N`` every rank evaluates its block of the sorted stems, the states are
synchronised, and rank 0 alone prints and writes the files (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from segcal.cli.common import CLI_FLAGS, check_out_path, device_from_arg, input_type_from_args
from segcal.errors import InputError
from segcal.io.files import atomic_write, to_jsonable
from segcal.metrics import CalibrationMetrics
from segcal.pipeline.distributed import rank_device, world
from segcal.pipeline.evaluate import evaluate_folder

#: (key, label) pairs printed in the summary table, in order
SUMMARY = [
    ("ece", "ECE (pooled, top-label)"),
    ("image_ece", "ECE (image-wise mean)"),
    ("image_ece_std", "ECE (image-wise std)"),
    ("mce", "MCE (pooled)"),
    ("rmsce", "RMS calibration error"),
    ("ace_adaptive", "ACE adaptive (equal-mass)"),
    ("ace_unweighted", "ACE unweighted (RPH)"),
    ("classwise_ece", "Class-wise ECE"),
    ("ece_correct", "ECE on correct pixels"),
    ("ece_mispredicted", "ECE on mispredicted pixels"),
    ("nll", "NLL"),
    ("brier", "Brier (multiclass sum)"),
    ("accuracy", "Pixel accuracy"),
    ("mean_confidence", "Mean confidence"),
    ("miou", "mIoU"),
    ("mdice", "mean Dice"),
]


def format_table(results: dict[str, Any]) -> str:
    """The printed summary of ``CalibrationMetrics.compute()``."""
    lines = [f"{'metric':<30} {'value':>10}", "-" * 41]
    for key, label in SUMMARY:
        v = results.get(key)
        if v is None:
            continue
        lines.append(f"{label:<30} {v:>10.5f}")
    lines.append(f"{'images / valid pixels':<30} {results['n_images']:>5d} / {results['n_pixels']}")
    iou = results.get("iou_per_class")
    if iou is not None:
        lines.append("")
        lines.append("per-class IoU:  " + "  ".join(f"{i}:{v:.4f}" for i, v in enumerate(iou)))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.bins < 1:
        raise InputError(f"--bins: expected a positive integer, got {args.bins}")
    inputs = {"--pred": args.pred, "--labels": args.labels}
    for flag in ("--json", "--save-state"):
        out = getattr(args, flag[2:].replace("-", "_"))
        if out:
            check_out_path(out, inputs, kind="file", flag=flag)
    device = device_from_arg(args.device)
    with world(device) as w:
        evaluation = evaluate_folder(
            args.pred,
            args.labels,
            ignore_index=args.ignore_index,
            n_bins=args.bins,
            input_type=input_type_from_args(args),
            device=rank_device(device, w),
            progress=not args.no_progress and w.is_main,
            names=CLI_FLAGS,
            distributed=w.distributed,
        )
        if w.is_main:
            report(args, evaluation.metrics)
    return 0


def report(args: argparse.Namespace, metrics: CalibrationMetrics) -> None:
    """Print the table and write ``--json`` / ``--save-state`` (rank 0 alone under torchrun)."""
    results = metrics.compute()
    print(format_table(results))
    if args.json:
        payload = to_jsonable(results)
        payload["config"] = {
            "pred": str(args.pred),
            "labels": str(args.labels),
            "ignore_index": args.ignore_index,
            "n_bins": args.bins,
            "input_type": metrics.input_type,
        }
        with atomic_write(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    if args.save_state:
        metrics.save(args.save_state)
