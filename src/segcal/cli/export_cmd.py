"""``segcal export``: a registered model and a fitted calibrator as one exported module.

Builds :class:`segcal.models.CalibratedModel` and writes it with
:meth:`~segcal.models.CalibratedModel.export` (``.pt2``) or
:meth:`~segcal.models.CalibratedModel.to_onnx` (``.onnx``). The arguments are declared in
:mod:`segcal.cli.parsers.export`. Under ``torchrun`` rank 0 alone exports (one file) while the
other ranks wait; a refusal on rank 0 stops every rank with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from segcal.adaptation import load_adapted
from segcal.calibrators import load
from segcal.cli.common import check_out_path
from segcal.errors import InputError
from segcal.models import UNET3D_MODEL_NAME, CalibratedModel, create_model
from segcal.pipeline.distributed import launched, on_main, world

#: ``--dynamic`` -> ``CalibratedModel.export(dynamic=...)``
DYNAMIC = {"all": True, "batch": "batch", "none": False}
SUFFIXES = (".pt2", ".onnx")


def example_shape(text: str | None, model: str) -> tuple[int, ...]:
    """``--example-shape`` ("N,C,H,W" or "N,C,D,H,W") as a tuple (a default per model)."""
    if text is None:
        return (2, 1, 32, 32, 32) if model == UNET3D_MODEL_NAME else (2, 3, 360, 480)
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise InputError(f"--example-shape: expected N,C,H,W or N,C,D,H,W (positive integers), got {text!r}")
    return shape


def check_example(module: CalibratedModel, example: torch.Tensor, args: argparse.Namespace) -> None:
    """Run the module once on the example input (eager, no gradient) before exporting it: an
    ``--example-shape`` the network cannot take (another channel count, a 3D shape for a 2D model)
    is refused naming the flag, where the export's tracing raised torch's error as a traceback."""
    try:
        with torch.no_grad():
            module(example)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--example-shape {','.join(map(str, example.shape))}: {args.model} cannot run on an input of "
                         f"this shape ({first}); expected the model's preprocessed input (N, C_in, *spatial), "
                         f"e.g. {','.join(map(str, example_shape(None, args.model)))}") from exc


def _export(module: CalibratedModel, out: Path, example: torch.Tensor, dynamic: bool | str) -> None:
    if out.suffix == ".onnx":
        module.to_onnx(out, example, dynamic)
    else:
        module.export(out, example, dynamic)


def run(args: argparse.Namespace) -> int:
    """Export ``--model`` + ``--calibrator`` to ``--out`` (under ``torchrun``: rank 0 alone)."""
    if not launched():
        return _run(args)
    with world():  # one file: rank 0 writes it while the others wait; all exit with its code
        return int(on_main(lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("model", "calibrator", "out") if not getattr(args, k)]
    if missing:
        raise InputError(f"missing required argument(s): {', '.join(missing)}")
    out = Path(args.out)
    if out.suffix not in SUFFIXES:
        raise InputError(f"--out: {args.out} has suffix {out.suffix or '(none)'!r}; expected .pt2 "
                         "(torch.export) or .onnx")
    check_out_path(out, {"--calibrator": args.calibrator, "--checkpoint": args.checkpoint}, kind="file")
    shape = example_shape(args.example_shape, args.model)
    t0 = time.perf_counter()
    cal = load(args.calibrator)
    try:
        loaded = create_model(args.model, data_root=args.data_root, device="cpu", channels_last=False)
    except ValueError as exc:  # an unknown name: the registry lists the known ones
        raise InputError(f"--model: {exc}") from None
    if args.checkpoint:
        info = load_adapted(loaded, args.checkpoint)
        print(f"loaded {info['method']} checkpoint (epoch {info['epoch']}) into {args.model}", file=sys.stderr)
    if cal.num_classes != loaded.num_classes:
        raise InputError(f"--calibrator: {args.calibrator} has {cal.num_classes} classes, but --model "
                         f"{args.model} predicts {loaded.num_classes}")
    module = CalibratedModel(loaded.module, cal, output=args.output)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    check_example(module, example, args)
    dynamic = DYNAMIC.get(args.dynamic, True)
    try:
        _export(module, out, example, dynamic)
    except InputError as exc:
        if args.dynamic != "auto" or not str(exc).startswith("export: the model's code fixes"):
            raise
        dynamic = "batch"
        print(f"{args.model} fixes the image size: exporting with a dynamic batch size only, for "
              f"images of {shape[2:]} (--example-shape)", file=sys.stderr)
        _export(module, out, example, dynamic)
    free = {True: "batch and spatial sizes", "batch": "batch size", False: "no size"}[dynamic]
    print(f"wrote {out} ({args.model} + {cal.name}, output {args.output}, dynamic {free}, "
          f"example {tuple(shape)}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
