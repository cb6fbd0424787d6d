"""``segcal predict``: run a registered model over images and write a prediction folder."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="run a segmentation model over an image folder and write logits",
        description=(
            "Run a registered model (e.g. espnet-camvid) over --images and write one <stem>.npy "
            "(C, H, W) float16 logits file per image plus segcal.json into --out."
        ),
    )
    p.add_argument("--model", help="registered model name (see --list-models)")
    p.add_argument(
        "--images",
        help="image folder (.png/.jpg) or a dataset alias: camvid:train, camvid:val, camvid:test",
    )
    p.add_argument("--out", help="output prediction folder")
    p.add_argument("--labels", help="optional label folder, checked against images and model")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (4)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data-root", help="folder holding camvid/ and espnet/ (default: SEGCAL_DATA "
                   "or ../shared/data)")  # fmt: skip
    p.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="storage dtype of the logits (float16)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds another model's predictions")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-models", action="store_true", help="list the registered models")
    p.add_argument("--checkpoint", help="predict with the weights of a segcal adapt checkpoint (epoch_XXX.pt) "
                   "made from --model (or, for a mapped model such as espnet-cityscapes-camvid, from the "
                   "model it maps)")  # fmt: skip
    p.add_argument("--corruption", help="corrupt each image before the model (segcal.shift; synthetic shift)")
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1..5 (3)")
    p.add_argument("--seed", type=int, default=0, help="corruption seed (per image: derived from seed and stem)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from segcal.models import available_models, get_spec

    _register_optional_models()
    if args.list_models:
        for name in available_models():
            spec = get_spec(name)
            print(f"{name}\t{spec.num_classes} classes\t{spec.description}")
        return 0
    missing = [f"--{k}" for k in ("model", "images", "out") if not getattr(args, k)]
    if missing:
        raise ValueError(f"missing required argument(s): {', '.join(missing)}")

    from segcal.models.unet3d import MODEL_NAME as UNET3D

    if args.model == UNET3D and (args.checkpoint or args.corruption):
        raise ValueError(f"--checkpoint / --corruption are not supported for {UNET3D}")
    if args.model == UNET3D:  # 3D volumes: whole-volume normalisation, padding, crop back
        import time

        import numpy as np

        from segcal.pipeline.predict import predict_volumes
        from segcal.models import create_model

        t0 = time.perf_counter()
        loaded = create_model(UNET3D, device="cpu")  # small 3D net: whole volumes on the CPU
        written = predict_volumes(
            loaded.module, args.images, args.out, model_name=UNET3D,
            dtype=np.float16 if args.dtype == "float16" else np.float32, progress=not args.no_progress,
        )
        print(f"wrote {len(written)} volume prediction(s) of {UNET3D} to {args.out} "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return 0

    from segcal.pipeline.predict import predict_folder

    model = args.model
    if args.checkpoint:
        from segcal.adaptation import load_adapted
        from segcal.models import create_model

        model = create_model(args.model, data_root=args.data_root, device=args.device)
        info = load_adapted(model, args.checkpoint)
        print(f"loaded {info['method']} checkpoint (epoch {info['epoch']}) of adapted {info['model']} "
              f"into {args.model} ({info['target']})", file=sys.stderr)
    transform = None
    if args.corruption:
        from segcal.shift import make_transform

        transform = make_transform(args.corruption, args.severity, args.seed)
    res = predict_folder(
        model,
        args.images,
        args.out,
        labels=args.labels,
        batch_size=args.batch_size,
        device=args.device,
        data_root=args.data_root,
        limit=args.limit,
        progress=not args.no_progress,
        dtype=args.dtype,
        overwrite=args.overwrite,
        transform=transform,
    )
    print(
        f"wrote {len(res.stems)} predictions ({res.num_classes} classes, {args.dtype}) of "
        f"{res.model} to {res.out_dir} in {res.seconds:.1f} s ({res.images_per_s:.2f} images/s)",
        file=sys.stderr,
    )
    return 0


def _register_optional_models() -> None:
    """Register models whose code needs optional extras (the 3D U-Net needs MONAI) if possible."""
    from segcal.models.unet3d import MODEL_NAME
    from segcal.models import available_models

    if MODEL_NAME in available_models():
        return
    try:
        import monai  # noqa: F401
    except ImportError:
        return  # the registry registers unet3d-hippocampus itself (segcal.models.registry)
