"""Histogram binning and isotonic regression on the top-label confidence (netcal-style baselines).

Both are fitted from streamed statistics: per equal-width bin of the top-label confidence
``c = max_k S(z)_k`` (bins from :func:`segcal.metrics.bin_index`, the ``(lo, hi]`` convention)
the pixel count, the sum of confidences and the number of correct pixels are accumulated over the
fit data in float64; the fitted map ``f(c)`` is a table indexed by the same ``bin_index``.

Applying a top-label map to the full distribution: the top class gets ``f(c)``, the other classes
are rescaled by the common factor ``(1 − f(c)) / (1 − c)`` so the probabilities sum to 1 and their
order is kept. To keep the argmax, ``f(c)`` is raised where needed to just above the value at
which the rescaled runner-up would tie (``f > q₂ / (1 − c + q₂)``, plus 1e-3 of the remaining
gap). Hence both calibrators are translation invariant (they see probabilities) and argmax- and
order-preserving; computed in float64.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segcal.calibrators.base import Calibrator
from segcal.calibrators.data import FitData
from segcal.calibrators.registry import register
from segcal.errors import missing_dependency
from segcal.metrics.binning import bin_index

__all__ = ["HistogramBinning", "IsotonicCalibration"]

MARGIN = 1e-3


def _isotonic_regression() -> type:
    """scikit-learn's ``IsotonicRegression`` (optional dependency: ``pip install 'segcal[isotonic]'``)."""
    try:
        from sklearn.isotonic import IsotonicRegression
    except ImportError:
        raise missing_dependency("sklearn", "isotonic", "isotonic calibration (method 'isotonic')") from None
    return IsotonicRegression


class _TopLabelMap(Calibrator):
    """Base of the top-label calibrators: a table ``f`` over ``n_bins`` confidence bins."""

    translation_invariant = True
    argmax_preserving = True
    order_preserving = True
    default_n_bins = 15

    def __init__(self, num_classes: int | None = None, *, n_bins: int | None = None, **kw: Any) -> None:
        n = self.default_n_bins if n_bins is None else int(n_bins)
        if n < 1:
            raise ValueError(f"n_bins: expected a positive integer, got {n_bins}")
        self.n_bins = n
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins}

    def _build(self, num_classes: int) -> None:
        centers = (torch.arange(self.n_bins, dtype=torch.float64) + 0.5) / self.n_bins
        self.register_buffer("table", centers)

    def _fit_stages(self) -> list:
        return []

    def _post_fit(self, train: FitData, val: FitData | None) -> dict[str, Any]:
        stats = torch.zeros(3, self.n_bins, dtype=torch.float64)
        with torch.no_grad():
            for b in train.iter_chunks(self._fit_kw["chunk_size"]):
                x = self._canonical(b.x.to(self.device))
                p = F.softmax(x.double(), 1)
                conf, pred = p.max(1)
                idx = bin_index(conf, self.n_bins).cpu()
                stats[0].index_add_(0, idx, torch.ones_like(conf).cpu())
                stats[1].index_add_(0, idx, conf.cpu())
                stats[2].index_add_(0, idx, (pred == b.y.to(pred.device)).double().cpu())
        self.table.copy_(self._table_from_stats(stats).to(self.table))
        return {"bin_counts": stats[0].tolist() if self.n_bins <= 100 else None,
                "nonempty_bins": int((stats[0] > 0).sum())}

    def _table_from_stats(self, stats: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(rows.to(torch.float64), 1)
        # the top class is argmax's (first index on ties), so tied inputs keep their decision
        top = logp.argmax(1, keepdim=True)
        c = logp.gather(1, top)[:, 0].exp()
        others = logp.scatter(1, top, float("-inf"))
        # log(1 − c) = logsumexp of the other classes (stable when c -> 1)
        log_rest = torch.logsumexp(others, 1, keepdim=True)
        f = self.table.to(torch.float64)[bin_index(c, self.n_bins)]
        # f_min = q2 / (1 − c + q2) in log space: finite even where 1 − c and q2 underflow to 0
        # (logit gaps above ~745), where the ratio form gave 0/0 = NaN
        f_min = torch.sigmoid(others.max(1).values - log_rest[:, 0])
        f = torch.maximum(f, f_min + MARGIN * (1 - f_min)).clamp(max=1 - 1e-12)
        out = logp + torch.log1p(-f)[:, None] - log_rest
        out = out.scatter(1, top, torch.log(f)[:, None])
        return out.to(torch.float32)


@register
class HistogramBinning(_TopLabelMap):
    """Histogram binning (Zadrozny & Elkan 2001) on the top-label confidence: ``f(c)`` = the
    accuracy of ``c``'s bin on the fit data (``n_bins`` = 15 equal-width bins; empty bins keep
    their center). TI, AP, OP (module docstring: how the full distribution is formed)."""

    name = "histogram_binning"
    aliases = ("hb", "histogram")
    description = "histogram binning of the top-label confidence (15 bins), others rescaled"
    section = "§4 (binning) / netcal baseline"

    def _table_from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        n, _, acc = stats
        centers = (torch.arange(self.n_bins, dtype=torch.float64) + 0.5) / self.n_bins
        return torch.where(n > 0, acc / n.clamp_min(1), centers)


@register
class IsotonicCalibration(_TopLabelMap):
    """Isotonic regression (Zadrozny & Elkan 2002) of correctness on the top-label confidence,
    fitted by PAV (scikit-learn ``IsotonicRegression``) on a fine histogram (``n_bins`` = 1000
    bins: points = bin mean confidence, targets = bin accuracy, weights = counts); ``f`` is the
    fit evaluated at each bin's mean confidence (its center when empty). TI, AP, OP."""

    name = "isotonic"
    aliases = ("isotonic_regression", "ir")
    description = "isotonic regression (PAV on a 1000-bin histogram) of the top-label confidence"
    section = "§4 (binning) / netcal baseline"
    default_n_bins = 1000

    def fit(self, *args: Any, **kwargs: Any) -> IsotonicCalibration:
        """:meth:`Calibrator.fit`; needs scikit-learn (the ``isotonic`` extra), checked first."""
        _isotonic_regression()
        return super().fit(*args, **kwargs)  # type: ignore[return-value]

    def _table_from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        IsotonicRegression = _isotonic_regression()
        n, sconf, acc = (s.numpy() for s in stats)
        nz = n > 0
        centers = (torch.arange(self.n_bins, dtype=torch.float64).numpy() + 0.5) / self.n_bins
        at = centers.copy()
        at[nz] = sconf[nz] / n[nz]
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(at[nz], acc[nz] / n[nz], sample_weight=n[nz])
        return torch.from_numpy(iso.predict(at)).to(torch.float64)
