"""The reference 3D U-Net (MONAI ``UNet``) for MSD hippocampus, and loading its committed weights.

The registry (:mod:`segcal.models.registry`) knows it as ``unet3d-hippocampus``. A 3D model needs
whole-volume normalisation, padding and cropping back, so ``segcal predict`` sends its inputs to
:func:`segcal.pipeline.predict.predict_volumes` rather than the 2D image loop; the registered
``preprocess`` is :func:`preprocess_volume`. MONAI (``pip install 'segcal[medical]'``) is needed
to build the network; the weights are committed (``weights/unet3d_hippocampus.pt``, trained by
``scripts/train_unet3d_hippocampus.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segcal.datasets.hippocampus import DIVISOR, normalise, pad_to_divisible
from segcal.errors import missing_dependency

MODEL_NAME = "unet3d-hippocampus"
MODEL_DESCRIPTION = (
    "MONAI 3D U-Net (16-32-64-128, 2 residual units) trained by segcal on MSD Task04 hippocampus "
    "(160 training cases of the committed split); input: raw 3D MRI NIfTI, per-case z-score; "
    "output: (3, X, Y, Z) logits in nibabel voxel order"
)
UNET_CONFIG: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": (16, 32, 64, 128),
    "strides": (2, 2, 2),
    "num_res_units": 2,
}
WEIGHTS_FILE = Path(__file__).parent / "weights" / "unet3d_hippocampus.pt"


def build_unet(**overrides: Any) -> nn.Module:
    """A fresh (randomly initialised) MONAI 3D U-Net with ``UNET_CONFIG`` (plus ``overrides``)."""
    try:
        from monai.networks.nets import UNet
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise missing_dependency("monai", "medical", "the 3D U-Net") from exc
    cfg = {**UNET_CONFIG, **overrides}
    return UNet(**cfg)


def load_unet3d_hippocampus(
    weights: str | os.PathLike | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """The trained reference model in eval mode (weights: the committed file by default)."""
    path = Path(weights) if weights is not None else WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no weights; train them with scripts/train_unet3d_hippocampus.py"
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    cfg = ckpt.get("config", {}) if isinstance(ckpt, dict) and "state_dict" in ckpt else {}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    model = build_unet(**cfg)
    model.load_state_dict(state)
    model.eval()
    return model


def preprocess_volume(volume: np.ndarray) -> torch.Tensor:
    """Raw ``(X, Y, Z)`` volume -> ``(1, 1, X', Y', Z')`` normalised, zero-padded float tensor."""
    padded, _ = pad_to_divisible(normalise(np.asarray(volume)), DIVISOR)
    return torch.from_numpy(np.ascontiguousarray(padded))[None, None]


def unet3d_factory(data_root: str | os.PathLike | None = None) -> nn.Module:
    """Registry factory: the committed weights (``data_root`` is not needed)."""
    return load_unet3d_hippocampus()


__all__ = [
    "MODEL_DESCRIPTION",
    "MODEL_NAME",
    "UNET_CONFIG",
    "WEIGHTS_FILE",
    "build_unet",
    "load_unet3d_hippocampus",
    "preprocess_volume",
    "unet3d_factory",
]
