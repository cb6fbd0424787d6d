"""Arguments of ``segcal bench`` (argparse only; the command runs in :mod:`segcal.cli.bench_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import csv_arg, ints_arg


def add_common(p: argparse.ArgumentParser) -> None:
    """The options ``segcal bench`` and ``segcal demo`` share."""
    p.add_argument("--data-root", help="folder holding camvid/ and espnet/ (default: SEGCAL_DATA or ../shared/data)")
    p.add_argument("--out", help="output folder for results.json, results.md, report.html")
    p.add_argument("--cache", help="prediction cache folder (default: ~/.cache/segcal/bench)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report (no matplotlib needed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: fastest on a shared 2-core machine)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
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
    p.add_argument("--methods", type=csv_arg,
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
    p.add_argument("--models", type=csv_arg, help="comma-separated models (default: espnet-camvid,espnet-cityscapes-camvid)")
    p.add_argument("--seeds", type=ints_arg, help="comma-separated split seeds (default 0,1,2)")
    p.add_argument("--fit-pixels", type=int, help="valid pixels per fit (and per selection half)")
    p.add_argument("--eval-fraction", type=float, help="fraction of valid test pixels evaluated (seeded)")
    p.add_argument("--corruptions", type=csv_arg, help="comma-separated corruptions ('none' for no corruption)")
    p.add_argument("--severities", type=ints_arg, help="comma-separated severities 1-5")
    p.add_argument("--corruption-images", type=int, help="test images per corrupted set (seeded subset)")
    p.add_argument("--test-limit", type=int, help="only the first N test images")
    p.add_argument("--val-limit", type=int, help="only the first N val images")
    p.add_argument("--n-boot", type=int, help="bootstrap replicates (1000)")
    p.add_argument("--shift-calibration", action="store_true",
                   help="leave-one-family-out evaluation of shift-aware calibration (issue 17; docs/shift_calibration.md): "
                        "fit on clean CamVid val + perturbed val of the other corruption families, test on the held-out "
                        "family at severities 3 and 5, clean, model shift, and the label-free estimator; --methods "
                        "then names its rows (ts_clean, ts_aug, cmsop_aug, ...), --corruption-images the test images "
                        "per held-out set")
    p.add_argument("--families", type=csv_arg,
                   help="with --shift-calibration: corruption families (default noise,blur,weather,digital)")
    p.add_argument("--sts-anchor-range", choices=("val", "val+train"),
                   help="with --shift-calibration: the clean range of the anchored sts rows: also the statistics of "
                        "the model's CamVid train images (val+train, the default; labels unused) or the clean val "
                        "images only (val)")
    p.add_argument("--no-mri", action="store_true",
                   help="with --shift-calibration: leave out the MRI rows (leave-one-shift-out for the 3D U-Net on "
                        "MSD hippocampus; their cache is CACHE/hippocampus)")
    return p
