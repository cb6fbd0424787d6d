"""``segcal pseudolabel``: ECE-weighted class-balanced pseudo-labels (Cal-SFDA, methods.md §3.15(g)).

    segcal pseudolabel --pred DIR --out DIR [--estimator est.pt [--features DIR]] [--round r]
                       [--ignore-value 255] [--format png|npy] [--labels DIR --label-ignore K]

Writes one label file per prediction (same stems) into ``--out``, which may be neither an input
folder nor inside or around one (an ``--out`` equal to ``--pred`` would replace the predictions,
one equal to ``--labels`` the true labels). With ``--labels`` (analysis only) it also reports the
precision and coverage of the pseudo-labels and of max-probability thresholding at the same
coverage. The arguments are declared in :mod:`segcal.cli.parsers.pseudolabel`.

Under ``torchrun`` every rank estimates the ECE of, labels, writes and scores its contiguous block
of the sorted images, and rank 0 alone prints and writes ``--json``; the class thresholds (and the
max-probability baseline's threshold) are exact quantiles over every image, so each rank still
reads every prediction once for them (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segcal.cli.common import (
    check_out_path,
    check_scores_kind,
    checked_ignore_index,
    files_bar,
    input_type_from_args,
)
from segcal.errors import InputError
from segcal.estimation import (
    BASELINES,
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
from segcal.io import PredictionFolder, atomic_write, read_label, to_jsonable
from segcal.pipeline.distributed import on_each, shard, world
from segcal.validation import check_class_count, check_finite


def _read(folder: PredictionFolder, it: Any, num_classes: int | None = None) -> tuple[torch.Tensor, str]:
    arr, _, itype = folder.read(it)
    if arr.ndim != 3:
        raise InputError(f"--pred: {it.path} has shape {tuple(arr.shape)}; expected (C, H, W)")
    if num_classes is not None:
        check_class_count(arr, num_classes, f"--pred: {it.path} (the first file has {num_classes} classes)")
    check_scores_kind(arr, itype, f"--pred: {it.path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    check_finite(x, f"--pred: {it.path}")
    return x, itype


def _true_labels(it: Any, shape: tuple[int, ...]) -> np.ndarray:
    lab = np.asarray(read_label(it.label_path))
    if lab.shape != shape:
        raise InputError(f"--labels: {it.label_path} has shape {lab.shape}; the prediction {it.path} "
                         f"covers {shape}")
    return lab


def run(args: argparse.Namespace) -> int:
    """Write the pseudo-label maps (and, with ``--labels``, report their precision)."""
    inputs = {"--pred": args.pred, "--labels": args.labels, "--features": args.features}
    if args.estimator is not None and args.estimator not in BASELINES:
        inputs["--estimator"] = args.estimator
    out = check_out_path(args.out, inputs)
    if args.json:
        check_out_path(args.json, inputs, kind="file", flag="--json")
    if args.label_ignore is not None and args.labels is None:
        raise InputError("--label-ignore: the ignore value of --labels, given without --labels; pass --labels DIR "
                         "(the true labels, for the precision report) or leave --label-ignore out")
    args.label_ignore = checked_ignore_index(args.label_ignore, args.labels, "--label-ignore")
    try:
        prop, local = proportion_schedule(args.round)
    except InputError as exc:
        raise InputError(f"--{exc}") from exc  # "round ...": the flag
    prop = args.prop if args.prop is not None else prop
    local = args.local_prop if args.local_prop is not None else local
    # checked here, naming the flags, before any file is read or --out created (an empty --out was left)
    if not 0 < prop <= 1:
        raise InputError(f"--prop: expected a proportion in (0, 1], got {prop}")
    if not 0 <= local <= 1:
        raise InputError(f"--local-prop: expected a proportion in [0, 1], got {local}")
    if args.subsample < 1:
        raise InputError(f"--subsample: expected >= 1, got {args.subsample}")
    if not 0 <= args.ignore_value <= 65535:
        raise InputError(f"--ignore-value: expected a label value in 0..65535, got {args.ignore_value}")
    folder = PredictionFolder(args.pred, args.labels, input_type=input_type_from_args(args))
    with world() as w:
        mine = shard(folder.items, w.rank, w.size) if w.distributed else folder.items
        return _run(args, out, folder, mine, prop, local, w.is_main)


def _run(args: argparse.Namespace, out: Path, folder: PredictionFolder, mine: list[Any], prop: float,
         local: float, main: bool) -> int:
    """The command on this rank's images ``mine`` (all of them in one process)."""
    if args.features is not None and not args.estimator:
        raise InputError("--features: read only by an --estimator trained on features, and no --estimator is "
                         "given; leave --features out (or pass such an estimator)")
    first, itype = _read(folder, folder.items[0])
    n_classes = int(first.shape[0])
    if args.ignore_value < n_classes:
        raise InputError(f"--ignore-value {args.ignore_value}: is a class of the predictions ({n_classes} classes, "
                         f"0..{n_classes - 1}); expected a value >= {n_classes} for the unselected pixels (e.g. 255)")
    ece = None
    if args.estimator:
        est = load_estimator(args.estimator)
        kind = getattr(est, "input_kind", "scores")
        if kind == "features" and args.features is None:
            raise InputError(f"--estimator {args.estimator} was trained on features: pass --features DIR")
        if kind != "features" and args.features is not None:
            raise InputError(f"--features: --estimator {args.estimator} reads the predictions, not features; leave "
                             "--features out (or pass an estimator trained on features)")

        def estimate() -> list[float]:
            feats = iter_feature_maps(args.features, [it.stem for it in mine]) if kind == "features" else None
            values = []
            for it in mine:
                f = next(feats).unsqueeze(0) if feats is not None else None
                s, _ = _read(folder, it, n_classes) if kind != "features" else (None, "logits")
                try:
                    values.append(float(estimate_images(est, None if s is None else s[None], f, input_type=itype)[0]))
                except ValueError as exc:
                    raise InputError(f"--pred: {it.path}: {exc}") from exc
            return values

        ece = [v for part in on_each(estimate) for v in part]  # rank order: the sorted order

    def scores_iter():
        for it in folder.items:
            yield _read(folder, it, n_classes)[0]

    thr, counts = class_thresholds(scores_iter(), prop=prop, ece=ece, subsample=args.subsample, input_type=itype)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> dict[str, Any]:
        stats: dict[str, Any] = {"cal_sfda": [0, 0, 0], "n_pixels": 0, "labelled": 0}
        for it in files_bar(mine, "pseudo-labels", args):
            s, _ = _read(folder, it, n_classes)
            lab, _ = pseudo_label(s, thr, local_prop=local, ignore_value=args.ignore_value, input_type=itype)
            _write(out / f"{it.stem}.{args.format}", lab)
            stats["n_pixels"] += lab.size
            stats["labelled"] += int((lab != args.ignore_value).sum())
            if it.label_path is not None:
                c, sel, v = pseudo_label_precision(lab, _true_labels(it, lab.shape), ignore_value=args.ignore_value,
                                                   label_ignore=args.label_ignore)
                stats["cal_sfda"] = [a + b for a, b in zip(stats["cal_sfda"], (c, sel, v), strict=True)]
        return stats

    parts = on_each(write)
    stats = {"n_pixels": sum(p["n_pixels"] for p in parts), "labelled": sum(p["labelled"] for p in parts),
             "cal_sfda": [sum(p["cal_sfda"][k] for p in parts) for k in range(3)]}
    coverage = stats["labelled"] / max(stats["n_pixels"], 1)
    report = {"prop": prop, "local_prop": local, "thresholds": thr.tolist(), "counts": counts.tolist(),
              "coverage": coverage, "n_images": len(folder), "ece_weighted": ece is not None,
              "mean_estimated_ece": None if ece is None else float(np.mean(ece))}
    if main:
        print(f"wrote {len(folder)} pseudo-label maps to {args.out} (prop {prop:.2f}, local {local:.2f}); "
              f"coverage {coverage:.4f}")
        print("class thresholds: " + "  ".join(f"{k}:{t:.4f}" for k, t in enumerate(thr)))
    if args.labels is not None:
        c, sel, _ = stats["cal_sfda"]
        t = maxprob_threshold_for_coverage(scores_iter(), coverage, input_type=itype)

        def baseline() -> list[int]:
            base = [0, 0, 0]
            for it in mine:
                s, _ = _read(folder, it, n_classes)
                b = maxprob_pseudo_labels(s, t, ignore_value=args.ignore_value, input_type=itype)
                r = pseudo_label_precision(b, _true_labels(it, b.shape), ignore_value=args.ignore_value,
                                           label_ignore=args.label_ignore)
                base = [a + x for a, x in zip(base, r, strict=True)]
            return base

        base = [sum(col) for col in zip(*on_each(baseline), strict=True)]
        report["precision"] = c / max(sel, 1)
        report["maxprob_precision"] = base[0] / max(base[1], 1)
        report["maxprob_threshold"] = t
        if main:
            print(f"precision {report['precision']:.4f} vs max-prob thresholding at the same coverage "
                  f"{report['maxprob_precision']:.4f} (threshold {t:.4f})")
    if args.json and main:
        with atomic_write(args.json, "w") as fh:
            json.dump(to_jsonable(report), fh, indent=2, allow_nan=False)
    return 0


def _write(path: Path, lab: np.ndarray) -> None:
    if path.suffix == ".npy":
        with atomic_write(path) as fh:
            np.save(fh, lab, allow_pickle=False)
        return
    with atomic_write(path) as fh:
        Image.fromarray(lab).save(fh, format="PNG")
