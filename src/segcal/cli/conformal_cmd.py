"""``segcal conformal fit|eval|apply``: conformal risk control on prediction folders.

Each action calls :mod:`segcal.conformal` (arguments: :mod:`segcal.cli.parsers.conformal`):
``fit`` builds the per-image loss table of the calibration folder and saves the threshold with its
guarantee (:func:`~segcal.conformal.fit_threshold`), ``eval`` measures the realised per-image risk
of a saved threshold on a test folder, ``apply`` writes each file's pixel sets and set-size map
(or, for ``fnr``, the guaranteed-recall mask; :func:`~segcal.conformal.apply_sets`) as .npz, PNG, NIfTI
or nnU-Net files with the guarantee in each (:mod:`segcal.conformal.writers`), all or nothing. The unit is the file (image or volume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from segcal.calibrators import Calibrator, load
from segcal.cli.common import check_out_path, checked_ignore_index, files_bar, input_type_from_args
from segcal.conformal import (
    ConformalResult,
    LossTable,
    apply_sets,
    as_probabilities,
    default_grid,
    fit_threshold,
    folder_loss_table,
)
from segcal.conformal.bounds import check_level
from segcal.conformal.writers import (
    MANIFEST,
    SetWriter,
    begin_staging,
    commit_staging,
    discard_staging,
    reference_files,
    write_manifest,
)
from segcal.errors import InputError
from segcal.io import PredictionFolder, atomic_write, to_jsonable
from segcal.pipeline.distributed import World, on_each, on_main, shard, world


def _calibrator(args: argparse.Namespace) -> Calibrator | None:
    return load(args.calibrator) if args.calibrator else None


def fit(args: argparse.Namespace) -> int:
    out = check_out_path(args.out, {"--pred": args.pred, "--labels": args.labels, "--calibrator": args.calibrator},
                         kind="file")
    if args.grid_size < 2:
        raise InputError(f"--grid-size: expected at least 2, got {args.grid_size}")
    if args.risk == "fnr" and args.class_index is None:
        raise InputError("--class: --risk fnr needs the class whose mask is controlled (--class K)")
    if args.risk == "coverage" and args.tau is None:
        raise InputError("--tau: --risk coverage needs the coverage level (--tau 0.9)")
    # the levels are checked before any file is read (fit_threshold checks them again, after the table)
    check_level(args.alpha, "--alpha")
    if args.delta is not None:
        check_level(args.delta, "--delta")
    if args.risk == "fnr" and args.class_index < 0:
        raise InputError(f"--class: expected a class index >= 0, found {args.class_index}")
    if args.risk == "coverage" and not 0.0 < args.tau <= 1.0:
        raise InputError(f"--tau: --risk coverage needs a coverage level in (0, 1], found {args.tau!r}")
    args.ignore_index = checked_ignore_index(args.ignore_index, args.labels)
    if args.risk == "fnr" and args.ignore_index is not None and args.class_index == args.ignore_index:
        raise InputError(f"--class {args.class_index}: is the --ignore-index: its pixels are left out of every loss, "
                         "so its false-negative rate is 0 for any mask; pass a labelled class")
    with world() as w:
        table = shared_table(args, w, args.risk, default_grid(args.grid_size), args.class_index, args.tau,
                             args.ignore_index)

        def finish() -> None:
            result = fit_threshold(table, args.alpha, delta=args.delta,
                                   meta={"pred": str(args.pred), "labels": str(args.labels),
                                         "calibrator_file": args.calibrator, "num_classes": table.num_classes})
            result.save(out)
            print(f"lambda = {result.lam:.6g} (threshold 1 - lambda = {1 - result.lam:.6g}), method "
                  f"{result.method}, {result.n_images} calibration images")
            print(f"calibration risk {result.calibration_risk:.5f}, mean set size {result.mean_size:.5f}")
            print(result.guarantee)
            print(f"wrote {out}")

        on_main(finish)
    return 0


def check_result_classes(res: ConformalResult, num_classes: int, where: str, path: Any) -> None:
    """Refuse predictions of another class count than the ones the threshold was fitted on (the
    ``num_classes`` its ``meta`` records; files written before it was recorded are not checked):
    the guarantee written into every output file holds only for the model it was calibrated on."""
    want = res.meta.get("num_classes")
    if isinstance(want, int) and not isinstance(want, bool) and want != num_classes:
        raise InputError(f"--result {path}: the threshold was fitted on predictions of {want} classes, but "
                         f"{where} has {num_classes}; expected predictions of the model it was fitted on "
                         "(its guarantee holds only for those)")


def shared_table(args: argparse.Namespace, w: World, risk: str, grid: Any, class_index: int | None,
                 tau: float | None, ignore_index: int | None) -> LossTable:
    """The loss table of ``--pred`` / ``--labels``; under ``torchrun`` every rank counts its block of
    the sorted stems and every rank gets all rows, in stem order (equal to one process's table)."""
    folder = PredictionFolder(args.pred, args.labels, input_type=input_type_from_args(args))
    mine = shard(folder.stems, w.rank, w.size)

    def part() -> tuple[list[str], Any, Any, Any, int | None] | None:
        if not mine:  # a rank without images takes part all the same
            return None
        t = folder_loss_table(folder, risk=risk, grid=grid, class_index=class_index, tau=tau,
                              ignore_index=ignore_index, calibrator=_calibrator(args),
                              progress=not args.no_progress and w.is_main, stems=mine)
        return t.stems, t.losses, t.sizes, t.n_valid, t.num_classes

    parts = [p for p in on_each(part) if p is not None]
    counts = [(p[4], p[0][0]) for p in parts]
    for c, stem in counts[1:]:  # each rank's table checked its own files against its first one
        if c != counts[0][0]:
            raise InputError(f"--pred: {stem} has {c} classes, but {counts[0][1]} has {counts[0][0]}; expected "
                             "every file of the folder to have the same class count")
    return LossTable(risk, np.asarray(grid, dtype=np.float64), np.concatenate([p[1] for p in parts]),
                     np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]),
                     [s for p in parts for s in p[0]], class_index, None if tau is None else float(tau), ignore_index,
                     num_classes=counts[0][0])


def evaluate(args: argparse.Namespace) -> int:
    res = ConformalResult.load(args.result)
    if args.json:
        check_out_path(args.json, {"--pred": args.pred, "--labels": args.labels, "--result": args.result},
                       kind="file", flag="--json")
    if args.ignore_index is not None and args.ignore_index != res.ignore_index and os.environ.get("RANK", "0") == "0":
        print(f"segcal: warning: --ignore-index {args.ignore_index}: the threshold was fitted with ignore index "
              f"{res.ignore_index} ({args.result}); its guarantee is about the loss of those valid pixels, so the "
              "realised risk measured here is of another loss (leave --ignore-index out to use the fit's)",
              file=sys.stderr)
    ignore = checked_ignore_index(args.ignore_index if args.ignore_index is not None else res.ignore_index,
                                  args.labels)
    first = PredictionFolder(args.pred, input_type=input_type_from_args(args))
    check_result_classes(res, first.num_classes, first.items[0].path.name, args.result)
    with world() as w:
        table = shared_table(args, w, res.risk, [res.lam], res.class_index, res.tau, ignore)
        on_main(lambda: report_eval(args, res, table))
    return 0


def report_eval(args: argparse.Namespace, res: ConformalResult, table: LossTable) -> None:
    """Print (and with ``--json`` write) the realised risk of ``res`` on ``table`` (rank 0 alone)."""
    numbers: dict[str, Any] = {
        "risk": res.risk, "lambda": res.lam, "alpha": res.alpha, "delta": res.delta, "method": res.method,
        "n_images": table.n_images, "realised_risk": float(table.losses[:, 0].mean()),
        "realised_risk_std": float(table.losses[:, 0].std(ddof=1)) if table.n_images > 1 else None,
        "mean_size": float(table.sizes[:, 0].mean()), "guarantee": res.guarantee,
    }
    print(f"{res.risk} at lambda = {res.lam:.6g} on {table.n_images} test images: realised risk "
          f"{numbers['realised_risk']:.5f} (alpha {res.alpha}), mean set size {numbers['mean_size']:.5f}")
    if args.json:
        with atomic_write(args.json, "w") as fh:
            json.dump(to_jsonable(numbers), fh, indent=2)
            fh.write("\n")


def apply(args: argparse.Namespace) -> int:
    res = ConformalResult.load(args.result)
    out = check_out_path(args.out, {"--pred": args.pred, "--result": args.result, "--calibrator": args.calibrator,
                                    "--reference": args.reference})
    if args.reference is not None and args.format != "nifti":
        raise InputError(f"--reference: only --format nifti reads reference headers (got --format {args.format})")
    cal = _calibrator(args)
    folder = PredictionFolder(args.pred, None, input_type=input_type_from_args(args))
    reference = reference_files(args.reference)
    with world() as w:
        # rank 0 opens the staged folder, every rank writes its contiguous block of the sorted files
        # into it, rank 0 writes the manifest of all of them and swaps the folder in: all or nothing
        root = on_main(lambda: begin_staging(out))
        try:
            def part() -> tuple[dict[str, list[str]], int | None]:
                writer = SetWriter(res, args.format, root, reference, folder.meta)
                items = shard(folder.items, w.rank, w.size)
                for item in files_bar(items, "conformal apply", args, show=w.is_main):
                    scores, _, kind = folder.read(item)
                    check_result_classes(res, int(scores.shape[0]), item.path.name, args.result)
                    sets = apply_sets(res, as_probabilities(scores, kind, cal, f"pred: {item.stem}"))
                    writer.write(item.stem, sets, item.path)
                return writer.files, writer.num_masks

            writer = SetWriter(res, args.format, root, reference, folder.meta)
            for files, num_masks in on_each(part):  # rank order: the sorted order of the files
                writer.files.update(files)
                writer.num_masks = writer.num_masks if num_masks is None else num_masks

            def finish() -> None:
                write_manifest(root, writer)
                commit_staging(root, out)

            on_main(finish)
        except BaseException:
            on_main(lambda: discard_staging(root))
            raise
        if not w.is_main:
            return 0
    print(f"wrote the {'recall masks' if res.risk == 'fnr' else 'pixel sets and set sizes'} of "
          f"{len(writer.files)} files to {out} as {args.format} (lambda = {res.lam:.6g}; the guarantee is in "
          f"every file and in {MANIFEST})")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"fit": fit, "eval": evaluate, "apply": apply}[args.action](args)
