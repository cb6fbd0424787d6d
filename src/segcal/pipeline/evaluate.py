"""The one evaluation of a prediction folder.

:func:`evaluate_folder` streams a folder of predictions against its labels (one file in memory at
a time) into :class:`~segcal.metrics.CalibrationMetrics` -- the predictions as they are and, with
a ``calibrator``, after calibration. ``segcal eval`` prints it, ``segcal fit`` prints the
before/after pair on its validation images; the metric definitions are those of
``../shared/methods.md`` §4 (implemented in :mod:`segcal.metrics`).

The folder-level checks every folder command shares live here too: probabilities read as logits
(or logits as probabilities) on the first file, a class count that does not match (with the
channel-last hint), labels outside ``[0, C)`` naming the label file. (An empty folder, a stem
mismatch, an incomplete folder and a label of another shape are refused by
:class:`~segcal.io.PredictionFolder` itself.) Each is an
:class:`~segcal.errors.InputError` naming the file and the argument to pass; ``names`` says how
the caller spells the arguments (:data:`API_NAMES` for Python; the command line passes its flags,
``segcal.cli.common.CLI_FLAGS``).
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from segcal.calibrators import Calibrator, FolderBatches
from segcal.conformal import LossTable, LossTableBuilder
from segcal.errors import InputError
from segcal.io import PredictionFolder, PredictionItem, read_label
from segcal.metrics import CalibrationMetrics
from segcal.pipeline.distributed import agree, current, shard
from segcal.validation import (
    API_FLAGS,
    EVERY_PIXEL_HINT,
    as_tensor,
    channel_last_hint,
    check_input_kind,
)

T = TypeVar("T")
R = TypeVar("R")

#: how the Python API names the arguments that a message asks for
API_NAMES: dict[str, str] = {"ignore_index": "ignore_index={value}", **API_FLAGS}


@dataclass
class FolderEvaluation:
    """What :func:`evaluate_folder` measured.

    Attributes
    ----------
    metrics
        The metric state of the predictions as they are.
    calibrated
        The metric state after the calibrator (``None`` without one).
    input_type
        ``"logits"`` or ``"probs"``: how the predictions were read.
    stems
        The image ids evaluated, in order.
    conformal
        The per-image conformal loss table built in the same pass (``evaluate_folder(conformal=...)``),
        rows in ``stems`` order; ``None`` without one.
    """

    metrics: CalibrationMetrics
    calibrated: CalibrationMetrics | None
    input_type: str
    stems: list[str]
    conformal: LossTable | None = None


def _name(names: Mapping[str, str] | None, key: str, value: Any = "") -> str:
    return (names or API_NAMES).get(key, API_NAMES[key]).format(value=value)


def _flags(names: Mapping[str, str] | None) -> dict[str, str]:
    """The ``flags`` of :func:`segcal.validation.check_input_kind` from ``names``."""
    return {key: _name(names, key) for key in ("probs", "logits")}


def check_num_classes(scores: Any, num_classes: int, path: str | os.PathLike, what: str) -> None:
    """Refuse a file whose class axis (axis 0) does not have ``num_classes`` entries.

    ``what`` says where ``num_classes`` came from (``"the calibrator"``, ``"the first file"``); a
    file whose last axis has ``num_classes`` entries gets the channel-last hint of
    :func:`segcal.validation.channel_last_hint`.
    """
    shape = tuple(scores.shape)
    if shape[0] == num_classes:
        return
    raise InputError(
        f"pred: {Path(path).name} has shape {shape}: {shape[0]} classes on axis 0, but {what} has "
        f"{num_classes}; expected {num_classes} classes{channel_last_hint(shape, 0, num_classes)}"
    )


def label_range_error(item: PredictionItem, labels: np.ndarray, num_classes: int, ignore_index: int | None,
                      names: Mapping[str, str] | None = None) -> InputError | None:
    """The error for labels outside ``[0, num_classes)`` (not ``ignore_index``) in one label map, or None.

    The message names the label file, the values and the argument that leaves a void value out
    (``--ignore-index 255`` on the command line).
    """
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu":
        return None
    bad = (lab < 0) | (lab >= num_classes)
    if ignore_index is not None:
        bad &= lab != ignore_index
    if not bad.any():
        return None
    vals = np.unique(lab[bad])[:10].tolist()
    label_name = item.label_path.name if item.label_path is not None else item.stem
    flag = _name(names, "ignore_index", vals[0] if len(vals) == 1 else "V")
    return InputError(
        f"labels: {label_name} holds label values {vals} outside [0, {num_classes}) (the predictions "
        f"have {num_classes} classes); pass {flag} to leave a void value out, or fix the labels"
    )


def find_label_error(folder: PredictionFolder, stems: Iterable[str] | None, num_classes: int,
                     ignore_index: int | None, names: Mapping[str, str] | None = None) -> InputError | None:
    """:func:`label_range_error` of the first label map of ``stems`` (default: all) that has one.

    Reads the label maps only (a diagnosis for a failed fit: the fitting loop reports the values,
    this finds the file and the argument to pass).
    """
    want = None if stems is None else set(stems)
    for item in folder.items:
        if item.label_path is None or (want is not None and item.stem not in want):
            continue
        err = label_range_error(item, read_label(item.label_path), num_classes, ignore_index, names)
        if err is not None:
            return err
    return None


def folder_input_type(folder: PredictionFolder, names: Mapping[str, str] | None = None) -> str:
    """How the folder's files are read (``"logits"`` / ``"probs"``), checked on its first file
    (:func:`segcal.validation.check_input_kind`: probabilities read as logits are refused, and the
    reverse)."""
    item = folder.items[0]
    scores, _, itype = folder.read(item)
    check_input_kind(scores, itype, f"pred: {item.path.name}", flags=_flags(names))
    return itype


def evaluate_folder(
    pred: str | os.PathLike | PredictionFolder,
    labels: str | os.PathLike | None = None,
    *,
    calibrator: Calibrator | None = None,
    stems: Iterable[str] | None = None,
    images: str | os.PathLike | None = None,
    num_classes: int | None = None,
    n_bins: int = 15,
    ignore_index: int | None = None,
    input_type: str | None = None,
    per_image: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
    names: Mapping[str, str] | None = None,
    distributed: bool = False,
    prefetch: int = 2,
    fine_bins: int = 1 << 16,
    conformal: LossTableBuilder | None = None,
) -> FolderEvaluation:
    """Stream a prediction folder against its labels into calibration metrics.

    Parameters
    ----------
    pred
        Prediction folder (``.npy`` / ``.npz``, ``(C, *spatial)``), or an open
        :class:`~segcal.io.PredictionFolder` with labels.
    labels
        Label folder with matching stems (omit when ``pred`` is an open folder).
    calibrator
        Optional fitted calibrator: its output is measured too (``FolderEvaluation.calibrated``).
    stems
        Image ids to evaluate (default: all), e.g. ``segcal fit``'s validation images.
    images
        Folder of input images for a calibrator with an image branch (stems matching ``pred``).
    num_classes
        Expected number of classes (default: the calibrator's, else the first file's).
    n_bins, ignore_index, per_image, fine_bins
        As in :class:`~segcal.metrics.CalibrationMetrics` (``fine_bins``: the resolution of the fine
        histogram behind the adaptive ECE, the failure-detection metrics and smECE; more bins, smaller
        ``*_tie_bound`` values, 24 bytes of state each).
    input_type
        ``"logits"``, ``"probs"`` or ``None`` (the folder's ``segcal.json``, then the ``.npz`` key,
        then logits). The first file is checked against it (:func:`segcal.validation.check_input_kind`).
    device
        Device of the metric state (default: the CPU).
    progress
        Show a progress bar on stderr.
    names
        How the caller spells the arguments a message asks for (keys of :data:`API_NAMES`; the
        default is :data:`API_NAMES`, the command line passes its flags).
    distributed
        Share the work among the ranks of the initialised ``torch.distributed`` process group
        (``torchrun``, or :func:`segcal.pipeline.distributed.world`): each rank reads only its
        contiguous block of the stems (:func:`segcal.pipeline.distributed.shard`), then the metric
        states are synchronised (:meth:`~segcal.metrics.CalibrationMetrics.sync`), so every rank
        returns the total -- equal to one process's, per-image values in the same order. Every
        rank must call it; a rank with no image takes part, and an error on one rank is raised on
        every rank (:func:`segcal.pipeline.distributed.agree`) instead of leaving the others
        waiting.
    prefetch
        How many files a reader thread reads ahead while the current one is accumulated
        (:func:`prefetched`; ``0``: read in this thread). The results do not depend on it.
    conformal
        Optional :class:`~segcal.conformal.LossTableBuilder` (its ``ignore_index`` must be this
        call's): the per-image conformal loss table of the predictions as they are is built in the
        same pass, from the metric engine's own softmax (``on_chunk``: no second read, no second
        softmax), equal bit for bit to :func:`~segcal.conformal.folder_loss_table` on the same
        folder (``FolderEvaluation.conformal``; under ``distributed`` every rank's rows are
        gathered in stem order, so every rank holds the whole table).

    Returns
    -------
    FolderEvaluation

    Raises
    ------
    InputError
        For every refused input; the message names the file and what to pass.
    """
    if isinstance(pred, PredictionFolder):
        folder = pred
    else:
        if labels is None:
            raise InputError("labels: evaluating a prediction folder needs a label folder")
        folder = PredictionFolder(pred, labels, input_type=input_type)
    batches = FolderBatches(folder, stems, images=images)
    source = "num_classes"
    if num_classes is None and calibrator is not None and calibrator.num_classes is not None:
        num_classes, source = int(calibrator.num_classes), "the calibrator"
    if conformal is not None and conformal.ignore_index != ignore_index:
        raise InputError(f"conformal: the loss table's ignore_index {conformal.ignore_index!r} is not the "
                         f"evaluation's {ignore_index!r}; build the LossTableBuilder with ignore_index={ignore_index!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    settings = {"n_bins": n_bins, "ignore_index": ignore_index, "per_image": per_image, "device": dev,
                "fine_bins": fine_bins}
    all_stems = [it.stem for it in batches.items]
    if not distributed:
        acc = _Accumulator(folder, batches, calibrator, images, num_classes, source, settings, names, conformal)
        acc.run(batches.items, progress, prefetch)
        if acc.before is None:
            raise InputError(f"pred: no image selected in {folder.pred_dir} (stems: [])")
        return FolderEvaluation(acc.before, acc.after, acc.itype, all_stems,
                                conformal.table() if conformal is not None else None)
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError("distributed=True: no torch.distributed process group is initialised (start the job "
                         "with torchrun, or open segcal.pipeline.distributed.world() around the call)")
    w = current()
    mine = shard(batches.items, w.rank, w.size)
    acc = _Accumulator(folder, batches, calibrator, images, num_classes, source, settings, names, conformal)
    failure: BaseException | None = None
    try:
        acc.run(mine, progress and w.is_main, prefetch)
    except Exception as exc:  # shared with every rank by agree() below, then raised
        failure = exc
    rows = conformal.rows() if conformal is not None and failure is None else None
    infos = agree(failure, (acc.num_classes, acc.itype, mine[0].path.name if mine else None, rows))
    seen = [(c, t, f) for c, t, f, _ in infos if f is not None]
    if not seen:
        raise InputError(f"pred: no image selected in {folder.pred_dir} (stems: [])")
    for c, t, f in seen[1:]:
        if c != seen[0][0]:
            raise InputError(f"pred: {f} has {c} classes on axis 0, but {seen[0][2]} has {seen[0][0]}; "
                             f"expected {seen[0][0]} classes")
        if t != seen[0][1]:
            raise InputError(f"pred: {f} is read as {t}, but {seen[0][2]} as {seen[0][1]}; every file of a "
                             f"folder holds the same kind of scores")
    if acc.before is None:  # a rank without images takes part in the synchronisation all the same
        acc.num_classes, acc.itype = seen[0][0], seen[0][1]
        acc.create()
    assert acc.before is not None
    acc.before.sync()
    if acc.after is not None:
        acc.after.sync()
    table = None
    if conformal is not None:  # every rank's rows, in rank order = stem order (contiguous shards)
        parts = [r for _, _, _, r in infos if r is not None and r[0]]
        if not parts:
            raise InputError(f"pred: no image selected in {folder.pred_dir} (stems: [])")
        table = conformal.table(([s for p in parts for s in p[0]], np.concatenate([p[1] for p in parts]),
                                 np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])))
    return FolderEvaluation(acc.before, acc.after, acc.itype, all_stems, table)


class _Accumulator:
    """The metric states of one process's share of a folder, and the loop that fills them."""

    def __init__(self, folder: PredictionFolder, batches: FolderBatches, calibrator: Calibrator | None,
                 images: str | os.PathLike | None, num_classes: int | None, source: str,
                 settings: dict[str, Any], names: Mapping[str, str] | None,
                 conformal: LossTableBuilder | None = None) -> None:
        self.folder, self.batches, self.calibrator, self.images = folder, batches, calibrator, images
        self.num_classes, self.source, self.settings, self.names = num_classes, source, settings, names
        self.conformal = conformal
        self.before: CalibrationMetrics | None = None
        self.after: CalibrationMetrics | None = None
        self.itype = "logits"

    def create(self) -> None:
        """The metric states (before, and after the calibrator) for ``num_classes`` / ``itype``."""
        assert self.num_classes is not None
        self.before = CalibrationMetrics(self.num_classes, input_type=self.itype, **self.settings)
        if self.calibrator is not None:
            self.after = CalibrationMetrics(self.num_classes, input_type="logits", **self.settings)

    def run(self, items: list[PredictionItem], progress: bool, depth: int) -> None:
        bar = tqdm(total=len(items), desc="eval", unit="img", disable=not progress, file=sys.stderr)
        with closing(prefetched(self.folder.read, items, depth)) as stream:
            for i, (item, (scores, lab, self.itype)) in enumerate(stream):
                bar.update(1)
                self.add(i, item, scores, lab)
        bar.close()

    def add(self, i: int, item: PredictionItem, scores: np.ndarray, lab: Any) -> None:
        """Check and accumulate the ``i``-th file of this process."""
        calibrator, names = self.calibrator, self.names
        if i == 0:
            check_input_kind(scores, self.itype, f"pred: {item.path.name}", flags=_flags(names))
        if self.num_classes is None:
            self.num_classes, self.source = int(scores.shape[0]), "the first file"
        check_num_classes(scores, self.num_classes, item.path, self.source)
        if self.before is None:
            self.create()
        assert self.before is not None
        x = as_tensor(scores, "pred").unsqueeze(0)
        y = as_tensor(lab, "labels").unsqueeze(0)
        tables = self.conformal
        if tables is not None:
            if i == 0:
                tables.check_num_classes(self.num_classes, (names or {}).get("conformal_class", "class_index"))
            tables.begin(1)
        try:
            self.before.update(x, y, on_chunk=None if tables is None else tables.chunk)
        except (ValueError, TypeError) as exc:
            found = label_range_error(item, lab, self.num_classes, self.settings["ignore_index"], names)
            raise (found or InputError(f"{item.path.name}: {exc}")) from exc
        if tables is not None:
            tables.end([item.stem])
        if calibrator is not None and self.after is not None:
            try:
                with torch.no_grad():
                    xc = x.to(calibrator.device)
                    if self.images is not None:
                        img = torch.from_numpy(self.batches.read_image(item.stem))[None].to(calibrator.device)
                        z = calibrator(xc, image=img)
                    else:
                        z = calibrator(xc)
            except InputError as exc:
                hint = ""
                if not bool(torch.isfinite(x).all()):  # NaN / inf the metrics left out (ignored pixels)
                    hint = f"; {EVERY_PIXEL_HINT}"
                raise InputError(f"pred: {item.path.name}: {exc} (calibrator {calibrator.name}){hint}") from exc
            self.after.update(z.to(self.settings["device"]), y)


def prefetched(read: Callable[[T], R], items: Iterable[T], depth: int = 2) -> Iterator[tuple[T, R]]:
    """``(item, read(item))`` in order, reading up to ``depth`` items ahead in one thread.

    The overlapped input pipeline of the folder evaluation: while the caller accumulates one file,
    the next ones are read and decoded (NumPy and Pillow release the GIL while they do), so at
    most ``depth + 1`` files are in memory. ``depth=0`` reads in the caller's thread. A reader's
    exception is raised when its item is reached, as without prefetching; stopping early cancels
    what was not started.
    """
    if depth <= 0:
        for item in items:
            yield item, read(item)
        return
    pending: deque[tuple[T, Future[R]]] = deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segcal-read") as pool:
        try:
            for item in source:
                pending.append((item, pool.submit(read, item)))
                if len(pending) > depth:
                    head, fut = pending.popleft()
                    yield head, fut.result()
            while pending:
                head, fut = pending.popleft()
                yield head, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


__all__ = [
    "API_NAMES",
    "FolderEvaluation",
    "check_num_classes",
    "evaluate_folder",
    "find_label_error",
    "folder_input_type",
    "label_range_error",
    "prefetched",
]
