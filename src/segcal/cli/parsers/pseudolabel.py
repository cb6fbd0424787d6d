"""Arguments of ``segcal pseudolabel`` (argparse only; runs in :mod:`segcal.cli.pseudolabel_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_input_type_args, add_progress_arg


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pseudolabel",
        help="write class-balanced, ECE-weighted pseudo-labels for unlabeled predictions",
        description="Cal-SFDA pseudo-labels: per-class thresholds at the (1 - prop) quantile of the "
        "ECE-weighted confidence over the folder, union with the per-image top local_prop pixels, "
        "ignore elsewhere.",
    )
    p.add_argument("--pred", required=True, help="prediction folder (logits (C, H, W))")
    p.add_argument("--out", required=True, help="output label folder (neither an input folder nor inside one)")
    p.add_argument("--estimator", default=None, help="ECE estimator (.pt) or 'maxprob'/'entropy'; none: no weighting")
    p.add_argument("--features", default=None, help="feature folder for a features estimator")
    p.add_argument("--round", type=int, default=0, help="self-training round r: prop = 0.15 + 0.05 r, local 0.1 + 0.05 r")
    p.add_argument("--prop", type=float, default=None, help="override the class-balanced proportion")
    p.add_argument("--local-prop", type=float, default=None, help="override the per-image proportion")
    p.add_argument("--subsample", type=int, default=5, help="keep every n-th sorted value per image")
    p.add_argument("--ignore-value", type=int, default=255, help="label written for unselected pixels")
    p.add_argument("--format", choices=["png", "npy"], default="png", help="label file format")
    add_input_type_args(p)
    add_progress_arg(p)
    p.add_argument("--labels", default=None, help="true labels, for reporting precision only")
    p.add_argument("--label-ignore", type=int, default=None, help="ignore value of --labels")
    p.add_argument("--json", default=None, help="write thresholds and statistics to this JSON file")
    return p
