"""The reference 3D U-Net (MONAI ``UNet``) for MSD hippocampus, and loading its committed weights."""

from __future__ import annotations

import os
from pathlib import Path

UNET_CONFIG = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": (16, 32, 64, 128),
    "strides": (2, 2, 2),
    "num_res_units": 2,
}
WEIGHTS_FILE = Path(__file__).parent / "weights" / "unet3d_hippocampus.pt"


def build_unet(**overrides):
    """A fresh (randomly initialised) MONAI 3D U-Net with ``UNET_CONFIG`` (plus ``overrides``)."""
    try:
        from monai.networks.nets import UNet
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ImportError("the 3D U-Net needs MONAI: pip install 'segcal[medical]'") from exc
    cfg = {**UNET_CONFIG, **overrides}
    return UNet(**cfg)


def load_unet3d_hippocampus(weights: str | os.PathLike | None = None, map_location="cpu"):
    """The trained reference model in eval mode (weights: the committed file by default)."""
    import torch

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
