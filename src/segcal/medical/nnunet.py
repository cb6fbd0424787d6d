"""Line up 3D predictions with NIfTI label volumes: nnU-Net v2 folders and segcal's own.

Two entry points for ``segcal eval``/``fit``/``apply`` (the lead wires them into ``segcal.io``):

* ``read_aligned(pred_path, label_path, *, num_classes=None, folder_meta=None)`` -> ``(pred, label)``
  with ``pred`` of shape ``(C, X, Y, Z)`` in nibabel order and ``label`` ``(X, Y, Z)`` int64.
  For an nnU-Net ``<case>.npz`` + ``<case>.pkl`` the axes come from the properties (see
  ``segcal.io.nnunet``); for a segcal ``<case>.npy`` written by ``predict_volumes`` the shape and
  affine recorded in ``segcal.json`` are checked against the label header.
* ``write_calibrated(out_dir, stem, probs, source_path)`` -> path: for an nnU-Net source, writes
  ``<stem>.npz`` (``probabilities``, source axis order) + a copy of ``<stem>.pkl``.

Every disagreement (shape, affine, class count, dimensionality) raises ``ValueError`` with a message
naming the file and both values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from segcal.io.nnunet import (
    NnUNetFormatError,
    is_nnunet_prediction,
    read_nnunet_prediction,
    write_nnunet_prediction,
)


def read_nifti_header(path: str | os.PathLike, *, what: str = "label") -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` of a 3D NIfTI without reading its voxels; refuses 4D (except ``(..., 1)``)."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"{what}: {Path(path).name} is {len(shape)}D with shape {shape}; expected a 3D volume")
    return shape, np.asarray(img.affine, dtype=np.float64)


def read_label_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 3D integer label NIfTI as ``(label (X, Y, Z) int64, affine)``; 4D files are refused."""
    from segcal.io.predictions import read_label

    shape, affine = read_nifti_header(path, what="label")
    lab = read_label(path)
    return lab.reshape(shape).astype(np.int64, copy=False), affine


def _check_classes(arr: np.ndarray, num_classes: int | None, name: str) -> None:
    if num_classes is not None and arr.shape[0] != num_classes:
        raise ValueError(f"{name}: {arr.shape[0]} classes in the prediction, expected {num_classes}")


def read_aligned(
    pred_path: str | os.PathLike,
    label_path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    folder_meta: dict[str, Any] | None = None,
    atol: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Prediction ``(C, X, Y, Z)`` and label ``(X, Y, Z)`` on the same voxel grid, checked.

    * nnU-Net ``.npz`` + ``.pkl``: transposed using the properties, checked against the label's
      shape and affine (``NnUNetFormatError``, a ``ValueError``, when they disagree).
    * segcal ``.npy``/``.npz``: shape must equal the label's; if ``folder_meta['cases'][stem]``
      records an affine (``predict_volumes`` does), it must match the label's.
    """
    from segcal.io.predictions import read_prediction

    pred_path, label_path = Path(pred_path), Path(label_path)
    shape, affine = read_nifti_header(label_path, what="label")
    if is_nnunet_prediction(pred_path):
        pred, _, _ = read_nnunet_prediction(
            pred_path, label_shape=shape, label_affine=affine, num_classes=num_classes
        )
    else:
        pred, _ = read_prediction(pred_path)
        if pred.ndim != 4:
            raise ValueError(
                f"{pred_path.name}: prediction has shape {pred.shape}; expected (C, X, Y, Z) for a 3D volume"
            )
        _check_classes(pred, num_classes, pred_path.name)
        if tuple(pred.shape[1:]) != shape:
            raise ValueError(
                f"{pred_path.name}: prediction spatial shape {tuple(pred.shape[1:])} differs from "
                f"label {label_path.name} shape {shape}"
            )
        stem = pred_path.name.rsplit(".", 1)[0]
        rec = (folder_meta or {}).get("cases", {}).get(stem)
        if rec is not None and rec.get("affine") is not None:
            paff = np.asarray(rec["affine"], dtype=np.float64)
            if not np.allclose(paff, affine, atol=atol):
                raise ValueError(
                    f"{pred_path.name}: prediction affine (segcal.json) differs from label "
                    f"{label_path.name} affine:\n{np.round(paff, 4)}\nvs\n{np.round(affine, 4)}"
                )
    label = read_label_volume(label_path)[0]
    return pred, label


def write_calibrated(
    out_dir: str | os.PathLike, stem: str, probs: np.ndarray, source_path: str | os.PathLike
) -> Path:
    """Write calibrated ``(C, X, Y, Z)`` probabilities in the source's format.

    nnU-Net source -> ``out_dir/<stem>.npz`` (key ``probabilities``, nnU-Net axis order, float32) and
    ``<stem>.pkl`` copied; otherwise -> ``out_dir/<stem>.npz`` with key ``probabilities`` in
    nibabel order (segcal format).
    """
    from segcal.io.predictions import write_prediction

    out = Path(out_dir) / f"{stem}.npz"
    if is_nnunet_prediction(source_path):
        return write_nnunet_prediction(out, probs, source_path)
    return write_prediction(out, probs, key="probabilities", dtype=np.float32)


__all__ = [
    "NnUNetFormatError",
    "is_nnunet_prediction",
    "read_aligned",
    "read_label_volume",
    "read_nifti_header",
    "write_calibrated",
]
