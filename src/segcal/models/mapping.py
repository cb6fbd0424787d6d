"""Class mappings between label spaces, as differentiable ``nn.Module`` heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ClassMapping(nn.Module):
    """Merge source-class logits into target-class logits by ``logsumexp`` over groups.

    Target logit ``c`` is ``logsumexp`` of the source logits listed in ``groups[c]``, so the
    target softmax equals the source softmax summed within each group and renormalised over the
    source classes that appear in some group (source classes in no group are dropped).

    Parameters
    ----------
    groups
        One non-empty sequence of source class indices per target class; groups must be
        disjoint.
    num_source
        Number of source classes (logit channels of the input); every index must be in
        ``[0, num_source)``.
    dim
        The class axis of the input (1 for ``(N, C, H, W)``).

    Raises
    ------
    ValueError
        If a group is empty, an index is out of range, or an index appears in two groups.
    """

    def __init__(self, groups: Sequence[Sequence[int]], num_source: int, dim: int = 1) -> None:
        super().__init__()
        if num_source < 1:
            raise ValueError(f"ClassMapping: num_source must be >= 1, got {num_source}")
        if len(groups) < 1:
            raise ValueError(
                "ClassMapping: groups is empty; give one group of source ids per target class"
            )
        seen: dict[int, int] = {}
        clean: list[tuple[int, ...]] = []
        for c, g in enumerate(groups):
            g = tuple(int(i) for i in g)
            if not g:
                raise ValueError(f"ClassMapping: group {c} is empty")
            for i in g:
                if not 0 <= i < num_source:
                    raise ValueError(
                        f"ClassMapping: group {c} holds source class {i}, outside [0, {num_source})"
                    )
                if i in seen:
                    raise ValueError(
                        f"ClassMapping: source class {i} appears in groups {seen[i]} and {c}; "
                        "groups must be disjoint"
                    )
                seen[i] = c
            clean.append(g)
        self.groups = tuple(clean)
        self.num_source = int(num_source)
        self.num_target = len(clean)
        self.dim = dim

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        dim = self.dim % logits.ndim
        if logits.shape[dim] != self.num_source:
            raise ValueError(
                f"ClassMapping: expected {self.num_source} source classes on axis {dim}, "
                f"got shape {tuple(logits.shape)}"
            )
        outs = [
            torch.logsumexp(logits.index_select(dim, self._idx(g, logits.device)), dim=dim)
            for g in self.groups
        ]
        return torch.stack(outs, dim=dim)

    @staticmethod
    def _idx(g: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.tensor(g, dtype=torch.long, device=device)

    def extra_repr(self) -> str:
        return f"num_source={self.num_source}, num_target={self.num_target}, groups={self.groups}"


class MappedModel(nn.Module):
    """A model followed by a :class:`ClassMapping` (keys ``model.*``; the mapping has none)."""

    def __init__(self, model: nn.Module, mapping: ClassMapping) -> None:
        super().__init__()
        self.model = model
        self.mapping = mapping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(self.model(x))
