"""Arguments of ``segcal apply`` (argparse only; the command runs in :mod:`segcal.cli.apply_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_device_arg, add_input_type_args, add_progress_arg


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("apply", help="apply a fitted calibrator to a prediction folder",
                       description="Calibrate every prediction of a folder with a calibrator saved "
                       "by `segcal fit` (or Calibrator.save) and write them in the same format. The "
                       "output's segcal.json is written first, marked incomplete, and marked complete "
                       "after the last file: an interrupted run is refused by every reader (run it again).")
    p.add_argument("--calibrator", required=True, help="fitted calibrator (.pt)")
    p.add_argument("--pred", required=True, help="prediction folder")
    p.add_argument("--out", required=True,
                   help="output folder (neither --pred nor inside it; an existing file is refused)")
    p.add_argument("--output", choices=("logits", "probs"), default=None,
                   help="what to write: log-probabilities ('logits') or probabilities (default: what the "
                        "input holds; probabilities for nnU-Net folders)")
    p.add_argument("--images", default=None,
                   help="folder of input images (stems matching --pred), for a calibrator fitted "
                        "with an image branch (segcal fit --images)")
    add_input_type_args(p)
    p.add_argument("--dtype", choices=("float16", "float32", "float64"), default=None,
                   help="storage dtype of the written files (default: each input file's own float dtype). "
                        "A file where float16 would break the calibrator's argmax- or order-preserving "
                        "guarantee is stored as float32 (said once on stderr); values below the dtype's "
                        "range are clamped to its finite minimum, never written as -inf")
    add_device_arg(p, "cpu")
    add_progress_arg(p)
    return p
