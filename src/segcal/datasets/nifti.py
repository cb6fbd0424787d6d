"""Image/label NIfTI volume pairs (``.nii`` / ``.nii.gz``) matched by stem.

Volumes are read by :func:`segcal.io.nifti.load_nifti` (nibabel, optional: ``pip install
'segcal[nifti]'``). The MSD Task04 hippocampus layout (``imagesTr/``, ``labelsTr/``) is supported
by :func:`nifti_pairs` and :func:`msd_hippocampus`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcal.data import data_root
from segcal.errors import InputError
from segcal.io.arrays import read_label
from segcal.io.files import check_stems_match, list_stems
from segcal.io.nifti import NIFTI_SUFFIXES, load_nifti, nifti_header, nifti_stem


def load_nifti_label(
    path: str | os.PathLike, *, ndim: int | None = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Read an integer label volume with :func:`segcal.io.arrays.read_label` (float files
    holding exact integers are cast to int64); returns ``(label, affine)``."""
    shape, affine = nifti_header(path, what="label", ndim=ndim)
    return read_label(path).reshape(shape), affine


@dataclass(frozen=True)
class VolumeItem:
    """An image volume and (optionally) its label volume, by path."""

    stem: str
    image_path: Path
    label_path: Path | None = None

    def load(self, *, atol: float = 1e-4) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(image, label or None, affine)``; see :func:`load_nifti_pair`."""
        if self.label_path is None:
            img, aff = load_nifti(self.image_path)
            return img, None, aff
        return load_nifti_pair(self.image_path, self.label_path, atol=atol)


def load_nifti_pair(
    image_path: str | os.PathLike, label_path: str | os.PathLike, *, atol: float = 1e-4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an image volume and its label volume; returns ``(image, label, affine)``.

    Raises
    ------
    ValueError
        If the shapes differ or the affines differ by more than ``atol`` (the message names both
        files).
    """
    img, aff_i = load_nifti(image_path)
    lab, aff_l = load_nifti_label(label_path)
    if img.shape != lab.shape:
        raise InputError(
            f"label volume {label_path} has shape {lab.shape} but image {image_path} has {img.shape}"
        )
    if not np.allclose(aff_i, aff_l, atol=atol, rtol=0):
        raise InputError(
            f"label volume {label_path} and image {image_path} have different affines "
            f"(max difference {np.abs(aff_i - aff_l).max():.3g}); they are not in the same space"
        )
    return img, lab, aff_i


def _nifti_files(folder: Path, what: str) -> dict[str, Path]:
    return list_stems(folder, NIFTI_SUFFIXES, what)


def nifti_pairs(
    images: str | os.PathLike, labels: str | os.PathLike | None = None, *, strict: bool = True
) -> list[VolumeItem]:
    """Pair ``images/*.nii[.gz]`` with ``labels/*.nii[.gz]`` by stem (sorted).

    Raises
    ------
    ValueError
        If no volumes are found, or (``strict``) some stems are on one side only (listed).
    """
    imgs = _nifti_files(Path(images), "images")
    if not imgs:
        raise InputError(f"images: no .nii/.nii.gz volumes found in {images}")
    if labels is None:
        return [VolumeItem(s, p) for s, p in sorted(imgs.items())]
    labs = _nifti_files(Path(labels), "labels")
    if strict:
        check_stems_match(imgs, labs, f"images/labels: volume stems do not match ({images} vs {labels})",
                          "image(s) without a label", "label(s) without an image")
    return [VolumeItem(s, p, labs[s]) for s, p in sorted(imgs.items()) if s in labs]


def msd_hippocampus(root: str | os.PathLike | None = None) -> list[VolumeItem]:
    """The 260 MSD Task04 hippocampus cases (``imagesTr`` / ``labelsTr``), sorted.

    ``root`` is the data root or the ``msd_task04_hippocampus`` folder (None: resolve the data
    root).
    """
    if root is None:
        root = data_root(required=True)
    root = Path(root)
    if not (root / "imagesTr").is_dir() and (root / "msd_task04_hippocampus").is_dir():
        root = root / "msd_task04_hippocampus"
    return nifti_pairs(root / "imagesTr", root / "labelsTr")


__all__ = [
    "NIFTI_SUFFIXES",
    "VolumeItem",
    "load_nifti",
    "load_nifti_label",
    "load_nifti_pair",
    "msd_hippocampus",
    "nifti_pairs",
    "nifti_stem",
]
