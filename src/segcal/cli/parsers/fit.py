"""Arguments of ``segcal fit`` (argparse only; the command runs in :mod:`segcal.cli.fit_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_device_arg, add_input_type_args, add_progress_arg


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("fit", help="fit a calibrator on a prediction folder",
                       description="Fit a calibrator on held-out predictions and labels; save it "
                       "for `segcal apply` / segcal.load.")
    p.add_argument("--pred", required=True, help="prediction folder (.npy/.npz, (C, *spatial))")
    p.add_argument("--labels", required=True, help="label folder (same stems)")
    p.add_argument("--method", required=True, help="calibrator name or alias (see `segcal calibrators`)")
    p.add_argument("--out", required=True, help="where to save the fitted calibrator (.pt)")
    p.add_argument("--ignore-index", type=int, default=None, help="label value to ignore (e.g. 255)")
    add_input_type_args(p)
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of fitting")
    p.add_argument("--base", default=None,
                   help="base calibrator of a composed method (e.g. --method selective --base ts)")
    p.add_argument("--images", default=None,
                   help="folder of input images (stems matching --pred): fits the image branch of "
                        "LTS/IBTS (use_image=True; also as the base of selective scaling)")
    p.add_argument("--objective", choices=("nll", "brier", "dice", "dece"), default="nll")
    p.add_argument("--optimizer", choices=("auto", "lbfgs", "adam"), default="auto",
                   help="auto: the calibrator's default (L-BFGS in memory, else Adam; Adam for LTS/IBTS)")
    p.add_argument("--max-iter", type=int, default=None, help="L-BFGS iteration budget")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (evaluations)")
    p.add_argument("--memory-budget-mb", type=float, default=2048, help="above it, data are streamed")
    p.add_argument("--subsample", type=float, default=None, help="fraction of valid pixels kept (seeded)")
    add_device_arg(p, "cpu")
    p.add_argument("--json", default=None, help="also write the summary as JSON")
    add_progress_arg(p)
    return p
