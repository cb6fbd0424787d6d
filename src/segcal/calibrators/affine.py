"""Affine calibrators: vector scaling, matrix scaling, TI matrix scaling, Dirichlet calibration.

``../shared/methods.md`` §3.2-§3.5. All maps are ``out = W x + b`` per pixel with ``x`` the raw
logits (VS, MS, MSc) or ``log S(z)`` (DC). The ODIR-style regulariser of Fiducio is used
(``lambda_reg · mean(off-diagonal W²) + mu_reg · mean(b²)`` -- *means*, methods.md §3.3; for VS
``lambda_reg · mean((w − 1)²) + mu_reg · mean(b²)``, §3.2). Both default to 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segcal.calibrators.base import Calibrator
from segcal.calibrators.registry import register


def odir(matrix: torch.Tensor, bias: torch.Tensor, lambda_reg: float, mu_reg: float) -> torch.Tensor | None:
    """``lambda_reg · mean_{i≠j} W_ij² + mu_reg · mean_k b_k²`` (None when both weights are 0)."""
    reg = None
    c = matrix.shape[-1]
    if lambda_reg > 0 and c > 1:
        off = ~torch.eye(c, dtype=torch.bool, device=matrix.device)
        reg = lambda_reg * matrix[..., off].square().mean()
    if mu_reg > 0:
        t = mu_reg * bias.square().mean()
        reg = t if reg is None else reg + t
    return reg


class _Regularised(Calibrator):
    def __init__(self, num_classes: int | None = None, *, lambda_reg: float = 0.0, mu_reg: float = 0.0, **kw: Any):
        if lambda_reg < 0 or mu_reg < 0:
            raise ValueError(f"lambda_reg/mu_reg: expected >= 0, got {lambda_reg}, {mu_reg}")
        self.lambda_reg = float(lambda_reg)
        self.mu_reg = float(mu_reg)
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {"lambda_reg": self.lambda_reg, "mu_reg": self.mu_reg}


@register
class VectorScaling(_Regularised):
    """Vector scaling (VS; "LogS" in [SEL]), methods.md §3.2: ``w ⊙ z + b``, init w = 1, b = 0.

    2C parameters. Regulariser ``lambda_reg · mean((w−1)²) + mu_reg · mean(b²)``.
    NOT translation invariant (``S(w⊙(z+c1)+b) = S(w⊙z + b + c·w)``) unless all ``w_k`` are equal;
    not argmax-preserving. Use ``vs_ti`` (VS on ``log S(z)``) for a TI version.
    """

    name = "vs"
    aliases = ("vector", "vector_scaling", "logs")
    description = "vector scaling w*z+b (2C)"
    section = "§3.2"

    def _build(self, num_classes: int) -> None:
        self.w = nn.Parameter(torch.ones(num_classes))
        self.b = nn.Parameter(torch.zeros(num_classes))

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.w + self.b

    def _regularizer(self):
        reg = None
        if self.lambda_reg > 0:
            reg = self.lambda_reg * (self.w - 1).square().mean()
        if self.mu_reg > 0:
            t = self.mu_reg * self.b.square().mean()
            reg = t if reg is None else reg + t
        return reg


@register
class MatrixScaling(_Regularised):
    """Matrix scaling (MS), methods.md §3.3: ``W z + b``, init W = I, b = 0; C² + C parameters.

    ODIR-style regulariser on the off-diagonal of W and on b (means). NOT translation invariant
    (TI iff ``W·1 ∝ 1``; as ``c → ∞`` the output collapses onto ``argmax(W·1)``, §1); may flip the
    argmax. ``ms_ti`` (MS on ``log S(z)``) and ``msc`` are TI versions.
    """

    name = "ms"
    aliases = ("matrix", "matrix_scaling")
    description = "matrix scaling W z + b (C^2+C), ODIR"
    section = "§3.3"

    def _build(self, num_classes: int) -> None:
        self.W = nn.Parameter(torch.eye(num_classes))
        self.b = nn.Parameter(torch.zeros(num_classes))

    def weight(self) -> torch.Tensor:
        return self.W

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, rows, self.weight().t())

    def _regularizer(self):
        return odir(self.weight(), self.b, self.lambda_reg, self.mu_reg)


@register
class TIMatrixScaling(MatrixScaling):
    """TI matrix scaling (MSc), methods.md §3.4: ``W z + b`` with equal row sums of W.

    The first C−1 columns of W and one shared row sum ``s`` (init 1) are learned; the last column
    is ``s − Σ_{j<C−1} W[:, j]``, so ``W·1 = s·1`` and ``S(W(z + c1) + b) = S(Wz + b)``.
    Init: identity. C(C−1) + 1 + C parameters; the regulariser acts on the reconstructed W.
    Translation invariant; not argmax-preserving.
    """

    name = "msc"
    aliases = ("ti_matrix_scaling", "matrix_ti")
    description = "TI matrix scaling, equal row sums (C^2+1)"
    section = "§3.4"
    translation_invariant = True

    def _build(self, num_classes: int) -> None:
        self.W_free = nn.Parameter(torch.eye(num_classes)[:, : num_classes - 1].clone())
        self.s = nn.Parameter(torch.ones(()))
        self.b = nn.Parameter(torch.zeros(num_classes))

    def weight(self) -> torch.Tensor:
        last = self.s - self.W_free.sum(1, keepdim=True)
        return torch.cat([self.W_free, last], dim=1)


@register
class DirichletCalibration(MatrixScaling):
    """Dirichlet calibration (DC; "DirS"), methods.md §3.5: ``W log S(z) + b``, full C×C W.

    Init W = I, b = 0 (C² + C parameters); ODIR-style regulariser (``lambda_reg``, ``mu_reg``).
    Translation invariant because ``log S`` is; not argmax-preserving. Probabilities are logged
    with a 1e-12 floor.
    """

    name = "dc"
    aliases = ("dirichlet", "dirichlet_calibration", "dirs")
    description = "Dirichlet calibration W log S(z) + b (C^2+C), ODIR"
    section = "§3.5"
    translation_invariant = True
    input_space = "logprobs"
