"""``segcal apply``: calibrate a prediction folder with a fitted calibrator.

Writes one file per input file, in the same format (``.npy`` stays ``.npy``; ``.npz`` keeps its
key convention: ``logits`` or ``probabilities``), each atomically, by
:func:`segcal.pipeline.calibrate.calibrate_folder`: the storage dtype follows each input file
unless ``--dtype`` is given, no value is written outside its range, and a file where float16 would
break the calibrator's argmax / order guarantee is stored as float32 (said once on stderr). A
calibrator fitted with an image branch (``segcal fit --images``) needs ``--images DIR`` here too.

Under ``torchrun`` every rank writes its contiguous block of the sorted files, rank 0 opens and
finalises the manifest and alone prints (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import sys

from segcal.calibrators import load
from segcal.cli.common import CLI_FLAGS, check_out_path, device_from_arg, input_type_from_args
from segcal.pipeline.calibrate import calibrate_folder
from segcal.pipeline.distributed import rank_device, world


def run(args: argparse.Namespace) -> int:
    out = check_out_path(args.out, {"--pred": args.pred, "--calibrator": args.calibrator, "--images": args.images},
                         kind="dir")
    device = device_from_arg(args.device)
    cal = load(args.calibrator)
    with world(device) as w:
        result = calibrate_folder(cal, args.pred, out, output=args.output, dtype=args.dtype, images=args.images,
                                  input_type=input_type_from_args(args), device=rank_device(device, w),
                                  progress=not args.no_progress and w.is_main, names=CLI_FLAGS,
                                  meta={"calibrator_file": str(args.calibrator)}, distributed=w.distributed,
                                  exclusive=True)
        if not w.is_main:
            return 0
    if result.float32_files:
        n, total = len(result.float32_files), len(result.files)
        print(f"segcal apply: note: {result.reason} in {n} of {total} file(s); those are stored as float32 "
              f"to keep what {cal.name} guarantees (pass --dtype float32 to store every file as float32)",
              file=sys.stderr)
    print(f"wrote {len(result.files)} calibrated prediction(s) ({result.output}) to {args.out}")
    return 0
