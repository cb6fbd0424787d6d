"""Temperature scaling (``../shared/methods.md`` §3.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.base import Calibrator, inverse_softplus
from segcal.calibrators.registry import register

T_EPS = 1e-6


def check_temperature_options(
    init_temperature: float, bounds: Sequence[float] | None = None
) -> tuple[float, tuple[float, float] | None]:
    """Validate an initial temperature and optional ``(lo, hi)`` bounds (``0 < lo < init < hi``)."""
    if bounds is not None:
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise ValueError(f"bounds: expected (lo, hi) with 0 < lo < hi, got {bounds!r}") from None
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"bounds: expected (lo, hi) with 0 < lo < hi < inf, got {bounds!r}")
        if not lo < init_temperature < hi:
            raise ValueError(
                f"init_temperature: expected inside bounds ({lo}, {hi}), got {init_temperature}"
            )
        return float(init_temperature), (lo, hi)
    if not (init_temperature > 0 and math.isfinite(init_temperature)):
        raise ValueError(f"init_temperature: expected a finite value > 0, got {init_temperature}")
    return float(init_temperature), None


def raw_temperature(t: float, bounds: tuple[float, float] | None = None) -> float:
    """Unconstrained parameter of temperature ``t`` (inverse of :func:`temperature_of`)."""
    if bounds is None:
        return inverse_softplus(max(t - T_EPS, 1e-12))
    lo, hi = bounds
    u = (t - lo) / (hi - lo)
    return math.log(u / (1.0 - u))


def temperature_of(raw: torch.Tensor, bounds: tuple[float, float] | None = None) -> torch.Tensor:
    """``T = softplus(raw) + 1e-6`` (unbounded) or ``T = lo + (hi - lo)·sigmoid(raw)`` (bounded)."""
    if bounds is None:
        return F.softplus(raw) + T_EPS
    lo, hi = bounds
    return lo + (hi - lo) * torch.sigmoid(raw)


@register
class TemperatureScaling(Calibrator):
    """Temperature scaling (TS), methods.md §3.1: ``q = S(z / T)``.

    ``T = softplus(r) + 1e-6`` (init ``T = init_temperature``, 1 by default); one parameter.
    With ``bounds=(lo, hi)`` the temperature is bounded, ``T = lo + (hi − lo)·sigmoid(r)``
    (methods.md §8 item 5, e.g. ``(0.05, 5)``): a guard against degenerate fits on tiny or
    label-noisy calibration sets.

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

    def __init__(self, num_classes: int | None = None, *, init_temperature: float = 1.0,
                 bounds: Sequence[float] | None = None, **kw: Any):
        self.init_temperature, self.bounds = check_temperature_options(init_temperature, bounds)
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {"init_temperature": self.init_temperature,
                "bounds": list(self.bounds) if self.bounds is not None else None}

    def _build(self, num_classes: int) -> None:
        raw = raw_temperature(self.init_temperature, self.bounds)
        self.raw_t = nn.Parameter(torch.tensor(raw, dtype=torch.float32))

    @property
    def temperature(self) -> float:
        """The fitted temperature ``T``."""
        return float(self._t().detach())

    def _t(self) -> torch.Tensor:
        return temperature_of(self.raw_t, self.bounds)

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return rows / self._t()

    def _row_temperature(self) -> torch.Tensor | None:
        """``T``: :meth:`_map` is ``rows / T``, so the NLL of a chunk is fitted through
        :class:`~segcal.calibrators.objectives.ScaledNLL` (the loss and its closed-form gradient
        in ``T``; autograd carries it on to ``raw_t``)."""
        return self._t()
