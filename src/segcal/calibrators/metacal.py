"""Meta-Cal* entropy-threshold scaling as implemented in [SEL] (``../shared/methods.md`` §3.13).

Per pixel: ``H = −Σ_k p_k log p_k`` of ``p = S(z)``; if ``H < τ`` the output is ``z / T``, else a
uniform distribution (constant logits, i.e. ``T → ∞``). ``T`` is fitted by the one loop on the
kept pixels (own-target stage hook); ``τ`` is given or chosen on the validation split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.base import Calibrator
from segcal.calibrators.data import Batch, FitData
from segcal.calibrators.fitting import evaluate
from segcal.calibrators.objectives import NLL
from segcal.calibrators.registry import register
from segcal.calibrators.temperature import raw_temperature, temperature_of
from segcal.validation import check_scores

__all__ = ["MetaCalScaling"]


def entropy(z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy (nats) of ``S(z)`` along ``dim`` (translation invariant)."""
    logp = F.log_softmax(z, dim=dim)
    return -(logp.exp() * logp).sum(dim)


@register
class MetaCalScaling(Calibrator):
    """Meta-Cal* ([SEL] ``Meta_Scaling``), methods.md §3.13: ``z/T`` where ``H(S(z)) < τ``, else
    uniform.

    Parameters
    ----------
    tau
        Entropy threshold (nats); ``None`` (default) = chosen on the validation split (on the fit
        data without ``val``) among the ``tau_quantiles`` of its pixel entropies, by the NLL of
        the calibrated output (uniform = ``log C`` on rejected pixels), refitting ``T`` for each.
    tau_quantiles
        Candidate quantiles (default 0.5 ... 0.99: at least 1% of pixels rejected, the method's
        premise).
    correct_weight
        Loss weight of correctly predicted kept pixels when fitting ``T``: 0.5 is the expected
        value of [SEL]'s "all mispredictions + a random half of the correct pixels".

    Guarantees: translation invariant. Argmax/order are preserved **for kept pixels only**:
    rejected pixels become uniform (ties), so the calibrator does not declare AP/OP;
    :meth:`segmentation` returns the original argmax for segmentation metrics (§7.8).
    """

    name = "metacal"
    aliases = ("meta_cal", "meta_scaling", "metacal_star")
    description = "Meta-Cal*: z/T where entropy < tau, uniform elsewhere (AP/OP on kept pixels only)"
    section = "§3.13"
    translation_invariant = True
    argmax_preserving = False
    order_preserving = False
    preservation_note = "argmax and order preserved on kept pixels only; segmentation() keeps the argmax"
    default_adam_lr = 0.1

    def __init__(self, num_classes: int | None = None, *, tau: float | None = None,
                 tau_quantiles: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
                 correct_weight: float = 0.5, **kw: Any) -> None:
        if tau is not None and not float(tau) > 0:
            raise ValueError(f"tau: expected > 0, got {tau}")
        qs = [float(q) for q in tau_quantiles]
        if not qs or any(not 0 < q <= 1 for q in qs):
            raise ValueError(f"tau_quantiles: expected values in (0, 1], got {list(tau_quantiles)}")
        if not 0 < float(correct_weight) <= 1:
            raise ValueError(f"correct_weight: expected a value in (0, 1], got {correct_weight}")
        self._tau_fixed = None if tau is None else float(tau)
        self.tau_quantiles = qs
        self.correct_weight = float(correct_weight)
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {"tau": self._tau_fixed, "tau_quantiles": list(self.tau_quantiles),
                "correct_weight": self.correct_weight}

    def _build(self, num_classes: int) -> None:
        self.raw_t = nn.Parameter(torch.tensor(raw_temperature(1.0), dtype=torch.float32))
        tau = self._tau_fixed if self._tau_fixed is not None else float("inf")
        self.register_buffer("tau_", torch.tensor(tau, dtype=torch.float32))

    @property
    def temperature(self) -> float:
        return float(temperature_of(self.raw_t.detach()))

    @property
    def tau(self) -> float:
        return float(self.tau_)

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        keep = entropy(rows) < self.tau_
        t = temperature_of(self.raw_t)
        return torch.where(keep[:, None], rows / t, torch.zeros_like(rows))

    def segmentation(self, logits: Any) -> Any:
        """The segmentation of the ORIGINAL logits (``argmax`` over classes; numpy in -> numpy
        out): Meta-Cal*'s uniform rows carry no decision (methods.md §3.13, §7.8)."""
        is_np = isinstance(logits, np.ndarray)
        t = check_scores(logits, "logits", num_classes=self.num_classes)
        out = t.argmax(1)
        return out.numpy() if is_np else out

    # ----------------------------------------------------------------- fitting
    def _fit_stages(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [("temperature", [self.raw_t])]

    def _kept_loss(self, batch: Batch, objective: Any) -> torch.Tensor:
        dev = self.device
        x = self._canonical(batch.x.to(dev))
        y = batch.y.to(dev)
        keep = entropy(x) < self.tau_
        w = torch.where(x.argmax(1) == y, self.correct_weight, 1.0) * keep
        t = temperature_of(self.raw_t)
        return (w * F.cross_entropy(x / t, y, reduction="none")).sum()

    def _stage_loss(self, stage: str) -> Any:
        return self._kept_loss

    def _post_fit(self, train: FitData, val: FitData | None) -> dict[str, Any]:
        data = val if val is not None else train
        chunk = self._fit_kw["chunk_size"]
        if self._tau_fixed is not None:
            return {"tau": self._tau_fixed, "tau_selected_by": "given"}
        with torch.no_grad():
            ent = torch.cat([entropy(self._canonical(b.x.to(self.device))).cpu() for b in data.iter_chunks(chunk)])
        ent = ent[torch.randperm(ent.numel(), generator=torch.Generator().manual_seed(0))[:10**6]]
        cands = sorted({float(np.quantile(ent.numpy(), q)) for q in self.tau_quantiles})
        objective = NLL()
        table = {}
        best = (float("inf"), None, None)
        for tau in cands:
            self.tau_.fill_(tau)
            with torch.no_grad():
                self.raw_t.fill_(raw_temperature(1.0))
            self._run_stage("temperature", [self.raw_t], train, val, objective)
            with torch.no_grad():
                v = evaluate(self._stats_fn, data, objective, chunk)
            table[repr(tau)] = {"nll": v, "temperature": self.temperature}
            if v < best[0]:
                best = (v, tau, self.raw_t.detach().clone())
        self.tau_.fill_(best[1])
        with torch.no_grad():
            self.raw_t.copy_(best[2])
        return {"tau": best[1], "tau_grid": table, "tau_selected_by": "nll",
                "selection_split": "val" if val is not None else "fit"}
