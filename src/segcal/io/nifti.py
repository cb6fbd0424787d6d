"""NIfTI volumes (``.nii`` / ``.nii.gz``): the one loader and the one header reader of segcal.

nibabel is an optional dependency (``pip install 'segcal[nifti]'``), imported when a volume is
first read; without it the error names the extra. Arrays come back in nibabel's voxel order
``(x, y, z)`` with the ``(4, 4)`` RAS affine as float64. A 4D file whose last axis has length 1
is read as the 3D volume it holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from segcal.errors import InputError, missing_dependency
from segcal.io.files import split_suffix
from segcal.validation import native_byte_order

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nibabel() -> ModuleType:
    """The ``nibabel`` module, or the install hint naming the ``nifti`` extra."""
    try:
        import nibabel as nib
    except ImportError as exc:
        raise missing_dependency("nibabel", "nifti", "reading NIfTI volumes") from exc
    return nib


def nifti_stem(name: str) -> str | None:
    """``"case_001.nii.gz" -> "case_001"``; None if not a NIfTI file name."""
    split = split_suffix(name, NIFTI_SUFFIXES)
    return None if split is None else split[0]


def is_nifti(path: str | os.PathLike) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz``."""
    return nifti_stem(Path(path).name) is not None


def _open(path: Path, what: str) -> Any:
    if nifti_stem(path.name) is None:
        raise InputError(f"{what}: {path}: not a NIfTI file (expected .nii or .nii.gz)")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: NIfTI file not found: {path}")
    nib = nibabel()
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(f"{what}: cannot read NIfTI file {path}: {exc}") from exc


def _check_ndim(shape: tuple[int, ...], ndim: int | None, path: Path, what: str) -> tuple[int, ...]:
    if ndim == 3 and len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if ndim is not None and len(shape) != ndim:
        extra = ""
        if len(shape) == 4:
            extra = " (a 4D volume: pass one channel/time point, or ndim=None to read it whole)"
        raise InputError(
            f"{what}: {path} is {len(shape)}D with shape {shape} ({len(shape)}D); expected a "
            f"{ndim}D volume{extra}"
        )
    return shape


def nifti_header(
    path: str | os.PathLike, *, what: str = "label", ndim: int | None = 3
) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` of a NIfTI file without reading its voxels.

    Raises
    ------
    InputError
        Not a NIfTI name, unreadable, or not ``ndim``-dimensional (4D files other than
        ``(X, Y, Z, 1)`` are refused for ``ndim=3``).
    """
    path = Path(path)
    img = _open(path, what)
    shape = _check_ndim(tuple(int(s) for s in img.shape), ndim, path, what)
    return shape, np.asarray(img.affine, dtype=np.float64)


def nifti_dtype(path: str | os.PathLike, *, what: str = "label") -> np.dtype:
    """The dtype of a NIfTI file's stored voxels, from its header (the voxels are not read)."""
    return np.dtype(_open(Path(path), what).get_data_dtype()).newbyteorder("=")


def load_nifti(
    path: str | os.PathLike,
    *,
    ndim: int | None = 3,
    dtype: np.dtype | type | None = None,
    what: str = "image",
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume; returns ``(array (x, y, z), affine (4, 4) float64)``.

    Parameters
    ----------
    ndim
        Required number of dimensions (3 by default; None accepts any). For 3, an
        ``(X, Y, Z, 1)`` file is read as ``(X, Y, Z)``.
    dtype
        Optional dtype to cast the data to.
    what
        What the file is, for the messages (``"image"``, ``"label"``).

    Raises
    ------
    MissingDependencyError
        If nibabel is not installed (the hint names the ``nifti`` extra).
    FileNotFoundError
        If the file is missing.
    InputError
        If the file cannot be read or has the wrong number of dimensions.
    """
    path = Path(path)
    img = _open(path, what)
    shape = _check_ndim(tuple(int(s) for s in img.shape), ndim, path, what)
    try:
        with np.errstate(all="ignore"):  # a corrupt scale factor: the values are checked by callers
            arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated or corrupt voxel data
        raise InputError(f"{what}: cannot read NIfTI file {path}: {exc}") from exc
    arr = native_byte_order(np.asarray(arr)).reshape(shape)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr, np.asarray(img.affine, dtype=np.float64)


__all__ = ["NIFTI_SUFFIXES", "is_nifti", "load_nifti", "nibabel", "nifti_dtype", "nifti_header", "nifti_stem"]
