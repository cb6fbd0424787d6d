"""Dataset readers: CamVid splits, generic image/label folders, NIfTI volumes.

Dataset *aliases* name a split under the data root: ``camvid:train``, ``camvid:val``,
``camvid:test`` (see :func:`resolve_images`).
"""

from __future__ import annotations

import os
from pathlib import Path

from segcal.data import data_root as find_data_root
from segcal.datasets.camvid import (
    CAMVID_CLASSES,
    CAMVID_IGNORE_INDEX,
    CAMVID_SPLITS,
    camvid_dir,
    camvid_split,
    camvid_split_dirs,
)
from segcal.datasets.folders import (
    IMAGE_SUFFIXES,
    SegItem,
    check_item_sizes,
    check_label_values,
    image_folder,
    image_size,
    load_image,
    load_label,
)
from segcal.datasets.nifti import (
    VolumeItem,
    load_nifti,
    load_nifti_label,
    load_nifti_pair,
    msd_hippocampus,
    nifti_pairs,
)
from segcal.errors import InputError

#: alias dataset name -> its splits
DATASET_ALIASES: dict[str, tuple[str, ...]] = {"camvid": CAMVID_SPLITS}


def is_alias(spec: str | os.PathLike) -> bool:
    """True for ``"<dataset>:<split>"`` strings naming a known dataset (not an existing path)."""
    s = os.fspath(spec)
    if ":" not in s or Path(s).exists():
        return False
    return s.split(":", 1)[0] in DATASET_ALIASES


def resolve_images(
    spec: str | os.PathLike, data_root: str | os.PathLike | None = None
) -> tuple[Path, Path | None]:
    """Resolve ``--images``: a folder, or an alias like ``camvid:test``.

    Returns ``(images_dir, labels_dir)``; ``labels_dir`` is the split's label folder for an
    alias and None for a plain folder.
    """
    s = os.fspath(spec)
    if is_alias(s):
        name, split = s.split(":", 1)
        splits = DATASET_ALIASES[name]
        if split not in splits:
            raise InputError(f"{s}: unknown split {split!r}; choose one of {', '.join(splits)}")
        if name == "camvid":
            return camvid_split_dirs(find_data_root(data_root, required=True), split)
    p = Path(s).expanduser()
    if not p.exists():
        known = ", ".join(f"{d}:{sp}" for d, sps in DATASET_ALIASES.items() for sp in sps)
        raise FileNotFoundError(f"--images: {p} does not exist (nor is it a dataset alias: {known})")
    return p, None


__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_IGNORE_INDEX",
    "CAMVID_SPLITS",
    "DATASET_ALIASES",
    "IMAGE_SUFFIXES",
    "SegItem",
    "VolumeItem",
    "camvid_dir",
    "camvid_split",
    "camvid_split_dirs",
    "check_item_sizes",
    "check_label_values",
    "image_folder",
    "image_size",
    "is_alias",
    "load_image",
    "load_label",
    "load_nifti",
    "load_nifti_label",
    "load_nifti_pair",
    "msd_hippocampus",
    "nifti_pairs",
    "resolve_images",
]
