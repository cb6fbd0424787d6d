"""Generic image-folder / label-folder datasets (2D), matched by file stem.

Images: ``.png``, ``.jpg``, ``.jpeg`` (any Pillow mode, converted to RGB; decoded by
:mod:`segcal.io.images`). Labels: ``.png`` or ``.npy`` integer maps (see
:func:`segcal.io.arrays.read_label`) with the image's height and width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcal.errors import InputError
from segcal.io.arrays import read_label
from segcal.io.files import check_stems_match
from segcal.io.images import (
    CALIBRATOR_IMAGE_MEAN,
    CALIBRATOR_IMAGE_STD,
    IMAGE_SUFFIXES,
    image_files,
    image_size,
    list_files,
    load_image,
    load_image_tensor,
    normalize_image,
)

LABEL_SUFFIXES_2D = (".png", ".npy")


@dataclass(frozen=True)
class SegItem:
    """One image (and optionally its label map), by path; nothing is read until asked."""

    stem: str
    image_path: Path
    label_path: Path | None = None

    def load_image(self) -> np.ndarray:
        return load_image(self.image_path)

    def load_label(self) -> np.ndarray:
        if self.label_path is None:
            raise InputError(f"{self.stem}: this item has no label map")
        return load_label(self.label_path, expected_hw=image_size(self.image_path)[::-1])


def image_folder(
    images: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    *,
    strict: bool = True,
) -> list[SegItem]:
    """Pair the images of ``images`` with the label maps of ``labels`` by stem, sorted by stem.

    Parameters
    ----------
    strict
        When True (default), stems present on one side only raise a ``ValueError`` listing them;
        when False, only matched pairs are returned.

    Raises
    ------
    InputError
        No images found, or (``strict``) mismatched stems.
    """
    imgs = list_files(images, IMAGE_SUFFIXES, "images")
    if not imgs:
        raise InputError(f"images: no .png/.jpg/.jpeg images found in {images}")
    if labels is None:
        return [SegItem(s, p) for s, p in sorted(imgs.items())]
    labs = list_files(labels, LABEL_SUFFIXES_2D, "labels")
    if strict:
        check_stems_match(imgs, labs, f"images/labels: file stems do not match ({images} vs {labels})",
                          "image(s) without a label", "label(s) without an image")
    items = [SegItem(s, p, labs[s]) for s, p in sorted(imgs.items()) if s in labs]
    if not items:
        raise InputError(f"images/labels: no image in {images} has a label in {labels}")
    return items


def load_label(
    path: str | os.PathLike,
    *,
    expected_hw: tuple[int, int] | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> np.ndarray:
    """Read a 2D integer label map; optionally check its ``(H, W)`` and value range.

    Raises
    ------
    InputError
        If the map is not 2D, its size differs from ``expected_hw`` or (with ``num_classes``) it
        holds values outside ``[0, num_classes)`` other than ``ignore_index``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    lab = read_label(path)
    if lab.ndim != 2:
        raise InputError(f"label map {path}: expected a 2D (H, W) map, got shape {lab.shape}")
    if expected_hw is not None and tuple(lab.shape) != tuple(expected_hw):
        raise InputError(
            f"label map {path} is {lab.shape[0]} x {lab.shape[1]} (H x W) but its image is "
            f"{expected_hw[0]} x {expected_hw[1]}"
        )
    if num_classes is not None:
        check_label_values(lab, num_classes, ignore_index, str(path))
    return lab


def check_label_values(
    labels: np.ndarray, num_classes: int, ignore_index: int | None, name: str
) -> None:
    """Raise if ``labels`` holds a value outside ``[0, num_classes)`` that is not ``ignore_index``."""
    vals = np.unique(labels)
    bad = [int(v) for v in vals if not (0 <= v < num_classes) and v != ignore_index]
    if bad:
        raise InputError(
            f"labels {name}: values {bad[:10]} are outside the model's {num_classes} classes "
            f"[0, {num_classes}) and are not the ignore label ({ignore_index}); "
            "is this the right model / label folder?"
        )


def check_item_sizes(item: SegItem) -> None:
    """Raise a ``ValueError`` naming both files if the label map's size differs from the image's."""
    if item.label_path is None:
        return
    wi, hi = image_size(item.image_path)
    wl, hl = image_size(item.label_path)
    if (wi, hi) != (wl, hl):
        raise InputError(
            f"label map {item.label_path} is {hl} x {wl} (H x W) but image {item.image_path} is "
            f"{hi} x {wi}"
        )


#: the image readers live in :mod:`segcal.io.images`; these names stay importable from here
__all__ = [
    "CALIBRATOR_IMAGE_MEAN",
    "CALIBRATOR_IMAGE_STD",
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES_2D",
    "SegItem",
    "check_item_sizes",
    "check_label_values",
    "image_files",
    "image_folder",
    "image_size",
    "list_files",
    "load_image",
    "load_image_tensor",
    "load_label",
    "normalize_image",
]
