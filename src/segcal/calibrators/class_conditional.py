"""Class-conditional affine calibrators: CDC (= CMS), CMSap, CMSop (``methods.md`` §3.7-§3.9).

Every pixel is routed to the expert of its uncalibrated top class ``c = argmax_k log S(z)_k``;
experts act on ``ℓ = log S(z)`` (so all three are translation invariant) and are fitted **jointly**
(one optimiser, one loss over all pixels, each through its own expert: the paper's choice).
With ``independent_experts=True`` each expert is instead fitted only on its routed pixels (the
Fiducio option, §3.7; "not interchangeable for paper results"): the training loss becomes the
mean over experts of each expert's mean NLL on its own pixels. The experts' parameters are
disjoint, so minimising that sum (plus the mean regulariser) is exactly minimising every
expert's own ``mean NLL_c + reg_c`` separately, in the one fitting loop; it differs from the joint
fit in how each expert's data term is weighted against its regulariser (and in when the shared
optimiser stops). The validation value uses the training split's routing counts.
The regulariser is the mean over experts of the ODIR-style penalty
``lambda_reg · mean(offdiag(A_c)²) + mu_reg · mean(b_c²)`` on the affine map ``(A_c, b_c)`` each
expert induces in the common logit space (for CMSap/CMSop penalising the raw margin parameters
would not mean "close to identity", §3.8). Parameter count O(C³): for low-to-moderate C.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.affine import odir
from segcal.calibrators.base import Calibrator, inverse_softplus
from segcal.calibrators.registry import register


class _ClassConditional(Calibrator):
    input_space = "logprobs"
    translation_invariant = True

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        lambda_reg: float = 0.0,
        mu_reg: float = 0.0,
        init_alpha: float = 1.0,
        init_floor: float = 1e-6,
        independent_experts: bool = False,
        **kw: Any,
    ) -> None:
        if lambda_reg < 0 or mu_reg < 0:
            raise ValueError(f"lambda_reg/mu_reg: expected >= 0, got {lambda_reg}, {mu_reg}")
        if not (init_alpha > 0 and init_floor > 0):
            raise ValueError("init_alpha/init_floor: expected > 0")
        self.lambda_reg = float(lambda_reg)
        self.mu_reg = float(mu_reg)
        self.init_alpha = float(init_alpha)
        self.init_floor = float(init_floor)
        self.independent_experts = bool(independent_experts)
        self._expert_weight: torch.Tensor | None = None
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {
            "lambda_reg": self.lambda_reg,
            "mu_reg": self.mu_reg,
            "init_alpha": self.init_alpha,
            "init_floor": self.init_floor,
            "independent_experts": self.independent_experts,
        }

    def _run_stage(self, stage, params, train, val, objective):
        if self.independent_experts:
            if getattr(objective, "name", None) != "nll":
                raise ValueError(
                    f"objective: independent_experts=True supports 'nll' only, got "
                    f"{getattr(objective, 'name', objective)!r}"
                )
            # pixels routed to each expert in the training split -> per-pixel weight
            # N / (C · n_c), so that loss / N = mean over experts of each expert's mean NLL
            c = int(self.num_classes)
            counts = torch.zeros(c, dtype=torch.float64)
            with torch.no_grad():
                for b in train.iter_chunks(self._fit_kw["chunk_size"]):
                    top = self._canonical(b.x.float()).argmax(1)
                    counts += torch.bincount(top.cpu(), minlength=c).double()
            n = float(counts.sum())
            w = torch.where(counts > 0, n / (c * counts.clamp_min(1)), torch.zeros_like(counts))
            self._expert_weight = w.float().to(self.device)
        try:
            return super()._run_stage(stage, params, train, val, objective)
        finally:
            self._expert_weight = None

    def _stage_loss(self, stage: str) -> Any:
        return self._independent_loss if self.independent_experts else None

    def _independent_loss(self, batch: Any, objective: Any) -> torch.Tensor:
        assert self._expert_weight is not None
        rows = self._canonical(batch.x.to(self.device))
        ce = F.cross_entropy(self._map(rows), batch.y.to(self.device), reduction="none")
        return (ce * self._expert_weight[rows.argmax(1)]).sum()

    def _route(self, rows: torch.Tensor, top: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn(sub_rows, c)`` (-> ``(p, K)``) to the rows whose expert is ``c``."""
        if torch.jit.is_tracing():  # TorchScript export: no data-dependent Python ints (counts)
            out = rows.new_zeros((rows.shape[0], self._out_dim()))
            for c in range(int(self.num_classes or rows.shape[1])):
                idx = torch.nonzero(top == c).squeeze(1)
                out = out.index_copy(0, idx, fn(rows.index_select(0, idx), c))
            return out
        if torch.compiler.is_compiling():  # torch.export / ONNX: no data-dependent sizes; every
            # expert runs on every row and the row's own expert is selected (C times the work)
            out = rows.new_zeros((rows.shape[0], self._out_dim()))
            for c in range(int(self.num_classes or rows.shape[1])):
                out = torch.where((top == c).unsqueeze(1), fn(rows, c), out)
            return out
        return self._apply_groups(*self._group(rows, top), fn)

    def _group(self, rows: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Rows sorted by expert (one stable sort), the count per expert, and the inverse order.

        One gather in and one gather out: O(1) full copies of the chunk, forward and backward,
        instead of one per expert.
        """
        order = torch.argsort(top, stable=True)
        counts = torch.bincount(top, minlength=int(self.num_classes or rows.shape[1])).tolist()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return rows.index_select(0, order), counts, inverse

    def _apply_groups(self, grouped: torch.Tensor, counts: list[int], inverse: torch.Tensor, fn) -> torch.Tensor:
        parts, start = [], 0
        for c, n in enumerate(counts):
            if n:
                parts.append(fn(grouped[start : start + n], c))
            start += n
        if not parts:
            return grouped.new_empty((0, self._out_dim()))
        return torch.cat(parts).index_select(0, inverse)

    def _expert_fn(self):
        """``fn(rows_of_expert_c, c)`` of the current parameters."""
        raise NotImplementedError

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return self._route(rows, rows.argmax(1), self._expert_fn())

    def _features(self, rows: torch.Tensor) -> tuple[Any, ...] | None:
        return self._group(rows, rows.argmax(1))

    def _map_features(self, feats: tuple[Any, ...]) -> torch.Tensor:
        return self._apply_groups(*feats, self._expert_fn())

    def _out_dim(self) -> int:
        return int(self.num_classes or 0)

    def _regularizer(self):
        if self.lambda_reg == 0 and self.mu_reg == 0:
            return None
        a, b = self.induced_affine()
        return odir(a, b, self.lambda_reg, self.mu_reg)


@register
class ClassConditionalDirichlet(_ClassConditional):
    """Class-conditional Dirichlet / matrix scaling (CDC = CMS), methods.md §3.7.

    Expert ``c = argmax z``: ``A_c · log S(z) + b_c`` (init ``A_c = I``, ``b_c = 0``),
    C·(C² + C) parameters, joint fit. Translation invariant; unconstrained, so it can flip the
    argmax (not AP/OP).
    """

    name = "cdc"
    aliases = ("cms", "class_conditional", "class_conditional_matrix_scaling")
    description = "class-conditional Dirichlet/MS, expert by argmax (C^3+C^2)"
    section = "§3.7"

    def _build(self, num_classes: int) -> None:
        c = num_classes
        self.A = nn.Parameter(torch.eye(c).repeat(c, 1, 1))
        self.bias = nn.Parameter(torch.zeros(c, c))

    def induced_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.bias

    def _expert_fn(self):
        return lambda x, c: torch.addmm(self.bias[c], x, self.A[c].t())


class _PositiveExperts(_ClassConditional):
    argmax_preserving = True

    def _build(self, num_classes: int) -> None:
        c, k = num_classes, num_classes - 1
        floor = inverse_softplus(self.init_floor)
        alpha = inverse_softplus(max(self.init_alpha, self.init_floor))
        raw_b = torch.full((c, k, k), floor)
        raw_b[:, torch.arange(k), torch.arange(k)] = alpha
        self.raw_B = nn.Parameter(raw_b)
        self.raw_mu = nn.Parameter(torch.full((c, k), floor))

    def B(self) -> torch.Tensor:
        return F.softplus(self.raw_B)

    def mu(self) -> torch.Tensor:
        return F.softplus(self.raw_mu)


def _competitors(c: int) -> torch.Tensor:
    base = torch.arange(c)
    return torch.stack([base[base != k] for k in range(c)])  # (C, C-1)


@register
class ArgmaxPreservingCMS(_PositiveExperts):
    """Argmax-preserving class-conditional matrix scaling (CMSap), methods.md §3.8.

    For a pixel routed to expert c with ``ℓ = log S(z)``: margins ``m_j = max(ℓ_c − ℓ_j, 0)`` for
    the C−1 competitors, ``t̃ = B_c m + μ_c`` with ``B_c = softplus(raw)`` (init diag 1, off-diag
    1e-6) and ``μ_c = softplus(raw)`` (init 1e-6); output 0 for class c and ``−t̃_j`` for
    competitor j. Every competitor is strictly below the winner, so the argmax is preserved
    (for pixels without a tie at the top). C²(C−1) parameters. Regulariser on the induced
    ``A = 1·e_cᵀ − S·B_c·D``, ``b = −S·μ_c``. Translation invariant; not order-preserving.
    """

    name = "cmsap"
    aliases = ("argmax_preserving", "argmax_preserving_matrix_scaling", "cms_ap")
    description = "class-conditional MS on margins to the top class; argmax-preserving"
    section = "§3.8"

    def _build(self, num_classes: int) -> None:
        super()._build(num_classes)
        self.register_buffer("comp", _competitors(num_classes), persistent=False)

    def _expert_fn(self):
        B, mu = self.B(), self.mu()

        def expert(x: torch.Tensor, c: int) -> torch.Tensor:
            comp = self.comp[c]
            m = (x[:, c : c + 1] - x.index_select(1, comp)).clamp_min(0)
            t = torch.addmm(mu[c], m, B[c].t())
            return torch.zeros_like(x).index_copy(1, comp, -t)

        return expert

    def induced_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(self.num_classes)
        k = c - 1
        dev = self.raw_B.device
        comp = self.comp
        rows = torch.arange(k, device=dev)
        d = torch.zeros(c, k, c, device=dev)
        s = torch.zeros(c, c, k, device=dev)
        e = torch.zeros(c, c, c, device=dev)
        for x in range(c):
            d[x, rows, x] = 1.0
            d[x, rows, comp[x]] = -1.0
            s[x, comp[x], rows] = 1.0
            e[x, :, x] = 1.0
        a = e - s @ self.B() @ d
        b = -(s @ self.mu().unsqueeze(-1)).squeeze(-1)
        return a, b


@register
class OrderPreservingCMS(_PositiveExperts):
    """Order-preserving class-conditional matrix scaling (CMSop), methods.md §3.9.

    Sort ``ℓ = log S(z)`` descending (``s_1 ≥ … ≥ s_C``, permutation π; stable sort), gaps
    ``g_k = max(s_k − s_{k+1}, 0)``, ``t̃ = B_c g + μ_c`` (positive via softplus, init as CMSap,
    expert c = top class), sorted outputs ``h_1 = 0``, ``h_{k+1} = −Σ_{i≤k} t̃_i`` (strictly
    decreasing), scattered back with π. The full order is preserved for resolved (non-tied) orders.
    C²(C−1) parameters; regulariser on ``A = 1·e_1ᵀ − L·B_c·D``, ``b = −L·μ_c`` (sorted coordinates).
    Translation invariant, argmax- and order-preserving.
    """

    name = "cmsop"
    aliases = ("order_preserving", "order_preserving_matrix_scaling", "cms_op")
    description = "class-conditional MS on sorted gaps; order-preserving"
    section = "§3.9"
    order_preserving = True

    def _out_dim(self) -> int:
        return int(self.num_classes) - 1

    def _expert_fn(self):
        B, mu = self.B(), self.mu()
        return lambda g, c: torch.addmm(mu[c], g, B[c].t())

    @staticmethod
    def _sorted_gaps(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaps ``max(s_k − s_{k+1}, 0)`` of the rows sorted descending (stable), and the order."""
        s, perm = torch.sort(rows, dim=1, descending=True, stable=True)
        return (s[:, :-1] - s[:, 1:]).clamp_min(0), perm

    def _features(self, rows: torch.Tensor) -> tuple[Any, ...] | None:
        gaps, perm = self._sorted_gaps(rows)
        small = torch.uint8 if rows.shape[1] <= 256 else torch.int16 if rows.shape[1] <= 32767 else perm.dtype
        return (*self._group(gaps, perm[:, 0]), perm.to(small))  # the class order kept compact

    @staticmethod
    def _unsort(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Sorted outputs ``h_1 = 0, h_{k+1} = −Σ_{i≤k} t_i``, scattered back to class order."""
        h = torch.cat([torch.zeros_like(t[:, :1]), -torch.cumsum(t, dim=1)], dim=1)
        return torch.zeros_like(h).scatter(1, perm.long(), h)

    def _map_features(self, feats: tuple[Any, ...]) -> torch.Tensor:
        grouped, counts, inverse, perm = feats
        return self._unsort(self._apply_groups(grouped, counts, inverse, self._expert_fn()), perm)

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        gaps, perm = self._sorted_gaps(rows)
        return self._unsort(self._route(gaps, perm[:, 0], self._expert_fn()), perm)

    def induced_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(self.num_classes)
        k = c - 1
        dev = self.raw_B.device
        d = torch.zeros(k, c, device=dev)
        idx = torch.arange(k, device=dev)
        d[idx, idx] = 1.0
        d[idx, idx + 1] = -1.0
        lo = torch.zeros(c, k, device=dev)
        lo[1:] = torch.tril(torch.ones(k, k, device=dev))
        e = torch.zeros(c, c, device=dev)
        e[:, 0] = 1.0
        a = e - lo @ self.B() @ d
        b = -(lo @ self.mu().unsqueeze(-1)).squeeze(-1)
        return a, b
