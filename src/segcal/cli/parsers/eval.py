"""Arguments of ``segcal eval`` (argparse only; the command runs in :mod:`segcal.cli.eval_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_device_arg, add_input_type_args, add_progress_arg, csv_arg
from segcal.cli.parsers.conformal import RISK_CHOICES


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="measure calibration of a prediction folder against labels",
        description="Stream a folder of predictions (.npy logits (C, *spatial), .npz with 'logits' or "
        "'probabilities') against label maps (.png, .npy, .nii.gz) with matching stems, and report "
        "calibration and segmentation metrics. Runs unchanged under 'torchrun --nproc-per-node N segcal "
        "eval ...' (each process reads its block of the sorted stems; rank 0 prints and writes; "
        "docs/scaling.md).",
    )
    p.add_argument("--pred", required=True, help="prediction folder")
    p.add_argument("--labels", required=True, help="label folder (same stems)")
    p.add_argument("--ignore-index", type=int, default=None, help="label value to ignore (e.g. 255)")
    p.add_argument("--bins", type=int, default=15, help="number of equal-width confidence bins (default 15)")
    p.add_argument("--fine-bins", type=int, default=1 << 16, metavar="N",
                   help="bins of the fine confidence histogram behind adaptive ECE, AURC/AUROC/AUPR and "
                        "smECE (default 65536; 262144 brings every *_tie_bound on CamVid below 1e-4)")
    p.add_argument("--json", default=None, help="write every metric to this JSON file")
    p.add_argument("--plot", default=None, metavar="FILE.png|FILE.svg",
                   help="write the pooled reliability diagram (needs matplotlib: pip install 'segcal[plot]')")
    p.add_argument("--html", default=None, metavar="FILE.html",
                   help="write a self-contained one-folder HTML report: headline metrics, reliability diagram, "
                   "per-class table and diagrams, per-image ECE distribution (needs matplotlib)")
    p.add_argument("--class-names", default=None, type=csv_arg, metavar="NAMES",
                   help="class names for --html / --plot, comma-separated by class index, or 'camvid'")
    add_input_type_args(p)
    add_device_arg(p, "cpu")
    p.add_argument("--save-state", default=None, help="also save the mergeable metric state (.pt)")
    add_progress_arg(p)
    c = p.add_argument_group(
        "conformal risk control in the same pass",
        "with --conformal-out, the per-image loss table of 'segcal conformal fit' is built from this pass's own "
        "softmax (one read, one softmax) and the fitted threshold is written: the same file 'segcal conformal fit' "
        "writes on the same folder (docs/conformal.md); --html then gains a conformal section")
    c.add_argument("--conformal-risk", choices=RISK_CHOICES, default=None,
                   help="per-image loss (default miscoverage): miscoverage of the pixel sets, false-negative rate "
                   "of --conformal-class, or coverage below --conformal-tau (COSE)")
    c.add_argument("--conformal-alpha", type=float, default=None, metavar="A", help="target risk in (0, 1)")
    c.add_argument("--conformal-delta", type=float, default=None, metavar="D",
                   help="with this: Learn-then-Test, P(risk <= alpha) >= 1 - delta; without: CRC, E[risk] <= alpha")
    c.add_argument("--conformal-class", type=int, default=None, metavar="K", help="class of --conformal-risk fnr")
    c.add_argument("--conformal-tau", type=float, default=None, metavar="T",
                   help="coverage level of --conformal-risk coverage")
    c.add_argument("--conformal-grid-size", type=int, default=None, metavar="N",
                   help="number of lambda values in [0, 1] (default 201)")
    c.add_argument("--conformal-out", default=None, metavar="FILE.json",
                   help="write the fitted threshold and its guarantee (the format of 'segcal conformal fit --out')")
    return p
