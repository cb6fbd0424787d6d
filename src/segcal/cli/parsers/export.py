"""Arguments of ``segcal export`` (argparse only; the command runs in :mod:`segcal.cli.export_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a model and its calibrator as one module (.pt2 torch.export or .onnx)",
        description=(
            "Wrap a registered model (--model, optionally with the weights of a segcal adapt "
            "--checkpoint) and a fitted calibrator (--calibrator, from segcal fit) into one "
            "segcal.CalibratedModel and export it: --out model.pt2 (torch.export; load with "
            "torch.export.load(path).module()) or --out model.onnx (needs pip install "
            "'segcal[export]'). The exported module takes the model's preprocessed input "
            "(N, C_in, *spatial) and returns calibrated probabilities (or --output logits) at the "
            "input's size. See docs/integrations.md."
        ),
    )
    p.add_argument("--model", help="registered model name (segcal predict --list-models)")
    p.add_argument("--checkpoint", help="weights of a segcal adapt checkpoint (epoch_XXX.pt) made from --model")
    p.add_argument("--calibrator", help="calibrator file written by segcal fit (cal.pt)")
    p.add_argument("--out", help="output file: .pt2 (torch.export) or .onnx")
    p.add_argument("--output", default="probs", choices=("probs", "logits"),
                   help="what the exported module returns: calibrated probabilities or logits")
    p.add_argument("--example-shape", help="shape of the example input traced, N,C,H,W or N,C,D,H,W "
                   "(default 2,3,360,480; 2,1,32,32,32 for unet3d-hippocampus); batch and spatial sizes >= 2")
    p.add_argument("--dynamic", default="auto", choices=("auto", "all", "batch", "none"),
                   help="sizes left free in the export: all = batch and spatial sizes, batch = batch "
                   "only (spatial sizes of --example-shape), none; auto = all, or batch when the "
                   "model's code fixes the image size")
    p.add_argument("--data-root", help="folder holding espnet/ weights (default: SEGCAL_DATA or ../shared/data)")
    return p
