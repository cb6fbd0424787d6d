"""``segcal adapt``: source-free adaptation guided by estimated calibration (Cal-SFDA) and baselines.

::

    segcal adapt --model espnet-camvid --target camvid:train --estimator est.pt \\
                 --method calsfda|tent|selftrain --out DIR [--rounds R] [--epochs E] [--quick]
                 [--resume DIR/epoch_003.pt] [--corruption NAME --severity S] [--seed N]
                 [--mapping cityscapes-camvid]

The target folder holds unlabeled images only; for ``camvid:train`` only the image folder is
resolved (the labels are never opened). ``--out`` may be neither the target folder nor inside it.
See ``docs/adaptation.md``; the arguments are declared in :mod:`segcal.cli.parsers.adapt`.
Under ``torchrun --nproc-per-node N`` (gloo on the CPU, NCCL with ``--device cuda``) every global
batch is split over the ranks, BatchNorm statistics, losses and gradients are summed over them,
and the result is the one-process run's (:mod:`segcal.adaptation.distributed`); rank 0 alone
writes the checkpoints and the log and prints.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from segcal.adaptation import METHODS, adapt, resolve_target_images
from segcal.cli.common import check_out_path, device_from_arg
from segcal.errors import InputError
from segcal.estimation import BASELINES, load_estimator
from segcal.models import ClassMapping, create_model, get_spec
from segcal.models.espnet import CITYSCAPES_TO_CAMVID
from segcal.pipeline.distributed import rank_device, world
from segcal.shift import make_transform


def _mapping(name: str | None) -> ClassMapping | None:
    if name is None:
        return None
    return ClassMapping(CITYSCAPES_TO_CAMVID, 20)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse values the run would not honour (accepted and ignored, or misread, before): ``--severity``
    without ``--corruption``, ``--rounds`` / ``--epochs`` with ``--quick`` (which sets one round of
    two epochs), ``--max-images`` below 1, a negative or non-finite ``--eta``."""
    if args.corruption is None and args.severity != 3:
        raise InputError(f"--severity {args.severity}: given without --corruption (the severity of a synthetic "
                         "corruption of the target images); pass --corruption NAME or leave --severity out")
    if args.quick:
        given = [flag for flag, value, default in (("--rounds", args.rounds, 3), ("--epochs", args.epochs, 2))
                 if value != default]
        if given:
            raise InputError(f"{given[0]}: --quick runs one round of 2 epochs on 4 images; leave {', '.join(given)} "
                             "out or drop --quick")
    if args.max_images is not None and args.max_images < 1:
        raise InputError(f"--max-images: expected at least 1, got {args.max_images}")
    if not math.isfinite(args.eta) or args.eta < 0:
        raise InputError(f"--eta: expected a weight >= 0 for the entropy term, got {args.eta}")


def run(args: argparse.Namespace) -> int:
    """Adapt, then print one row per epoch and the selected checkpoint (rank 0 under torchrun)."""
    check_flags(args)
    if args.method not in METHODS:
        raise InputError(f"--method: unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.method == "calsfda" and args.estimator is None:
        raise InputError("--estimator is required for --method calsfda (an estimator file, or maxprob/entropy)")
    paths = resolve_target_images(args.target, args.data_root)  # fails early on an empty folder
    inputs: dict[str, str | Path | None] = {"--target": Path(paths[0]).parent if paths else None}
    if args.estimator is not None and args.estimator not in BASELINES:
        inputs["--estimator"] = args.estimator
    check_out_path(args.out, inputs)
    get_spec(args.model)  # unknown model: the error lists the known ones
    device = device_from_arg(args.device)
    estimator = load_estimator(args.estimator) if args.estimator is not None else None
    transform = make_transform(args.corruption, args.severity, args.seed) if args.corruption else None
    with world(device) as w:
        model = create_model(args.model, data_root=args.data_root, device=str(rank_device(device, w)))
        res = adapt(
            model, paths, estimator, method=args.method, rounds=args.rounds, epochs_per_round=args.epochs,
            lr=args.lr, seed=args.seed, out_dir=args.out, resume=args.resume, quick=args.quick,
            class_mapping=_mapping(args.mapping), transform=transform, progress=not args.no_progress,
            batch_size=args.batch_size, eta=args.eta, max_images=args.max_images,
            bn_stats_pass=not args.no_bn_reset, warmup_affine=args.warmup == "stats+affine",
        )
        if not w.is_main:
            return 0
    print(f"{'epoch':>5} {'round':>5} {'phase':>7} {'loss':>9} {'est. ECE':>9} {'coverage':>9}")
    for e in res.epochs:
        est = "-" if e["estimated_ece"] is None else f"{e['estimated_ece']:.4f}"
        cov = "-" if e["coverage"] is None else f"{e['coverage']:.3f}"
        mark = "  <- selected" if e["epoch"] == res.selected_epoch else ""
        loss = "-" if e["loss"] is None else f"{e['loss']:.4f}"
        print(f"{e['epoch']:>5} {e['round']:>5} {e['phase']:>7} {loss:>9} {est:>9} {cov:>9}{mark}")
    print(f"selected ({res.selection_rule}): {res.selected_checkpoint}")
    print(f"log: {res.log_path}  ({res.seconds:.1f} s)", file=sys.stderr)
    return 0
