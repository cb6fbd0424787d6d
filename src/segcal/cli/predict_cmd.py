"""``segcal predict``: run a registered model over images and write a prediction folder.

2D models write one ``<stem>.npy`` logits file per image (:func:`segcal.pipeline.predict.predict_folder`);
the 3D U-Net (``unet3d-hippocampus``) predicts whole NIfTI volumes
(:func:`segcal.pipeline.predict.predict_volumes`). ``--out`` may be neither the image or label
folder nor inside or around one. The arguments are declared in :mod:`segcal.cli.parsers.predict`.

Under ``torchrun`` every rank predicts and writes its contiguous block of the sorted images
(``--device cuda``: rank *r* on ``cuda:<LOCAL_RANK>``) or volumes (the 3D U-Net: on the CPU,
gloo), rank 0 opens and finalises the manifest and alone prints (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from segcal.adaptation import load_adapted
from segcal.cli.common import check_out_path, device_from_arg
from segcal.datasets import resolve_images
from segcal.errors import InputError
from segcal.models import UNET3D_MODEL_NAME, available_models, create_model, get_spec
from segcal.pipeline.distributed import launched, rank_device, world
from segcal.pipeline.predict import predict_folder, predict_volumes
from segcal.shift import make_transform


def _list_models() -> int:
    for name in available_models():
        spec = get_spec(name)
        print(f"{name}\t{spec.num_classes} classes\t{spec.description}")
    return 0


def _predict_volumes(args: argparse.Namespace, main: bool = True, distributed: bool = False) -> int:
    """The 3D U-Net: whole-volume normalisation, padding, crop back (on the CPU: a small net);
    under ``torchrun`` every rank predicts its contiguous block of the sorted volumes."""
    if args.checkpoint or args.corruption:
        raise InputError(f"--checkpoint / --corruption are not supported for {UNET3D_MODEL_NAME}")
    t0 = time.perf_counter()
    loaded = create_model(UNET3D_MODEL_NAME, device="cpu")
    written = predict_volumes(
        loaded.module, args.images, args.out, model_name=UNET3D_MODEL_NAME,
        dtype=np.float16 if args.dtype == "float16" else np.float32, progress=not args.no_progress,
        distributed=distributed, exclusive=True,
    )
    if main:
        print(f"wrote {len(written)} volume prediction(s) of {UNET3D_MODEL_NAME} to {args.out} "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """List the models, or predict ``--images`` into ``--out``."""
    if args.list_models:
        return _list_models()
    missing = [f"--{k}" for k in ("model", "images", "out") if not getattr(args, k)]
    if missing:
        raise InputError(f"missing required argument(s): {', '.join(missing)}")
    images, alias_labels = resolve_images(args.images, args.data_root)
    check_out_path(args.out, {"--images": images, "--labels": args.labels or alias_labels,
                              "--checkpoint": args.checkpoint})
    if args.model == UNET3D_MODEL_NAME:
        if not launched():
            return _predict_volumes(args)
        with world("cpu") as w:  # the 3D U-Net runs on the CPU: gloo
            return _predict_volumes(args, w.is_main, w.distributed)
    if not launched():
        return _predict(args, args.device, True)
    with world(device_from_arg(args.device)) as w:
        return _predict(args, str(rank_device(device_from_arg(args.device), w)), w.is_main, w.distributed)


def _predict(args: argparse.Namespace, device: str, main: bool, distributed: bool = False) -> int:
    """Predict a 2D image folder (on this rank's share of it under ``torchrun``)."""
    model = args.model
    if args.checkpoint:
        model = create_model(args.model, data_root=args.data_root, device=device)
        info = load_adapted(model, args.checkpoint)
        if main:
            print(f"loaded {info['method']} checkpoint (epoch {info['epoch']}) of adapted {info['model']} "
                  f"into {args.model} ({info['target']})", file=sys.stderr)
    transform = make_transform(args.corruption, args.severity, args.seed) if args.corruption else None
    res = predict_folder(
        model,
        args.images,
        args.out,
        labels=args.labels,
        batch_size=args.batch_size,
        device=device,
        data_root=args.data_root,
        limit=args.limit,
        progress=not args.no_progress,
        dtype=args.dtype,
        overwrite=args.overwrite,
        transform=transform,
        distributed=distributed,
        exclusive=True,
    )
    if not main:
        return 0
    print(
        f"wrote {len(res.stems)} predictions ({res.num_classes} classes, {args.dtype}) of "
        f"{res.model} to {res.out_dir} in {res.seconds:.1f} s ({res.images_per_s:.2f} images/s)",
        file=sys.stderr,
    )
    return 0
