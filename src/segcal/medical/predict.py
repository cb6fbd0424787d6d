"""Run the reference 3D U-Net on NIfTI volumes and write a segcal prediction folder.

Each ``<case>.npy`` holds float16 logits of shape ``(3, X, Y, Z)`` in nibabel's (x, y, z) voxel
order, voxel-aligned with the input NIfTI (and hence with its label map). ``segcal.json`` records
``input_type: logits``, ``num_classes``, ``class_names``, ``axis_order: "xyz (nibabel)"`` and,
per case, the input's shape and affine (``cases``), so a reader can check a label volume against it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from segcal.medical.hippocampus import (
    CLASS_NAMES,
    DIVISOR,
    crop_back,
    load_nifti,
    normalise,
    pad_to_divisible,
)

AXIS_ORDER = "xyz (nibabel)"


def predict_logits(model, image: np.ndarray) -> np.ndarray:
    """Logits ``(C, X, Y, Z)`` float32 for one raw (x, y, z) volume: normalise, pad, run, crop back."""
    import torch

    x = normalise(image)
    xp, pads = pad_to_divisible(x, DIVISOR)
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(xp))[None, None].float())[0]
    return np.ascontiguousarray(crop_back(out.numpy(), pads), dtype=np.float32)


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            stem = name[: -len(suf)]
            # nnU-Net-style channel suffix (case_0000.nii.gz) -> case
            if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                stem = stem[:-5]
            return stem
    raise ValueError(f"images: {name} is not a NIfTI file (.nii or .nii.gz)")


def list_images(images: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
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
    model,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model_name: str = "unet3d-hippocampus",
    dtype=np.float16,
    progress: bool = False,
) -> list[Path]:
    """Predict every volume of ``images`` (a folder, one file, or a list) into ``out_dir``.

    Writes ``<case>.npy`` (``(3, X, Y, Z)`` logits, ``dtype``) and merges ``segcal.json``.
    Returns the written ``.npy`` paths. ``model=None`` loads the committed reference weights.
    """
    from segcal.io.predictions import read_folder_meta, write_folder_meta, write_prediction

    if model is None:
        from segcal.medical.unet import load_unet3d_hippocampus

        model = load_unet3d_hippocampus()
    model.eval()
    files = list_images(images)
    stems = [_stem(f) for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise ValueError(f"images: several files map to the same case id: {sorted(dup)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = dict(read_folder_meta(out).get("cases", {}))
    written = []
    it = zip(files, stems, strict=True)
    if progress:
        from tqdm import tqdm

        it = tqdm(list(it), desc="predict", unit="vol")
    for f, stem in it:
        image, affine = load_nifti(f, what="image")
        logits = predict_logits(model, image)
        written.append(write_prediction(out / f"{stem}.npy", logits, dtype=dtype))
        cases[stem] = {"shape": list(image.shape), "affine": np.round(affine, 6).tolist(),
                       "source": f.name}
    num_classes = int(logits.shape[0]) if written else len(CLASS_NAMES)
    write_folder_meta(
        out, input_type="logits", num_classes=num_classes,
        class_names=list(CLASS_NAMES[:num_classes]), axis_order=AXIS_ORDER,
        model=model_name, cases=cases,
    )
    return written


def weights_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def logits_fingerprint(logits: np.ndarray, voxels=((0, 0, 0), (10, 20, 10), (17, 25, 17))) -> dict:
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
    """``python -m segcal.medical.predict --images DIR --out DIR`` (until ``segcal predict`` routes here)."""
    import argparse

    ap = argparse.ArgumentParser(description="3D U-Net (MSD hippocampus) -> segcal prediction folder")
    ap.add_argument("--images", required=True, help="folder of .nii/.nii.gz volumes, or one file")
    ap.add_argument("--out", required=True, help="output prediction folder")
    ap.add_argument("--weights", default=None, help="weights file (default: the committed one)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from segcal.medical.unet import load_unet3d_hippocampus

    written = predict_volumes(
        load_unet3d_hippocampus(args.weights), args.images, args.out, progress=not args.no_progress
    )
    print(f"wrote {len(written)} prediction(s) to {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
