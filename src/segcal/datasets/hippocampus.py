"""MSD Task04 hippocampus: case listing, the fixed split, loading, normalisation and padding.

The split is fixed and committed (``hippocampus_split.json``): the 260 case ids sorted, shuffled
with ``numpy.random.default_rng(0)``, then 160 train / 50 calibration / 50 test.
``make_split`` rebuilds it from the ids so a test can check the committed file.

Preprocessing (the same in training and prediction):

* **Normalisation** -- per case z-score over all voxels (MONAI ``NormalizeIntensity(nonzero=False)``,
  float32). The raw intensities differ by four orders of magnitude between cases, so no global
  scale would work.
* **Padding** -- the 3D U-Net (three stride-2 levels) needs every spatial size divisible by 8.
  Prediction pads each volume symmetrically with zeros (the normalised mean) to the next multiple
  of 8 (MONAI ``DivisiblePad(k=8)``), then crops the logits back to the original shape, so the
  written logits are voxel-aligned with the input NIfTI.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import numpy as np

from segcal.data import data_root as find_data_root
from segcal.errors import InputError, missing_dependency
from segcal.io.arrays import read_label
from segcal.io.files import read_json
from segcal.io.nifti import load_nifti

DATASET_DIRNAME = "msd_task04_hippocampus"
CLASS_NAMES = ("background", "anterior", "posterior")
NUM_CLASSES = 3
SPLIT_FILE = Path(__file__).with_name("hippocampus_split.json")
SPLIT_SEED = 0
SPLIT_SIZES = {"train": 160, "calibration": 50, "test": 50}
DIVISOR = 8


def dataset_dir(data_root: str | os.PathLike | None = None) -> Path:
    """The ``msd_task04_hippocampus`` folder (under ``segcal.data.data_root``)."""
    d = Path(find_data_root(data_root)) / DATASET_DIRNAME
    if not (d / "imagesTr").is_dir() or not (d / "labelsTr").is_dir():
        raise FileNotFoundError(f"{d}: expected imagesTr/ and labelsTr/ (MSD Task04 hippocampus)")
    return d


def case_ids(folder: str | os.PathLike) -> list[str]:
    """Sorted case ids (``hippocampus_XXX``) of ``folder/imagesTr`` that have a label."""
    folder = Path(folder)
    ids = sorted(
        p.name[: -len(".nii.gz")]
        for p in (folder / "imagesTr").glob("*.nii.gz")
        if not p.name.startswith(".")
    )
    return [i for i in ids if (folder / "labelsTr" / f"{i}.nii.gz").exists()]


def make_split(ids: list[str], seed: int = SPLIT_SEED, sizes: dict[str, int] | None = None) -> dict:
    """Sorted ids, seeded shuffle, consecutive blocks of ``sizes`` (train, calibration, test)."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    ids = sorted(ids)
    if sum(sizes.values()) != len(ids):
        raise InputError(f"split sizes {sizes} do not add up to the {len(ids)} cases")
    order = np.random.default_rng(seed).permutation(len(ids))
    out: dict = {"seed": seed, "method": "sorted ids, numpy.random.default_rng(seed).permutation"}
    start = 0
    for name, n in sizes.items():
        out[name] = sorted(ids[i] for i in order[start : start + n])
        start += n
    return out


def load_split(path: str | os.PathLike = SPLIT_FILE) -> dict:
    """The committed split: ``{"train": [...], "calibration": [...], "test": [...], ...}``."""
    return read_json(path, what="hippocampus split")


def monai_transforms() -> ModuleType:
    """``monai.transforms``, or the install hint naming the ``medical`` extra."""
    try:
        import monai.transforms as mt
    except ImportError as exc:
        raise missing_dependency("monai", "medical", "the 3D U-Net preprocessing") from exc
    return mt


def normalise(image: np.ndarray) -> np.ndarray:
    """Per-case z-score over all voxels (MONAI ``NormalizeIntensity(nonzero=False)``), float32."""
    out = monai_transforms().NormalizeIntensity(nonzero=False)(np.asarray(image, dtype=np.float32))
    return np.asarray(out, dtype=np.float32)


def pad_amounts(shape: tuple[int, ...], k: int = DIVISOR) -> list[tuple[int, int]]:
    """Symmetric (before, after) zero padding per axis to the next multiple of ``k``.

    Same convention as MONAI ``DivisiblePad(k, method="symmetric")``: the extra voxel of an odd
    pad goes after.
    """
    out = []
    for s in shape:
        total = (-s) % k
        out.append((total // 2, total - total // 2))
    return out


def pad_to_divisible(image: np.ndarray, k: int = DIVISOR) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Pad a (x, y, z) volume with zeros via MONAI ``DivisiblePad``; returns (padded, amounts)."""
    pads = pad_amounts(image.shape, k)
    padded = np.asarray(monai_transforms().DivisiblePad(k=k, method="symmetric")(image[None]))[0]
    # keep our own record of where the volume sits, and check it agrees with MONAI
    expect = tuple(s + a + b for s, (a, b) in zip(image.shape, pads, strict=True))
    if padded.shape != expect:  # pragma: no cover - MONAI convention changed
        raise RuntimeError(f"DivisiblePad gave {padded.shape}, expected {expect}")
    sl = tuple(slice(a, a + s) for s, (a, _) in zip(image.shape, pads, strict=True))
    if not np.array_equal(padded[sl], image):  # pragma: no cover
        raise RuntimeError("DivisiblePad placed the volume differently from pad_amounts")
    return padded, pads


def crop_back(arr: np.ndarray, pads: list[tuple[int, int]]) -> np.ndarray:
    """Undo ``pad_to_divisible`` on the trailing three axes of ``arr`` (e.g. (C, X, Y, Z))."""
    sl = tuple(slice(a, arr.shape[-3 + i] - b) for i, (a, b) in enumerate(pads))
    return arr[(..., *sl)]


def load_case(folder: str | os.PathLike, case: str) -> dict:
    """Image (float32, raw), label (int64), affine and shape of one case; checks they agree."""
    folder = Path(folder)
    img, aff = load_nifti(folder / "imagesTr" / f"{case}.nii.gz", what="image")
    lab_path = folder / "labelsTr" / f"{case}.nii.gz"
    _, laff = load_nifti(lab_path, what="label")
    lab = read_label(lab_path)  # casts the two float32 label files, refuses non-integers
    if lab.shape != img.shape:
        raise InputError(f"{case}: label shape {lab.shape} differs from image shape {img.shape}")
    if not np.allclose(aff, laff, atol=1e-4):
        raise InputError(f"{case}: label affine differs from image affine")
    return {"id": case, "image": np.asarray(img, dtype=np.float32), "label": lab.astype(np.int64),
            "affine": aff}


__all__ = [
    "CLASS_NAMES",
    "DATASET_DIRNAME",
    "DIVISOR",
    "NUM_CLASSES",
    "SPLIT_FILE",
    "SPLIT_SEED",
    "SPLIT_SIZES",
    "case_ids",
    "crop_back",
    "dataset_dir",
    "load_case",
    "load_nifti",
    "load_split",
    "make_split",
    "monai_transforms",
    "normalise",
    "pad_amounts",
    "pad_to_divisible",
]
