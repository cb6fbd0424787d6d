"""ESPNet (Mehta et al., ECCV 2018), p=2, q=8, re-implemented to load the authors' weights.

The module tree and its names follow the published ``state_dict`` files exactly, so both
``espnet_p_2_q_8_camvid.pth`` (12 outputs) and ``espnet_p_2_q_8.pth`` (Cityscapes, 20 outputs)
load with ``strict=True``. The two files differ in what the decoder's last ``conv`` sees: the
CamVid model concatenates the upsampled scores with ``out0_cat`` (level-1 output + pooled image,
19 channels), the Cityscapes model with ``out0`` only (16 channels); see ``decoder_skip``.

Preprocessing reproduces the original OpenCV training code, quirks included: the image is
converted to BGR, standardised per channel, and *then* divided by 255 (:func:`preprocess_bgr`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from segcal.datasets.camvid import CAMVID_CLASSES

__all__ = [
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_TO_CAMVID",
    "ESPNet",
    "load_espnet",
    "preprocess_bgr",
]

BN_EPS = 1e-3

#: BGR mean / std (0..255 scale) of the CamVid training split, as the original code computes them.
CAMVID_MEAN_BGR = (110.33102643430219, 108.40886315470783, 105.03319368755685)
CAMVID_STD_BGR = (72.12571015416249, 72.69074533734523, 69.90434816160945)
#: BGR mean / std hard-coded in the authors' Cityscapes test script.
CITYSCAPES_MEAN_BGR = (72.3923111, 82.90893555, 73.15840149)
CITYSCAPES_STD_BGR = (45.3192215, 46.15289307, 44.91483307)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

#: CamVid class -> Cityscapes train ids (the README's mapping; terrain goes to Tree).
CITYSCAPES_TO_CAMVID: tuple[tuple[int, ...], ...] = (
    (10,),  # Sky
    (2, 3),  # Building <- building, wall
    (5,),  # Pole
    (0,),  # Road
    (1,),  # Pavement <- sidewalk
    (8, 9),  # Tree <- vegetation, terrain
    (6, 7),  # SignSymbol <- traffic light, traffic sign
    (4,),  # Fence
    (13, 14, 15, 16),  # Car <- car, truck, bus, train
    (11,),  # Pedestrian <- person
    (12, 17, 18),  # Bicyclist <- rider, motorcycle, bicycle
)


def preprocess_bgr(
    image: np.ndarray,
    mean_bgr: Sequence[float],
    std_bgr: Sequence[float],
) -> torch.Tensor:
    """Turn an ``H x W x 3`` uint8 RGB image into the ``1 x 3 x H x W`` float32 ESPNet input.

    ``x = ((rgb[..., ::-1] - mean_bgr) / std_bgr).transpose(2, 0, 1)[None] / 255``, computed in
    float32 exactly as the original code does (standardise first, then divide by 255).

    Raises
    ------
    ValueError
        If the image is not ``H x W x 3`` or ``H``/``W`` are not multiples of 8.
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected an H x W x 3 RGB array, got shape {arr.shape}")
    check_divisible(arr.shape[0], arr.shape[1])
    x = arr[..., ::-1].astype(np.float32)
    x = (x - np.asarray(mean_bgr, dtype=np.float32)) / np.asarray(std_bgr, dtype=np.float32)
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None]) / np.float32(255.0)
    return torch.from_numpy(x.astype(np.float32, copy=False))


def check_divisible(h: int, w: int, factor: int = 8) -> None:
    """Raise a clear error unless ``h`` and ``w`` are multiples of ``factor``."""
    if h % factor or w % factor:
        raise ValueError(
            f"ESPNet needs image height and width divisible by {factor}; got {h} x {w} (H x W). "
            f"Crop or pad to e.g. {h - h % factor} x {w - w % factor}."
        )


# --------------------------------------------------------------------------- building blocks
class CBR(nn.Module):
    """Convolution -> BatchNorm -> PReLU (keys ``conv``, ``bn``, ``act``)."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, k, stride=stride, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(n_out, eps=BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class BR(nn.Module):
    """BatchNorm -> PReLU (keys ``bn``, ``act``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n, eps=BN_EPS)
        self.act = nn.PReLU(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class C(nn.Module):
    """A bias-free convolution with 'same' padding (key ``conv``), optionally dilated."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        pad = ((k - 1) // 2) * dilation
        self.conv = nn.Conv2d(
            n_in, n_out, k, stride=stride, padding=pad, dilation=dilation, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _ESPBase(nn.Module):
    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        o = self.c1(x)
        d1 = self.d1(o)
        a1 = self.d2(o)
        a2 = a1 + self.d4(o)
        a3 = a2 + self.d8(o)
        a4 = a3 + self.d16(o)
        return torch.cat([d1, a1, a2, a3, a4], dim=1)

    def _make(self, c1: nn.Module, n: int, n1: int) -> None:
        self.c1 = c1
        self.d1 = C(n, n1, 3, 1, 1)
        self.d2 = C(n, n, 3, 1, 2)
        self.d4 = C(n, n, 3, 1, 4)
        self.d8 = C(n, n, 3, 1, 8)
        self.d16 = C(n, n, 3, 1, 16)


class DownSamplerB(_ESPBase):
    """Strided ESP block (3x3 stride-2 reduction, no residual; ``bn``/``act`` are direct children)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        n = n_out // 5
        self._make(C(n_in, n, 3, 2), n, n_out - 4 * n)
        self.bn = nn.BatchNorm2d(n_out, eps=BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self._branches(x)))


class DilatedParllelResidualBlockB(_ESPBase):
    """The ESP block: 1x1 reduce, five dilated 3x3 branches, hierarchical sum, optional residual."""

    def __init__(self, n_in: int, n_out: int, add: bool = True) -> None:
        super().__init__()
        n = n_out // 5
        self._make(C(n_in, n, 1, 1), n, n_out - 4 * n)
        self.bn = BR(n_out)
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._branches(x)
        if self.add:
            y = y + x
        return self.bn(y)


class InputProjectionA(nn.Module):
    """``s`` successive 3x3 stride-2 average poolings of the raw image (no parameters)."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList([nn.AvgPool2d(3, stride=2, padding=1) for _ in range(times)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.pool:
            x = p(x)
        return x


class ESPNetEncoder(nn.Module):
    """ESPNet-C encoder (p, q): returns ``(scores at 1/8, out0, out0_cat, out1_cat)``."""

    def __init__(self, num_classes: int, p: int = 2, q: int = 8) -> None:
        super().__init__()
        self.level1 = CBR(3, 16, 3, 2)
        self.sample1 = InputProjectionA(1)
        self.sample2 = InputProjectionA(2)
        self.b1 = BR(16 + 3)
        self.level2_0 = DownSamplerB(16 + 3, 64)
        self.level2 = nn.ModuleList([DilatedParllelResidualBlockB(64, 64) for _ in range(p)])
        self.b2 = BR(128 + 3)
        self.level3_0 = DownSamplerB(128 + 3, 128)
        self.level3 = nn.ModuleList([DilatedParllelResidualBlockB(128, 128) for _ in range(q)])
        self.b3 = BR(256)
        self.classifier = C(256, num_classes, 1, 1)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out0 = self.level1(x)
        inp1 = self.sample1(x)
        inp2 = self.sample2(x)
        out0_cat = self.b1(torch.cat([out0, inp1], 1))
        out1_0 = self.level2_0(out0_cat)
        out1 = out1_0
        for blk in self.level2:
            out1 = blk(out1)
        out1_cat = self.b2(torch.cat([out1, out1_0, inp2], 1))
        out2_0 = self.level3_0(out1_cat)
        out2 = out2_0
        for blk in self.level3:
            out2 = blk(out2)
        out2_cat = self.b3(torch.cat([out2_0, out2], 1))
        return self.classifier(out2_cat), out0, out0_cat, out1_cat


class ESPNet(nn.Module):
    """ESPNet (encoder + light decoder) producing ``(N, K, H, W)`` logits.

    Parameters
    ----------
    num_classes
        Number of outputs ``K`` (12 for the CamVid weights, 20 for the Cityscapes weights).
    p, q
        Number of ESP blocks at levels 2 and 3 (the published models use p=2, q=8).
    decoder_skip
        What the decoder's last ``conv`` concatenates with the upsampled scores:
        ``"out0_cat"`` (19 channels, the CamVid file) or ``"out0"`` (16 channels, the
        Cityscapes file).
    """

    def __init__(
        self,
        num_classes: int,
        p: int = 2,
        q: int = 8,
        decoder_skip: Literal["out0_cat", "out0"] = "out0_cat",
    ) -> None:
        super().__init__()
        if decoder_skip not in ("out0_cat", "out0"):
            raise ValueError(f"decoder_skip: expected 'out0_cat' or 'out0', got {decoder_skip!r}")
        k = num_classes
        self.num_classes = k
        self.decoder_skip = decoder_skip
        self.encoder = ESPNetEncoder(k, p, q)
        self.level3_C = C(128 + 3, k, 1, 1)
        self.br = nn.BatchNorm2d(k, eps=BN_EPS)
        skip_ch = 19 if decoder_skip == "out0_cat" else 16
        self.conv = CBR(skip_ch + k, k, 3, 1)
        self.up_l3 = nn.Sequential(nn.ConvTranspose2d(k, k, 2, stride=2, bias=False))
        self.combine_l2_l3 = nn.Sequential(
            BR(2 * k), DilatedParllelResidualBlockB(2 * k, k, add=False)
        )
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(k, k, 2, stride=2, bias=False), BR(k))
        self.classifier = nn.ConvTranspose2d(k, k, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ESPNet: expected input (N, 3, H, W), got {tuple(x.shape)}")
        check_divisible(int(x.shape[2]), int(x.shape[3]))
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return self._forward(x)
        # On the CPU most of ESPNet's time goes to denormal floats in the PReLU / BatchNorm chain;
        # flushing them to zero gives bitwise the same float32 logits on CamVid (43 test + val
        # images, both published models: max |diff| 0.0) and runs 3.5x (CamVid weights) to 7x
        # (Cityscapes weights) faster. The flag is per process and restored on the way out.
        torch.set_flush_denormal(True)
        try:
            return self._forward(x)
        finally:
            torch.set_flush_denormal(False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, out0, out0_cat, out1_cat = self.encoder(x)
        up_l3 = self.up_l3(self.br(scores))
        comb = self.combine_l2_l3(torch.cat([self.level3_C(out1_cat), up_l3], 1))
        up_l2 = self.up_l2(comb)
        skip = out0_cat if self.decoder_skip == "out0_cat" else out0
        return self.classifier(self.conv(torch.cat([up_l2, skip], 1)))


def load_espnet(
    weights: str | os.PathLike,
    num_classes: int,
    decoder_skip: Literal["out0_cat", "out0"],
    map_location: str | torch.device = "cpu",
) -> ESPNet:
    """Build an :class:`ESPNet` and load a published ``state_dict`` strictly; returns it in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``weights`` does not exist.
    """
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ESPNet weights not found: {path}")
    model = ESPNet(num_classes, decoder_skip=decoder_skip)
    sd = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()
