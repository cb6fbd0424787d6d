"""``segcal estimate``: label-free ECE estimates for a prediction folder (and estimator training).

Estimate::

    segcal estimate --pred DIR [--features DIR] --estimator est.pt [--json OUT]
    segcal estimate --pred DIR --baseline maxprob|entropy

Train (labels needed, e.g. on clean calibration images)::

    segcal estimate --train --pred DIR --labels DIR --out est.pt [--features DIR]
                    [--target image|class_level] [--ignore-index K]

The arguments are declared in :mod:`segcal.cli.parsers.estimate`.

Under ``torchrun`` every rank reads (and estimates, or computes the training targets of) its
contiguous block of the sorted images; the per-image values are gathered in rank order, and rank
0 alone fits the estimator, prints and writes (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from segcal.cli.common import (
    check_out_path,
    check_scores_kind,
    checked_ignore_index,
    files_bar,
    input_type_from_args,
)
from segcal.errors import InputError
from segcal.estimation import (
    ConfidenceBaseline,
    ECEEstimator,
    ece_targets,
    estimate_images,
    logit_features,
)
from segcal.estimation.features import iter_feature_maps
from segcal.io import PredictionFolder, atomic_write, to_jsonable
from segcal.pipeline.distributed import on_each, on_main, shard, world
from segcal.validation import check_class_count, check_finite


def _scores(arr: np.ndarray, where: str, itype: str) -> torch.Tensor:
    if arr.ndim != 3:
        raise InputError(f"--pred: {where} has shape {tuple(arr.shape)}; the estimator supports 2D predictions "
                         "(C, H, W)")
    check_scores_kind(arr, itype, f"--pred: {where}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.asarray(arr, dtype=np.float32)).unsqueeze(0)
    check_finite(x, f"--pred: {where}")
    return x


def _features(folder: str | None, stems: list[str]) -> Iterator[torch.Tensor] | None:
    if folder is None:
        return None
    return iter_feature_maps(folder, stems)


#: the training flags (``--train`` only) and their defaults: one given without --train is refused
TRAIN_ONLY = {"labels": None, "out": None, "target": "image", "ignore_index": None, "bins": 10, "epochs": 300,
              "lr": 1e-3, "seed": 0}
#: the estimation flags that --train does not read
ESTIMATE_ONLY = ("estimator", "baseline", "json")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse a flag that the chosen action would not read (accepted and ignored before: ``--labels``
    or ``--bins`` given to an estimation, ``--baseline`` or ``--json`` to ``--train``)."""
    if args.train:
        given = [f"--{k}" for k in ESTIMATE_ONLY if getattr(args, k, None) is not None]
        if given:
            raise InputError(f"{given[0]}: not used by --train (which fits an estimator and saves it to --out); "
                             f"leave {', '.join(given)} out, or estimate without --train")
        return
    given = [f"--{k.replace('_', '-')}" for k, default in TRAIN_ONLY.items() if getattr(args, k, default) != default]
    if given:
        raise InputError(f"{given[0]}: a training flag, read only with --train; pass --train to fit an estimator, "
                         f"or leave {', '.join(given)} out")


def run(args: argparse.Namespace) -> int:
    """Estimate (default) or, with ``--train``, fit an estimator."""
    check_flags(args)
    return _train(args) if args.train else _estimate(args)


def _estimate(args: argparse.Namespace) -> int:
    if args.estimator is None and args.baseline is None:
        raise InputError("give --estimator FILE or --baseline maxprob|entropy (or --train to fit one)")
    if args.json:
        check_out_path(args.json, {"--pred": args.pred, "--features": args.features,
                                   "--estimator": args.estimator}, kind="file", flag="--json")
    est = ConfidenceBaseline(args.baseline) if args.baseline else ECEEstimator.load(args.estimator)
    kind = getattr(est, "input_kind", "scores")
    if kind == "features" and args.features is None:
        raise InputError(f"--estimator {args.estimator} was trained on features: pass --features DIR")
    if kind != "features" and args.features is not None:
        raise InputError(f"--features: {'--baseline ' + args.baseline if args.baseline else '--estimator ' + str(args.estimator)}"
                         " reads the predictions, not features; leave --features out (or pass an estimator "
                         "trained on features)")
    folder = PredictionFolder(args.pred, input_type=input_type_from_args(args))
    with world() as w:
        items = shard(folder.items, w.rank, w.size) if w.distributed else folder.items
        parts = on_each(lambda: _estimate_items(est, kind, folder, items, args.features, args))
    per_image: dict[str, float] = {}
    seen = [(c, where) for _, c, where in parts if where is not None]
    for c, where in seen[1:]:
        if c != seen[0][0]:
            raise InputError(f"--pred: {where} has {c} classes, but {seen[0][1]} has {seen[0][0]}; expected "
                             f"{seen[0][0]} classes")
    for part, _, _ in parts:  # rank order: the sorted order of the images
        per_image.update(part)
    if not w.is_main:
        return 0
    vals = np.array(list(per_image.values()))
    name = f"baseline:{args.baseline}" if args.baseline else str(args.estimator)
    print(f"{'image':<32} {'estimated ECE':>14}")
    for s, v in per_image.items():
        print(f"{s:<32} {v:>14.5f}")
    print(f"{'overall (mean over images)':<32} {vals.mean():>14.5f}")
    if args.json:
        payload = {"estimator": name, "per_image": per_image, "mean": float(vals.mean()),
                   "std": float(vals.std()), "n_images": len(per_image)}
        with atomic_write(args.json, "w") as fh:
            json.dump(to_jsonable(payload), fh, indent=2, allow_nan=False)
    return 0


def _estimate_items(est: Any, kind: str, folder: PredictionFolder, items: list[Any],
                    features: str | None, args: argparse.Namespace) -> tuple[dict[str, float], int | None, str | None]:
    """The estimates of ``items`` (this rank's share), the class count and the first file read."""
    feats = _features(features, [it.stem for it in items]) if kind == "features" else None
    per_image: dict[str, float] = {}
    first: int | None = getattr(est, "num_classes", None) if kind == "logits" else None
    where = None
    for it in files_bar(items, "estimate", args):
        f = next(feats).unsqueeze(0) if feats is not None else None
        scores, itype = None, "logits"
        if kind != "features":
            arr, _, itype = folder.read(it)
            where = where or str(it.path)
            first = first or int(arr.shape[0])
            check_class_count(arr, first, f"--pred: {it.path}")
            scores = _scores(arr, str(it.path), itype)
        try:
            per_image[it.stem] = float(estimate_images(est, scores, f, input_type=itype)[0])
        except ValueError as exc:
            raise InputError(f"{it.stem}: {exc}") from exc
    return per_image, first, where


def _train(args: argparse.Namespace) -> int:
    if args.labels is None or args.out is None:
        raise InputError("--train needs --labels DIR and --out FILE")
    check_out_path(args.out, {"--pred": args.pred, "--labels": args.labels, "--features": args.features},
                   kind="file")
    args.ignore_index = checked_ignore_index(args.ignore_index, args.labels)
    folder = PredictionFolder(args.pred, args.labels, input_type=input_type_from_args(args))
    with world() as w:
        items = shard(folder.items, w.rank, w.size) if w.distributed else folder.items
        parts = on_each(lambda: _train_items(folder, items, args))
        seen = [(c, where) for _, _, c, where in parts if where is not None]
        for c, where in seen[1:]:
            if c != seen[0][0]:
                raise InputError(f"--pred: {where} has {c} classes, but {seen[0][1]} has {seen[0][0]}; "
                                 f"expected {seen[0][0]} classes")
        inputs = [x for part in parts for x in part[0]]  # rank order: the sorted order of the images
        targets = [t for part in parts for t in part[1]]
        c = seen[0][0] if seen else None
        x = torch.stack(inputs)
        meta = {"target": args.target, "n_bins": args.bins, "ignore_index": args.ignore_index,
                "pred": str(args.pred)}

        def fit() -> ECEEstimator:
            if args.features is not None:
                est = ECEEstimator(x.shape[1], meta=meta)
            else:
                est = ECEEstimator(x.shape[1], input_kind="logits", num_classes=c, meta=meta)
            est.fit(x, torch.tensor(targets), epochs=args.epochs, lr=args.lr, seed=args.seed)
            est.save(args.out)
            return est

        est = on_main(fit)  # rank 0 alone fits and saves; the others wait for it
    if not w.is_main:
        return 0
    print(f"fitted an ECE estimator ({est.input_kind}, target={args.target}) on {len(targets)} images: "
          f"best held-out MSE {est.fit_info['best_val_mse']:.5f} at epoch {est.fit_info['best_epoch']}; "
          f"saved to {args.out}", file=sys.stderr)
    return 0


def _train_items(folder: PredictionFolder, items: list[Any],
                 args: argparse.Namespace) -> tuple[list[torch.Tensor], list[float], int | None, str | None]:
    """Estimator inputs and ECE targets of ``items`` (this rank's share), class count, first file."""
    feats = _features(args.features, [it.stem for it in items])
    inputs, targets = [], []
    c, where = None, None
    for it in items:
        arr, lab, itype = folder.read(it)
        where = where or str(it.path)
        c = c or int(arr.shape[0])
        check_class_count(arr, c, f"--pred: {it.path} (the first file has {c} classes)")
        x = _scores(arr, str(it.path), itype)
        y = torch.from_numpy(np.asarray(lab).astype(np.int64)).unsqueeze(0)
        try:
            targets.append(float(ece_targets(x, y, kind=args.target, n_bins=args.bins,
                                             ignore_index=args.ignore_index, input_type=itype)[0]))
        except ValueError as exc:
            raise InputError(f"{it.stem}: {exc}") from exc
        inputs.append(next(feats) if feats is not None else logit_features(x, itype)[0])
    return inputs, targets, c, where
