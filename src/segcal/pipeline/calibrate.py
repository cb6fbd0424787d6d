"""Calibrate a prediction folder and write it, keeping the calibrator's guarantees on disk.

:func:`calibrate_folder` is ``segcal apply``: every file of a prediction folder goes through a
fitted calibrator and is written in the same format (``.npy`` / ``.npz`` with the same key
convention, nnU-Net ``.npz`` + ``.pkl``). What is written is checked before it is written
(:func:`storable`):

* no value outside the stored dtype's range: log-probabilities below the dtype's finite minimum
  (float16: -65504) are clamped to it instead of becoming ``-inf``; NaN is refused;
* a declared property survives the storage precision: for an argmax-preserving calibrator the
  stored array has the argmax of the calibrated float32 output, for an order-preserving one the
  order of its classes at every pixel (``../shared/methods.md`` §1, the AP / OP properties
  the calibrators declare). Where float16 would round the top-two gap of a pixel to a tie, that file is
  stored as float32 instead and the report says so.

The storage dtype follows each input file's float dtype unless one is asked for. The output's
manifest is written first, marked incomplete (:func:`segcal.io.predictions.begin_folder`), and
marked complete only after the last file: an interrupted run is refused by every reader instead of
being read, say, as logits when it holds probabilities.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from segcal.calibrators import Calibrator
from segcal.errors import InputError
from segcal.io import PredictionFolder
from segcal.io.images import image_files, load_image_tensor
from segcal.io.nnunet import write_like_source
from segcal.io.predictions import begin_folder, check_stems_match, finish_folder
from segcal.pipeline.distributed import current, on_each, on_main, shard
from segcal.pipeline.evaluate import check_num_classes, folder_input_type
from segcal.validation import as_tensor

#: the dtypes a calibrated folder can be stored in
STORAGE_DTYPES = ("float16", "float32", "float64")


def _ties_created(reference: np.ndarray, stored: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per pixel: True where two classes distinct in ``reference`` are equal in ``stored``
    (the class order of ``reference`` is not the order of ``stored``)."""
    idx = np.argsort(-reference, axis=axis, kind="stable")
    ref = np.take_along_axis(reference, idx, axis=axis)
    st = np.take_along_axis(stored.astype(np.float64), idx, axis=axis)
    # rounding is monotone: distinct sorted reference values can only become equal, never swap
    return ((np.diff(ref, axis=axis) < 0) & (np.diff(st, axis=axis) >= 0)).any(axis=axis)


def storable(
    values: np.ndarray,
    dtype: Any,
    *,
    argmax_preserving: bool = False,
    order_preserving: bool = False,
    axis: int = 0,
) -> tuple[np.ndarray, str | None]:
    """``values`` (calibrated float32 output) in ``dtype``, or in float32 where ``dtype`` breaks a property.

    Parameters
    ----------
    values
        The calibrated output (log-probabilities or probabilities), float32, class axis ``axis``.
    dtype
        The storage dtype asked for.
    argmax_preserving, order_preserving
        The calibrator's declared properties that the stored array must keep.

    Returns
    -------
    (array, reason)
        ``reason`` is None when the array is in ``dtype``, else why it was kept in float32.

    Raises
    ------
    InputError
        When ``values`` holds NaN (a calibrator producing NaN is refused, never written).
    """
    values = np.asarray(values, dtype=np.float32)
    if np.isnan(values).any():
        raise InputError(f"the calibrated output holds {int(np.isnan(values).sum())} NaN value(s); refusing to write it")
    dt = np.dtype(dtype)
    reference = np.clip(values, np.finfo(np.float32).min, np.finfo(np.float32).max)
    if dt.itemsize >= 4:
        return reference.astype(dt), None
    fin = np.finfo(dt)
    stored = np.clip(reference, fin.min, fin.max).astype(dt)
    if argmax_preserving or order_preserving:
        if order_preserving:
            broken = _ties_created(reference, stored, axis)
            what = "order-preserving"
        else:
            broken = stored.argmax(axis) != reference.argmax(axis)
            what = "argmax-preserving"
        if bool(broken.any()):
            return reference, (f"{dt.name} would break the {what} guarantee (class scores closer "
                               "than its rounding)")
    return stored, None


@dataclass
class CalibratedFolder:
    """What :func:`calibrate_folder` wrote.

    Attributes
    ----------
    out
        The output folder.
    output
        ``"logits"`` (log-probabilities) or ``"probs"``.
    files
        Names of the written files, in order.
    float32_files
        Files stored as float32 because the requested dtype would have broken a declared property.
    reason
        Why (for the first of them), or None.
    """

    out: Path
    output: str
    files: list[str] = field(default_factory=list)
    float32_files: list[str] = field(default_factory=list)
    reason: str | None = None


def calibrate_folder(
    calibrator: Calibrator,
    pred: str | os.PathLike,
    out: str | os.PathLike,
    *,
    output: str | None = None,
    dtype: str | None = None,
    images: str | os.PathLike | None = None,
    input_type: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    names: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    distributed: bool = False,
    exclusive: bool = False,
) -> CalibratedFolder:
    """Calibrate every prediction of ``pred`` and write it to ``out`` in the same format.

    Parameters
    ----------
    calibrator
        A fitted calibrator (moved to ``device``).
    pred, out
        Input and output prediction folders (``out`` must differ; inputs are never overwritten).
    output
        ``"logits"`` (log-probabilities), ``"probs"``, or None: what the input holds.
    dtype
        Storage dtype (``"float16"``, ``"float32"``, ``"float64"``); None: each input file's own.
    images
        Folder of input images for a calibrator with an image branch.
    input_type
        How to read ``pred`` (default: its ``segcal.json``, the ``.npz`` key, else logits).
    progress
        Progress bar on stderr.
    names
        How the caller spells arguments in messages (see :mod:`segcal.pipeline.evaluate`).
    meta
        Extra entries for the output folder's ``segcal.json``.
    distributed
        Share the files among the ranks of the initialised process group (``torchrun``): rank 0
        opens the manifest (marked incomplete) while the others wait, each rank writes its
        contiguous block of the sorted files (:func:`segcal.pipeline.distributed.shard`), and
        rank 0 marks the folder complete after every rank has finished; a failure on any rank
        stops every rank (:func:`segcal.pipeline.distributed.agree`) and leaves the folder
        incomplete. Every rank returns the whole folder's result (files in the sorted order).
    exclusive
        Refuse an ``out`` that already holds prediction files this call does not write (left by
        an earlier run, they would be read as one folder with this run's): ``segcal apply``.
        The default adds to the folder.
    """
    if output not in (None, "logits", "probs"):
        raise InputError(f"output: expected 'logits' or 'probs', got {output!r}")
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise InputError(f"dtype: expected one of {STORAGE_DTYPES}, got {dtype!r}")
    folder = PredictionFolder(pred, input_type=input_type)
    dev = torch.device(device) if device is not None else calibrator.device
    calibrator = calibrator.to(dev).eval()
    image_paths = None
    if calibrator.uses_image and images is None:
        raise InputError(f"images: the calibrator ({calibrator.name}) has an image branch; "
                         "pass the folder of input images (stems matching the predictions)")
    if images is not None:
        if not calibrator.uses_image:
            raise InputError(f"images: the calibrator ({calibrator.name}) has no image branch")
        found = image_files(images)
        check_stems_match(set(folder.stems), set(found) & set(folder.stems),
                          f"images: file stems do not match ({pred} vs {images})",
                          "prediction(s) without an image", "")
        image_paths = found
    # probabilities read as logits (or the reverse) are refused here, before anything is written
    output = output or folder_input_type(folder, names)
    # the manifest first, marked incomplete: an interrupted run never reads as a finished folder
    w = current()
    if distributed and not w.distributed:
        distributed = False  # one process (no group, or a group of one): the plain run
    begin = dict(input_type=output,
                 num_classes=None if calibrator.num_classes is None else int(calibrator.num_classes),
                 calibrator=calibrator.name, source=str(pred), dtype=dtype or "as input", **dict(meta or {}))
    writes = [it.path.name for it in folder.items] if exclusive else None
    out = on_main(lambda: begin_folder(out, writes=writes, **begin)) if distributed else begin_folder(
        out, writes=writes, **begin)
    items = shard(folder.items, w.rank, w.size) if distributed else folder.items

    def work() -> CalibratedFolder:
        return _calibrate_items(calibrator, folder, items, out, output, dtype, image_paths, dev,
                                progress and w.is_main)

    if not distributed:
        result = work()
        finish_folder(out, float32_files=list(result.float32_files))
        return result
    result = CalibratedFolder(out, output)
    for part in on_each(work):  # in rank order: the sorted order of the files
        result.files += part.files
        result.float32_files += part.float32_files
        result.reason = result.reason or part.reason
    on_main(lambda: finish_folder(out, float32_files=list(result.float32_files)))
    return result


def _calibrate_items(calibrator: Calibrator, folder: PredictionFolder, items: list[Any], out: Path,
                     output: str, dtype: str | None, image_paths: dict[str, Any] | None,
                     dev: torch.device, progress: bool) -> CalibratedFolder:
    """Calibrate and write ``items`` of ``folder`` into ``out`` (the loop of :func:`calibrate_folder`)."""
    props = calibrator.properties()
    result = CalibratedFolder(out, output)
    for it in tqdm(items, desc="calibrating", unit="file", disable=not progress, file=sys.stderr):
        scores, _, itype = folder.read(it)
        if itype != calibrator.input_type:
            raise InputError(f"pred: {it.path.name} holds {itype} but the calibrator expects "
                             f"{calibrator.input_type}")
        if calibrator.num_classes is not None:
            check_num_classes(scores, int(calibrator.num_classes), it.path, "the calibrator")
        with torch.no_grad():
            x = as_tensor(scores, "pred")[None].to(dev)
            if image_paths is not None:
                img = torch.from_numpy(load_image_tensor(image_paths[it.stem]))[None].to(dev)
                z = calibrator(x, image=img)
            else:
                z = calibrator(x)
            res = torch.softmax(z.float(), 1) if output == "probs" else torch.log_softmax(z.float(), 1)
        try:
            arr, reason = storable(res[0].cpu().numpy(), dtype or scores.dtype,
                                   argmax_preserving=props["argmax_preserving"],
                                   order_preserving=props["order_preserving"])
        except InputError as exc:
            raise InputError(f"{it.path.name}: {exc} (calibrator {calibrator.name})") from exc
        if reason is not None:
            result.float32_files.append(it.path.name)
            result.reason = result.reason or reason
        key = None
        if it.path.suffix == ".npz":
            key = "probabilities" if output == "probs" else "logits"
        write_like_source(out / it.path.name, arr, it.path, key=key, dtype=None)
        result.files.append(it.path.name)
    return result


__all__ = ["STORAGE_DTYPES", "CalibratedFolder", "calibrate_folder", "storable"]
