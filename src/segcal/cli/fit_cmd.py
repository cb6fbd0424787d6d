"""``segcal fit``: fit a calibrator on a prediction folder and save it.

The images (files) are split at random (``--seed``) into a fit set and a validation set
(``--val-fraction``); the validation NLL drives early stopping / best-iterate selection, and the
before/after metrics printed at the end are measured on the validation images (on the fit images
when there is no validation set) by :func:`segcal.pipeline.evaluate.evaluate_folder`.

``--images DIR`` (input images whose stems match the predictions) fits a calibrator with an image
branch: LTS / IBTS / LTS(log S) get ``use_image=True``; selective scaling passes it to its base
(``--method selective --base lts --images DIR``). RGB files are normalised like the models'
inputs (ImageNet mean/std); ``.npy`` images are used as they are.
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any

import numpy as np

from segcal.calibrators import FolderBatches, create, resolve
from segcal.cli.common import CLI_FLAGS, check_out_path, device_from_arg, input_type_from_args
from segcal.errors import InputError
from segcal.io import PredictionFolder
from segcal.io.files import atomic_write
from segcal.pipeline.evaluate import (
    evaluate_folder,
    find_label_error,
    folder_input_type,
)

SUMMARY = [("nll", "NLL"), ("ece", "ECE (pooled, 15 bins)"), ("image_ece", "ECE (image-wise)"),
           ("brier", "Brier"), ("accuracy", "Pixel accuracy"), ("miou", "mIoU"), ("mdice", "mean Dice")]


def split_stems(stems: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of image ids into (fit, val); at least one image in each when possible."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val-fraction: expected a fraction in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = round(len(stems) * val_fraction)
    if val_fraction > 0 and len(stems) >= 2:
        n_val = min(max(n_val, 1), len(stems) - 1)
    val = sorted(stems[i] for i in order[:n_val])
    fit = sorted(stems[i] for i in order[n_val:])
    return fit, val


def _takes(method: str, arg: str) -> bool:
    return arg in inspect.signature(resolve(method).__init__).parameters


def _calibrator_kwargs(args: argparse.Namespace, input_type: str, device: Any) -> dict[str, Any]:
    """The ``create(method, **kw)`` arguments the command line asks for."""
    kw: dict[str, Any] = dict(input_type=input_type, objective=args.objective, seed=args.seed,
                              memory_budget=args.memory_budget_mb * 2**20, subsample=args.subsample,
                              patience=args.patience, device=device)
    if args.optimizer != "auto":  # "auto": the calibrator's default (Adam for LTS/IBTS, §3.11)
        kw["optimizer"] = args.optimizer
    if args.max_iter is not None:
        kw["max_iter"] = args.max_iter
    if args.base is not None:
        if not _takes(args.method, "base"):
            raise InputError(f"--base: method {args.method!r} does not take a base calibrator")
        kw["base"] = args.base
    if args.images is not None:
        if _takes(args.method, "use_image"):
            kw["use_image"] = True
        elif args.base is not None and _takes(args.base, "use_image"):
            kw["base_config"] = {"use_image": True}
        else:
            raise InputError(f"--images: method {args.method!r}"
                             + (f" with base {args.base!r}" if args.base else "")
                             + " has no image branch (LTS / IBTS / LTS(log S) have one)")
    return kw


def _print_fit_info(info: dict[str, Any], out: str) -> None:
    print(f"fitted with {info['optimizer']} ({info['mode']}) on {info['n_pixels']} pixels; saved {out}")
    if "base" in info:
        print(f"base calibrator: {info['base']['name']}"
              + (f" (T = {info['base']['temperature']:.4f})" if "temperature" in info["base"] else ""))
    if "selector_accuracy" in info:
        acc = info["selector_accuracy"]
        print(f"selector accuracy on the {info.get('selection_split')} split: overall {acc['overall']:.4f}, "
              f"correct pixels {acc['correct']:.4f}, mispredicted pixels {acc['mispredicted']:.4f}; "
              f"t_mispred = {info['t_mispred']:g} (by {info.get('t_mispred_selected_by')})")


def run(args: argparse.Namespace) -> int:
    inputs = {"--pred": args.pred, "--labels": args.labels, "--images": args.images}
    check_out_path(args.out, inputs, kind="file", flag="--out")
    if args.json:
        check_out_path(args.json, {**inputs, "--out": args.out}, kind="file", flag="--json")
    device = device_from_arg(args.device)
    folder = PredictionFolder(args.pred, args.labels, input_type=input_type_from_args(args))
    input_type = folder_input_type(folder, names=CLI_FLAGS)
    fit_stems, val_stems = split_stems(folder.stems, args.val_fraction, args.seed)
    cal = create(args.method, **_calibrator_kwargs(args, input_type, device))
    print(f"fitting {cal.name} on {len(fit_stems)} image(s), validating on {len(val_stems)} "
          f"(seed {args.seed}, objective {args.objective})")
    try:
        cal.fit(FolderBatches(folder, fit_stems, images=args.images), ignore_index=args.ignore_index,
                val=FolderBatches(folder, val_stems, images=args.images) if val_stems else None,
                progress=not args.no_progress)
    except ValueError as exc:  # labels outside the classes: name the file and --ignore-index
        found = find_label_error(folder, None, int(folder.read(folder.items[0])[0].shape[0]),
                                 args.ignore_index, CLI_FLAGS)
        if found is None:
            raise
        raise found from exc
    cal.fit_info["split"] = {"fit": fit_stems, "val": val_stems, "seed": args.seed}
    if args.images is not None:
        cal.fit_info["images"] = {"folder": str(args.images),
                                  "preprocessing": "RGB/255, ImageNet mean/std; .npy as is"}
    cal.save(args.out)
    _print_fit_info(cal.fit_info, args.out)
    eval_stems = val_stems or fit_stems
    evaluation = evaluate_folder(folder, calibrator=cal, stems=eval_stems, images=args.images,
                                 ignore_index=args.ignore_index, n_bins=15, names=CLI_FLAGS)
    assert evaluation.calibrated is not None
    before, after = evaluation.metrics.compute(), evaluation.calibrated.compute()
    where = "validation" if val_stems else "fit (no validation images)"
    print(f"\nmetrics on the {where} images ({len(eval_stems)}):")
    print(f"  {'metric':24s} {'before':>10s} {'after':>10s}")
    summary = {}
    for key, label in SUMMARY:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        summary[key] = {"before": float(b), "after": float(a)}
        print(f"  {label:24s} {float(b):10.4f} {float(a):10.4f}")
    if args.json:
        with atomic_write(args.json, "w") as fh:
            json.dump({"method": cal.name, "fit_info": cal.fit_info, "metrics": summary,
                       "evaluated_on": where}, fh, indent=2, default=str)
    return 0
