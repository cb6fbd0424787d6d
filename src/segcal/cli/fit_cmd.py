"""``segcal fit``: fit a calibrator on a prediction folder and save it.

The images (files) are split at random (``--seed``) into a fit set and a validation set
(``--val-fraction``); the validation NLL drives early stopping / best-iterate selection, and the
before/after metrics printed at the end are measured on the validation images (on the fit images
when there is no validation set) with :class:`segcal.metrics.CalibrationMetrics`.

``--images DIR`` (input images whose stems match the predictions) fits a calibrator with an image
branch: LTS / IBTS / LTS(log S) get ``use_image=True``; selective scaling passes it to its base
(``--method selective --base lts --images DIR``). RGB files are normalised by
:func:`segcal.datasets.folders.normalize_image`; ``.npy`` images are used as they are.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

SUMMARY = [("nll", "NLL"), ("ece", "ECE (pooled, 15 bins)"), ("image_ece", "ECE (image-wise)"),
           ("brier", "Brier"), ("accuracy", "Pixel accuracy"), ("miou", "mIoU"), ("mdice", "mean Dice")]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fit", help="fit a calibrator on a prediction folder",
                       description="Fit a calibrator on held-out predictions and labels; save it "
                       "for `segcal apply` / segcal.load.")
    p.add_argument("--pred", required=True, help="prediction folder (.npy/.npz, (C, *spatial))")
    p.add_argument("--labels", required=True, help="label folder (same stems)")
    p.add_argument("--method", required=True, help="calibrator name or alias (see `segcal calibrators`)")
    p.add_argument("--out", required=True, help="where to save the fitted calibrator (.pt)")
    p.add_argument("--ignore-index", type=int, default=None, help="label value to ignore (e.g. 255)")
    p.add_argument("--input-type", choices=("logits", "probs"), default=None,
                   help="default: the folder's segcal.json, else logits")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of fitting")
    p.add_argument("--base", default=None,
                   help="base calibrator of a composed method (e.g. --method selective --base ts)")
    p.add_argument("--images", default=None,
                   help="folder of input images (stems matching --pred): fits the image branch of "
                        "LTS/IBTS (use_image=True; also as the base of selective scaling)")
    p.add_argument("--objective", choices=("nll", "brier", "dice", "dece"), default="nll")
    p.add_argument("--optimizer", choices=("auto", "lbfgs", "adam"), default="auto",
                   help="auto: the calibrator's default (L-BFGS in memory, else Adam; Adam for LTS/IBTS)")
    p.add_argument("--max-iter", type=int, default=None, help="L-BFGS iteration budget")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (evaluations)")
    p.add_argument("--memory-budget-mb", type=float, default=2048, help="above it, data are streamed")
    p.add_argument("--subsample", type=float, default=None, help="fraction of valid pixels kept (seeded)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, help="also write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def split_stems(stems: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of image ids into (fit, val); at least one image in each when possible."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction: expected a fraction in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = round(len(stems) * val_fraction)
    if val_fraction > 0 and len(stems) >= 2:
        n_val = min(max(n_val, 1), len(stems) - 1)
    val = sorted(stems[i] for i in order[:n_val])
    fit = sorted(stems[i] for i in order[n_val:])
    return fit, val


def _metrics(cal: Any, folder: Any, stems: list[str], num_classes: int, ignore_index: int | None,
             input_type: str, device: str, images: str | None = None) -> tuple[dict, dict]:
    from segcal.calibrators import FolderBatches
    from segcal.metrics import CalibrationMetrics

    before = CalibrationMetrics(num_classes, n_bins=15, ignore_index=ignore_index, input_type=input_type)
    after = CalibrationMetrics(num_classes, n_bins=15, ignore_index=ignore_index, input_type="logits")
    with torch.no_grad():
        for batch in FolderBatches(folder, stems, images=images):
            scores, labels = batch[0], batch[1]
            s = torch.from_numpy(np.asarray(scores, dtype=np.float32))
            y = torch.from_numpy(np.asarray(labels).astype(np.int64))
            img = torch.from_numpy(batch[4]).to(device) if images is not None else None
            before.update(s, y)
            after.update((cal(s.to(device), image=img) if img is not None else cal(s.to(device))).cpu(), y)
    return before.compute(), after.compute()


def run(args: Any) -> int:
    import inspect

    from segcal.calibrators import FolderBatches, create, resolve
    from segcal.io import PredictionFolder

    folder = PredictionFolder(args.pred, args.labels, input_type=args.input_type)
    input_type = args.input_type or folder.read(folder.items[0])[2]
    fit_stems, val_stems = split_stems(folder.stems, args.val_fraction, args.seed)
    kw: dict[str, Any] = dict(input_type=input_type, objective=args.objective, seed=args.seed, memory_budget=args.memory_budget_mb * 2**20,
                              subsample=args.subsample, patience=args.patience, device=args.device)
    if args.optimizer != "auto":  # "auto": the calibrator's default (Adam for LTS/IBTS, §3.11)
        kw["optimizer"] = args.optimizer
    if args.max_iter is not None:
        kw["max_iter"] = args.max_iter
    if args.base is not None:
        if "base" not in inspect.signature(resolve(args.method).__init__).parameters:
            raise ValueError(f"--base: method {args.method!r} does not take a base calibrator")
        kw["base"] = args.base
    if args.images is not None:
        if "use_image" in inspect.signature(resolve(args.method).__init__).parameters:
            kw["use_image"] = True
        elif args.base is not None and "use_image" in inspect.signature(resolve(args.base).__init__).parameters:
            kw["base_config"] = {"use_image": True}
        else:
            raise ValueError(f"--images: method {args.method!r}"
                             + (f" with base {args.base!r}" if args.base else "")
                             + " has no image branch (LTS / IBTS / LTS(log S) have one)")
    cal = create(args.method, **kw)
    print(f"fitting {cal.name} on {len(fit_stems)} image(s), validating on {len(val_stems)} "
          f"(seed {args.seed}, objective {args.objective})")
    cal.fit(FolderBatches(folder, fit_stems, images=args.images), ignore_index=args.ignore_index,
            val=FolderBatches(folder, val_stems, images=args.images) if val_stems else None,
            progress=not args.no_progress)
    cal.fit_info["split"] = {"fit": fit_stems, "val": val_stems, "seed": args.seed}
    if args.images is not None:
        cal.fit_info["images"] = {"folder": str(args.images),
                                  "preprocessing": "RGB/255, ImageNet mean/std; .npy as is"}
    cal.save(args.out)
    info = cal.fit_info
    print(f"fitted with {info['optimizer']} ({info['mode']}) on {info['n_pixels']} pixels; "
          f"saved {args.out}")
    if "base" in info:
        print(f"base calibrator: {info['base']['name']}"
              + (f" (T = {info['base']['temperature']:.4f})" if "temperature" in info["base"] else ""))
    if "selector_accuracy" in info:
        acc = info["selector_accuracy"]
        print(f"selector accuracy on the {info.get('selection_split')} split: overall {acc['overall']:.4f}, "
              f"correct pixels {acc['correct']:.4f}, mispredicted pixels {acc['mispredicted']:.4f}; "
              f"t_mispred = {info['t_mispred']:g} (by {info.get('t_mispred_selected_by')})")
    eval_stems = val_stems or fit_stems
    before, after = _metrics(cal, folder, eval_stems, int(cal.num_classes), args.ignore_index,
                             input_type, args.device, args.images)
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
        from segcal.io import atomic_write

        with atomic_write(args.json, "w") as fh:
            json.dump({"method": cal.name, "fit_info": cal.fit_info, "metrics": summary,
                       "evaluated_on": where}, fh, indent=2, default=str)
    return 0
