"""Inputs of the label-free ECE estimator: hooked feature maps or logit-derived maps.

Two kinds of input are supported, so the estimator works with any model:

* **features** -- an intermediate feature map of the segmenter, captured with a forward hook by
  :class:`FeatureExtractor` (any ``nn.Module``, any named sub-module; for ESPNet the encoder's
  ``encoder.b3`` output, 256 channels at 1/8 resolution, plays the role of Cal-SFDA's ResNet
  ``layer4``);
* **logits** -- when no features are available, :func:`logit_features` builds per-pixel maps from
  the scores alone: the log-softmax of every class (clamped at ``-LOGP_FLOOR``) plus the
  top-label confidence, the normalised entropy and the top-1/top-2 margin, i.e. ``C + 3``
  channels.

Both are average-pooled to a small grid (:func:`pool_map`, default ``(15, 20)``: exact 3x3
blocks of ESPNet's 45x60 map at 480x360) before being stored or fed to the estimator. The value
net's BN/1x1 conv act per pixel and its 4x4 resize is an average pool, so storing pooled maps
changes only the BN batch statistics, not the architecture.

A *feature folder* mirrors a prediction folder: one ``<stem>.npy`` array ``(C_f, h, w)`` per image
(float16 recommended), written by :func:`write_feature_map`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcal.errors import InputError
from segcal.io import atomic_write

__all__ = [
    "DEFAULT_GRID",
    "LOGP_FLOOR",
    "FeatureExtractor",
    "confidence_maps",
    "find_feature_files",
    "image_confidence_stats",
    "logit_features",
    "pool_map",
    "read_feature_map",
    "write_feature_map",
]

#: default pooled grid (rows, cols) of stored feature maps
DEFAULT_GRID: tuple[int, int] = (15, 20)
#: log-probabilities are clamped at ``-LOGP_FLOOR`` in :func:`logit_features`
LOGP_FLOOR = 20.0


def _as_batch(scores: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise InputError(f"expected scores (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    return x.float()


def pool_map(x: torch.Tensor, grid: tuple[int, int] | None = DEFAULT_GRID) -> torch.Tensor:
    """Adaptive average pooling of ``(N, C, H, W)`` to ``grid`` (``None``: unchanged)."""
    if grid is None:
        return x
    return F.adaptive_avg_pool2d(x, tuple(int(g) for g in grid))


def confidence_maps(scores: Any, input_type: str = "logits") -> torch.Tensor:
    """Per-pixel ``(N, 3, H, W)``: top-label confidence, normalised entropy, top-1/top-2 margin."""
    x = _as_batch(scores)
    c = x.shape[1]
    if c < 2:
        raise InputError(f"expected at least 2 classes, got {c}")
    if input_type == "logits":
        logp = F.log_softmax(x, dim=1)
    elif input_type == "probs":
        logp = torch.log(x.clamp_min(1e-12))
    else:
        raise InputError(f"input_type: expected 'logits' or 'probs', got {input_type!r}")
    p = logp.exp()
    top2 = p.topk(2, dim=1).values
    ent = -(p * logp).sum(1) / math.log(c)
    return torch.stack([top2[:, 0], ent, top2[:, 0] - top2[:, 1]], dim=1)


def logit_features(
    scores: Any, input_type: str = "logits", grid: tuple[int, int] | None = DEFAULT_GRID
) -> torch.Tensor:
    """Logits-only estimator input ``(N, C + 3, *grid)`` from scores ``(C, H, W)``/``(N, C, H, W)``.

    Channels: ``max(log p_k, -LOGP_FLOOR)`` for every class, then :func:`confidence_maps`, all
    average-pooled to ``grid``.
    """
    x = _as_batch(scores)
    if input_type == "logits":
        logp = F.log_softmax(x, dim=1)
    elif input_type == "probs":
        logp = torch.log(x.clamp_min(1e-12))
    else:
        raise InputError(f"input_type: expected 'logits' or 'probs', got {input_type!r}")
    maps = torch.cat([logp.clamp_min(-LOGP_FLOOR), confidence_maps(x, input_type)], dim=1)
    return pool_map(maps, grid)


def image_confidence_stats(scores: Any, input_type: str = "logits") -> dict[str, np.ndarray]:
    """Per-image means ``(N,)`` of the top-label confidence and of the normalised entropy."""
    m = confidence_maps(scores, input_type)
    return {
        "mean_maxprob": m[:, 0].mean(dim=(1, 2)).numpy().astype(np.float64),
        "mean_entropy": m[:, 1].mean(dim=(1, 2)).numpy().astype(np.float64),
    }


class FeatureExtractor:
    """Capture the output of a named sub-module of any ``nn.Module`` with a forward hook.

    Parameters
    ----------
    module
        The model (e.g. ``create_model("espnet-camvid").module``).
    layer_name
        Dotted name as in ``module.named_modules()`` (e.g. ``"encoder.b3"``; for a
        ``MappedModel`` wrapper ``"model.encoder.b3"``).
    grid
        Pool the captured map to this grid (``None``: keep full resolution).

    Examples
    --------
    >>> fx = FeatureExtractor(model, "encoder.b3")          # doctest: +SKIP
    >>> logits, feats = fx(images)                         # doctest: +SKIP
    >>> fx.remove()                                        # doctest: +SKIP

    Also a context manager (the hook is removed on exit). Tuple/list outputs keep their first
    tensor.
    """

    def __init__(self, module: nn.Module, layer_name: str, *, grid: tuple[int, int] | None = DEFAULT_GRID) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        layers = dict(module.named_modules())
        if layer_name not in layers or layer_name == "":
            names = [n for n in layers if n]
            hint = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise InputError(f"layer_name: {layer_name!r} is not a sub-module of {type(module).__name__} ({hint})")
        self.module = module
        self.layer_name = layer_name
        self.grid = grid
        self._captured: list[torch.Tensor] = []
        self._handle = layers[layer_name].register_forward_hook(self._hook)

    def _hook(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, tuple | list):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"layer {self.layer_name!r} returned {type(out).__name__}, not a tensor")
        self._captured.append(out.detach())

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the module on ``x`` without gradients; returns ``(output, pooled features)``."""
        if self._handle is None:
            raise RuntimeError("FeatureExtractor: the hook was removed")
        self._captured.clear()
        with torch.no_grad():
            out = self.module(x)
        if not self._captured:
            raise RuntimeError(f"layer {self.layer_name!r} was not called during the forward pass")
        feats = self._captured[-1]
        self._captured.clear()
        if feats.ndim == 4:
            feats = pool_map(feats.float(), self.grid)
        return out, feats

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Only the (pooled) feature map of ``x``."""
        return self(x)[1]

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def write_feature_map(path: str | os.PathLike, feats: Any) -> Path:
    """Write one ``(C_f, h, w)`` feature map as float16 ``.npy`` (atomically)."""
    arr = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    if arr.ndim != 3:
        raise InputError(f"feature map: expected (C_f, h, w), got shape {arr.shape}")
    path = Path(path)
    with atomic_write(path) as fh:
        np.save(fh, arr.astype(np.float16), allow_pickle=False)
    return path


def find_feature_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``stem -> path`` of the ``.npy`` feature maps in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"features: folder {folder} does not exist")
    return {p.name[:-4]: p for p in sorted(folder.glob("*.npy")) if not p.name.startswith(".")}


def read_feature_map(path: str | os.PathLike) -> torch.Tensor:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 3 or arr.dtype.kind != "f":
        raise InputError(f"features: {Path(path).name} holds {arr.dtype} {arr.shape}; expected float (C_f, h, w)")
    return torch.from_numpy(arr.astype(np.float32))


def iter_feature_maps(folder: str | os.PathLike, stems: list[str]) -> Iterator[torch.Tensor]:
    files = find_feature_files(folder)
    missing = [s for s in stems if s not in files]
    if missing:
        raise InputError(
            f"features: {len(missing)} prediction(s) have no feature map in {folder}: {', '.join(missing[:5])}"
        )
    for s in stems:
        yield read_feature_map(files[s])
