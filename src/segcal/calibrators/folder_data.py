"""Fit data read from a prediction folder: :class:`FolderBatches` (re-exported by
:mod:`segcal.calibrators.data`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from segcal.errors import InputError
from segcal.io.arrays import prediction_header
from segcal.io.files import check_stems_match, read_ahead
from segcal.io.images import image_files, load_image_tensor
from segcal.io.predictions import PredictionFolder

__all__ = ["FolderBatches"]


class FolderBatches:
    """Re-iterable ``(scores[None], labels[None], None, input_type[, image[None]])`` batches from
    (a subset of) a folder.

    Parameters
    ----------
    folder
        A :class:`~segcal.io.PredictionFolder` with labels.
    stems
        The image ids to use (default: all), in this order.
    images
        Optional folder of input images (``.png``/``.jpg``/``.jpeg``, or ``.npy`` arrays
        ``(C_img, *spatial)`` used as they are) whose stems match the predictions, for calibrators
        with an image branch; RGB files are read by :func:`segcal.io.images.load_image_tensor`.
        Every used stem needs an image (a ``ValueError`` lists the missing ones).
    """

    def __init__(self, folder: PredictionFolder, stems: Iterable[str] | None = None,
                 images: str | os.PathLike | None = None) -> None:
        self.folder = folder
        by_stem = {it.stem: it for it in folder.items}
        if stems is None:
            self.items = list(folder.items)
        else:
            missing = [s for s in stems if s not in by_stem]
            if missing:
                raise ValueError(f"stems not in {folder.pred_dir}: {missing[:5]}")
            self.items = [by_stem[s] for s in stems]
        if any(it.label_path is None for it in self.items):
            raise ValueError("labels: fitting from a prediction folder needs a label folder")
        self.image_dir = None if images is None else os.fspath(images)
        self.image_paths: dict[str, Any] = {}
        if images is not None:
            found = image_files(images)
            want = {it.stem for it in self.items}
            # extra images are fine (e.g. a whole dataset split for a subset of predictions)
            check_stems_match(want, set(found) & want,
                              f"images: file stems do not match ({folder.pred_dir} vs {images})",
                              "prediction(s) without an image", "")
            self.image_paths = {s: found[s] for s in want}

    def __len__(self) -> int:
        return len(self.items)

    def batch_shapes(self) -> list[tuple[tuple[int, ...], np.dtype]] | None:
        """``(shape, dtype)`` of every batch :meth:`__iter__` yields (``(1, C, *spatial)``), from the
        ``.npy`` headers (:func:`segcal.io.arrays.prediction_header`, the readers' header read; no
        value read), for :func:`segcal.calibrators.sources.nbytes_bound`.

        None for a folder with ``.npz`` predictions (their bound is not taken yet), when input images travel with the scores (their
        bytes are not bounded here), or when a header cannot be read: the reading pass then names
        the file (on every rank of a distributed fit, through its agreement), not this one.
        """
        if self.image_dir is not None or any(it.path.suffix != ".npy" for it in self.items):
            return None
        out = []
        for it in self.items:
            try:
                shape, dtype = prediction_header(it.path)
            except (InputError, OSError):
                return None
            out.append(((1, *shape), dtype))
        return out

    def read_image(self, stem: str) -> np.ndarray:
        """The image of ``stem`` as ``(C_img, *spatial)`` float32 (requires ``images``)."""
        return load_image_tensor(self.image_paths[stem])

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """``(scores[None], labels[None], None, input_type, image[None] or None, file)``: the
        prediction file's path last, so that a refused batch is named by its file.

        Before a file is handed over, the kernel is asked to read the next prediction file ahead
        (:func:`segcal.io.files.read_ahead`), so that a streamed pass reads from disk while it computes."""
        for i, it in enumerate(self.items):
            if i + 1 < len(self.items):
                read_ahead(self.items[i + 1].path)
            scores, labels, itype = self.folder.read(it)
            image = None if self.image_dir is None else self.read_image(it.stem)[None]
            yield scores[None], labels[None], None, itype, image, str(it.path)
            del scores, labels, image  # the file (a memory map) is released before the next read
