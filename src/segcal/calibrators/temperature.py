"""Temperature scaling (``../shared/methods.md`` §3.1)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.base import Calibrator, inverse_softplus
from segcal.calibrators.registry import register

T_EPS = 1e-6


@register
class TemperatureScaling(Calibrator):
    """Temperature scaling (TS), methods.md §3.1: ``q = S(z / T)``.

    ``T = softplus(r) + 1e-6`` (init ``T = init_temperature``, 1 by default); one parameter.

    Guarantees: translation invariant (``(z + c·1)/T = z/T + (c/T)·1``), argmax- and (strictly)
    order-preserving (division by ``T > 0`` is monotone).
    """

    name = "ts"
    aliases = ("temperature", "temperature_scaling")
    description = "temperature scaling z/T (1 parameter)"
    section = "§3.1"
    translation_invariant = True
    argmax_preserving = True
    order_preserving = True
    default_adam_lr = 0.1

    def __init__(self, num_classes: int | None = None, *, init_temperature: float = 1.0, **kw: Any):
        if not init_temperature > 0:
            raise ValueError(f"init_temperature: expected > 0, got {init_temperature}")
        self.init_temperature = float(init_temperature)
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {"init_temperature": self.init_temperature}

    def _build(self, num_classes: int) -> None:
        raw = inverse_softplus(max(self.init_temperature - T_EPS, 1e-12))
        self.raw_t = nn.Parameter(torch.tensor(raw, dtype=torch.float32))

    @property
    def temperature(self) -> float:
        """The fitted temperature ``T``."""
        return float(F.softplus(self.raw_t.detach()) + T_EPS)

    def _t(self) -> torch.Tensor:
        return F.softplus(self.raw_t) + T_EPS

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return rows / self._t()
