"""The prediction-folder format shared by ``segcal eval``, ``fit``, ``apply`` and ``predict``.

A *prediction folder* holds one file per image or volume; the file stem is the image id.

* ``<stem>.npy`` -- a ``(C, *spatial)`` array of logits (float16 is the recommended storage
  dtype; any float dtype is read). Read memory-mapped, so a volume is never copied whole.
* ``<stem>.npz`` -- key ``logits`` or ``probabilities`` (the latter is what nnU-Net v2 writes with
  ``--save_probabilities``; a ``<stem>.pkl`` properties file next to it is left alone here).
* ``segcal.json`` (optional) -- folder metadata: ``{"format": "segcal-predictions", "version": 1,
  "input_type": "logits" | "probs", "num_classes": C, ...}``. ``write_prediction`` keeps it.

A *label folder* holds ``<stem>.png`` (8/16-bit grey or palette indices), ``<stem>.npy``,
``<stem>.nii.gz`` or ``<stem>.nii`` integer label maps with the predictions' spatial shape.

Every writer is atomic: data go to a temporary file in the destination folder that is renamed
over the final name only once complete, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcal.io.files import atomic_write

PREDICTION_SUFFIXES = (".npy", ".npz")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".png", ".npy")
META_NAME = "segcal.json"
FORMAT_NAME = "segcal-predictions"
FORMAT_VERSION = 1


def _split_suffix(name: str, suffixes: tuple[str, ...], ignore_case: bool = False) -> tuple[str, str] | None:
    test = name.lower() if ignore_case else name
    for suf in suffixes:
        if test.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)], name[-len(suf):]
    return None


@dataclass(frozen=True)
class PredictionItem:
    """One entry of a prediction folder (paths only; nothing is read until asked)."""

    stem: str
    path: Path
    label_path: Path | None = None


def list_stems(
    folder: str | os.PathLike, suffixes: tuple[str, ...], what: str, *, ignore_case: bool = False
) -> dict[str, Path]:
    """Map stem -> path for the files of ``folder`` ending in one of ``suffixes`` (sorted).

    The one folder-listing routine of segcal: multi-part suffixes (``.nii.gz``) are handled,
    hidden files and sub-folders skipped; ``ignore_case`` matches ``.PNG`` as ``.png``.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        If ``folder`` is missing or not a folder (the message starts with ``what``).
    ValueError
        If two files share a stem.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what}: {folder} is not a folder")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        split = _split_suffix(p.name, suffixes, ignore_case)
        if split is None:
            continue
        stem, _ = split
        if stem in found:
            raise ValueError(f"{what}: two files share the stem {stem!r} in {folder}: {found[stem].name}, {p.name}")
        found[stem] = p
    return found


_list_stems = list_stems


def find_label_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Map stem -> label file for every label map in ``folder``."""
    return _list_stems(Path(folder), LABEL_SUFFIXES, "labels")


def read_folder_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """Return the folder's ``segcal.json`` metadata, or ``{}`` when absent."""
    p = Path(folder) / META_NAME
    if not p.exists():
        return {}
    meta = json.loads(p.read_text())
    if meta.get("format") not in (None, FORMAT_NAME):
        raise ValueError(f"{p}: not a segcal prediction folder (format={meta.get('format')!r})")
    return meta


def write_folder_meta(folder: str | os.PathLike, **meta: Any) -> None:
    """Write (merge) the folder's ``segcal.json`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cur = read_folder_meta(folder)
    cur.update({"format": FORMAT_NAME, "version": FORMAT_VERSION})
    cur.update(meta)
    with atomic_write(folder / META_NAME, "w") as fh:
        json.dump(cur, fh, indent=2, sort_keys=True)


class PredictionFolder:
    """A folder of per-image predictions, optionally paired with a label folder.

    Parameters
    ----------
    pred_dir
        Folder of ``.npy`` / ``.npz`` predictions.
    label_dir
        Optional folder of label maps with matching stems. Stems present on one side only raise a
        ``ValueError`` that lists them (``strict=True``, the default).
    input_type
        ``"logits"`` or ``"probs"``; ``None`` takes the folder metadata, then the ``.npz`` key,
        and defaults to logits.
    """

    def __init__(
        self,
        pred_dir: str | os.PathLike,
        label_dir: str | os.PathLike | None = None,
        *,
        input_type: str | None = None,
        strict: bool = True,
    ) -> None:
        self.pred_dir = Path(pred_dir)
        self.label_dir = Path(label_dir) if label_dir is not None else None
        self.meta = read_folder_meta(self.pred_dir)
        self.items = pair_folders(self.pred_dir, self.label_dir, strict=strict)
        if not self.items:
            raise ValueError(f"pred: no .npy/.npz predictions found in {self.pred_dir}")
        self._input_type = input_type

    def __len__(self) -> int:
        return len(self.items)

    @property
    def stems(self) -> list[str]:
        return [it.stem for it in self.items]

    def input_type_of(self, key: str | None) -> str:
        if self._input_type is not None:
            return self._input_type
        if "input_type" in self.meta:
            return str(self.meta["input_type"])
        if key == "probabilities":
            return "probs"
        return "logits"

    def read(self, item: PredictionItem) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Read one item: ``(scores (C, *spatial), labels (*spatial) or None, input_type)``.

        An nnU-Net v2 case (``.npz`` with a ``.pkl`` properties file beside it) is read through
        :mod:`segcal.io.nnunet`, which lines its ``(C, z, y, x)`` probabilities up with the
        nibabel-ordered labels from the properties (never by guessing from shapes).
        """
        if item.path.suffix == ".npz":
            from segcal.io.nnunet import is_nnunet_prediction, read_nnunet_item

            if is_nnunet_prediction(item.path):
                nc = self.meta.get("num_classes")
                probs, labels = read_nnunet_item(
                    item.path, item.label_path, num_classes=None if nc is None else int(nc)
                )
                return probs, labels, self._input_type or "probs"
        scores, key = read_prediction(item.path)
        labels = read_label(item.label_path) if item.label_path is not None else None
        if labels is not None and tuple(labels.shape) != tuple(scores.shape[1:]):
            raise ValueError(
                f"labels: {item.label_path.name} has shape {tuple(labels.shape)} but prediction "
                f"{item.path.name} has spatial shape {tuple(scores.shape[1:])}"
            )
        return scores, labels, self.input_type_of(key)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, str]]:
        for it in self.items:
            scores, labels, itype = self.read(it)
            yield it.stem, scores, labels, itype


def check_stems_match(
    left: dict[str, Path] | set[str],
    right: dict[str, Path] | set[str],
    header: str,
    left_only: str,
    right_only: str,
) -> None:
    """Raise a ``ValueError`` listing the stems present on one side only.

    The message is ``"<header>; N <left_only>: a, b, ...; M <right_only>: ..."`` (10 stems shown
    per side). The one stem-matching check of segcal (prediction/label folders, image/label
    folders, NIfTI volume pairs).
    """
    only_l = sorted(set(left) - set(right))
    only_r = sorted(set(right) - set(left))
    if not (only_l or only_r):
        return

    def _fmt(xs: list[str]) -> str:
        return ", ".join(xs[:10]) + (f" ... (+{len(xs) - 10} more)" if len(xs) > 10 else "")

    msg = [header]
    if only_l:
        msg.append(f"{len(only_l)} {left_only}: {_fmt(only_l)}")
    if only_r:
        msg.append(f"{len(only_r)} {right_only}: {_fmt(only_r)}")
    raise ValueError("; ".join(msg))


def pair_folders(
    pred_dir: str | os.PathLike, label_dir: str | os.PathLike | None = None, *, strict: bool = True
) -> list[PredictionItem]:
    """Pair predictions with label maps by stem, sorted by stem.

    Raises
    ------
    ValueError
        When ``strict`` and some stems are present on one side only; the message lists them.
    """
    preds = _list_stems(Path(pred_dir), PREDICTION_SUFFIXES, "pred")
    if label_dir is None:
        return [PredictionItem(s, p) for s, p in sorted(preds.items())]
    labels = find_label_files(label_dir)
    if strict:
        check_stems_match(preds, labels, "pred/labels: file stems do not match",
                          "prediction(s) without a label", "label(s) without a prediction")
    return [PredictionItem(s, p, labels[s]) for s, p in sorted(preds.items()) if s in labels]


def read_prediction(path: str | os.PathLike) -> tuple[np.ndarray, str | None]:
    """Read a ``.npy`` (memory-mapped) or ``.npz`` prediction; returns ``(array, npz_key)``."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        key = None
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = [k for k in ("logits", "probabilities") if k in z.files]
            if not keys:
                raise ValueError(f"pred: {path.name} has no 'logits' or 'probabilities' array (keys: {z.files})")
            key = keys[0]
            arr = z[key]
    else:
        raise ValueError(f"pred: unsupported prediction file {path.name}; expected .npy or .npz")
    if arr.dtype.kind != "f":
        raise TypeError(f"pred: {path.name} holds {arr.dtype}, expected floating logits or probabilities")
    if arr.ndim < 2:
        raise ValueError(f"pred: {path.name} has shape {arr.shape}, expected (C, *spatial)")
    return arr, key


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label map (``.png``, ``.npy``, ``.nii``/``.nii.gz``) as an integer array.

    Float label files holding exact integers (some NIfTI label maps) are cast; others raise.
    """
    path = Path(path)
    name = path.name
    if name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(f"labels: {name} is a {im.mode} image; expected a single-channel label map")
            arr = np.asarray(im)
    elif name.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    elif name.endswith((".nii.gz", ".nii")):
        try:
            import nibabel as nib
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise ImportError("reading NIfTI labels needs nibabel: pip install 'segcal[nifti]'") from exc
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    else:
        raise ValueError(f"labels: unsupported label file {name}; expected .png, .npy, .nii or .nii.gz")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise TypeError(f"labels: {name} holds non-integer values ({arr.dtype})")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise TypeError(f"labels: {name} has dtype {arr.dtype}, expected integers")
    return arr


def write_prediction(
    path: str | os.PathLike, array: Any, *, key: str | None = None, dtype: Any = np.float16
) -> Path:
    """Write one ``(C, *spatial)`` prediction atomically.

    ``.npy`` stores the raw array; ``.npz`` stores it compressed under ``key`` (``logits`` by default,
    ``probabilities`` for nnU-Net-style files). ``dtype=None`` keeps the array's dtype.
    """
    path = Path(path)
    arr = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if path.suffix == ".npy":
        with atomic_write(path) as fh:
            np.save(fh, arr, allow_pickle=False)
    elif path.suffix == ".npz":
        with atomic_write(path) as fh:
            np.savez_compressed(fh, **{key or "logits": arr})
    else:
        raise ValueError(f"write_prediction: unsupported suffix {path.suffix!r}; use .npy or .npz")
    return path
