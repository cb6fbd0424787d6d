"""Run a segmentation model and write a prediction folder: 2D image folders and 3D volumes.

The output is the format of :mod:`segcal.io.predictions`: one ``<stem>.npy`` logits file per
image or volume (float16 by default, written atomically) and a ``segcal.json`` manifest written
first marked incomplete and finalised last (:func:`segcal.io.predictions.begin_folder` /
``finish_folder``), so an interrupted run is never read back as a complete folder.

* :func:`predict_folder` -- a registered 2D model over an image folder: ``(C, H, W)`` logits;
  the manifest records ``input_type="logits"``, ``num_classes``, ``class_names``,
  ``ignore_index``, ``model``.
* :func:`predict_volumes` -- the reference 3D U-Net (``unet3d-hippocampus``) over NIfTI volumes:
  ``(3, X, Y, Z)`` logits in nibabel's (x, y, z) voxel order, voxel-aligned with the input NIfTI
  (and hence with its label map); the manifest records ``axis_order: "xyz (nibabel)"`` and, per
  case, the input's shape and affine (``cases``), so a reader can check a label volume against
  it. ``python -m segcal.pipeline.predict --images DIR --out DIR`` runs it without the CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from segcal.datasets import (
    SegItem,
    check_label_values,
    image_folder,
    is_alias,
    load_image,
    load_label,
    resolve_images,
)
from segcal.datasets.hippocampus import CLASS_NAMES as HIPPOCAMPUS_CLASSES
from segcal.datasets.hippocampus import DIVISOR, crop_back, normalise, pad_to_divisible
from segcal.errors import InputError
from segcal.io.nifti import load_nifti, nifti_stem
from segcal.io.predictions import begin_folder, finish_folder, read_folder_meta, write_prediction
from segcal.models import LoadedModel, create_model
from segcal.models.unet3d import MODEL_NAME as UNET3D_NAME
from segcal.models.unet3d import load_unet3d_hippocampus
from segcal.pipeline.distributed import current, on_each, on_main, shard

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
    model: str | LoadedModel,
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
    distributed: bool = False,
    exclusive: bool = False,
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
    exclusive
        Refuse an ``out`` that already holds prediction files of images this call does not
        predict (left by a run with another ``--limit``, ``--corruption`` or image folder, they
        would be read as one folder with this run's): ``segcal predict``. The default (the bench
        caches) adds the missing images to the folder.
    distributed
        Share the images among the ranks of the initialised process group (``torchrun``): rank 0
        checks and opens the folder (manifest marked incomplete) while the others wait, each rank
        predicts and writes its contiguous block of the sorted images, and rank 0 marks the folder
        complete once every rank has finished; a failure on any rank stops every rank and leaves
        the folder incomplete. Every rank returns the whole folder's stems.

    Returns
    -------
    PredictResult
        The output folder, stems written, and the wall time.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
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
            raise InputError("labels: pass label paths inside the SegItems when images is a list")
        if not items:
            raise InputError("images: the item list is empty")
    items = sorted(items, key=lambda it: it.stem)
    if limit is not None:
        items = items[:limit]

    # ---- model
    lm = model if isinstance(model, LoadedModel) else create_model(model, data_root, device)

    # ---- output folder: the manifest first, marked incomplete
    out_dir = Path(out)
    w = current()
    distributed = distributed and w.distributed

    def open_folder() -> None:
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"--out: {out_dir} exists and is not a folder; expected a folder to write into")
        old = read_folder_meta(out_dir) if out_dir.is_dir() else {}
        if old and not overwrite:
            if old.get("model") != lm.name or old.get("num_classes") != lm.num_classes:
                raise InputError(
                    f"--out: {out_dir} already holds predictions of model {old.get('model')!r} "
                    f"({old.get('num_classes')} classes); use a new folder or --overwrite"
                )
        begin_folder(
            out_dir,
            writes=[f"{it.stem}.npy" for it in items] if exclusive else None,
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

    if distributed:
        on_main(open_folder)
        items = shard(items, w.rank, w.size)
    else:
        open_folder()

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

    def run_items() -> list[str]:
        with tqdm(total=len(items), unit="img", desc=f"predict {lm.name}",
                  disable=not progress or not w.is_main) as bar:
            _predict_items(items, lm, transform, batch_size, flush, batch, bar)
        return res.stems

    if distributed:
        res.stems = [stem for part in on_each(run_items) for stem in part]  # rank order = sorted order
        res.seconds = time.perf_counter() - t0
        on_main(lambda: finish_folder(out_dir, n_images=len(res.stems)))
        return res
    run_items()
    res.seconds = time.perf_counter() - t0
    finish_folder(out_dir, n_images=len(res.stems))
    return res


def _predict_items(items: Sequence[SegItem], lm: LoadedModel, transform: Transform | None, batch_size: int,
                   flush: Callable[[], None], batch: list[tuple[str, np.ndarray]], bar: Any) -> None:
    """The reading loop of :func:`predict_folder`: consecutive images of one size in batches."""
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


# --------------------------------------------------------------------------- 3D volumes
AXIS_ORDER = "xyz (nibabel)"


def predict_logits(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Logits ``(C, X, Y, Z)`` float32 for one raw (x, y, z) volume: normalise, pad, run, crop back."""
    x = normalise(image)
    xp, pads = pad_to_divisible(x, DIVISOR)
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(xp))[None, None].float())[0]
    return np.ascontiguousarray(crop_back(out.numpy(), pads), dtype=np.float32)


def volume_stem(path: Path) -> str:
    """Case id of a NIfTI file: ``case.nii.gz`` -> ``case``; an nnU-Net channel suffix
    (``case_0000.nii.gz``) is dropped."""
    stem = nifti_stem(path.name)
    if stem is None:
        raise InputError(f"images: {path.name} is not a NIfTI file (.nii or .nii.gz)")
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        stem = stem[:-5]
    return stem


def list_volumes(images: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """A folder (its ``*.nii.gz``/``*.nii`` files, sorted) or an explicit list of NIfTI paths."""
    if isinstance(images, str | os.PathLike):
        p = Path(images)
        if p.is_dir():
            files = sorted(
                f for f in p.iterdir()
                if f.name.endswith((".nii.gz", ".nii")) and not f.name.startswith(".")
            )
            if not files:
                raise FileNotFoundError(f"images: no .nii/.nii.gz files in {p}")
            return files
        if not p.exists():
            raise FileNotFoundError(f"images: {p} does not exist")
        return [p]
    files = [Path(f) for f in images]
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"images: {f} does not exist")
    return files


def predict_volumes(
    model: torch.nn.Module | None,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model_name: str = UNET3D_NAME,
    dtype: type = np.float16,
    progress: bool = False,
    distributed: bool = False,
    exclusive: bool = False,
) -> list[Path]:
    """Predict every volume of ``images`` (a folder, one file, or a list) into ``out_dir``.

    Writes ``<case>.npy`` (``(3, X, Y, Z)`` logits, ``dtype``) and merges ``segcal.json`` (written
    first marked incomplete, finalised once every volume is written). Returns the written
    ``.npy`` paths (of every rank, in order). ``model=None`` loads the committed reference weights.

    ``distributed=True`` (under ``torchrun``, an initialised process group): rank 0 opens the
    folder while the others wait, every rank predicts and writes its contiguous block of the
    volumes (disjoint files, each bitwise the single-process file), the per-case records
    (shape, affine, source) are gathered in rank order and rank 0 finalises the manifest after
    every rank finished (:func:`segcal.pipeline.distributed.on_each` / ``on_main``); a failure on
    any rank stops every rank and leaves the manifest incomplete. A rank without volumes works.
    ``exclusive=True`` (``segcal predict``) refuses an ``out_dir`` that already holds predictions of
    other volumes (see :func:`predict_folder`).
    """
    if model is None:
        model = load_unet3d_hippocampus()
    model.eval()
    files = list_volumes(images)
    stems = [volume_stem(f) for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise InputError(f"images: several files map to the same case id: {sorted(dup)}")
    out = Path(out_dir)
    w = current()
    distributed = distributed and w.distributed
    cases: dict[str, Any] = {}

    def open_folder() -> None:
        cases.update(read_folder_meta(out).get("cases", {}) if out.is_dir() else {})
        meta = {"input_type": "logits", "axis_order": AXIS_ORDER, "model": model_name}
        begin_folder(out, **meta, writes=[f"{s}.npy" for s in stems] if exclusive else None,
                     num_classes=len(HIPPOCAMPUS_CLASSES),
                     class_names=list(HIPPOCAMPUS_CLASSES), cases=cases)

    pairs = list(zip(files, stems, strict=True))
    if distributed:
        on_main(open_folder)
        pairs = shard(pairs, w.rank, w.size)
    else:
        open_folder()

    def run_volumes() -> tuple[list[Path], dict[str, Any], int | None]:
        written: list[Path] = []
        mine: dict[str, Any] = {}
        num_classes: int | None = None
        for f, stem in tqdm(pairs, desc="predict", unit="vol", disable=not progress or not w.is_main):
            image, affine = load_nifti(f, what="image")
            logits = predict_logits(model, image)
            num_classes = int(logits.shape[0])
            written.append(write_prediction(out / f"{stem}.npy", logits, dtype=dtype))
            mine[stem] = {"shape": list(image.shape), "affine": np.round(affine, 6).tolist(),
                          "source": f.name}
        return written, mine, num_classes

    parts = on_each(run_volumes) if distributed else [run_volumes()]
    written = [p for part in parts for p in part[0]]
    for part in parts:  # rank order: the single-process order of the cases
        cases.update(part[1])
    seen = [part[2] for part in parts if part[2] is not None]
    num_classes = seen[-1] if seen else len(HIPPOCAMPUS_CLASSES)

    def finish() -> None:
        finish_folder(out, num_classes=num_classes, class_names=list(HIPPOCAMPUS_CLASSES[:num_classes]),
                      cases=cases)

    if distributed:
        on_main(finish)
    else:
        finish()
    return written


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file (pins the committed model down)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def logits_fingerprint(
    logits: np.ndarray,
    voxels: Sequence[tuple[int, int, int]] = ((0, 0, 0), (10, 20, 10), (17, 25, 17)),
) -> dict:
    """Summary statistics of ``(C, X, Y, Z)`` logits that pin a model's output down.

    ``sum`` and per-class ``mean`` (float64), logits at a few fixed voxels, and the histogram of
    the argmax over classes.
    """
    x = np.asarray(logits, dtype=np.float64)
    c = x.shape[0]
    return {
        "shape": list(x.shape),
        "sum": float(x.sum()),
        "class_mean": [float(v) for v in x.reshape(c, -1).mean(1)],
        "voxels": {",".join(map(str, v)): [float(t) for t in x[(slice(None), *v)]] for v in voxels},
        "argmax_hist": [int(n) for n in np.bincount(x.argmax(0).ravel(), minlength=c)],
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m segcal.pipeline.predict --images DIR --out DIR``: the 3D U-Net without the CLI."""
    ap = argparse.ArgumentParser(description="3D U-Net (MSD hippocampus) -> segcal prediction folder")
    ap.add_argument("--images", required=True, help="folder of .nii/.nii.gz volumes, or one file")
    ap.add_argument("--out", required=True, help="output prediction folder")
    ap.add_argument("--weights", default=None, help="weights file (default: the committed one)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    written = predict_volumes(
        load_unet3d_hippocampus(args.weights), args.images, args.out, progress=not args.no_progress
    )
    print(f"wrote {len(written)} prediction(s) to {args.out}")
    return 0


__all__ = [
    "AXIS_ORDER",
    "PredictResult",
    "Transform",
    "is_alias",
    "list_volumes",
    "logits_fingerprint",
    "predict_folder",
    "predict_logits",
    "predict_volumes",
    "volume_stem",
    "weights_sha256",
]


if __name__ == "__main__":
    sys.exit(main())
