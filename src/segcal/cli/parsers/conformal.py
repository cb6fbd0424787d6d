"""Arguments of ``segcal conformal fit|eval|apply`` (argparse only; runs in :mod:`segcal.cli.conformal_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import HelpFormatter, add_input_type_args, add_progress_arg

RISK_CHOICES = ("miscoverage", "fnr", "coverage")
#: the formats of 'apply' (kept equal to segcal.conformal.writers.OUTPUT_FORMATS by a test; no import here)
OUTPUT_FORMATS = ("npz", "png", "nifti", "nnunet")


def _common(p: argparse.ArgumentParser, labels: bool = True) -> None:
    p.formatter_class = HelpFormatter
    p.add_argument("--pred", required=True, help="prediction folder (one file per image or volume)")
    if labels:
        p.add_argument("--labels", required=True, help="label folder (same stems)")
    p.add_argument("--calibrator", default=None, help="fitted segcal calibrator (.pt) applied to each file first")
    add_input_type_args(p)
    add_progress_arg(p)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of every error (also: SEGCAL_DEBUG=1)")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "conformal",
        help="conformal risk control: a threshold with a guarantee per image (docs/conformal.md)",
        description="Conformal risk control over images or volumes (never pixels): 'fit' chooses the "
        "threshold lambda of the pixel sets {k : p_k >= 1 - lambda} (or of one class's mask) on a "
        "calibration folder, 'eval' measures the realised risk on a test folder, 'apply' writes each "
        "image's bit-packed sets and set-size map. docs/conformal.md states the guarantees.",
    )
    acts = p.add_subparsers(dest="action", required=True, metavar="{fit,eval,apply}")
    f = acts.add_parser("fit", help="choose lambda on calibration images (CRC, or LTT with --delta)")
    _common(f)
    f.add_argument("--risk", choices=RISK_CHOICES, default="miscoverage",
                   help="per-image loss: miscoverage of the pixel sets, false-negative rate of --class, or "
                   "coverage below --tau (COSE)")
    f.add_argument("--alpha", type=float, required=True, help="target risk in (0, 1)")
    f.add_argument("--delta", type=float, default=None,
                   help="with this: Learn-then-Test, P(risk <= alpha) >= 1 - delta; without: CRC, E[risk] <= alpha")
    f.add_argument("--class", type=int, default=None, dest="class_index", help="class of --risk fnr")
    f.add_argument("--tau", type=float, default=None, help="coverage level of --risk coverage")
    f.add_argument("--ignore-index", type=int, default=None, help="label value to ignore (e.g. 255)")
    f.add_argument("--grid-size", type=int, default=201, help="number of lambda values in [0, 1] (default 201)")
    f.add_argument("--out", required=True, help="result file (.json)")
    e = acts.add_parser("eval", help="realised risk of a fitted lambda on test images")
    _common(e)
    e.add_argument("--result", required=True, help="file written by 'segcal conformal fit'")
    e.add_argument("--ignore-index", type=int, default=None, help="label value to ignore (default: the fit's)")
    e.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = acts.add_parser("apply", help="write each image's pixel sets and set-size map, or the guaranteed-recall "
                        "mask of --risk fnr, with the guarantee in every file")
    _common(a, labels=False)
    a.add_argument("--result", required=True, help="file written by 'segcal conformal fit'")
    a.add_argument("--format", choices=OUTPUT_FORMATS, default="npz",
                   help="npz: <stem>.npz (bit-packed sets, sizes); png (2D): sets/ (class bit codes, 8/16-bit), "
                   "sizes/, recall/; nifti (3D): the same as .nii.gz with the source's affine; nnunet: sets/<case>.npz"
                   "+.pkl, sizes/ and recall/ NIfTI on the case's grid (docs/conformal.md)")
    a.add_argument("--reference", default=None,
                   help="--format nifti: folder of the source NIfTI volumes (<stem>.nii.gz) whose header is copied")
    a.add_argument("--out", required=True, help="output folder, written all at once (+ conformal.json manifest)")
    return p
