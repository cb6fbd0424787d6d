"""Per-image ECE estimates of a model on target images, whatever the estimator kind.

An estimator is an :class:`~segcal.estimation.ECEEstimator` trained on ``"logits"`` (its class
count must equal the model's, or ``class_mapping.num_target`` when a mapping is given), one
trained on ``"features"`` (its ``meta["layer"]`` names the hooked sub-module), or a
:class:`~segcal.estimation.ConfidenceBaseline` (``"maxprob"``/``"entropy"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from segcal.errors import InputError, InputTypeError
from segcal.estimation.features import pool_map

__all__ = ["EstimatorGlue", "estimate_target_ece"]


class EstimatorGlue:
    """Per-image ECE estimates of the current model, whatever the estimator kind."""

    def __init__(
        self, estimator: Any, module: nn.Module, num_classes: int, mapping: nn.Module | None, model_name: str = ""
    ) -> None:
        self.estimator = estimator
        self.mapping = mapping
        self.kind = getattr(estimator, "input_kind", None) if estimator is not None else None
        self._hook = None
        self._feat: torch.Tensor | None = None
        self.capture = False
        if estimator is None:
            return
        if self.kind not in ("scores", "logits", "features"):
            raise InputTypeError(f"estimator: unsupported object {type(estimator).__name__}")
        space = mapping.num_target if mapping is not None else num_classes
        if mapping is not None and getattr(mapping, "num_source", num_classes) != num_classes:
            raise InputError(
                f"class mapping expects {mapping.num_source} source classes but the model has {num_classes} outputs"
            )
        if self.kind == "logits" and estimator.num_classes != space:
            where = f"the mapping's {space} target classes" if mapping is not None else f"the model's {space} outputs"
            raise InputError(
                f"estimator was trained for {estimator.num_classes} classes but it would see {where}; "
                "use an estimator trained on this model's (mapped) logits, a class mapping, or a baseline (maxprob)"
            )
        if self.kind == "features":
            meta = getattr(estimator, "meta", {}) or {}
            trained_on = meta.get("model")
            if trained_on and model_name and trained_on != model_name:
                warnings.warn(
                    f"the features estimator was trained on {trained_on!r} features, not {model_name!r}; "
                    "its estimates may be meaningless", UserWarning, stacklevel=4,
                )
            layer = meta.get("layer")
            if not layer:
                raise InputError("features estimator: its meta has no 'layer' (the hooked sub-module name)")
            mods = dict(module.named_modules())
            name = layer if layer in mods else f"model.{layer}" if f"model.{layer}" in mods else None
            if name is None:
                raise InputError(f"features estimator: layer {layer!r} is not a sub-module of the model")
            self._hook = mods[name].register_forward_hook(self._on_forward)

    def _on_forward(self, _m: nn.Module, _i: Any, out: Any) -> None:
        if self.capture:
            self._feat = (out[0] if isinstance(out, tuple | list) else out).detach()

    def forward(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """``(logits, estimates)`` for batch ``x`` (no gradients; the caller sets eval mode)."""
        self.capture = self.kind == "features"
        try:
            with torch.no_grad():
                logits = module(x)
        finally:
            self.capture = False
        if self.estimator is None:
            return logits, None
        if self.kind == "features":
            grid = self.estimator.config.get("grid")
            feats = pool_map(self._feat.float(), None if grid is None else tuple(grid))
            self._feat = None
            return logits, self.estimator.predict(feats)
        scores = self.mapping(logits) if self.mapping is not None else logits
        if self.kind == "scores":
            return logits, self.estimator.predict_scores(scores, "logits")
        return logits, self.estimator.predict(self.estimator.inputs_from_scores(scores, "logits"))

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def estimate_target_ece(
    module: nn.Module,
    images: Sequence[torch.Tensor],
    estimator: Any,
    *,
    num_classes: int,
    class_mapping: nn.Module | None = None,
    model_name: str = "",
) -> np.ndarray:
    """Per-image estimated ECE of ``module`` on preprocessed target batches, in eval mode.

    The yardstick :func:`adapt` logs after every epoch, usable on its own, e.g. to score the
    checkpoints of a finished run with another estimator (``benchmarks/adaptation_protocol.py
    --rescore-estimator``). ``images`` are ``(B, 3, H, W)`` tensors; ``estimator`` is any estimator
    :func:`adapt` accepts (a logits, features or baseline estimator), ``class_mapping`` is applied to
    the logits before it. Returns one estimate per image (float64). The module's train/eval mode is
    restored afterwards.
    """
    if estimator is None:
        raise InputError("estimator: an ECE estimator is required")
    glue = EstimatorGlue(estimator, module, int(num_classes), class_mapping, model_name)
    was_training = module.training
    try:
        module.eval()
        out = [np.asarray(glue.forward(module, x)[1], dtype=np.float64).reshape(-1) for x in images]
    finally:
        glue.close()
        module.train(was_training)
    if not out:
        raise InputError("images: no target batch given")
    return np.concatenate(out)
