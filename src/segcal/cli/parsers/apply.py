"""Arguments of ``segcal apply`` (argparse only; the command runs in :mod:`segcal.cli.apply_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_device_arg, add_progress_arg


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("apply", help="apply a fitted calibrator to a prediction folder",
                       description="Calibrate every prediction of a folder with a calibrator saved "
                       "by `segcal fit` (or Calibrator.save) and write them in the same format.")
    p.add_argument("--calibrator", required=True, help="fitted calibrator (.pt)")
    p.add_argument("--pred", required=True, help="prediction folder")
    p.add_argument("--out", required=True, help="output folder (must differ from --pred)")
    p.add_argument("--output", choices=("logits", "probs"), default=None,
                   help="what to write (default: what the input holds; probabilities for nnU-Net folders)")
    p.add_argument("--images", default=None,
                   help="folder of input images (stems matching --pred), for a calibrator fitted "
                        "with an image branch (segcal fit --images)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    add_device_arg(p, "cpu")
    add_progress_arg(p)
    return p
