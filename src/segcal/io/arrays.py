"""The one reader and writer of prediction files and label maps, below the folder formats.

* Predictions: ``<stem>.npy`` (a ``(C, *spatial)`` float array, read memory-mapped) or
  ``<stem>.npz`` (key ``logits`` or ``probabilities``), written atomically by
  :func:`write_prediction`.
* Labels: ``<stem>.png`` (8/16-bit grey or palette indices), ``<stem>.npy``, ``<stem>.nii.gz`` /
  ``<stem>.nii`` integer maps, read by :func:`read_label` for every command (eval, fit, apply,
  the benches). Unsigned 16/32-bit labels come back as signed integers torch can hold.
* :func:`label_geometry` -- the shape (and, for NIfTI, the affine) of a label file from its
  header, for the geometry checks of :mod:`segcal.io.nnunet` and :mod:`segcal.io.predictions`.

Every refusal is an :class:`~segcal.errors.InputError` naming the file, what was found and what
was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from segcal.errors import InputError
from segcal.io.files import atomic_write, list_stems, load_npy, load_npz, npz_header
from segcal.io.images import png_label_dtype, read_png_label
from segcal.io.nifti import NIFTI_SUFFIXES, load_nifti, nifti_dtype, nifti_header

PREDICTION_SUFFIXES = (".npy", ".npz")
LABEL_SUFFIXES = (*NIFTI_SUFFIXES, ".png", ".npy")
PREDICTION_KEYS = ("logits", "probabilities")


def find_label_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Map stem -> label file for every label map in ``folder``."""
    return list_stems(Path(folder), LABEL_SUFFIXES, "labels")


def read_prediction(path: str | os.PathLike) -> tuple[np.ndarray, str | None]:
    """Read a ``.npy`` (memory-mapped) or ``.npz`` prediction; returns ``(array, npz_key)``.

    Raises
    ------
    InputError
        Unreadable file (zero-byte, truncated, corrupt), no float array, or fewer than 2 axes.
    """
    path = Path(path)
    key: str | None
    if path.suffix == ".npy":
        arr = load_npy(path, what="pred", mmap=True)
        key = None
    elif path.suffix == ".npz":
        arr, key = load_npz(path, PREDICTION_KEYS, what="pred")
    else:
        raise InputError(f"pred: unsupported prediction file {path.name}; expected .npy or .npz")
    if arr.dtype.kind != "f":
        raise InputError(f"pred: {path.name} holds {arr.dtype}, expected floating logits or probabilities")
    if arr.ndim < 2:
        raise InputError(f"pred: {path.name} has shape {arr.shape}, expected (C, *spatial)")
    return arr, key


def prediction_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a prediction file (``.npy``, ``.npz``, an nnU-Net case's
    ``probabilities``, whose class axis is first too) from its header, no value read: the shape is
    ``(C, *spatial)``.

    Raises
    ------
    InputError
        As :func:`read_prediction`: an unreadable file, no float array, fewer than 2 axes.
    """
    path = Path(path)
    if path.suffix == ".npy":
        arr = load_npy(path, what="pred", mmap=True)
        shape, dtype = tuple(int(s) for s in arr.shape), arr.dtype
        del arr
    elif path.suffix == ".npz":
        shape, dtype, _ = npz_header(path, PREDICTION_KEYS, what="pred")
    else:
        raise InputError(f"pred: unsupported prediction file {path.name}; expected .npy or .npz")
    if dtype.kind != "f":
        raise InputError(f"pred: {path.name} holds {dtype}, expected floating logits or probabilities")
    if len(shape) < 2:
        raise InputError(f"pred: {path.name} has shape {shape}, expected (C, *spatial)")
    return shape, dtype


def prediction_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The ``(C, *spatial)`` shape of a prediction file from its header
    (:func:`prediction_header`): the one way to learn a folder's class count before reading it."""
    return prediction_header(path)[0]


def _as_signed(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(f"labels: {name} holds non-integer values ({arr.dtype}); expected an integer label map")
        if arr.size and float(np.abs(arr).max()) > 2.0**62:
            raise InputError(f"labels: {name} holds values up to {float(np.abs(arr).max()):.3g}; expected class indices")
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise InputError(f"labels: {name} has dtype {arr.dtype}, expected integers")
    if arr.dtype.kind == "b":  # a 1-bit PNG or a boolean .npy mask: classes 0 and 1
        return arr.astype(np.uint8)
    if arr.dtype == np.uint16:
        return arr.astype(np.int32)
    if arr.dtype.kind == "u" and arr.dtype.itemsize >= 4:
        if arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise InputError(f"labels: {name} holds values above {np.iinfo(np.int64).max}")
        return arr.astype(np.int64)
    return arr


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label map (``.png``, ``.npy``, ``.nii``/``.nii.gz``) as an integer array.

    Float label files holding exact integers (some NIfTI label maps) are cast to int64; uint16
    (16-bit PNG) to int32 and uint32/uint64 to int64, boolean maps (a 1-bit PNG, a bool ``.npy``)
    to uint8 classes 0 / 1, so every label map fits a torch tensor.

    Raises
    ------
    InputError
        Unsupported suffix, undecodable file, multi-channel PNG, non-integer values.
    """
    path = Path(path)
    name = path.name
    if name.lower().endswith(".png"):
        arr = read_png_label(path)
    elif name.endswith(".npy"):
        arr = load_npy(path, what="labels")
    elif name.endswith(NIFTI_SUFFIXES):
        arr, _ = load_nifti(path, ndim=None, what="labels")
        if arr.ndim == 4 and arr.shape[3] == 1:  # (X, Y, Z, 1): the volume it holds, as label_geometry reads it
            arr = arr[..., 0]
    else:
        raise InputError(f"labels: unsupported label file {name}; expected .png, .npy, .nii or .nii.gz")
    return _as_signed(arr, name)


def label_geometry(path: str | os.PathLike) -> tuple[tuple[int, ...] | None, np.ndarray | None]:
    """``(shape, affine)`` of a label file from its header: NIfTI gives both (3D volumes only),
    ``.npy`` its shape and no affine, other files ``(None, None)`` (a PNG carries no geometry)."""
    p = Path(path)
    if p.name.endswith(NIFTI_SUFFIXES):
        return nifti_header(p, what="labels")
    if p.name.endswith(".npy"):
        return tuple(load_npy(p, what="labels", mmap=True).shape), None
    return None, None


def label_dtype(path: str | os.PathLike) -> np.dtype:
    """The dtype a label file stores its values in, from its header (PNG mode, ``.npy`` header,
    NIfTI header; a 1-bit PNG or a boolean ``.npy`` is uint8, as :func:`read_label` reads it):
    what the values of an ignore index must fit (:func:`segcal.validation.ignore_index_note`)."""
    p = Path(path)
    if p.name.lower().endswith(".png"):
        return png_label_dtype(p)
    if p.name.endswith(".npy"):
        dtype = load_npy(p, what="labels", mmap=True).dtype
    elif p.name.endswith(NIFTI_SUFFIXES):
        dtype = nifti_dtype(p, what="labels")
    else:
        raise InputError(f"labels: unsupported label file {p.name}; expected .png, .npy, .nii or .nii.gz")
    return np.dtype(np.uint8) if dtype.kind == "b" else np.dtype(dtype).newbyteorder("=")


def write_prediction(
    path: str | os.PathLike, array: Any, *, key: str | None = None, dtype: Any = np.float16
) -> Path:
    """Write one ``(C, *spatial)`` prediction atomically.

    ``.npy`` stores the raw array; ``.npz`` stores it compressed under ``key`` (``logits`` by default,
    ``probabilities`` for nnU-Net-style files). ``dtype=None`` keeps the array's dtype.

    Raises
    ------
    InputError
        The array holds NaN, or a finite value that the storage ``dtype`` cannot represent (a
        float16 overflow would be written as +-inf); nothing is written then.
    """
    path = Path(path)
    src = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    with np.errstate(over="ignore"):  # overflow is reported below, naming the file
        arr = src.astype(dtype, copy=False) if dtype is not None else src
    if src.dtype.kind == "f":
        if np.isnan(src).any():
            raise InputError(f"write_prediction: {path.name}: the array holds NaN; expected finite scores")
        if arr is not src and arr.dtype.kind == "f":
            lost = np.isfinite(src) & ~np.isfinite(arr)
            if lost.any():
                big = float(np.abs(src[lost]).max())
                raise InputError(
                    f"write_prediction: {path.name}: {int(lost.sum())} value(s) up to {big:.6g} are "
                    f"outside the {arr.dtype} range (max {float(np.finfo(arr.dtype).max):.6g}) and "
                    "would be stored as inf; store float32 (--dtype float32)"
                )
    if path.suffix == ".npy":
        with atomic_write(path) as fh:
            np.save(fh, arr, allow_pickle=False)
    elif path.suffix == ".npz":
        with atomic_write(path) as fh:
            np.savez_compressed(fh, **{key or "logits": arr})
    else:
        raise InputError(f"write_prediction: unsupported suffix {path.suffix!r}; use .npy or .npz")
    return path


__all__ = [
    "LABEL_SUFFIXES",
    "PREDICTION_KEYS",
    "PREDICTION_SUFFIXES",
    "find_label_files",
    "label_dtype",
    "label_geometry",
    "prediction_header",
    "prediction_shape",
    "read_label",
    "read_prediction",
    "write_prediction",
]
