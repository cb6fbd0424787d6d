"""Ensemble temperature scaling (``../shared/methods.md`` §3.6)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.base import PROB_FLOOR, Calibrator
from segcal.calibrators.registry import register
from segcal.calibrators.temperature import (
    check_temperature_options,
    raw_temperature,
    temperature_of,
)


@register
class EnsembleTemperatureScaling(Calibrator):
    """Ensemble temperature scaling (ETS; Zhang et al. 2020), methods.md §3.6.

    ``q = w0·S(z/T) + w1·S(z) + w2/C`` with ``T = softplus(r) + 1e-6`` (init 1) and
    ``w = softmax(raw)``, raw init (1, 0, 0). Two-stage fit: T by NLL (the objective), then w with T
    fixed. ``forward`` returns ``log max(q, 1e-12)``.

    Guarantees: translation invariant; argmax- and order-preserving in the weak sense (each
    component is monotone in z; classes whose mixture probabilities round to the same float, or
    hit the 1e-12 floor, tie).
    """

    name = "ets"
    aliases = ("ensemble_temperature", "ensemble_temperature_scaling")
    description = "ensemble TS: w0 S(z/T) + w1 S(z) + w2/C (1+3)"
    section = "§3.6"
    translation_invariant = True
    argmax_preserving = True
    order_preserving = True
    default_adam_lr = 0.1

    def __init__(self, num_classes: int | None = None, *, init_temperature: float = 1.0, **kw: Any):
        self.init_temperature, _ = check_temperature_options(init_temperature)
        self._stage: str | None = None
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {"init_temperature": self.init_temperature}

    def _build(self, num_classes: int) -> None:
        self.raw_t = nn.Parameter(torch.tensor(raw_temperature(self.init_temperature), dtype=torch.float32))
        self.raw_w = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

    @property
    def temperature(self) -> float:
        return float(temperature_of(self.raw_t.detach()))

    @property
    def weights(self) -> list[float]:
        return F.softmax(self.raw_w.detach(), 0).tolist()

    def _fit_stages(self):
        return [("temperature", [self.raw_t]), ("weights", [self.raw_w])]

    def _set_stage(self, stage: str | None) -> None:
        self._stage = stage

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        t = temperature_of(self.raw_t)
        if self._stage == "temperature":
            return rows / t
        w = F.softmax(self.raw_w, 0)
        c = rows.shape[1]
        q = w[0] * F.softmax(rows / t, dim=1) + w[1] * F.softmax(rows, dim=1) + w[2] / c
        return torch.log(q.clamp_min(PROB_FLOOR))

