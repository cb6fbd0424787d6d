"""A segmentation network and a fitted calibrator as one deployable module: :class:`CalibratedModel`.

``CalibratedModel(model, calibrator)(x)`` runs the network, brings its logits to the input's
spatial size when it predicts at a lower resolution (Hugging Face SegFormer-style 1/4-resolution
logits: bilinear for 2D, trilinear for 3D, ``align_corners=False``), and applies the calibrator's
pure-tensor forward (:class:`segcal.calibrators.persistence.TensorCalibrator`: the calibrator's
map without input validation or chunking, equal to ``Calibrator.forward`` on valid input).

:meth:`CalibratedModel.export` writes a ``torch.export`` program (``.pt2``, dynamic batch and
spatial sizes; load it with ``torch.export.load(path).module()``), :meth:`CalibratedModel.to_onnx`
an ONNX file (optional dependencies ``onnx`` and ``onnxscript``: ``pip install 'segcal[export]'``).
Which calibrators export, and why the others do not: ``docs/integrations.md``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators import Calibrator, NotFittedError
from segcal.calibrators.persistence import TensorCalibrator
from segcal.errors import InputError, missing_dependency
from segcal.io.files import atomic_write

__all__ = ["NOT_EXPORTABLE", "NOT_ONNX_EXPORTABLE", "OUTPUTS", "CalibratedModel", "model_logits",
           "resize_logits"]

OUTPUTS = ("probs", "logits")
#: the ``dynamic`` modes of :meth:`CalibratedModel.export`: batch and spatial sizes, batch only, none
DYNAMIC = (True, "batch", False)

#: registered calibrators that ``CalibratedModel.export`` refuses, with the reason (none today:
#: every registered calibrator exports; tests/models/test_calibrated_export.py asserts this list)
NOT_EXPORTABLE: dict[str, str] = {}
#: registered calibrators that ``CalibratedModel.to_onnx`` refuses, with the reason
NOT_ONNX_EXPORTABLE: dict[str, str] = {
    "cmsop": "its map sorts the log-probabilities with a stable sort (ties keep class order, "
             "which fixes the order-preserving output); ONNX has no stable sort (torch.onnx has no "
             "translation of aten.sort.stable), and an unstable sort would change outputs on ties",
}


def model_logits(out: Any) -> torch.Tensor:
    """The logits tensor of a model's output: a tensor, a mapping with ``"logits"`` (Hugging
    Face) or ``"out"`` (torchvision), or an object with a ``logits`` attribute."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "out"):
            if key in out:
                return out[key]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"model output: expected a logits tensor, a mapping with 'logits' or 'out', or "
                    f"an object with .logits; got {type(out).__name__}")


def resize_logits(logits: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``(N, C, *spatial)`` logits brought to the spatial ``size`` (float32): unchanged when they
    have it already, else bilinear (2D) / trilinear (3D) with ``align_corners=False`` (the
    convention of ``transformers``' post-processing)."""
    logits = logits.to(torch.float32)
    size = tuple(size)
    if tuple(logits.shape[2:]) == size:
        return logits
    mode = "bilinear" if logits.ndim == 4 else "trilinear"
    return F.interpolate(logits, size=size, mode=mode, align_corners=False)


class CalibratedModel(nn.Module):
    """``calibrator(model(x))``: a network and its fitted calibrator as one module.

    Parameters
    ----------
    model
        The segmentation network: ``x (N, C_in, *spatial) -> logits (N, C, *spatial')`` (a tensor,
        or an output with ``logits`` / ``"out"``; see :func:`model_logits`). Logits at a lower
        resolution than ``x`` are resized to the input's spatial size (bilinear for 2D, trilinear
        for 3D, ``align_corners=False``) before calibration.
    calibrator
        A fitted :class:`~segcal.calibrators.Calibrator` with ``num_classes == C``. One fitted on
        probabilities (``input_type="probs"``) receives ``softmax(logits)``. One with an image
        branch (:attr:`~segcal.calibrators.Calibrator.uses_image`; LTS/IBTS ``use_image=True``)
        receives the model's input ``x`` as its image (``x`` must then have the calibrator's
        ``image_channels``).
    output
        ``"probs"`` (default): calibrated probabilities ``softmax(calibrated logits)``;
        ``"logits"``: the calibrator's output as is (calibrated logits, which are log-probabilities
        for the calibrators that output them, e.g. binning and Meta-Cal; the calibrator's contract).
    freeze
        Put ``model`` and ``calibrator`` in eval mode and turn ``requires_grad`` off on their
        parameters (default True), so outputs carry no autograd graph. ``freeze=False`` leaves the
        parameters as they are (the module is in eval mode either way).
    """

    def __init__(self, model: nn.Module, calibrator: Calibrator, output: str = "probs", *,
                 freeze: bool = True) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(calibrator, Calibrator):
            raise TypeError(f"calibrator: expected a segcal Calibrator, got {type(calibrator).__name__}")
        if not calibrator.is_fitted:
            raise NotFittedError(f"calibrator: this {calibrator.name} calibrator is not fitted; "
                                 "fit it (or segcal.load a saved one) first")
        if output not in OUTPUTS:
            raise InputError(f"output: expected one of {list(OUTPUTS)}, got {output!r}")
        self.model = model
        self.tensor_calibrator = TensorCalibrator(calibrator)
        self.output = output
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)
        self.eval()

    @property
    def calibrator(self) -> Calibrator:
        """The wrapped calibrator."""
        return self.tensor_calibrator.cal

    @property
    def num_classes(self) -> int:
        """Number of classes of the calibrator (and of the model's logits)."""
        return int(self.calibrator.num_classes or 0)

    def extra_repr(self) -> str:
        return f"calibrator={self.calibrator.name!r}, output={self.output!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities (``output="probs"``) or logits ``(N, C, *spatial of x)``."""
        if x.ndim not in (4, 5):
            raise ValueError(f"x: expected (N, C_in, H, W) or (N, C_in, D, H, W), got shape {tuple(x.shape)}")
        logits = model_logits(self.model(x))
        if logits.ndim != x.ndim:
            raise ValueError(f"model output: expected {x.ndim} dimensions like the input, got shape "
                             f"{tuple(logits.shape)}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"model output: {logits.shape[1]} classes, but the calibrator has "
                             f"{self.num_classes}")
        logits = resize_logits(logits, tuple(x.shape[2:]))
        scores = logits.softmax(1) if self.calibrator.input_type == "probs" else logits
        image = None
        if self.calibrator.uses_image:
            need = int(self.calibrator.image_channels_needed or 3)
            if x.shape[1] != need:
                raise ValueError(f"x: the {self.calibrator.name} calibrator's image branch takes "
                                 f"{need}-channel images, got {x.shape[1]} channels")
            image = x.to(torch.float32)
        out = self.tensor_calibrator(scores, image)
        return out.softmax(1) if self.output == "probs" else out

    # ----------------------------------------------------------------- export
    def _check_exportable(self, example: Any, dynamic: bool | str) -> torch.Tensor:
        name = self.calibrator.name
        if name in NOT_EXPORTABLE:
            raise InputError(f"calibrator: {name!r} does not export: {NOT_EXPORTABLE[name]}")
        if not isinstance(example, torch.Tensor) or example.ndim not in (4, 5):
            raise InputError("example: expected a tensor (N, C_in, H, W) or (N, C_in, D, H, W), got "
                             f"{getattr(example, 'shape', type(example).__name__)}")
        if dynamic is not False and (example.shape[0] < 2 or min(example.shape[2:]) < 2):
            raise InputError(f"example: shape {tuple(example.shape)}; dynamic export needs a batch "
                             "size and spatial sizes >= 2 (a size of 1 is specialised by torch.export)")
        return example

    def dynamic_shapes(self, example: torch.Tensor, dynamic: bool | str = True) -> tuple[dict[int, Any]] | None:
        """``torch.export`` dynamic shapes of ``example``: ``True`` batch and every spatial
        dimension, ``"batch"`` the batch only (for networks whose code fixes the image size, e.g.
        ESPNet), ``False`` none (the example's shape only)."""
        if dynamic not in DYNAMIC:
            raise InputError(f"dynamic: expected one of {list(DYNAMIC)}, got {dynamic!r}")
        if dynamic is False:
            return None
        dyn = torch.export.Dim.DYNAMIC
        spatial = range(2, example.ndim) if dynamic is True else ()
        return ({0: dyn, **{d: dyn for d in spatial}},)

    def export_program(self, example: torch.Tensor,
                       dynamic: bool | str = True) -> torch.export.ExportedProgram:
        """The ``torch.export`` program of this module traced on ``example`` (dynamic sizes as in
        :meth:`dynamic_shapes`); the sizes the model or calibrator need (e.g. LTS: every spatial
        size > 4) become the program's range constraints. A network whose code fixes a size
        marked dynamic raises an :class:`~segcal.errors.InputError` that says so."""
        example = self._check_exportable(example, dynamic)
        shapes = self.dynamic_shapes(example, dynamic)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.export.export(self, (example,), dynamic_shapes=shapes)
            except RuntimeError as exc:  # torch's constraint violation (a UserError)
                if "specialized it to be a constant" not in str(exc) or dynamic is not True:
                    raise
                raise InputError(
                    "export: the model's code fixes the image size (torch.export specialised a "
                    f"spatial dimension to the example's {tuple(example.shape[2:])}); export with "
                    "dynamic='batch' (segcal export --dynamic batch) for that image size, or "
                    "dynamic=False") from None

    def export(self, path: str | os.PathLike, example: torch.Tensor,
               dynamic: bool | str = True) -> torch.export.ExportedProgram:
        """Export with ``torch.export`` and save the program to ``path`` (``.pt2``, atomically).

        Load it with ``torch.export.load(path).module()``: it needs only torch, takes ``x`` of any
        batch and spatial size (``dynamic=True``; ``"batch"``: any batch size; see
        :meth:`dynamic_shapes`) and returns what :meth:`forward` returns.
        ``example``: an input of the model (batch and spatial sizes >= 2). Returns the program.
        """
        program = self.export_program(example, dynamic)
        with atomic_write(path) as fh:
            torch.export.save(program, fh)
        return program

    def to_onnx(self, path: str | os.PathLike, example: torch.Tensor,
                dynamic: bool | str = True) -> None:
        """Export to an ONNX file (``torch.onnx.export`` through ``torch.export``; input ``"x"``,
        output ``"out"``, dynamic sizes as in :meth:`dynamic_shapes`). Needs the optional
        dependencies ``onnx`` and ``onnxscript`` (``pip install 'segcal[export]'``); run the file
        with onnxruntime."""
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise missing_dependency(exc.name or "onnx", "export", "ONNX export") from None
        name = self.calibrator.name
        if name in NOT_ONNX_EXPORTABLE:
            raise InputError(f"calibrator: {name!r} does not export to ONNX: {NOT_ONNX_EXPORTABLE[name]}; "
                             "export it with torch.export (.pt2) instead")
        program = self.export_program(example, dynamic)
        log = logging.getLogger("torch.onnx")  # its notes on absent torchvision ops
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_program = torch.onnx.export(program, (example,), input_names=["x"],
                                                 output_names=["out"], dynamo=True, verbose=False)
        finally:
            log.setLevel(level)
        with atomic_write(path) as fh:
            fh.write(onnx_program.model_proto.SerializeToString())
