"""``segcal estimate``: label-free ECE estimates for a prediction folder (and estimator training).

Estimate::

    segcal estimate --pred DIR [--features DIR] --estimator est.pt [--json OUT]
    segcal estimate --pred DIR --baseline maxprob|entropy

Train (labels needed, e.g. on clean calibration images)::

    segcal estimate --train --pred DIR --labels DIR --out est.pt [--features DIR]
                    [--target image|class_level] [--ignore-index K]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import numpy as np
import torch

from segcal.io import PredictionFolder, atomic_write


def add_parser(sub: Any) -> None:
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
    g.add_argument("--baseline", choices=["maxprob", "entropy"], default=None, help="label-free baseline")
    p.add_argument("--json", default=None, help="write per-image and overall estimates to this JSON file")
    p.add_argument("--probabilities", action="store_true", help="inputs are probabilities, not logits")
    tr = p.add_argument_group("training (--train)")
    tr.add_argument("--train", action="store_true", help="fit an estimator instead of estimating")
    tr.add_argument("--labels", default=None, help="label folder (training)")
    tr.add_argument("--out", default=None, help="where to save the fitted estimator (training)")
    tr.add_argument("--target", choices=["image", "class_level"], default="image",
                    help="per-image target: top-label image ECE (default) or class-level ECE (Cal-SFDA)")
    tr.add_argument("--ignore-index", type=int, default=None, help="label value excluded from the targets")
    tr.add_argument("--bins", type=int, default=10, help="bins of the target ECE (default 10)")
    tr.add_argument("--epochs", type=int, default=300)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _scores(arr: np.ndarray, stem: str) -> torch.Tensor:
    if arr.ndim != 3:
        raise ValueError(f"pred: {stem} has shape {arr.shape}; the estimator supports 2D predictions (C, H, W)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(arr, dtype=np.float32)).unsqueeze(0)


def _features(folder: str | None, stems: list[str]):
    from segcal.estimation.features import iter_feature_maps

    if folder is None:
        return None
    return iter_feature_maps(folder, stems)


def run(args: argparse.Namespace) -> int:
    return _train(args) if args.train else _estimate(args)


def _estimate(args: argparse.Namespace) -> int:
    from segcal.estimation import ConfidenceBaseline, ECEEstimator, estimate_images

    if args.estimator is None and args.baseline is None:
        raise ValueError("give --estimator FILE or --baseline maxprob|entropy (or --train to fit one)")
    est = ConfidenceBaseline(args.baseline) if args.baseline else ECEEstimator.load(args.estimator)
    kind = getattr(est, "input_kind", "scores")
    if kind == "features" and args.features is None:
        raise ValueError(f"{args.estimator} was trained on features: pass --features DIR")
    folder = PredictionFolder(args.pred, input_type="probs" if args.probabilities else None)
    feats = _features(args.features, folder.stems) if kind == "features" else None
    per_image: dict[str, float] = {}
    for it in folder.items:
        f = next(feats).unsqueeze(0) if feats is not None else None
        scores, itype = None, "logits"
        if kind != "features":
            arr, _, itype = folder.read(it)
            scores = _scores(arr, it.stem)
        try:
            per_image[it.stem] = float(estimate_images(est, scores, f, input_type=itype)[0])
        except ValueError as exc:
            raise ValueError(f"{it.stem}: {exc}") from exc
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
            json.dump(payload, fh, indent=2)
    return 0


def _train(args: argparse.Namespace) -> int:
    from segcal.estimation import ECEEstimator, ece_targets, logit_features

    if args.labels is None or args.out is None:
        raise ValueError("--train needs --labels DIR and --out FILE")
    folder = PredictionFolder(args.pred, args.labels, input_type="probs" if args.probabilities else None)
    feats = _features(args.features, folder.stems)
    inputs, targets = [], []
    c = None
    for it in folder.items:
        arr, lab, itype = folder.read(it)
        x = _scores(arr, it.stem)
        c = c or x.shape[1]
        if x.shape[1] != c:
            raise ValueError(f"pred: {it.stem} has {x.shape[1]} classes, the first file had {c}")
        y = torch.from_numpy(np.asarray(lab).astype(np.int64)).unsqueeze(0)
        targets.append(float(ece_targets(x, y, kind=args.target, n_bins=args.bins,
                                         ignore_index=args.ignore_index, input_type=itype)[0]))
        inputs.append(next(feats) if feats is not None else logit_features(x, itype)[0])
    x = torch.stack(inputs)
    meta = {"target": args.target, "n_bins": args.bins, "ignore_index": args.ignore_index, "pred": str(args.pred)}
    if feats is not None:
        est = ECEEstimator(x.shape[1], meta=meta)
    else:
        est = ECEEstimator(x.shape[1], input_kind="logits", num_classes=c, meta=meta)
    est.fit(x, torch.tensor(targets), epochs=args.epochs, lr=args.lr, seed=args.seed)
    est.save(args.out)
    print(f"fitted an ECE estimator ({est.input_kind}, target={args.target}) on {len(targets)} images: "
          f"best held-out MSE {est.fit_info['best_val_mse']:.5f} at epoch {est.fit_info['best_epoch']}; "
          f"saved to {args.out}", file=sys.stderr)
    return 0
