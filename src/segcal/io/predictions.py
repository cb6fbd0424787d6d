"""The prediction-folder format shared by ``segcal eval``, ``fit``, ``apply`` and ``predict``.

A *prediction folder* holds one file per image or volume; the file stem is the image id.

* ``<stem>.npy`` -- a ``(C, *spatial)`` array of logits (float16 is the recommended storage
  dtype; any float dtype is read). Read memory-mapped, so a volume is never copied whole.
* ``<stem>.npz`` -- key ``logits`` or ``probabilities`` (the latter is what nnU-Net v2 writes with
  ``--save_probabilities``; a ``<stem>.pkl`` properties file next to it is read by
  :mod:`segcal.io.nnunet`).
* ``segcal.json`` (optional for folders written elsewhere) -- the manifest: ``{"format":
  "segcal-predictions", "version": 1, "input_type": "logits" | "probs", "num_classes": C,
  "complete": true | false, ...}``.

A *label folder* holds ``<stem>.png`` (8/16-bit grey or palette indices), ``<stem>.npy``,
``<stem>.nii.gz`` or ``<stem>.nii`` integer label maps with the predictions' spatial shape.

Folder integrity: a writer opens the folder with :func:`begin_folder` (which removes the
temporary files an interrupted run left and writes the manifest first, marked
``"complete": false``, with ``input_type`` and the rest) and closes it with :func:`finish_folder`
(``"complete": true``) once every file is written; :func:`writing_folder` does both around a
block. :class:`PredictionFolder` refuses a folder whose manifest says it is incomplete, so an
interrupted ``segcal apply --output probs`` is never read back as logits.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcal.errors import InputError
from segcal.io.arrays import (
    LABEL_SUFFIXES,
    PREDICTION_SUFFIXES,
    find_label_files,
    label_geometry,
    prediction_shape,
    read_label,
    read_prediction,
    write_prediction,
)
from segcal.io.files import (
    atomic_write,
    check_stems_match,
    clean_temporary_files,
    list_stems,
    read_json,
)
from segcal.io.nifti import is_nifti
from segcal.io.nnunet import is_nnunet_prediction, read_nnunet_item
from segcal.validation import channel_last_hint, score_kind

META_NAME = "segcal.json"
FORMAT_NAME = "segcal-predictions"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PredictionItem:
    """One entry of a prediction folder (paths only; nothing is read until asked)."""

    stem: str
    path: Path
    label_path: Path | None = None


def read_folder_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """Return the folder's ``segcal.json`` manifest, or ``{}`` when absent.

    Raises
    ------
    InputError
        The manifest is not valid JSON, not a JSON object, or names another format.
    """
    p = Path(folder) / META_NAME
    if not p.exists():
        return {}
    meta = read_json(p, what="prediction folder manifest")
    if meta.get("format") not in (None, FORMAT_NAME):
        raise InputError(
            f"{p}: not a segcal prediction folder (format={meta.get('format')!r}); expected "
            f"format {FORMAT_NAME!r}"
        )
    check_manifest(meta, p)
    return meta


def check_manifest(meta: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse manifest entries of the wrong type (the readers rely on these fields)."""

    def bad(key: str, expected: str) -> InputError:
        return InputError(f"{path}: {key!r} is {meta[key]!r}; expected {expected}")

    if "input_type" in meta and meta["input_type"] not in ("logits", "probs"):
        raise bad("input_type", "'logits' or 'probs'")
    nc = meta.get("num_classes")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 0):
        raise bad("num_classes", "a positive integer (0 or null: not recorded)")
    if "complete" in meta and not isinstance(meta["complete"], bool):
        raise bad("complete", "true or false")
    cases = meta.get("cases")
    if cases is not None and (
        not isinstance(cases, dict) or not all(isinstance(v, dict) for v in cases.values())
    ):
        raise InputError(f"{path}: 'cases' must map each case id to an object (shape, affine, source)")


def write_folder_meta(folder: str | os.PathLike, **meta: Any) -> None:
    """Write (merge) the folder's ``segcal.json`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cur = read_folder_meta(folder)
    cur.update({"format": FORMAT_NAME, "version": FORMAT_VERSION})
    cur.update(meta)
    with atomic_write(folder / META_NAME, "w") as fh:
        json.dump(cur, fh, indent=2, sort_keys=True)


def begin_folder(folder: str | os.PathLike, *, writes: Iterable[str] | None = None, **meta: Any) -> Path:
    """Open ``folder`` for writing predictions: the manifest first, marked incomplete.

    Removes the temporary files an interrupted writer left (``.<name>.<random>.tmp``), then
    writes (merges) ``segcal.json`` with ``meta`` (``input_type``, ``num_classes``, ...) and
    ``"complete": false``. Call :func:`finish_folder` once every file is written.

    Parameters
    ----------
    writes
        The names of the prediction files the run will write (``segcal predict`` / ``apply``
        pass them): a folder that already holds other ``.npy`` / ``.npz`` predictions is refused
        before anything is written, since files left by an earlier run (another ``--limit``,
        ``--corruption`` or input folder) would be read as one folder with this run's under a
        manifest marked complete. ``None`` (the bench caches, which add the missing files to a
        folder) checks nothing.

    Raises
    ------
    InputError
        If ``folder`` exists and is not a folder, or holds prediction files not in ``writes``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out: {folder} exists and is not a folder; expected a folder to write into")
    if writes is not None and folder.is_dir():
        names = set(writes)
        stale = [p.name for p in list_stems(folder, PREDICTION_SUFFIXES, "--out").values() if p.name not in names]
        if stale:
            shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
            raise InputError(
                f"--out: {folder} already holds {len(stale)} prediction file(s) that this run does not write "
                f"({shown}); they would be read as one folder with this run's files. Expected an empty "
                "folder, or one holding only files this run rewrites: remove them or pass a new --out"
            )
    folder.mkdir(parents=True, exist_ok=True)
    clean_temporary_files(folder)
    write_folder_meta(folder, **meta, complete=False)
    return folder


def finish_folder(folder: str | os.PathLike, **meta: Any) -> None:
    """Mark ``folder`` complete (merging ``meta`` into its manifest): the last write of a run."""
    write_folder_meta(folder, **meta, complete=True)


@contextlib.contextmanager
def writing_folder(folder: str | os.PathLike, **meta: Any) -> Iterator[Path]:
    """``with writing_folder(out, input_type="probs", ...) as out:`` -- :func:`begin_folder` on
    entry, :func:`finish_folder` when the block ends without an error (an error leaves the
    manifest marked incomplete)."""
    path = begin_folder(folder, **meta)
    yield path
    finish_folder(path)


def check_complete(folder: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Refuse a folder whose manifest records an unfinished write."""
    if meta.get("complete") is False:
        raise InputError(
            f"pred: {folder} is incomplete: its {META_NAME} records that the command writing it "
            "(segcal predict / apply) did not finish; run that command again with the same --out "
            "to redo it (or delete the folder)"
        )


class PredictionFolder:
    """A folder of per-image predictions, optionally paired with a label folder.

    Parameters
    ----------
    pred_dir
        Folder of ``.npy`` / ``.npz`` predictions.
    label_dir
        Optional folder of label maps with matching stems. Stems present on one side only raise an
        ``InputError`` that lists them (``strict=True``, the default).
    input_type
        ``"logits"`` or ``"probs"``; ``None`` takes the folder metadata, then the ``.npz`` key,
        and defaults to logits.

    Raises
    ------
    InputError
        No predictions, mismatched stems, an invalid manifest, or a manifest marked incomplete.
    """

    def __init__(
        self,
        pred_dir: str | os.PathLike,
        label_dir: str | os.PathLike | None = None,
        *,
        input_type: str | None = None,
        strict: bool = True,
    ) -> None:
        self.pred_dir = Path(pred_dir)
        self.label_dir = Path(label_dir) if label_dir is not None else None
        self.meta = read_folder_meta(self.pred_dir)
        check_complete(self.pred_dir, self.meta)
        if not list_stems(self.pred_dir, PREDICTION_SUFFIXES, "pred"):
            raise InputError(f"pred: no .npy/.npz predictions found in {self.pred_dir}")
        self.items = pair_folders(self.pred_dir, self.label_dir, strict=strict)
        if not self.items:
            raise InputError(f"pred: no prediction in {self.pred_dir} has a label in {self.label_dir}")
        self._input_type = input_type
        self._first_kind: tuple[str | None] | None = None  # score_kind of items[0], once read
        self._same_kind: set[Path] = set()  # files found to hold the first file's kind (a fit re-reads them)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        """The class count of the folder: its first file's class axis, read from the file's header
        (:func:`segcal.io.arrays.prediction_shape`; ``.npy``, ``.npz`` and nnU-Net cases alike, no
        label read); the readers check every other file against it."""
        return int(prediction_shape(self.items[0].path)[0])

    @property
    def stems(self) -> list[str]:
        """The stems of the items, sorted."""
        return [it.stem for it in self.items]

    def input_type_of(self, key: str | None) -> str:
        """The input type: the argument, else the manifest, else the ``.npz`` key (default logits)."""
        if self._input_type is not None:
            return self._input_type
        if "input_type" in self.meta:
            return str(self.meta["input_type"])
        if key == "probabilities":
            return "probs"
        return "logits"

    def _check_label_affine(self, item: PredictionItem) -> None:
        """A NIfTI label against the affine ``predict_volumes`` recorded for the case."""
        rec = (self.meta.get("cases") or {}).get(item.stem)
        if item.label_path is None or not is_nifti(item.label_path) or not rec or rec.get("affine") is None:
            return
        _, affine = label_geometry(item.label_path)
        try:
            paff = np.asarray(rec["affine"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{self.pred_dir / META_NAME}: the affine recorded for {item.stem!r} is not a 4 x 4 "
                f"matrix ({exc})"
            ) from exc
        if affine is not None and (paff.shape != (4, 4) or not np.allclose(paff, affine, atol=1e-3)):
            raise InputError(
                f"labels: {item.label_path.name} has affine\n{np.round(affine, 4)}\nbut prediction "
                f"{item.path.name} was made on a volume with affine ({META_NAME})\n{np.round(paff, 4)}"
                "\nThey are not the same voxel grid; expected the label of the predicted volume"
            )

    def _check_same_kind(self, item: PredictionItem, scores: np.ndarray) -> None:
        """Refuse a file that holds the other kind of scores (logits / probabilities) than the
        folder's first file (:func:`segcal.validation.score_kind`, from a few values of each).

        Whether the first file itself holds what the folder is read as is the callers' check
        (``segcal.pipeline.evaluate.folder_input_type``, with the flag to pass); this one keeps
        one probabilities file among logits (a folder merged from two tools) from being read
        with the others' input type, a silently wrong calibration error.
        """
        first = self.items[0]
        if item.path in self._same_kind or item.path == first.path or (
                first.path.suffix == ".npz" and is_nnunet_prediction(first.path)):
            return
        kind = score_kind(scores)  # ~20 ms on a 19 x 1024 x 2048 float16 memory map, once per file
        if kind is None:  # NaN / inf: the finite check names them
            return
        if self._first_kind is None:
            self._first_kind = (score_kind(read_prediction(first.path)[0]),)
        expected = self._first_kind[0]
        if expected is not None and kind != expected:
            what = {"probs": "probabilities (every value in [0, 1], summing to one over the class axis)",
                    "logits": "logits (values outside [0, 1] or not summing to one over the class axis)"}
            raise InputError(
                f"pred: {item.path.name} holds {what[kind]}, but {first.path.name}, the first file of "
                f"{self.pred_dir}, holds {what[expected].split(' (')[0]}; expected every file of a prediction "
                "folder to hold the same kind of scores: put each kind in a folder of its own"
            )
        if expected is not None:
            self._same_kind.add(item.path)

    def read(self, item: PredictionItem) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Read one item: ``(scores (C, *spatial), labels (*spatial) or None, input_type)``.

        An nnU-Net v2 case (``.npz`` with a ``.pkl`` properties file beside it) is read through
        :mod:`segcal.io.nnunet`, which lines its ``(C, z, y, x)`` probabilities up with the
        nibabel-ordered labels from the properties (never by guessing from shapes). A NIfTI
        label of a folder written by ``predict_volumes`` is checked against the recorded affine.
        """
        if item.path.suffix == ".npz" and is_nnunet_prediction(item.path):
            nc = self.meta.get("num_classes") or None  # 0: not recorded
            probs, labels = read_nnunet_item(item.path, item.label_path, num_classes=nc)
            return probs, labels, self._input_type or "probs"
        scores, key = read_prediction(item.path)
        self._check_same_kind(item, scores)
        labels = read_label(item.label_path) if item.label_path is not None else None
        if labels is not None and tuple(labels.shape) != tuple(scores.shape[1:]):
            hint = ""
            if tuple(scores.shape[:-1]) == tuple(labels.shape):
                hint = channel_last_hint(tuple(scores.shape), 0, expected=int(scores.shape[-1]))
            elif scores.shape[0] == 1 and tuple(scores.shape[2:]) == tuple(labels.shape):
                hint = (f"; the shape {tuple(scores.shape)} looks like a batch of one, (1, C, *spatial): "
                        "segcal reads one (C, *spatial) array per file; save x[0]")
            raise InputError(
                f"labels: {item.label_path.name} has shape {tuple(labels.shape)} but prediction "
                f"{item.path.name} has spatial shape {tuple(scores.shape[1:])}{hint}"
            )
        self._check_label_affine(item)
        return scores, labels, self.input_type_of(key)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, str]]:
        for it in self.items:
            scores, labels, itype = self.read(it)
            yield it.stem, scores, labels, itype


def pair_folders(
    pred_dir: str | os.PathLike, label_dir: str | os.PathLike | None = None, *, strict: bool = True
) -> list[PredictionItem]:
    """Pair predictions with label maps by stem, sorted by stem.

    Raises
    ------
    InputError
        When ``strict`` and some stems are present on one side only; the message lists them.
    """
    preds = list_stems(Path(pred_dir), PREDICTION_SUFFIXES, "pred")
    if label_dir is None:
        return [PredictionItem(s, p) for s, p in sorted(preds.items())]
    labels = find_label_files(label_dir)
    if strict:
        check_stems_match(preds, labels, "pred/labels: file stems do not match",
                          "prediction(s) without a label", "label(s) without a prediction")
    return [PredictionItem(s, p, labels[s]) for s, p in sorted(preds.items()) if s in labels]


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LABEL_SUFFIXES",
    "META_NAME",
    "PREDICTION_SUFFIXES",
    "PredictionFolder",
    "PredictionItem",
    "begin_folder",
    "check_complete",
    "check_manifest",
    "check_stems_match",
    "find_label_files",
    "finish_folder",
    "list_stems",
    "pair_folders",
    "read_folder_meta",
    "read_label",
    "read_prediction",
    "write_folder_meta",
    "write_prediction",
    "writing_folder",
]
