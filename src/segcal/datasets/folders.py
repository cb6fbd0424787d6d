"""Generic image-folder / label-folder datasets (2D), matched by file stem.

Images: ``.png``, ``.jpg``, ``.jpeg`` (any Pillow mode, converted to RGB). Labels: ``.png`` or
``.npy`` integer maps (see :func:`segcal.io.read_label`) with the image's height and width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcal.io.predictions import read_label

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
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
            raise ValueError(f"{self.stem}: this item has no label map")
        return load_label(self.label_path, expected_hw=image_size(self.image_path)[::-1])


def list_files(folder: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """Map stem -> path for the files of ``folder`` whose (case-insensitive) suffix is in ``suffixes``;
    see :func:`segcal.io.predictions.list_stems` (errors for a missing folder or a shared stem)."""
    from segcal.io.predictions import list_stems

    return list_stems(folder, tuple(x.lower() for x in suffixes), what, ignore_case=True)


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
    ValueError
        No images found, or (``strict``) mismatched stems.
    """
    imgs = list_files(images, IMAGE_SUFFIXES, "images")
    if not imgs:
        raise ValueError(f"images: no .png/.jpg/.jpeg images found in {images}")
    if labels is None:
        return [SegItem(s, p) for s, p in sorted(imgs.items())]
    labs = list_files(labels, LABEL_SUFFIXES_2D, "labels")
    if strict:
        from segcal.io.predictions import check_stems_match

        check_stems_match(imgs, labs, f"images/labels: file stems do not match ({images} vs {labels})",
                          "image(s) without a label", "label(s) without an image")
    items = [SegItem(s, p, labs[s]) for s, p in sorted(imgs.items()) if s in labs]
    if not items:
        raise ValueError(f"images/labels: no image in {images} has a label in {labels}")
    return items


#: normalisation of RGB images fed to a calibrator's image branch (LTS/IBTS ``use_image``):
#: ``(rgb / 255 - mean) / std`` per channel, ImageNet statistics, RGB order
CALIBRATOR_IMAGE_MEAN = (0.485, 0.456, 0.406)
CALIBRATOR_IMAGE_STD = (0.229, 0.224, 0.225)
CALIBRATOR_IMAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")


def image_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Stem -> path of the input images of a calibrator's image branch in ``folder``:
    ``.png``/``.jpg``/``.jpeg`` (RGB) or ``.npy`` arrays ``(C_img, *spatial)`` (e.g. volumes)."""
    found = list_files(folder, CALIBRATOR_IMAGE_SUFFIXES, "images")
    if not found:
        raise ValueError(f"images: no .png/.jpg/.jpeg/.npy images found in {folder}")
    return found


def normalize_image(rgb: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 RGB -> ``(3, H, W)`` float32 ``(rgb / 255 - mean) / std`` (ImageNet
    mean/std): the input of a calibrator's image branch (same for fit, apply and the bench)."""
    x = np.asarray(rgb, dtype=np.float32) / 255.0
    x = (x - np.asarray(CALIBRATOR_IMAGE_MEAN, np.float32)) / np.asarray(CALIBRATOR_IMAGE_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_image_tensor(path: str | os.PathLike) -> np.ndarray:
    """An input image for a calibrator's image branch: an RGB file through :func:`normalize_image`
    (``(3, H, W)``), or a ``.npy`` array ``(C_img, *spatial)`` used as it is (float32)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        arr = np.load(path, allow_pickle=False)
        if arr.ndim < 3:
            raise ValueError(f"image {path}: expected a (C_img, *spatial) array, got shape {arr.shape}")
        return np.asarray(arr, dtype=np.float32)
    return normalize_image(load_image(path))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image or ``.npy`` label map, reading the header only."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.ndim != 2:
            raise ValueError(f"{path}: expected a 2D label map, got shape {arr.shape}")
        return int(arr.shape[1]), int(arr.shape[0])
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as ``H x W x 3`` uint8 RGB (Pillow ``.convert("RGB")``).

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If Pillow cannot decode it (the message names the file).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


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
    ValueError
        If the map is not 2D, its size differs from ``expected_hw`` or (with ``num_classes``) it
        holds values outside ``[0, num_classes)`` other than ``ignore_index``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    try:
        lab = read_label(path)
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read label map {path}: {exc}") from exc
    if lab.ndim != 2:
        raise ValueError(f"label map {path}: expected a 2D (H, W) map, got shape {lab.shape}")
    if expected_hw is not None and tuple(lab.shape) != tuple(expected_hw):
        raise ValueError(
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
        raise ValueError(
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
        raise ValueError(
            f"label map {item.label_path} is {hl} x {wl} (H x W) but image {item.image_path} is "
            f"{hi} x {wi}"
        )
