"""Local temperature scaling (LTS) and image-based TS (IBTS) (Ding et al., ICCV 2021).

Exact architecture of ``../shared/methods.md`` §3.11 (uncbiag/LTS ``calibration_models.py``), for
any number of classes, 2D images (``Conv2d``) and 3D volumes (``Conv3d``, kernel 5x5x5 with the
same rule), with or without the image branch:

* every layer is ``Conv(in -> 1, kernel 5, dilation 2)`` on the input padded by 4 with
  ``reflect`` padding (9-pixel receptive field); all weights and biases are zero-initialised;
* four temperature branches on the logits ``t_i = conv_i(z) + 1`` and three gates ``a_1..a_3``:
  ``t_A = σ(a_1) t_1 + (1 − σ(a_1)) t_2``, ``t_B = σ(a_2) t_3 + (1 − σ(a_2)) t_4``,
  ``t_z = σ(a_3) t_A + (1 − σ(a_3)) t_B``;
* with the image (``use_image=True``): ``t_img = conv_img(x) + 1`` and a gate ``a_img = conv(z)``,
  ``T = σ(a_img) t_z + (1 − σ(a_img)) t_img``; without it ``T = t_z`` (7 convolutions);
* LTS: ``T_final = ReLU(T + 1) + 1e-8`` per pixel; IBTS: ``T_final = ReLU(mean_pixels(T) + 1) + 1e-8``
  per image. Output ``z / T_final``. With zero init ``T ≡ 1``: **the initial temperature is 2**.

Parameters: ``8·(25C + 1) + 76`` (2D, with image; ``200C + 84``), ``7·(25C + 1)`` without the
image; 3D: ``125`` instead of ``25`` taps per channel.

Deviation, documented: ``reflect`` padding needs every spatial size ``> 4``; smaller inputs fall
back to ``replicate`` padding. An ``(M, C)`` table has no spatial context: each row is calibrated
as an isolated 1-pixel image (replicate padding; the convolutions reduce to their kernel sums).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.base import Calibrator
from segcal.calibrators.data import FitData, check_image
from segcal.calibrators.registry import register
from segcal.calibrators.wrappers import translation_invariant
from segcal.validation import as_tensor

__all__ = ["ImageBasedTemperatureScaling", "LocalTemperatureScaling", "LocalTemperatureScalingTI"]

PAD = 4


def _pad(x: torch.Tensor, dims: int) -> torch.Tensor:
    mode = "reflect" if min(x.shape[2:]) > PAD else "replicate"
    return F.pad(x, [PAD] * (2 * dims), mode=mode)


class TemperatureTree(nn.Module):
    """The LTS temperature network (methods.md §3.11): returns ``T`` (before ``ReLU(T + 1)``)."""

    def __init__(self, num_classes: int, dims: int = 2, use_image: bool = False,
                 image_channels: int = 3) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {dims}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.dims = dims
        self.use_image = bool(use_image)

        def layer(cin: int) -> nn.Module:
            m = conv(cin, 1, kernel_size=5, dilation=2, padding=0, bias=True)
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
            return m

        c = int(num_classes)
        self.temps = nn.ModuleList([layer(c) for _ in range(4)])
        self.gates = nn.ModuleList([layer(c) for _ in range(3)])
        if self.use_image:
            self.image_gate = layer(c)
            self.image_temp = layer(int(image_channels))

    @staticmethod
    def _isolated(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """The conv on isolated pixels ``(M, C_in)``: replicate padding of a 1-pixel image makes
        every tap see the same value, so the conv is ``(Σ_taps w) · z + b``."""
        w = m.weight.sum(dim=tuple(range(2, m.weight.ndim)))
        return F.linear(rows, w, m.bias)

    def forward(self, z: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if z.ndim == 2:  # (M, C) rows of isolated pixels -> (M, 1)
            zp = z

            def conv(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
                return self._isolated(m, v)
        else:
            zp = _pad(z, self.dims)

            def conv(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
                return m(v)
        t1, t2, t3, t4 = (conv(m, zp) + 1 for m in self.temps)
        a1, a2, a3 = (torch.sigmoid(conv(m, zp)) for m in self.gates)
        ta = a1 * t1 + (1 - a1) * t2
        tb = a2 * t3 + (1 - a2) * t4
        tz = a3 * ta + (1 - a3) * tb
        if not self.use_image:
            return tz
        if image is None:
            raise ValueError("image: this calibrator was built with use_image=True; pass image=")
        ip = image if z.ndim == 2 else _pad(image, self.dims)
        timg = conv(self.image_temp, ip) + 1
        ai = torch.sigmoid(conv(self.image_gate, zp))
        return ai * tz + (1 - ai) * timg


@register
class LocalTemperatureScaling(Calibrator):
    """Local temperature scaling (LTS; Ding et al. 2021), methods.md §3.11: ``z / T(x)``.

    Parameters
    ----------
    spatial_dims
        2 (images, ``Conv2d``) or 3 (volumes, ``Conv3d``); ``None`` (default) = taken from the
        fit data (2 for ``(M, C)`` tables).
    use_image
        Use the image branch (§3.11: ``t_img = conv_img(x) + 1`` gated by ``a_img = conv(z)``):
        the input image ``(N, image_channels, *spatial)`` is then required at fit
        (``fit(..., images=..., val_images=...)``, an ``"image"`` entry in streamed batches, or an
        image folder) and at apply time (``forward(logits, image=...)``); a missing or mis-shaped
        image is a ``ValueError``. Default False (prediction folders carry no images).
    image_channels
        Channels of the image (3 for RGB).
    **kw
        Common :class:`Calibrator` arguments. Defaults here: Adam (``optimizer="adam"`` unless
        given) lr 1e-4 (§3.11), mini-batches of ``batch_size`` = 4 whole images per step (the LTS
        code; equal-size images are stacked),
        ``max_steps`` = 500 (raise it for large sets: the LTS code runs 200 epochs), validation NLL every ``eval_every`` = 10 steps with best-iterate
        restore (the LTS code checks every 10 iterations).

    Trained on whole images (``spatial = True``). Guarantees: argmax- and order-preserving
    (``T > 0``); **not** translation invariant (the convolutions see raw ``z``); ``lts_ti``
    (the T-net fed ``log S(z)``) is.
    """

    name = "lts"
    aliases = ("local_temperature_scaling", "local_ts")
    description = "local TS z/T(x), T from a tree of dilated 5x5 convs (init T = 2)"
    section = "§3.11"
    translation_invariant = False
    argmax_preserving = True
    order_preserving = True
    spatial = True
    default_adam_lr = 1e-4
    per_image = False

    def __init__(self, num_classes: int | None = None, *, spatial_dims: int | None = None,
                 use_image: bool = False, image_channels: int = 3, **kw: Any) -> None:
        if spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims: expected 2, 3 or None, got {spatial_dims}")
        kw.setdefault("optimizer", "adam")
        kw.setdefault("batch_size", 4)
        kw.setdefault("max_steps", 500)
        self.spatial_dims = spatial_dims
        self.use_image = bool(use_image)
        self.image_channels = int(image_channels)
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "use_image": self.use_image,
                "image_channels": self.image_channels}

    @property
    def uses_image(self) -> bool:
        return self.use_image

    def _build(self, num_classes: int) -> None:
        self.tree = TemperatureTree(num_classes, self.spatial_dims or 2, self.use_image,
                                    self.image_channels)

    def _prepare(self, data: Any, labels: Any, mask: Any, ignore_index: int | None, what: str,
                 progress: bool = False, images: Any = None) -> FitData:
        fd = super()._prepare(data, labels, mask, ignore_index, what, progress, images)
        if what == "logits" and self.spatial_dims is None:
            first = next(iter(fd.iter_batches()))
            self.spatial_dims = 2 if first.x.ndim == 2 else first.x.ndim - 2
            if self.num_classes is not None:
                self._build_params(self.num_classes)
        return fd

    def _temperature(self, x: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        t = self.tree(x, image)
        if self.per_image and t.ndim > 2:
            t = t.mean(dim=tuple(range(2, t.ndim)), keepdim=True)
        return F.relu(t + 1) + 1e-8

    def temperature_map(self, logits: Any, image: Any = None) -> torch.Tensor:
        """``T_final``: ``(N, 1, *spatial)`` (LTS) or ``(N, 1, 1, ...)`` (IBTS), no gradients."""
        self._check_ready()
        x = as_tensor(logits, "logits").to(self.device, torch.float32)
        img = None
        if self.use_image:
            if image is None:
                raise ValueError(f"image: this {self.name} calibrator has an image branch "
                                 "(use_image=True); pass image=")
            img = check_image(image, x, self.image_channels, "image").to(self.device, torch.float32)
        elif image is not None:
            raise ValueError(f"image: given, but this {self.name} calibrator has no image branch")
        with torch.no_grad():
            return self._temperature(self._canonical(x, dim=1), img)

    def _map_image(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_image and image is None:
            raise ValueError(f"image: this {self.name} calibrator has an image branch "
                             "(use_image=True); pass image=")
        if x.ndim == 2:  # (M, C) table: isolated pixels (1-pixel images)
            return x / self._temperature(x, image)
        if x.ndim - 2 != (self.spatial_dims or 2):
            raise ValueError(
                f"logits: this {self.name} calibrator has spatial_dims={self.spatial_dims or 2}, "
                f"got {x.ndim - 2} spatial dimensions"
            )
        return x / self._temperature(x, image)

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return self._map_image(rows)


@register
class ImageBasedTemperatureScaling(LocalTemperatureScaling):
    """Image-based TS (IBTS; Ding et al. 2021), methods.md §3.11: one temperature per image,
    ``T_final = ReLU(mean_pixels(T) + 1) + 1e-8`` from the LTS network. Same parameters and
    guarantees as :class:`LocalTemperatureScaling` (AP, OP, not TI)."""

    name = "ibts"
    aliases = ("image_based_temperature_scaling",)
    description = "image-based TS: z/T_img, T_img = spatial mean of the LTS T-map"
    per_image = True


LocalTemperatureScalingTI = register(translation_invariant(
    LocalTemperatureScaling, name="lts_ti", aliases=("lts(logs)", "local_temperature_scaling_ti")))
