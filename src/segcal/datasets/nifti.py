"""NIfTI volumes (``.nii`` / ``.nii.gz``) and image/label volume pairs, via nibabel (optional).

nibabel is imported lazily: only reading a volume needs it (``pip install 'segcal[nifti]'``).
The MSD Task04 hippocampus layout (``imagesTr/``, ``labelsTr/``) is supported by
:func:`nifti_pairs` and :func:`msd_hippocampus`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nibabel():
    try:
        import nibabel as nib
    except ImportError as exc:
        raise ImportError(
            "reading NIfTI volumes needs nibabel: pip install 'segcal[nifti]'"
        ) from exc
    return nib


def nifti_stem(name: str) -> str | None:
    """``"case_001.nii.gz" -> "case_001"``; None if not a NIfTI file name."""
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return None


def load_nifti(
    path: str | os.PathLike, *, ndim: int | None = 3, dtype: np.dtype | type | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume; returns ``(array, affine (4, 4) float64)``.

    Parameters
    ----------
    ndim
        Required number of dimensions (3 by default; None accepts any).
    dtype
        Optional dtype to cast the data to.

    Raises
    ------
    ImportError
        If nibabel is not installed (with the install hint).
    FileNotFoundError
        If the file is missing.
    ValueError
        If the file cannot be read, or has the wrong number of dimensions (e.g. 4D where 3D is
        expected).
    """
    path = Path(path)
    if nifti_stem(path.name) is None:
        raise ValueError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    nib = _nibabel()
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(f"cannot read NIfTI file {path}: {exc}") from exc
    if ndim is not None and arr.ndim != ndim:
        extra = ""
        if arr.ndim == 4:
            extra = " (a 4D volume: pass one channel/time point, or ndim=None to read it whole)"
        raise ValueError(
            f"NIfTI file {path} has shape {arr.shape} ({arr.ndim}D); expected a {ndim}D volume{extra}"
        )
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return np.asarray(arr), np.asarray(img.affine, dtype=np.float64)


def load_nifti_label(
    path: str | os.PathLike, *, ndim: int | None = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Read an integer label volume (float files holding exact integers are cast to int64)."""
    arr, affine = load_nifti(path, ndim=ndim)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"label volume {path} holds non-integer values ({arr.dtype})")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"label volume {path} has dtype {arr.dtype}, expected integers")
    return arr, affine


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
        raise ValueError(
            f"label volume {label_path} has shape {lab.shape} but image {image_path} has {img.shape}"
        )
    if not np.allclose(aff_i, aff_l, atol=atol, rtol=0):
        raise ValueError(
            f"label volume {label_path} and image {image_path} have different affines "
            f"(max difference {np.abs(aff_i - aff_l).max():.3g}); they are not in the same space"
        )
    return img, lab, aff_i


def _nifti_files(folder: Path, what: str) -> dict[str, Path]:
    from segcal.io.predictions import list_stems

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
        raise ValueError(f"images: no .nii/.nii.gz volumes found in {images}")
    if labels is None:
        return [VolumeItem(s, p) for s, p in sorted(imgs.items())]
    labs = _nifti_files(Path(labels), "labels")
    if strict:
        from segcal.io.predictions import check_stems_match

        check_stems_match(imgs, labs, f"images/labels: volume stems do not match ({images} vs {labels})",
                          "image(s) without a label", "label(s) without an image")
    return [VolumeItem(s, p, labs[s]) for s, p in sorted(imgs.items()) if s in labs]


def msd_hippocampus(root: str | os.PathLike | None = None) -> list[VolumeItem]:
    """The 260 MSD Task04 hippocampus cases (``imagesTr`` / ``labelsTr``), sorted.

    ``root`` is the data root or the ``msd_task04_hippocampus`` folder (None: resolve the data
    root).
    """
    if root is None:
        from segcal.data import data_root

        root = data_root(required=True)
    root = Path(root)
    if not (root / "imagesTr").is_dir() and (root / "msd_task04_hippocampus").is_dir():
        root = root / "msd_task04_hippocampus"
    return nifti_pairs(root / "imagesTr", root / "labelsTr")
