"""``segcal fit``: fit a calibrator on a prediction folder and save it.

The images (files) are split at random (``--seed``) into a fit set and a validation set
(``--val-fraction``); the validation NLL drives early stopping / best-iterate selection, and the
before/after metrics printed at the end are measured on the validation images (on the fit images
when there is no validation set) by :func:`segcal.pipeline.evaluate.evaluate_folder`.

``--images DIR`` (input images whose stems match the predictions) fits a calibrator with an image
branch: LTS / IBTS / LTS(log S) get ``use_image=True``; selective scaling passes it to its base
(``--method selective --base lts --images DIR``). RGB files are normalised like the models'
inputs (ImageNet mean/std); ``.npy`` images are used as they are. ``--extra-pred DIR``
(repeatable) adds prediction folders fitted together with ``--pred`` (e.g. of perturbed copies of
the images); their images follow ``--pred``'s split. The fit's data are ``--pred``'s images, then
each extra folder's, each in stem order: one list of (folder, stem) pairs, of which every rank
under ``torchrun`` reads its contiguous block (so N processes fit what one fits).

``--model NAME --images DIR|ALIAS [--labels DIR]`` fits on the model's outputs instead
(:func:`segcal.pipeline.fit_model.fit_from_model`; no logits are written), optionally with
``--perturb SPEC`` (perturbation-augmented fitting, :func:`segcal.pipeline.fit_model.parse_perturb`);
the before/after metrics are then measured on the clean validation images by
:func:`segcal.pipeline.fit_model.evaluate_model`. Under ``torchrun`` every rank runs the model
on its contiguous block of the single-process batches (``--batch-size`` images of one size;
blocks balanced by image count, :func:`segcal.pipeline.distributed.shard_weighted`) and the fit
and the metrics are those of one process; rank 0 saves and prints. The target-adaptive
correction (``--target-*``) is not sharded: every rank computes the same one.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np

from segcal.adaptation import load_adapted
from segcal.calibrators import Calibrator, FolderBatches, create, resolve
from segcal.calibrators.collective import RankError, sharded
from segcal.cli.common import (
    CLI_FLAGS,
    check_out_path,
    checked_ignore_index,
    device_from_arg,
    input_type_from_args,
)
from segcal.datasets import check_label_values, load_label
from segcal.errors import InputError
from segcal.estimation import load_estimator
from segcal.estimation.target_adaptive import adapt_to_target
from segcal.io import PredictionFolder
from segcal.io.files import atomic_write, to_jsonable
from segcal.metrics import CalibrationMetrics
from segcal.models import UNET3D_MODEL_NAME, create_model
from segcal.pipeline.distributed import (
    World,
    current,
    on_main,
    rank_device,
    shard,
    shard_weighted,
    world,
)
from segcal.pipeline.evaluate import (
    evaluate_folder,
    find_label_error,
    folder_input_type,
)
from segcal.pipeline.fit_model import (
    batch_preprocess,
    evaluate_model,
    fit_from_model,
    folder_groups,
    folder_items,
    folder_loader,
    parse_perturb,
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
    if args.chunk_size is not None:
        if args.chunk_size < 1:
            raise InputError(f"--chunk-size: expected a positive number of pixels, got {args.chunk_size}")
        kw["chunk_size"] = args.chunk_size
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


def _summary(args: argparse.Namespace, cal: Calibrator, before: CalibrationMetrics,
             after: CalibrationMetrics, where: str, n_images: int) -> None:
    """Print the before/after table (and write ``--json``)."""
    b_all, a_all = before.compute(), after.compute()
    print(f"\nmetrics on the {where} images ({n_images}):")
    print(f"  {'metric':24s} {'before':>10s} {'after':>10s}")
    summary = {}
    for key, label in SUMMARY:
        b, a = b_all.get(key), a_all.get(key)
        if b is None or a is None:
            continue
        summary[key] = {"before": float(b), "after": float(a)}
        print(f"  {label:24s} {float(b):10.4f} {float(a):10.4f}")
    if args.json:
        with atomic_write(args.json, "w") as fh:
            # to_jsonable: NaN / inf (a fit history's first training loss, a metric of a class
            # never present) become null, never the invalid JSON token NaN
            json.dump(to_jsonable({"method": cal.name, "fit_info": cal.fit_info, "metrics": summary,
                                   "evaluated_on": where}, unknown="str"), fh, indent=2, allow_nan=False)


def _check_mode(args: argparse.Namespace) -> None:
    """One of --pred / --model, and only the flags of that mode."""
    if args.pred is not None and args.model is not None:
        raise InputError("--pred and --model: pass one of them (a prediction folder, or a model to run "
                         "over --images)")
    if args.pred is None and args.model is None:
        raise InputError("missing required argument: --pred (a prediction folder) or --model (a "
                         "registered model, with --images)")
    if args.pred is not None:
        for flag, val in (("--perturb", args.perturb), ("--perturb-sample", args.perturb_sample),
                          ("--checkpoint", args.checkpoint), ("--data-root", args.data_root),
                          ("--batch-size", None if args.batch_size == 4 else args.batch_size),
                          ("--perturb-seed", None if args.perturb_seed == 0 else args.perturb_seed)):
            if val is not None:  # read only when the model runs (accepted and ignored with --pred before)
                raise InputError(f"{flag}: goes with --model (running the model on the images); with "
                                 "--pred, pass prediction folders of perturbed images as --extra-pred")
        if args.labels is None:
            raise InputError("missing required argument: --labels (the label folder of --pred)")
    elif args.extra_pred:
        raise InputError("--extra-pred: goes with --pred (prediction folders); with --model use --perturb")


def _check_target(args: argparse.Namespace) -> None:
    """The --target-* options (target-adaptive recalibration), refused early and in one line."""
    if args.target_images is not None and args.model is None:
        raise InputError("--target-images: goes with --model (PseudoCal runs the model on mixed target "
                         "images); with --pred, pass the target's predictions as --target-pred")
    if args.target_estimator is not None and args.target_method != "ece-estimate":
        raise InputError("--target-estimator: goes with --target-method ece-estimate")
    if args.target_pred is None and args.target_images is None:
        for flag, given in (("--target-method", args.target_method != "pseudocal"),
                            ("--target-max-images", args.target_max_images != 64)):
            if given:  # accepted and ignored before
                raise InputError(f"{flag}: goes with --target-pred DIR (or --target-images DIR with --model), "
                                 "the unlabelled target domain; pass one or leave it out")
        return
    if args.target_method == "ece-estimate":
        if args.target_estimator is None:
            raise InputError("--target-method ece-estimate: pass --target-estimator FILE (an ECE "
                             "estimator trained on logits: segcal estimate --train)")
        if args.target_pred is None:
            raise InputError("--target-method ece-estimate: needs the target's predictions, --target-pred DIR")
    elif args.model is not None and args.target_images is None:
        raise InputError("--target-pred with --model: PseudoCal needs --target-images (the model runs on "
                         "mixed target images); or use --target-method ece-estimate")
    if args.target_max_images < 2:
        raise InputError(f"--target-max-images: expected >= 2, got {args.target_max_images}")
    for flag, d in (("--target-pred", args.target_pred), ("--target-images", args.target_images)):
        if d is not None and not os.path.isdir(d):
            raise InputError(f"{flag}: folder {d} does not exist")


def _adapt_to_target(args: argparse.Namespace, cal: Calibrator, *, source: Any = None,
                     model: Any = None, source_images: Any = None) -> Calibrator:
    """--target-pred / --target-images: correct the fitted calibrator on the unlabelled target
    (:func:`segcal.estimation.target_adaptive.adapt_to_target`); unchanged without them."""
    if args.target_pred is None and args.target_images is None:
        return cal
    estimator = load_estimator(args.target_estimator) if args.target_estimator else None
    out = adapt_to_target(cal, args.target_pred, how=args.target_method, estimator=estimator,
                          source=source, model=model, images=args.target_images,
                          source_images=source_images, max_images=args.target_max_images, seed=args.seed)
    info = out.fit_info["target_adaptation"]
    mode = f", {info['mode']}" if "mode" in info else ""
    if current().is_main:
        print(f"target-adaptive correction ({info['how']}{mode}) on {info['n_images']} unlabelled target "
              f"image(s): calibrated logits = {cal.name}(z) / {info['correction']:.4f}")
    return out


def run(args: argparse.Namespace) -> int:
    _check_mode(args)
    _check_target(args)
    if args.model is not None:
        return _run_model(args)
    return _run_pred(args)


def _extra_folders(args: argparse.Namespace, input_type: str | None) -> list[PredictionFolder]:
    extras = []
    for d in args.extra_pred or []:
        try:
            extra = PredictionFolder(d, args.labels, input_type=input_type)
        except (InputError, ValueError) as exc:  # e.g. stems that do not match the labels
            raise InputError(f"--extra-pred {d}: {exc}") from None
        extras.append(extra)
    if extras and args.images is not None:
        raise InputError("--images with --extra-pred: the image branch would need the perturbed images "
                         "too; fit the image branch without --extra-pred")
    return extras


def _run_pred(args: argparse.Namespace) -> int:
    """Fit on a prediction folder; under ``torchrun`` every rank reads its contiguous block of the
    fit and validation images (the split does not depend on the number of processes), the fit is
    the one-process fit (:func:`segcal.calibrators.collective.sharded`), rank 0 saves and prints."""
    inputs = {"--pred": args.pred, "--labels": args.labels, "--images": args.images,
              **{f"--extra-pred {d}": d for d in args.extra_pred or []}}
    check_out_path(args.out, inputs, kind="file", flag="--out")
    if args.json:
        check_out_path(args.json, {**inputs, "--out": args.out}, kind="file", flag="--json")
    args.ignore_index = checked_ignore_index(args.ignore_index, args.labels)
    with world(device_from_arg(args.device)) as w:
        return _fit_pred(args, rank_device(device_from_arg(args.device), w), w)


def _fit_pred(args: argparse.Namespace, device: Any, w: World) -> int:
    folder = PredictionFolder(args.pred, args.labels, input_type=input_type_from_args(args))
    input_type = folder_input_type(folder, names=CLI_FLAGS)
    extras = _extra_folders(args, input_type_from_args(args))
    fit_stems, val_stems = split_stems(folder.stems, args.val_fraction, args.seed)

    def batches(stems: list[str]) -> FolderBatches | Any:
        if not extras:
            return FolderBatches(folder, shard(stems, w.rank, w.size), images=args.images)  # this rank's block
        # the fit's data: --pred's images, then each --extra-pred folder's (those it holds), each
        # in stem order -- one list of (folder, stem); every rank takes its contiguous block of
        # it, so the order does not depend on the number of processes
        folders = [folder, *extras]
        pairs = [(0, s) for s in stems] + [(k, s) for k, e in enumerate(extras, 1)
                                           for s in stems if s in set(e.stems)]
        mine = shard(pairs, w.rank, w.size)
        parts = [FolderBatches(folders[k], [s for _, s in run])
                 for k, run in itertools.groupby(mine, key=lambda p: p[0])]

        def chained() -> Iterator[Any]:
            return itertools.chain.from_iterable(parts)
        return chained

    cal = create(args.method, **_calibrator_kwargs(args, input_type, device))
    more = f" (+ {len(extras)} extra folder(s))" if extras else ""
    if w.is_main:
        print(f"fitting {cal.name} on {len(fit_stems)} image(s){more}, validating on {len(val_stems)} "
              f"(seed {args.seed}, objective {args.objective})")
    try:
        with sharded() if w.distributed else nullcontext():
            cal.fit(batches(fit_stems), ignore_index=args.ignore_index,
                    val=batches(val_stems) if val_stems else None, progress=not args.no_progress and w.is_main)
    except ValueError as exc:  # labels outside the classes: name the file and --ignore-index
        found = find_label_error(folder, None, int(folder.read(folder.items[0])[0].shape[0]),
                                 args.ignore_index, CLI_FLAGS)
        if found is None:
            raise
        raise found from exc
    cal.fit_info["split"] = {"fit": fit_stems, "val": val_stems, "seed": args.seed}
    if extras:
        cal.fit_info["extra_pred"] = [str(d) for d in args.extra_pred]
    if args.images is not None:
        cal.fit_info["images"] = {"folder": str(args.images),
                                  "preprocessing": "RGB/255, ImageNet mean/std; .npy as is"}
    cal = _adapt_to_target(args, cal, source=args.pred)
    eval_stems = val_stems or fit_stems
    evaluation = evaluate_folder(folder, calibrator=cal, stems=eval_stems, images=args.images,
                                 ignore_index=args.ignore_index, n_bins=15, names=CLI_FLAGS,
                                 device=device, distributed=w.distributed)
    assert evaluation.calibrated is not None
    # saved once the before/after evaluation has run: a file it refuses leaves no --out behind
    on_main(lambda: cal.save(args.out))  # rank 0 writes; every rank stops if that fails
    where = "validation" if val_stems else "fit (no validation images)"
    if w.is_main:
        _print_fit_info(cal.fit_info, args.out)
        _summary(args, cal, evaluation.metrics, evaluation.calibrated, where, len(eval_stems))
    return 0


def _run_model(args: argparse.Namespace) -> int:
    """Fit on a model's outputs; under ``torchrun`` every rank runs the model on its contiguous
    block of the fit and validation batches (:func:`segcal.pipeline.image_batches.folder_groups`: the
    single-process batches, so the data order and the model's inputs do not depend on the number
    of processes), the fit is the one-process fit (:func:`segcal.calibrators.collective.sharded`),
    rank 0 saves and prints."""
    if args.images is None:
        raise InputError("missing required argument: --images (the images to run --model on)")
    if args.model == UNET3D_MODEL_NAME:
        raise InputError(f"--model {UNET3D_MODEL_NAME}: fitting from 3D volumes runs through its "
                         "prediction folder: segcal predict, then segcal fit --pred")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: expected >= 1, got {args.batch_size}")
    spec = parse_perturb(args.perturb, sample=args.perturb_sample, seed=args.perturb_seed, name="--perturb")
    items = folder_items(args.images, args.labels, data_root=args.data_root)
    inputs = {"--images": items[0].image_path.parent, "--labels": items[0].label_path.parent,  # type: ignore[union-attr]
              "--checkpoint": args.checkpoint}
    check_out_path(args.out, inputs, kind="file", flag="--out")
    args.ignore_index = checked_ignore_index(args.ignore_index, items[0].label_path)
    if args.json:
        check_out_path(args.json, {**inputs, "--out": args.out}, kind="file", flag="--json")
    with world(device_from_arg(args.device)) as w:
        return _fit_model(args, items, inputs, spec, rank_device(device_from_arg(args.device), w), w)


def _fit_model(args: argparse.Namespace, items: list[Any], inputs: dict[str, Any], spec: Any,
               device: Any, w: World) -> int:
    try:
        loaded = create_model(args.model, data_root=args.data_root, device=device)
    except ValueError as exc:  # an unknown name: the registry lists the known ones
        raise InputError(f"--model: {exc}") from None
    if args.checkpoint:
        info = load_adapted(loaded, args.checkpoint)
        if w.is_main:
            print(f"loaded {info['method']} checkpoint (epoch {info['epoch']}) into {args.model}",
                  file=sys.stderr)
    input_type = input_type_from_args(args) or "logits"
    by_stem = {it.stem: it for it in items}
    fit_stems, val_stems = split_stems(sorted(by_stem), args.val_fraction, args.seed)
    kw = vars(args).copy()
    kw["images"] = None  # --images are the model's inputs here, not an image branch
    cal = create(args.method, **_calibrator_kwargs(argparse.Namespace(**kw), input_type, device))
    prep = batch_preprocess(loaded.preprocess)

    def loader(stems: list[str]) -> Any:
        # this rank's block of the single-process batches (whole batches: see folder_groups)
        groups = folder_groups([by_stem[s] for s in stems], args.batch_size)
        mine = [it for g in shard_weighted(groups, [len(g) for g in groups], w.rank, w.size) for it in g]
        return folder_loader(mine, loaded.preprocess, batch_size=args.batch_size)

    copies = f", each clean and under {spec.copies - 1} perturbation(s)" if spec else ""
    if w.is_main:
        print(f"fitting {cal.name} on {args.model}'s outputs for {len(fit_stems)} image(s){copies}, "
              f"validating on {len(val_stems)} (seed {args.seed}, objective {args.objective})")
    try:
        with sharded() if w.distributed else nullcontext():
            fit_from_model(loaded.module, loader(fit_stems), calibrator=cal,
                           val_loader=loader(val_stems) if val_stems else None, device=device,
                           ignore_index=args.ignore_index, preprocess=prep, perturb=spec,
                           progress=not args.no_progress and w.is_main)
    except RankError:  # another rank refused its input: it names the file
        raise
    except ValueError as exc:  # labels outside the classes: name the file and --ignore-index
        for it in items:
            try:
                check_label_values(load_label(it.label_path), loaded.num_classes, args.ignore_index,  # type: ignore[arg-type]
                                   str(it.label_path))
            except InputError as bad:
                raise InputError(f"{bad}; pass --ignore-index V if V marks pixels to ignore") from exc
        raise
    cal.fit_info["split"] = {"fit": fit_stems, "val": val_stems, "seed": args.seed}
    cal.fit_info["model"] = {"name": args.model, "checkpoint": args.checkpoint, "images": str(args.images),
                             "labels": str(inputs["--labels"])}
    cal = _adapt_to_target(args, cal, model=loaded.logits, source_images=inputs["--images"])
    eval_stems = val_stems or fit_stems
    before, after = evaluate_model(loaded.module, loader(eval_stems), cal, num_classes=loaded.num_classes,
                                   ignore_index=args.ignore_index, device=device, preprocess=prep,
                                   distributed=w.distributed)
    assert after is not None
    on_main(lambda: cal.save(args.out))  # after the evaluation, as in _fit_pred
    where = "validation" if val_stems else "fit (no validation images)"
    if w.is_main:
        _print_fit_info(cal.fit_info, args.out)
        _summary(args, cal, before, after, where, len(eval_stems))
    return 0
