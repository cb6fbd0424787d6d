"""What ``fit`` is given, before anything is read: the batch source and its upper bound of bytes.

:func:`normalise_source` turns the ``data`` argument of ``fit`` (an array, an iterable of batches,
a :class:`~segcal.io.PredictionFolder`, a folder path or a
:class:`~segcal.calibrators.folder_data.FolderBatches`) into a :class:`Source`: a factory of an
iterator of raw batches (unpacked by :func:`unpack_batch`), whether it can be read again, and --
where the source can tell it without reading its values -- the ``(shape, dtype)`` of every batch
it yields. :func:`nbytes_bound` turns those shapes into an upper bound of the bytes that
:func:`segcal.calibrators.data.prepare_data` would keep in memory for them, so that a source far
larger than ``memory_budget`` is streamed from its first batch instead of being held up to the
budget while it is counted (the one place the bound is computed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segcal.calibrators.folder_data import FolderBatches
from segcal.io.predictions import PredictionFolder

__all__ = ["Source", "is_array", "nbytes_bound", "normalise_source", "unpack_batch"]

#: a batch's ``(shape, dtype)``: ``(N, C, *spatial)`` or ``(M, C)`` and a NumPy or torch float dtype
Shape = tuple[tuple[int, ...], Any]


@dataclass
class Source:
    """The batches ``fit`` reads.

    Attributes
    ----------
    factory
        Returns a fresh iterator of raw batches (tuples or mappings, see :func:`unpack_batch`).
    reiterable
        Whether ``factory`` may be called again (streaming needs it).
    shapes
        ``(shape, dtype)`` of every batch the source yields, known without reading the values
        (array shapes, ``.npy`` headers), or None when the source cannot tell (an iterable of
        batches, ``.npz`` files, images beside the scores).
    """

    factory: Callable[[], Iterator[Any]]
    reiterable: bool
    shapes: list[Shape] | None = None


def is_array(x: Any) -> bool:
    """Whether ``x`` is an in-memory tensor or NumPy array."""
    return isinstance(x, torch.Tensor | np.ndarray)


def _row_bytes(num_classes: int, dtype: Any) -> int:
    """Bytes of one gathered row: the scores as stored (16-bit floats kept, else float32) and an
    int64 label (what :class:`segcal.calibrators.data.Batch` holds)."""
    half = dtype in (torch.float16, torch.bfloat16) if isinstance(dtype, torch.dtype) else np.dtype(dtype).itemsize == 2
    return num_classes * (2 if half else 4) + 8


def nbytes_bound(shapes: Sequence[Shape], *, subsample: float | None = None) -> int:
    """Upper bound of the bytes the gathered batches of ``shapes`` hold in memory.

    Every pixel is counted as valid (the number of valid pixels needs the labels; it can only
    lower the true figure), at :func:`_row_bytes` each; with ``subsample`` a batch of ``P`` pixels
    keeps at most ``max(1, round(P * subsample))`` rows (``round`` is monotone, so the bound holds
    for every count of valid pixels). Whole images (spatial calibrators) hold the same bytes per
    pixel (their mask is not counted, as in :attr:`segcal.calibrators.data.Batch.nbytes`) and are
    never subsampled: pass ``subsample=None`` for them.

    Parameters
    ----------
    shapes
        ``(shape, dtype)`` of each batch: ``(N, C, *spatial)`` or ``(M, C)``.
    subsample
        The fraction of pixels kept, or None.

    Returns
    -------
    int
        The bound, in bytes.
    """
    total = 0
    for shape, dtype in shapes:
        pixels = math.prod(shape) // max(int(shape[1]), 1)
        if subsample is not None and pixels:
            pixels = min(pixels, max(1, round(pixels * float(subsample))))
        total += pixels * _row_bytes(int(shape[1]), dtype)
    return total


def normalise_source(data: Any, labels: Any, mask: Any, what: str, images: Any = None) -> Source:
    """The :class:`Source` of ``fit``'s ``data`` (with its ``labels``, ``mask`` and ``images``).

    Raises
    ------
    ValueError
        Labels missing for in-memory data, labels or a mask beside an iterable of batches, images
        of the wrong kind for the source.
    TypeError
        ``data`` of an unsupported type.
    """
    img_name = "images" if what == "logits" else f"{what} images"
    if isinstance(data, str | os.PathLike):
        if labels is None:
            raise ValueError(f"{what}: fitting from a prediction folder needs the label folder")
        data = PredictionFolder(data, labels)
        labels = None
    if isinstance(data, PredictionFolder):
        if images is not None and not isinstance(images, str | os.PathLike):
            raise ValueError(f"{img_name}: with a prediction folder, pass the image folder (a path)")
        data = FolderBatches(data, images=images)
        images = None
    if is_array(data):
        if labels is None:
            raise ValueError(f"labels: required to fit (got None for {what})")
        if images is not None and not is_array(images):
            raise ValueError(f"{img_name}: expected an (N, C_img, *spatial) tensor/array with "
                             f"in-memory {what}, got {type(images).__name__}")
        shapes = [(tuple(int(s) for s in data.shape), data.dtype)] if images is None and data.ndim >= 2 else None
        return Source(lambda: iter([(data, labels, mask, None, images)]), True, shapes)
    if labels is not None or mask is not None:
        raise ValueError(
            f"labels/mask: pass them inside the batches when {what} is an iterable of batches"
        )
    if images is not None:
        raise ValueError(
            f"{img_name}: pass each image inside its batch (a mapping with an 'image' entry) when "
            f"{what} is an iterable of batches, or an image folder to FolderBatches"
        )
    if isinstance(data, FolderBatches):
        return Source(lambda: iter(data), True, data.batch_shapes())
    if callable(data):
        return Source(lambda: iter(data()), True)
    if isinstance(data, list | tuple):
        return Source(lambda: iter(data), True)
    if isinstance(data, Iterable):
        return Source(lambda: iter(data), False)
    raise TypeError(
        f"{what}: expected a tensor/array, an iterable of (scores, labels[, mask]) batches, "
        f"a PredictionFolder or a folder path, got {type(data).__name__}"
    )


def unpack_batch(item: Any, what: str) -> tuple[Any, Any, Any, str | None, Any, str | None]:
    """``(scores, labels, mask, input_type, image, source file)`` of one batch.

    A batch is ``(scores, labels)``, ``(scores, labels, mask)`` (internally also
    ``(..., input_type[, image[, source file]])``) or a mapping with keys ``scores`` (or
    ``logits``), ``labels`` and optionally ``mask``, ``image``, ``input_type``.

    Raises
    ------
    TypeError
        Any other kind of batch.
    """
    if isinstance(item, Mapping):
        unknown = set(item) - {"scores", "logits", "labels", "mask", "image", "input_type"}
        if unknown or ("scores" in item) == ("logits" in item) or "labels" not in item:
            raise TypeError(
                f"{what}: a batch mapping needs 'scores' (or 'logits') and 'labels', optionally "
                f"'mask', 'image', 'input_type'; got keys {sorted(item)}"
            )
        scores = item["scores"] if "scores" in item else item["logits"]
        return scores, item["labels"], item.get("mask"), item.get("input_type"), item.get("image"), None
    if not isinstance(item, list | tuple) or len(item) not in (2, 3, 4, 5, 6):
        raise TypeError(f"{what}: each batch must be (scores, labels), (scores, labels, mask) or a "
                        "mapping {'scores', 'labels', 'mask', 'image'}")
    scores, labels = item[0], item[1]
    mask = item[2] if len(item) > 2 else None
    itype = item[3] if len(item) > 3 else None
    image = item[4] if len(item) > 4 else None
    source = item[5] if len(item) > 5 else None
    return scores, labels, mask, itype, image, source
