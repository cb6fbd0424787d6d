"""Run a registered segmentation model over an image folder and write a prediction folder.

The output is the format of :mod:`segcal.io.predictions`: one ``<stem>.npy`` ``(C, H, W)`` logits
file per image (float16 by default, written atomically) and a ``segcal.json`` describing the
folder (``input_type="logits"``, ``num_classes``, ``class_names``, ``ignore_index``, ``model``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcal.datasets import (
    SegItem,
    check_label_values,
    image_folder,
    is_alias,
    load_image,
    load_label,
    resolve_images,
)
from segcal.io.predictions import read_folder_meta, write_folder_meta, write_prediction

#: ``transform(image_uint8 (H, W, 3), stem) -> image_uint8 (H, W, 3)``, applied before preprocessing
Transform = Callable[[np.ndarray, str], np.ndarray]

_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class PredictResult:
    """What :func:`predict_folder` wrote."""

    out_dir: Path
    model: str
    num_classes: int
    stems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return len(self.stems) / self.seconds if self.seconds > 0 else float("nan")


def _check_transformed(img: np.ndarray, stem: str) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(
            f"transform: for {stem!r} it returned {arr.dtype} {arr.shape}; expected an "
            "H x W x 3 uint8 RGB image"
        )
    return arr


def predict_folder(
    model,
    images: str | os.PathLike | Sequence[SegItem],
    out: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    batch_size: int = 4,
    device: str | None = "auto",
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    transform: Transform | None = None,
    progress: bool = True,
    dtype: str = "float16",
    overwrite: bool = False,
) -> PredictResult:
    """Predict logits for every image of ``images`` into the prediction folder ``out``.

    Parameters
    ----------
    model
        A registered model name (see :func:`segcal.models.available_models`) or a
        :class:`segcal.models.LoadedModel`.
    images
        An image folder, a dataset alias such as ``"camvid:test"`` (resolved under the data
        root; its label folder is then used for checks unless ``labels`` is given), or a list of
        :class:`segcal.datasets.SegItem`.
    labels
        Optional label folder (stems must match the images). Labels are only *checked* here:
        same size as the image, values within the model's classes or its ignore label.
    batch_size
        Images per forward pass (consecutive images of the same size are batched).
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``; ignored for a ``LoadedModel``.
    limit
        Only the first ``limit`` images (sorted by stem).
    transform
        Optional per-image hook ``transform(image_uint8, stem) -> image_uint8`` applied after
        loading and before the model's preprocessing (e.g. a covariate-shift corruption).
    dtype
        Storage dtype of the logits: ``"float16"`` (default) or ``"float32"``.
    overwrite
        Allow writing into a folder whose ``segcal.json`` names a different model / class count.

    Returns
    -------
    PredictResult
        The output folder, stems written, and the wall time.
    """
    from tqdm.auto import tqdm

    from segcal.models import LoadedModel, create_model

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if transform is not None and not callable(transform):
        raise TypeError("transform must be a callable transform(image_uint8, stem) -> image_uint8")

    # ---- inputs
    source = "items"
    if isinstance(images, (str, os.PathLike)):
        source = os.fspath(images)
        img_dir, alias_labels = resolve_images(images, data_root)
        if labels is None and alias_labels is not None:
            labels = alias_labels
        items = image_folder(img_dir, labels, strict=True)
    else:
        items = list(images)
        if labels is not None:
            raise ValueError("labels: pass label paths inside the SegItems when images is a list")
        if not items:
            raise ValueError("images: the item list is empty")
    items = sorted(items, key=lambda it: it.stem)
    if limit is not None:
        items = items[:limit]

    # ---- model
    lm = model if isinstance(model, LoadedModel) else create_model(model, data_root, device)

    # ---- output folder
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out: {out_dir} exists and is not a folder")
    old = read_folder_meta(out_dir) if out_dir.is_dir() else {}
    if old and not overwrite:
        if old.get("model") != lm.name or old.get("num_classes") != lm.num_classes:
            raise ValueError(
                f"--out: {out_dir} already holds predictions of model {old.get('model')!r} "
                f"({old.get('num_classes')} classes); use a new folder or --overwrite"
            )
    write_folder_meta(
        out_dir,
        input_type="logits",
        num_classes=lm.num_classes,
        class_names=list(lm.class_names),
        ignore_index=lm.ignore_index,
        model=lm.name,
        model_description=lm.description,
        images=source if source != "items" else None,
        labels=os.fspath(labels) if labels is not None else None,
        transform=None if transform is None else getattr(transform, "__name__", repr(transform)),
        dtype=dtype,
    )

    # ---- run
    res = PredictResult(out_dir=out_dir, model=lm.name, num_classes=lm.num_classes)
    np_dtype = _DTYPES[dtype]
    t0 = time.perf_counter()
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        logits = lm.logits([im for _, im in batch]).float().cpu().numpy()
        for (stem, im), lg in zip(batch, logits, strict=True):
            if lg.shape[1:] != im.shape[:2]:
                raise ValueError(
                    f"model {lm.name!r}: output for {stem!r} has spatial shape {lg.shape[1:]} but "
                    f"the image is {im.shape[:2]}"
                )
            arr = lg.astype(np_dtype)
            if not np.isfinite(arr).all():
                hint = " (float16 overflow: use dtype='float32')" if np.isfinite(lg).all() else ""
                raise ValueError(f"model {lm.name!r}: non-finite logits for {stem!r}{hint}")
            write_prediction(out_dir / f"{stem}.npy", arr, dtype=None)
            res.stems.append(stem)
        batch.clear()

    with tqdm(total=len(items), unit="img", desc=f"predict {lm.name}", disable=not progress) as bar:
        for it in items:
            img = load_image(it.image_path)
            if transform is not None:
                img = _check_transformed(transform(img, it.stem), it.stem)
            if it.label_path is not None:
                lab = load_label(it.label_path, expected_hw=img.shape[:2])
                check_label_values(lab, lm.num_classes, lm.ignore_index, str(it.label_path))
            if batch and batch[0][1].shape != img.shape:
                n = len(batch)
                flush()
                bar.update(n)
            batch.append((it.stem, img))
            if len(batch) >= batch_size:
                n = len(batch)
                flush()
                bar.update(n)
        n = len(batch)
        flush()
        bar.update(n)
    res.seconds = time.perf_counter() - t0
    write_folder_meta(out_dir, n_images=len(res.stems))
    return res


__all__ = ["PredictResult", "Transform", "is_alias", "predict_folder"]
