"""Arguments of ``segcal estimate`` (argparse only; runs in :mod:`segcal.cli.estimate_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_input_type_args, add_progress_arg

#: the label-free baselines (:class:`segcal.estimation.ConfidenceBaseline`)
BASELINES = ("maxprob", "entropy")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "estimate",
        help="estimate the ECE of unlabeled predictions (or train an estimator with --train)",
        description="Print the estimated ECE per image and overall for a folder of predictions without "
        "labels, using a trained value-net estimator (features or logits) or a label-free baseline. "
        "With --train, fit an estimator on a labelled prediction folder instead.",
    )
    p.add_argument("--pred", required=True, help="prediction folder (.npy/.npz logits (C, H, W))")
    p.add_argument("--features", default=None, help="feature folder (<stem>.npy (C_f, h, w)) for a features estimator")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--estimator", default=None, help="estimator file (.pt) from --train")
    g.add_argument("--baseline", choices=BASELINES, default=None, help="label-free baseline")
    p.add_argument("--json", default=None, help="write per-image and overall estimates to this JSON file")
    add_input_type_args(p)
    add_progress_arg(p)
    tr = p.add_argument_group("training (--train)")
    tr.add_argument("--train", action="store_true", help="fit an estimator instead of estimating")
    tr.add_argument("--labels", default=None, help="label folder (training)")
    tr.add_argument("--out", default=None, help="where to save the fitted estimator (training; a file outside "
                    "the input folders)")
    tr.add_argument("--target", choices=["image", "class_level"], default="image",
                    help="per-image target: top-label image ECE or class-level ECE (Cal-SFDA)")
    tr.add_argument("--ignore-index", type=int, default=None, help="label value excluded from the targets")
    tr.add_argument("--bins", type=int, default=10, help="bins of the target ECE")
    tr.add_argument("--epochs", type=int, default=300, help="training epochs")
    tr.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    tr.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of the initialisation")
    return p
