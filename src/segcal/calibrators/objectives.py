"""Fitting objectives of the calibrators: NLL (default), Brier, soft Dice and differentiable ECE.

Every objective is written as *additive statistics* over pixels plus a final (possibly
non-linear) reduction, so the one fitting loop (:mod:`segcal.calibrators.fitting`) can evaluate it
exactly on data processed in chunks: ``value = finalize(Σ_chunks stats(chunk), n_pixels)``.
For linear objectives (NLL, Brier) ``finalize`` divides by the pixel count; for soft Dice and the
differentiable ECE the loop first accumulates the statistics without gradients, then
back-propagates chunk by chunk through ``d finalize / d stats`` (exact, bounded memory).

* ``nll``: mean cross-entropy of the calibrated distribution (methods.md §4 NLL).
* ``brier``: mean over pixels of ``Σ_k (q_k − 1[y = k])²`` (multiclass sum form, §4).
* ``dice``: ``1 − mean_k soft-Dice_k`` over the classes present in the labels, with
  ``soft-Dice_k = (2 Σ q_k 1[y=k] + ε) / (Σ q_k + Σ 1[y=k] + ε)`` computed over all pixels.
  Fitting for likelihood can flip decisions and cost Dice ([RPH], methods.md §1).
* ``dece``: the LogSumExp differentiable ECE of Cal-SFDA (§3.15(a)) over the pooled pixels,
  ``n_bins = 15`` by default (see :mod:`segcal.losses`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segcal.losses import ece_from_stats, smooth_confidence, soft_binned_ece_stats

__all__ = ["NLL", "OBJECTIVES", "Objective", "ScaledNLL", "get_objective"]


class Objective:
    """Base class: additive per-chunk statistics and a final reduction."""

    name = "objective"
    #: ``finalize(stats, n) == stats / n``: no first pass needed for chunked gradients.
    linear = True

    def stats(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, stats: torch.Tensor, n: int) -> torch.Tensor:
        return stats / max(n, 1)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.finalize(self.stats(logits, labels), labels.shape[0])


class NLL(Objective):
    name = "nll"

    def stats(self, logits, labels):
        return F.cross_entropy(logits, labels, reduction="sum")

    def scaled_stats(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``stats(z / t, labels)`` for a scalar temperature ``t`` (a per-row scaling calibrator:
        TS), with the closed-form gradient in ``t`` only (:class:`ScaledNLL`; ``z`` is data)."""
        return ScaledNLL.apply(z, t, labels)


class ScaledNLL(torch.autograd.Function):
    """``Σ_i [logsumexp(z_i / t) − z_{i,y_i} / t]`` and its derivative in ``t`` (methods.md §3.1).

    ``d/dt = Σ_i (z_{i,y_i} − Σ_k q_ik z_ik) / t²`` with ``q = S(z / t)``: one log-softmax
    forward and two reductions backward instead of autograd's division, log-softmax, NLL and
    their backward passes (each a parallel region over the chunk). No gradient reaches ``z``.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logq = F.log_softmax(z / t, dim=1)
        ctx.save_for_backward(z, t, labels, logq)
        return F.nll_loss(logq, labels, reduction="sum")  # = cross_entropy(z / t): the same value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:  # type: ignore[override]
        z, t, labels, logq = ctx.saved_tensors
        # per row first (z_iy - E_q z_i: centred), then over rows in float64: two separate sums
        # over the chunk would cancel in float32 near the optimum
        d = z.gather(1, labels[:, None]).squeeze(1) - (logq.exp() * z).sum(1)
        return None, grad * d.sum(dtype=torch.float64).to(t.dtype) / (t * t), None


class Brier(Objective):
    name = "brier"

    def stats(self, logits, labels):
        q = F.softmax(logits, dim=1)
        # Σ_k (q_k − y_k)² = Σ_k q_k² − 2 q_y + 1
        return (q.square().sum(1) - 2 * q.gather(1, labels[:, None]).squeeze(1) + 1).sum()


class SoftDice(Objective):
    name = "dice"
    linear = False

    def __init__(self, eps: float = 1.0) -> None:
        self.eps = float(eps)

    def stats(self, logits, labels):
        q = F.softmax(logits, dim=1)
        c = q.shape[1]
        onehot = F.one_hot(labels, c).to(q.dtype)
        return torch.stack([(q * onehot).sum(0), q.sum(0), onehot.sum(0)], dim=1)  # (C, 3)

    def finalize(self, stats, n):
        inter, psum, ysum = stats.unbind(1)
        dice = (2 * inter + self.eps) / (psum + ysum + self.eps)
        present = ysum > 0
        if not bool(present.any()):
            return stats.new_zeros(())
        return 1 - dice[present].mean()


class DECE(Objective):
    name = "dece"
    linear = False

    def __init__(self, n_bins: int = 15, t: float = 1e-5) -> None:
        self.n_bins = int(n_bins)
        self.t = float(t)

    def stats(self, logits, labels):
        q = F.softmax(logits, dim=1)
        conf = smooth_confidence(q, self.t, dim=1)
        correct = q.argmax(1) == labels
        return soft_binned_ece_stats(conf, correct, self.n_bins)

    def finalize(self, stats, n):
        return ece_from_stats(stats, float(n))


OBJECTIVES: dict[str, type[Objective]] = {
    "nll": NLL,
    "brier": Brier,
    "dice": SoftDice,
    "soft_dice": SoftDice,
    "dece": DECE,
    "ece": DECE,
}


def get_objective(name: str | Objective) -> Objective:
    """Return an objective instance from its name (``nll``, ``brier``, ``dice``, ``dece``)."""
    if isinstance(name, Objective):
        return name
    try:
        return OBJECTIVES[str(name).lower()]()
    except KeyError:
        raise ValueError(
            f"objective: unknown {name!r}; expected one of {sorted(set(OBJECTIVES))}"
        ) from None
