"""Calibrator files: saving, reading back safely, the TorchScript export and the pure-tensor
forward that ``torch.export`` traces (:class:`TensorCalibrator`).

A calibrator file (format ``segcal-calibrator``, version 1) is a ``torch.save`` of a dict with
``format``, ``version``, ``name`` (the registered calibrator), ``config`` (constructor keyword
arguments), ``state_dict``, ``properties`` and ``fit_info``. It is read with
``torch.load(weights_only=True)``: no code from the file runs. :func:`read_calibrator_file`
refuses, with an :class:`~segcal.errors.InputError` naming the file, anything that is not such a
file (another pickle, a zero-byte or truncated file, a dict missing a key) and a file whose
parameters hold NaN or infinite values (a damaged file, or a diverged fit).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segcal.errors import InputError
from segcal.io.files import atomic_write, to_jsonable

__all__ = [
    "FORMAT",
    "REQUIRED_KEYS",
    "VERSION",
    "TensorCalibrator",
    "check_finite_state",
    "export_torchscript",
    "nonfinite_entries",
    "read_calibrator_file",
    "save_calibrator",
]

FORMAT = "segcal-calibrator"
VERSION = 1
#: the keys every calibrator file holds (``properties`` and ``fit_info`` are informative)
REQUIRED_KEYS = ("format", "version", "name", "config", "state_dict")


def nonfinite_entries(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinite value."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite_state(state: Mapping[str, Any], where: str, why: str) -> None:
    """Raise an :class:`~segcal.errors.InputError` ``"{where} parameter(s) [...] {why}"`` when a
    floating-point tensor of ``state`` holds NaN or an infinite value."""
    bad = nonfinite_entries(state)
    if bad:
        raise InputError(f"{where} parameter(s) {bad} {why}")


def save_calibrator(cal: Any, path: str | os.PathLike) -> None:
    """Write the file of a fitted calibrator ``cal`` atomically (see the module docstring)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "name": cal.name,
        "config": cal.get_config(),
        "state_dict": {k: v.detach().cpu() for k, v in cal.state_dict().items()},
        "properties": cal.properties(),
        "fit_info": to_jsonable(cal.fit_info, finite=False, unknown="str"),
    }
    with atomic_write(path) as fh:
        torch.save(payload, fh)


def read_calibrator_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checked payload of a calibrator file.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    InputError
        Not a segcal calibrator file (not loadable with ``weights_only=True``, empty, truncated,
        another format, a newer version, a missing key, a state that is not a dict of tensors)
        or one whose parameters hold NaN/Inf; the message names the file (and the parameter).
    """
    where = f"calibrator: {os.fspath(path)}"
    if os.path.isdir(path):
        raise InputError(f"{where} is a directory; expected a calibrator file written by `segcal fit`")
    if os.path.exists(path) and os.path.getsize(path) == 0:
        raise InputError(f"{where} is empty (0 bytes); expected a calibrator file written by `segcal fit`")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the error below says it
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        # never repeat torch's advice to retry with weights_only=False (that would run the file's code)
        raise InputError(
            f"{where} is not a segcal calibrator file: it could not be read as a safe torch file "
            f"({type(exc).__name__}; a truncated or damaged file, or another kind of file)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = f"format={payload.get('format')!r}" if isinstance(payload, dict) else type(payload).__name__
        raise InputError(f"{where} is not a segcal calibrator file (found {found}; expected format={FORMAT!r})")
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise InputError(f"{where} has format version {version!r}; this segcal reads versions <= {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise InputError(f"{where} is incomplete: missing key(s) {missing} (a calibrator file holds "
                         f"{list(REQUIRED_KEYS)})")
    if not isinstance(payload["name"], str):
        raise InputError(f"{where}: 'name' is {type(payload['name']).__name__}, expected the calibrator's name")
    if not isinstance(payload["config"], dict):
        raise InputError(f"{where}: 'config' is {type(payload['config']).__name__}, expected a dict")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{where}: 'state_dict' is not a dict of tensors")
    check_finite_state(state, f"{where}:", "hold NaN or infinite values (a damaged file or a "
                       "diverged fit); refit the calibrator")
    return payload


class TensorCalibrator(nn.Module):
    """Pure-tensor forward of a fitted calibrator, for tracing and ``torch.export`` (through its
    subclass hooks ``_canonical``, ``_map`` / ``_apply_image_map``; no input validation, no
    chunking, no data-dependent Python branch): ``forward(scores, image=None)`` equals
    ``Calibrator.forward`` on valid input."""

    def __init__(self, cal: Any) -> None:
        super().__init__()
        self.cal = cal

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if self.cal.spatial:
            return self.cal._apply_image_map(self.cal._canonical(x, dim=1), image)
        # rank-agnostic under tracing: (N, C, *spatial) or (M, C) -> (N, C, S) -> rows
        n, c = x.shape[0], x.shape[1]
        flat = x.reshape(n, c, -1)
        rows = self.cal._canonical(flat.transpose(1, 2).reshape(-1, c))
        out = self.cal._map(rows).reshape(n, -1, c).transpose(1, 2)
        return out.reshape_as(x)


def export_torchscript(cal: Any, path: str | os.PathLike | None = None) -> torch.jit.ScriptModule:
    """Trace a fitted calibrator to TorchScript (see ``Calibrator.to_torchscript``)."""
    module = TensorCalibrator(copy.deepcopy(cal).cpu().eval()).eval()
    c = int(cal.num_classes or 2)
    gen = torch.Generator().manual_seed(0)
    if cal.spatial:  # traced on an image of the calibrator's rank, large enough for reflect
        dims = int(getattr(cal, "spatial_dims", None) or 2)
        ex = torch.randn(1, c, *([9] * dims), generator=gen)
    else:
        ex = torch.randn(2, c, 3, 5, generator=gen)
    if cal.input_type == "probs":
        ex = ex.softmax(1)
    args: tuple[torch.Tensor, ...] = (ex,)
    if cal.uses_image:
        args = (ex, torch.randn(ex.shape[0], int(cal.image_channels_needed or 3), *ex.shape[2:],
                                generator=gen))
    for p in module.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), warnings.catch_warnings():
        # shape-dependent Python values are traced as dynamic size ops; the export is
        # checked on other ranks and sizes in tests/calibrators/test_calibrator_checks.py
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, args, check_trace=False, strict=False)
    if path is not None:
        torch.jit.save(traced, str(path))
    return traced
