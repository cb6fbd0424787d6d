"""Image files (``.png``, ``.jpg``, ``.jpeg``): the one place segcal decodes them, with Pillow.

* :func:`load_image` -- an input image as ``H x W x 3`` uint8 RGB;
* :func:`read_png_label` -- a single-channel PNG label map (8/16-bit grey, palette indices);
* :func:`image_size` -- ``(width, height)`` from the header only;
* :func:`load_image_tensor` / :func:`normalize_image` -- the input of a calibrator's image
  branch (LTS/IBTS ``use_image``), the same for fit, apply and the bench.

Every decoding failure (a zero-byte or truncated file, random bytes) is an
:class:`~segcal.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segcal.errors import InputError
from segcal.io.files import list_stems, load_npy

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: normalisation of RGB images fed to a calibrator's image branch (LTS/IBTS ``use_image``):
#: ``(rgb / 255 - mean) / std`` per channel, ImageNet statistics, RGB order
CALIBRATOR_IMAGE_MEAN = (0.485, 0.456, 0.406)
CALIBRATOR_IMAGE_STD = (0.229, 0.224, 0.225)
CALIBRATOR_IMAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")

#: Pillow modes of a single-channel label map
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")

#: what Pillow raises on files it cannot decode (zero-byte, truncated, random bytes)
DECODE_ERRORS = (
    UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
    Image.DecompressionBombError, IndexError, TypeError,
)


def list_files(folder: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """Stem -> path for the files of ``folder`` whose (case-insensitive) suffix is in ``suffixes``;
    see :func:`segcal.io.files.list_stems` (errors for a missing folder or a shared stem)."""
    return list_stems(folder, tuple(x.lower() for x in suffixes), what, ignore_case=True)


def _decode(path: Path, what: str, mode: str | None) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"cannot read {what} {path}: the file is empty (0 bytes); expected an image")
    check_png_end(path, size, what)
    try:
        with Image.open(path) as im:
            if mode is None:
                if im.mode not in LABEL_MODES:
                    raise InputError(
                        f"labels: {path.name} is a {im.mode} image; expected a single-channel label map"
                    )
                return np.array(im)
            return np.asarray(im.convert(mode), dtype=np.uint8).copy()
    except InputError:
        raise
    except DECODE_ERRORS as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from exc


def check_png_end(path: Path, size: int, what: str) -> None:
    """Refuse a PNG that stops before its ``IEND`` chunk (Pillow decodes such files silently)."""
    with open(path, "rb") as fh:
        head = fh.read(len(PNG_SIGNATURE))
        if head != PNG_SIGNATURE:
            return
        fh.seek(max(0, size - 64))
        tail = fh.read()
    if b"IEND" not in tail:
        raise InputError(
            f"cannot read {what} {path}: the PNG is truncated ({size} bytes, no IEND chunk at the "
            "end); expected a complete PNG file"
        )


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as ``H x W x 3`` uint8 RGB (Pillow ``.convert("RGB")``).

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    InputError
        If Pillow cannot decode it (the message names the file).
    """
    return _decode(Path(path), "image", "RGB")


def read_png_label(path: str | os.PathLike) -> np.ndarray:
    """A single-channel PNG label map as an array (uint8, uint16 or int32 as stored)."""
    return _decode(Path(path), "label map", None)


#: the dtype a PNG label map of each Pillow mode is stored in (a 1-bit map is read as uint8 0 / 1)
PNG_LABEL_DTYPES = {"1": np.dtype(np.uint8), "L": np.dtype(np.uint8), "P": np.dtype(np.uint8),
                    "I": np.dtype(np.int32), "I;16": np.dtype(np.uint16), "I;16B": np.dtype(np.uint16),
                    "I;16L": np.dtype(np.uint16)}


def png_label_dtype(path: str | os.PathLike) -> np.dtype:
    """The dtype of a PNG label map's values, from its header (no pixel is decoded).

    Raises
    ------
    InputError
        If Pillow cannot read the header or the image is not a single-channel label map.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
    except DECODE_ERRORS as exc:
        raise InputError(f"cannot read label map {path}: {exc}") from exc
    if mode not in PNG_LABEL_DTYPES:
        raise InputError(f"labels: {path.name} is a {mode} image; expected a single-channel label map")
    return PNG_LABEL_DTYPES[mode]


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image or ``.npy`` label map, reading the header only."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = load_npy(path, what="label map", mmap=True)
        if arr.ndim != 2:
            raise InputError(f"{path}: expected a 2D label map, got shape {arr.shape}")
        return int(arr.shape[1]), int(arr.shape[0])
    try:
        with Image.open(path) as im:
            return im.size
    except DECODE_ERRORS as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def image_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Stem -> path of the input images of a calibrator's image branch in ``folder``:
    ``.png``/``.jpg``/``.jpeg`` (RGB) or ``.npy`` arrays ``(C_img, *spatial)`` (e.g. volumes)."""
    found = list_files(folder, CALIBRATOR_IMAGE_SUFFIXES, "images")
    if not found:
        raise InputError(f"images: no .png/.jpg/.jpeg/.npy images found in {folder}")
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
        arr = load_npy(path, what="image")
        if arr.ndim < 3:
            raise InputError(f"image {path}: expected a (C_img, *spatial) array, got shape {arr.shape}")
        return np.asarray(arr, dtype=np.float32)
    return normalize_image(load_image(path))


__all__ = [
    "CALIBRATOR_IMAGE_MEAN",
    "CALIBRATOR_IMAGE_STD",
    "CALIBRATOR_IMAGE_SUFFIXES",
    "IMAGE_SUFFIXES",
    "LABEL_MODES",
    "image_files",
    "image_size",
    "list_files",
    "load_image",
    "load_image_tensor",
    "normalize_image",
    "read_png_label",
]
