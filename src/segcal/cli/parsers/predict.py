"""Arguments of ``segcal predict`` (argparse only; the command runs in :mod:`segcal.cli.predict_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_progress_arg


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="run a segmentation model over an image folder and write logits",
        description=(
            "Run a registered model (e.g. espnet-camvid) over --images and write one <stem>.npy "
            "(C, H, W) float16 logits file per image plus segcal.json into --out."
        ),
    )
    p.add_argument("--model", help="registered model name (see --list-models)")
    p.add_argument("--images", help="image folder (.png/.jpg) or a dataset alias: camvid:train, camvid:val, "
                   "camvid:test")
    p.add_argument("--out", help="output prediction folder (neither an input folder nor inside one)")
    p.add_argument("--labels", help="optional label folder, checked against images and model")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    p.add_argument("--data-root", help="folder holding camvid/ and espnet/ (default: SEGCAL_DATA "
                   "or ../shared/data)")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="storage dtype of the logits")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds another model's predictions of the same images "
                   "(an --out holding files of images this run does not predict is always refused)")
    add_progress_arg(p)
    p.add_argument("--list-models", action="store_true", help="list the registered models")
    p.add_argument("--checkpoint", help="predict with the weights of a segcal adapt checkpoint (epoch_XXX.pt) "
                   "made from --model (or, for a mapped model such as espnet-cityscapes-camvid, from the "
                   "model it maps)")
    p.add_argument("--corruption", help="corrupt each image before the model (segcal.shift; synthetic shift)")
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1..5")
    p.add_argument("--seed", type=int, default=0, help="corruption seed (per image: derived from seed and stem)")
    return p
