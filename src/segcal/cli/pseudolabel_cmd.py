"""``segcal pseudolabel``: ECE-weighted class-balanced pseudo-labels (Cal-SFDA, methods.md §3.15(g)).

    segcal pseudolabel --pred DIR --out DIR [--estimator est.pt [--features DIR]] [--round r]
                       [--ignore-value 255] [--format png|npy] [--labels DIR --label-ignore K]

Writes one label file per prediction (same stems); with ``--labels`` (analysis only) it also
reports the precision and coverage of the pseudo-labels and of max-probability thresholding at the
same coverage.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.io import PredictionFolder, atomic_write


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pseudolabel",
        help="write class-balanced, ECE-weighted pseudo-labels for unlabeled predictions",
        description="Cal-SFDA pseudo-labels: per-class thresholds at the (1 - prop) quantile of the "
        "ECE-weighted confidence over the folder, union with the per-image top local_prop pixels, "
        "ignore elsewhere.",
    )
    p.add_argument("--pred", required=True, help="prediction folder (logits (C, H, W))")
    p.add_argument("--out", required=True, help="output label folder")
    p.add_argument("--estimator", default=None, help="ECE estimator (.pt) or 'maxprob'/'entropy'; none: no weighting")
    p.add_argument("--features", default=None, help="feature folder for a features estimator")
    p.add_argument("--round", type=int, default=0, help="self-training round r: prop = 0.15 + 0.05 r, local 0.1 + 0.05 r")
    p.add_argument("--prop", type=float, default=None, help="override the class-balanced proportion")
    p.add_argument("--local-prop", type=float, default=None, help="override the per-image proportion")
    p.add_argument("--subsample", type=int, default=5, help="keep every n-th sorted value per image (default 5)")
    p.add_argument("--ignore-value", type=int, default=255, help="label written for unselected pixels (default 255)")
    p.add_argument("--format", choices=["png", "npy"], default="png")
    p.add_argument("--probabilities", action="store_true", help="inputs are probabilities, not logits")
    p.add_argument("--labels", default=None, help="true labels, for reporting precision only")
    p.add_argument("--label-ignore", type=int, default=None, help="ignore value of --labels")
    p.add_argument("--json", default=None, help="write thresholds and statistics to this JSON file")
    p.set_defaults(func=run)


def _read(folder: PredictionFolder, it: Any) -> tuple[torch.Tensor, str]:
    arr, _, itype = folder.read(it)
    if arr.ndim != 3:
        raise ValueError(f"pred: {it.stem} has shape {arr.shape}; expected (C, H, W)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(arr, dtype=np.float32)), itype


def run(args: argparse.Namespace) -> int:
    from segcal.estimation import (
        class_thresholds,
        estimate_images,
        load_estimator,
        maxprob_pseudo_labels,
        maxprob_threshold_for_coverage,
        proportion_schedule,
        pseudo_label,
    )
    from segcal.estimation.features import iter_feature_maps
    from segcal.estimation.pseudolabels import pseudo_label_precision
    from segcal.io import read_label

    prop, local = proportion_schedule(args.round)
    prop = args.prop if args.prop is not None else prop
    local = args.local_prop if args.local_prop is not None else local
    folder = PredictionFolder(args.pred, args.labels, input_type="probs" if args.probabilities else None)
    ece = None
    if args.estimator:
        est = load_estimator(args.estimator)
        kind = getattr(est, "input_kind", "scores")
        if kind == "features" and args.features is None:
            raise ValueError(f"{args.estimator} was trained on features: pass --features DIR")
        feats = iter_feature_maps(args.features, folder.stems) if kind == "features" else None
        ece = []
        for it in folder.items:
            f = next(feats).unsqueeze(0) if feats is not None else None
            s, itype = _read(folder, it) if kind != "features" else (None, "logits")
            ece.append(float(estimate_images(est, None if s is None else s[None], f, input_type=itype)[0]))

    def scores_iter():
        for it in folder.items:
            yield _read(folder, it)[0]

    itype = _read(folder, folder.items[0])[1]
    thr, counts = class_thresholds(scores_iter(), prop=prop, ece=ece, subsample=args.subsample, input_type=itype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"cal_sfda": [0, 0, 0], "n_pixels": 0, "labelled": 0}
    for it in folder.items:
        s, _ = _read(folder, it)
        lab, _ = pseudo_label(s, thr, local_prop=local, ignore_value=args.ignore_value, input_type=itype)
        _write(out / f"{it.stem}.{args.format}", lab)
        stats["n_pixels"] += lab.size
        stats["labelled"] += int((lab != args.ignore_value).sum())
        if it.label_path is not None:
            c, sel, v = pseudo_label_precision(lab, read_label(it.label_path), ignore_value=args.ignore_value,
                                               label_ignore=args.label_ignore)
            stats["cal_sfda"] = [a + b for a, b in zip(stats["cal_sfda"], (c, sel, v), strict=True)]
    coverage = stats["labelled"] / max(stats["n_pixels"], 1)
    report = {"prop": prop, "local_prop": local, "thresholds": thr.tolist(), "counts": counts.tolist(),
              "coverage": coverage, "n_images": len(folder), "ece_weighted": ece is not None,
              "mean_estimated_ece": None if ece is None else float(np.mean(ece))}
    print(f"wrote {len(folder)} pseudo-label maps to {out} (prop {prop:.2f}, local {local:.2f}); "
          f"coverage {coverage:.4f}")
    print("class thresholds: " + "  ".join(f"{k}:{t:.4f}" for k, t in enumerate(thr)))
    if args.labels is not None:
        c, sel, v = stats["cal_sfda"]
        t = maxprob_threshold_for_coverage(scores_iter(), coverage, input_type=itype)
        base = [0, 0, 0]
        for it in folder.items:
            s, _ = _read(folder, it)
            b = maxprob_pseudo_labels(s, t, ignore_value=args.ignore_value, input_type=itype)
            r = pseudo_label_precision(b, read_label(it.label_path), ignore_value=args.ignore_value,
                                       label_ignore=args.label_ignore)
            base = [a + x for a, x in zip(base, r, strict=True)]
        report["precision"] = c / max(sel, 1)
        report["maxprob_precision"] = base[0] / max(base[1], 1)
        report["maxprob_threshold"] = t
        print(f"precision {report['precision']:.4f} vs max-prob thresholding at the same coverage "
              f"{report['maxprob_precision']:.4f} (threshold {t:.4f})")
    if args.json:
        with atomic_write(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


def _write(path: Path, lab: np.ndarray) -> None:
    if path.suffix == ".npy":
        with atomic_write(path) as fh:
            np.save(fh, lab, allow_pickle=False)
        return
    from PIL import Image

    with atomic_write(path) as fh:
        Image.fromarray(lab).save(fh, format="PNG")
