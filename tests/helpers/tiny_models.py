"""Tiny random-weight models for tests that register a model by name (no weights on disk)."""

from __future__ import annotations

import torch


class PixelConv(torch.nn.Module):
    """A 1 x 1 convolution from 3 image channels to 3 class logits: the smallest segmentation model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
