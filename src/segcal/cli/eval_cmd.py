"""``segcal eval``: stream a prediction folder against labels and report calibration metrics."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import numpy as np
import torch

from segcal.io import PredictionFolder, atomic_write
from segcal.metrics import CalibrationMetrics, to_jsonable

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


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="measure calibration of a prediction folder against labels",
        description="Stream a folder of predictions (.npy logits (C, *spatial), .npz with 'logits' or "
        "'probabilities') against label maps (.png, .npy, .nii.gz) with matching stems, and report "
        "calibration and segmentation metrics.",
    )
    p.add_argument("--pred", required=True, help="prediction folder")
    p.add_argument("--labels", required=True, help="label folder (same stems)")
    p.add_argument("--ignore-index", type=int, default=None, help="label value to ignore (e.g. 255)")
    p.add_argument("--bins", type=int, default=15, help="number of equal-width confidence bins (default 15)")
    p.add_argument("--json", default=None, help="write every metric to this JSON file")
    p.add_argument("--probabilities", action="store_true", help="inputs are probabilities, not logits")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--save-state", default=None, help="also save the mergeable metric state (.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device: CUDA was requested but is not available")
    return torch.device(name)


def evaluate_folder(
    pred: str,
    labels: str,
    *,
    ignore_index: int | None = None,
    n_bins: int = 15,
    input_type: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> CalibrationMetrics:
    """Accumulate the metric state over a prediction folder (one file in memory at a time)."""
    from tqdm.auto import tqdm

    folder = PredictionFolder(pred, labels, input_type=input_type)
    dev = _device(device)
    metrics: CalibrationMetrics | None = None
    for item in tqdm(folder.items, desc="eval", unit="img", disable=not progress, file=sys.stderr):
        scores, lab, itype = folder.read(item)
        if metrics is None:
            metrics = CalibrationMetrics(
                int(scores.shape[0]), n_bins=n_bins, ignore_index=ignore_index, input_type=itype, device=dev
            )
        elif scores.shape[0] != metrics.num_classes:
            raise ValueError(
                f"pred: {item.path.name} has {scores.shape[0]} classes, the first file had {metrics.num_classes}"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmap -> torch
            x = torch.from_numpy(np.asarray(scores)).unsqueeze(0)
        try:
            metrics.update(x, torch.from_numpy(np.asarray(lab)).unsqueeze(0))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{item.stem}: {exc}") from exc
    assert metrics is not None
    return metrics


def format_table(results: dict[str, Any]) -> str:
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
        raise ValueError("--bins: expected a positive integer")
    metrics = evaluate_folder(
        args.pred,
        args.labels,
        ignore_index=args.ignore_index,
        n_bins=args.bins,
        input_type="probs" if args.probabilities else None,
        device=args.device,
        progress=not args.no_progress,
    )
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
    return 0
