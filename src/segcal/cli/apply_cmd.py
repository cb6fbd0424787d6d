"""``segcal apply``: calibrate a prediction folder with a fitted calibrator.

Writes one file per input file, in the same format (``.npy`` stays ``.npy``; ``.npz`` keeps its
key convention: ``logits`` or ``probabilities``), each atomically (a temporary file renamed once
complete), then the folder's ``segcal.json``. A calibrator fitted with an image branch
(``segcal fit --images``) needs ``--images DIR`` here too (stems matching the predictions; the same
preprocessing as at fit time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def add_parser(sub: Any) -> None:
    p = sub.add_parser("apply", help="apply a fitted calibrator to a prediction folder",
                       description="Calibrate every prediction of a folder with a calibrator saved "
                       "by `segcal fit` (or Calibrator.save) and write them in the same format.")
    p.add_argument("--calibrator", required=True, help="fitted calibrator (.pt)")
    p.add_argument("--pred", required=True, help="prediction folder")
    p.add_argument("--out", required=True, help="output folder (must differ from --pred)")
    p.add_argument("--output", choices=("logits", "probs"), default=None,
                   help="what to write (default: what the input holds; probabilities for nnU-Net folders)")
    p.add_argument("--images", default=None,
                   help="folder of input images (stems matching --pred), for a calibrator fitted "
                        "with an image branch (segcal fit --images)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    import segcal
    from segcal.cli import CLIError
    from segcal.io import PredictionFolder
    from segcal.io.nnunet import write_like_source
    from segcal.io.predictions import write_folder_meta

    if Path(args.out).resolve() == Path(args.pred).resolve():
        raise CLIError("--out must differ from --pred (inputs are never overwritten)")
    cal = segcal.load(args.calibrator).to(args.device).eval()
    folder = PredictionFolder(args.pred)
    image_paths = None
    if cal.uses_image and args.images is None:
        raise CLIError(f"--images: the calibrator {args.calibrator} ({cal.name}) has an image branch; "
                       "pass the folder of input images (stems matching --pred)")
    if args.images is not None:
        if not cal.uses_image:
            raise CLIError(f"--images: the calibrator {args.calibrator} ({cal.name}) has no image branch")
        from segcal.datasets.folders import image_files, load_image_tensor
        from segcal.io.predictions import check_stems_match

        found = image_files(args.images)
        check_stems_match(set(folder.stems), set(found) & set(folder.stems),
                          f"images: file stems do not match ({args.pred} vs {args.images})",
                          "prediction(s) without an image", "")
        image_paths = found
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = folder.items
    if not args.no_progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="calibrating", unit="file")
    dtype = np.float16 if args.dtype == "float16" else np.float32
    for it in items:
        scores, _, itype = folder.read(it)
        if args.output is None:
            args.output = itype
        if itype != cal.input_type:
            raise CLIError(f"{it.path.name}: holds {itype} but the calibrator expects {cal.input_type}")
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(scores))[None].to(args.device)
            if image_paths is not None:
                img = torch.from_numpy(load_image_tensor(image_paths[it.stem]))[None].to(args.device)
                z = cal(x, image=img)
            else:
                z = cal(x)
            res = torch.softmax(z, 1) if args.output == "probs" else torch.log_softmax(z, 1)
        arr = res[0].cpu().numpy()
        key = None
        if it.path.suffix == ".npz":
            key = "probabilities" if args.output == "probs" else "logits"
        write_like_source(out / it.path.name, arr, it.path, key=key, dtype=dtype)
    write_folder_meta(out, input_type=args.output, num_classes=int(cal.num_classes),
                      calibrator=cal.name, calibrator_file=str(args.calibrator), source=str(args.pred))
    print(f"wrote {len(folder)} calibrated prediction(s) ({args.output}) to {out}")
    return 0
