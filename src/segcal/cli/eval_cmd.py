"""``segcal eval``: stream a prediction folder against labels and report calibration metrics.

The evaluation is :func:`segcal.pipeline.evaluate.evaluate_folder`; this module checks the output
paths, calls it and prints the table (arguments: :mod:`segcal.cli.parsers.eval`). Under
``torchrun --nproc-per-node N`` every rank evaluates its block of the sorted stems, the states are
synchronised, and rank 0 alone prints and writes the files (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from segcal.cli.common import (
    CLI_FLAGS,
    check_out_path,
    checked_ignore_index,
    device_from_arg,
    input_type_from_args,
)
from segcal.conformal import (
    ConformalResult,
    LossTable,
    LossTableBuilder,
    default_grid,
    fit_threshold,
)
from segcal.conformal.bounds import check_level
from segcal.datasets.camvid import CAMVID_CLASSES
from segcal.errors import InputError, missing_dependency
from segcal.io.files import atomic_write
from segcal.io.predictions import PredictionFolder, read_folder_meta
from segcal.pipeline.distributed import rank_device, world
from segcal.pipeline.evaluate import FolderEvaluation, evaluate_folder
from segcal.report.folder_report import (
    FAILURE,
    SUMMARY,
    folder_report_html,
    folder_summary,
    headline,
)
from segcal.report.reliability import figure_bytes, reliability_diagram

#: the file types of the figure and report outputs
SUFFIXES = {"--plot": (".png", ".svg"), "--html": (".html", ".htm")}

def format_table(results: dict[str, Any], ignore_index: int | None = None) -> str:
    """The printed summary of ``CalibrationMetrics.compute()``; the IoU of the class ``ignore_index``
    (never labelled, not in the mIoU) and of a class without a labelled or predicted pixel reads ``n/a``."""
    lines = [f"{'metric':<30} {'value':>10}", "-" * 41]
    lines += [f"{label:<30} {v:>10.5f}" for label, v in headline(results, SUMMARY)]
    failure = headline(results, FAILURE)
    if failure:
        lines.append(f"{'failure detection':<30}")
        lines += [f"  {label:<28} {v:>10.5f}" for label, v in failure]
    lines.append(f"{'images / valid pixels':<30} {results['n_images']:>5d} / {results['n_pixels']}")
    iou = results.get("iou_per_class")
    if iou is not None:
        lines.append("")
        shown = ["n/a" if i == ignore_index or not np.isfinite(v) else f"{v:.4f}" for i, v in enumerate(iou)]
        lines.append("per-class IoU:  " + "  ".join(f"{i}:{v}" for i, v in enumerate(shown)))
        if ignore_index is not None and 0 <= ignore_index < len(iou):
            lines.append(f"(class {ignore_index} is the ignore index: not a label, not in the mIoU)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.bins < 1:
        raise InputError(f"--bins: expected a positive integer, got {args.bins}")
    if not args.bins <= args.fine_bins <= 1 << 24:
        raise InputError(f"--fine-bins: expected an integer from --bins ({args.bins}) to {1 << 24}, got "
                         f"{args.fine_bins}")
    inputs = {"--pred": args.pred, "--labels": args.labels}
    args.ignore_index = checked_ignore_index(args.ignore_index, args.labels)
    builder = conformal_builder(args)
    for flag in ("--json", "--save-state", "--plot", "--html", "--conformal-out"):
        out = getattr(args, flag[2:].replace("-", "_"))
        if out:
            check_out_path(out, inputs, kind="file", flag=flag)
            check_writable(out, flag)
    for flag, suffixes in SUFFIXES.items():
        out = getattr(args, flag[2:])
        if out and Path(out).suffix.lower() not in suffixes:
            raise InputError(f"{flag} {out}: has the extension {Path(out).suffix or '(none)'!r}; expected "
                             f"{' or '.join(suffixes)}")
    if args.plot or args.html:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise missing_dependency("matplotlib", "plot", "--plot / --html") from exc
    check_class_names(args)
    device = device_from_arg(args.device)
    with world(device) as w:
        evaluation = evaluate_folder(
            args.pred,
            args.labels,
            ignore_index=args.ignore_index,
            n_bins=args.bins,
            fine_bins=args.fine_bins,
            input_type=input_type_from_args(args),
            device=rank_device(device, w),
            progress=not args.no_progress and w.is_main,
            names={**CLI_FLAGS, "conformal_class": "--conformal-class"},
            distributed=w.distributed,
            conformal=builder,
        )
        if w.is_main:
            report(args, evaluation)
    return 0


#: the conformal flags that need --conformal-out
CONFORMAL_FLAGS = ("--conformal-risk", "--conformal-alpha", "--conformal-delta", "--conformal-class",
                   "--conformal-tau", "--conformal-grid-size")


def conformal_builder(args: argparse.Namespace) -> LossTableBuilder | None:
    """The loss-table builder of ``--conformal-*`` (None without ``--conformal-out``); every flag is
    checked here, before the evaluation runs."""
    given = [f for f in CONFORMAL_FLAGS if getattr(args, f[2:].replace("-", "_"), None) is not None]
    if args.conformal_out is None:
        if given:
            raise InputError(f"{given[0]}: given without --conformal-out; pass --conformal-out FILE.json (where "
                             "the fitted threshold is written) or leave the conformal flags out")
        return None
    if args.conformal_alpha is None:
        raise InputError("--conformal-alpha: --conformal-out needs the target risk; pass --conformal-alpha A "
                         "with A in (0, 1), e.g. 0.1")
    check_level(args.conformal_alpha, "--conformal-alpha")
    if args.conformal_delta is not None:
        check_level(args.conformal_delta, "--conformal-delta")
    risk = args.conformal_risk or "miscoverage"
    if risk == "fnr" and args.conformal_class is None:
        raise InputError("--conformal-class: --conformal-risk fnr needs the class whose mask is controlled "
                         "(--conformal-class K)")
    if risk == "fnr" and args.conformal_class < 0:
        raise InputError(f"--conformal-class: expected a class index >= 0, found {args.conformal_class}")
    if risk == "fnr" and args.ignore_index is not None and args.conformal_class == args.ignore_index:
        raise InputError(f"--conformal-class {args.conformal_class}: is the --ignore-index: its pixels are left out "
                         "of every loss, so its false-negative rate is 0 for any mask; pass a labelled class")
    if risk == "coverage":
        tau = args.conformal_tau
        if tau is None or not 0.0 < tau <= 1.0:
            raise InputError(f"--conformal-tau: --conformal-risk coverage needs a coverage level in (0, 1], "
                             f"found {tau!r} (e.g. --conformal-tau 0.9)")
    size = 201 if args.conformal_grid_size is None else args.conformal_grid_size
    if size < 2:
        raise InputError(f"--conformal-grid-size: expected at least 2, found {size}")
    return LossTableBuilder(risk, grid=default_grid(size), class_index=args.conformal_class,
                            tau=args.conformal_tau, ignore_index=args.ignore_index)


def conformal_result(args: argparse.Namespace, table: LossTable, num_classes: int) -> ConformalResult:
    """The threshold of ``--conformal-*`` on the pass's loss table: what ``segcal conformal fit``
    fits and saves on the same folder (same table, same settings, same provenance, the class count
    that ``conformal eval`` / ``apply`` check)."""
    try:
        return fit_threshold(table, args.conformal_alpha, delta=args.conformal_delta,
                             meta={"pred": str(args.pred), "labels": str(args.labels), "calibrator_file": None,
                                   "num_classes": int(num_classes)})
    except InputError as exc:
        raise InputError(f"--conformal-alpha {args.conformal_alpha}: {exc}") from exc


def check_writable(out: str | os.PathLike, flag: str) -> None:
    """Refuse an output file whose folder cannot be created or written (before the evaluation runs)."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {out}: {parent} is a file, not a folder; pass a {flag} in a folder")
    try:  # a real probe: os.access says yes to root on folders that refuse new files (/sys, read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".segcal-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{flag} {out}: the folder {parent} is not writable ({exc.strerror or exc}); pass a "
                         f"{flag} in a writable folder") from exc


def class_names(args: argparse.Namespace) -> list[str] | None:
    """``--class-names``: the names by class index (``camvid``: CamVid's 11 classes and ``void``,
    the 12th output of the CamVid ESPNet)."""
    names = getattr(args, "class_names", None)
    if not names:
        return manifest_class_names(args.pred)
    if len(names) == 1 and names[0].lower() == "camvid":
        return [*CAMVID_CLASSES, "void"]
    return list(names)


def check_class_names(args: argparse.Namespace) -> None:
    """Refuse ``--class-names`` whose count is not the predictions' class count (read from the
    first prediction file's header, :attr:`PredictionFolder.num_classes`), before the evaluation:
    the report would put the names on the wrong classes (``camvid``'s 12 names on a 4-class folder)
    or leave some classes unnamed."""
    names = class_names(args) if getattr(args, "class_names", None) else None
    if names is None:
        return
    folder = PredictionFolder(args.pred)  # refuses a folder without predictions, naming it
    c = folder.num_classes
    if len(names) != c:
        raise InputError(f"--class-names: {len(names)} names given, but {folder.items[0].path.name} holds {c} "
                         f"classes; expected one name per class ({c}, by class index)")


def manifest_class_names(pred: str) -> list[str] | None:
    """The class names that ``segcal predict`` recorded in the folder's ``segcal.json`` (``None``
    when absent or not a list of strings): the report's default labels."""
    try:
        names = read_folder_meta(pred).get("class_names")
    except (InputError, OSError):
        return None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def _write(path: str, data: bytes | str, flag: str) -> None:
    try:
        with atomic_write(path, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot be written ({exc.strerror or exc}); nothing was written "
                         f"there, pass another {flag}") from exc


def report(args: argparse.Namespace, evaluation: FolderEvaluation) -> None:
    """Print the table and write ``--json`` / ``--save-state`` / ``--plot`` / ``--html`` (rank 0 alone
    under torchrun). Every output is rendered in memory first, then written atomically."""
    metrics = evaluation.metrics
    config = {
        "pred": str(args.pred),
        "labels": str(args.labels),
        "ignore_index": args.ignore_index,
        "n_bins": args.bins,
        "input_type": metrics.input_type,
    }
    results = metrics.compute()
    conformal = None
    if args.conformal_out and evaluation.conformal is not None:
        conformal = conformal_result(args, evaluation.conformal, metrics.num_classes)
    print(format_table(results, args.ignore_index))
    summary = folder_summary(evaluation, config, results)
    outputs: list[tuple[str, bytes | str, str]] = []
    if conformal is not None:
        print(f"conformal: lambda = {conformal.lam:.6g} (threshold {1 - conformal.lam:.6g}), method "
              f"{conformal.method}, {conformal.n_images} images; calibration risk {conformal.calibration_risk:.5f}, "
              f"mean {'mask volume' if conformal.risk == 'fnr' else 'set size'} {conformal.mean_size:.5f}")
        outputs.append((args.conformal_out, json.dumps(conformal.to_dict(), indent=2) + "\n", "--conformal-out"))
    if args.json:
        outputs.append((args.json, json.dumps(summary, indent=2), "--json"))
    names = class_names(args)
    if args.plot:
        fig = reliability_diagram(summary)
        outputs.append((args.plot, figure_bytes(fig, Path(args.plot).suffix.lower()[1:], dpi=120), "--plot"))
    if args.html:
        outputs.append((args.html, folder_report_html(
            summary, class_names=names, title=f"segcal eval: {Path(args.pred).name}",
            conformal=None if conformal is None else (conformal, evaluation.conformal)), "--html"))
    for path, data, flag in outputs:
        _write(path, data, flag)
    if args.save_state:
        metrics.save(args.save_state)
