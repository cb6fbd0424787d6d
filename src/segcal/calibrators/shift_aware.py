"""Shift-conditioned temperature scaling: one temperature per image from label-free statistics.

``../shared/methods.md`` §9.1 (Tomani et al., CVPR 2021, "Post-hoc Uncertainty Calibration for
Domain Drift Scenarios") and §3.1 (TS). A calibrator fitted on clean validation data is tuned to
one accuracy level; under covariate shift the model's accuracy falls faster than its confidence
and a fixed temperature stays over-confident. Tomani et al. fit on the validation set plus
perturbed copies of it, so that the calibrator sees many confidence-accuracy relations. Here the
temperature is in addition made a function of how the model's own output looks on the image:

``T(x) = exp(clamp(a + Σ_j w_j·φ_j(s(x)), log t_min, log t_max))``, output ``z / T(x)``,

where ``s(x)`` are statistics of the softmax output over **all** pixels (voxels) of the image --
never the labels, so nothing extra is needed at test time -- and ``φ`` is a fixed basis of them:

* ``uncertainty``: ``1 - mean max-prob``; ``entropy``: mean normalised entropy ``H / log C``;
* ``low_conf_50`` / ``low_conf_90``: the fraction of pixels whose max-prob is below 0.5 / 0.9,
  smoothed (``mean σ((τ − max-prob)/0.05)``; points of the confidence CDF, i.e. the information of
  its quantiles, but continuous in the logits and free of data-dependent sizes for export);
* ``logit_norm``: ``−mean log std_c(z)`` (the spread of the logits across classes, a
  translation-invariant logit-norm statistic: small logits, more uncertainty);
* spatial (where the low confidence lies), computed on the map subsampled to a shortest side of at
  most 96 pixels (every ``s``-th pixel, ``s = ceil(side / 96)``: a strided map and its full map give
  the same values; CamVid 360 x 480: ``s = 4``): a pixel is *interior* when no pixel within ``r`` of
  it (the ``(2r+1)``-cube, ``r = max(1, round(0.02·shortest side))``) lies next to a change of the
  predicted class; ``interior_low_conf_50`` / ``_90``: the smoothed ``low_conf`` fractions over the
  interior pixels (with a pseudo-count of 1 % of the pixels at the whole-image fraction: an image
  without interior gets that), ``boundary_fraction``: the share of non-interior pixels (a
  fragmented prediction). Blur lowers the confidence mostly along the predicted class boundaries,
  noise everywhere and it fragments the prediction; these tell the two apart where the whole-image
  statistics cannot (``docs/shift_calibration.md``). A pixel table ``(M, C)`` has no neighbours:
  every row is interior, ``boundary_fraction`` 0. :meth:`to_torchscript` traces them at one map
  size (the band and the subsampling of that size).

Every feature is oriented so that larger means less confident; they are standardised with the
mean / standard deviation over the training images (buffers, set at ``fit``). With
``monotone=True`` (default) ``w_j = softplus(r_j) ≥ 0``: the temperature can only grow as the
image looks less confident, which keeps the map sane far outside the range it was fitted on
(a shift nobody labelled). ``knots > 0`` adds hinge terms ``relu(φ_j − k_jm)`` at training
quantiles: an additive piecewise-linear monotone (convex) ``g`` instead of a linear one.

**Clean anchor** (``fit(..., anchor=clean_data)``, the recommended use): the map becomes

``log T(x) = log T_0 + Σ_j w_j·relu(φ_j(s(x)) − k_j)`` (plus hinges at training quantiles above
``k_j`` with ``knots > 0``), ``w_j ≥ 0``,

where ``T_0`` is TS fitted on the anchor (clean, in-domain) images alone (a first fit stage) and
``k_j`` is the ``anchor_quantile`` (default 1: the maximum) of the anchor images' standardised
statistic ``j``. An image whose statistics all lie in the anchor range gets exactly ``T_0``: the
map **falls back to clean TS in-domain**; a statistic can only *raise* ``T`` above ``T_0`` and only
beyond what clean images show, so a feature that moves "the wrong way" under some shift (the
logit norm under severe noise grows while accuracy collapses) cannot make the output more
confident than clean TS. The second stage fits the weights alone on all the training images
(clean and perturbed) with ``T_0`` frozen. ``anchored`` (set by such a fit) is recorded in the
config, so a saved anchored map loads as one.

Fitted by the one loop (``Calibrator.fit``; full-batch L-BFGS when the data fit in memory) on
whole images (``spatial = True``); the statistics are parameter-free and cached once per image
during L-BFGS. Fit it on clean **and perturbed** validation predictions (Tomani et al.; segcal's
``fit_from_model(..., perturb=...)`` / ``segcal fit --perturb`` / ``--extra-pred``): on clean data
alone the statistics hardly vary and the map reduces to TS. Default features: ``uncertainty``,
``entropy``, ``low_conf_50``, ``low_conf_90`` (:data:`DEFAULT_FEATURES`); ``logit_norm`` is
available but not a default (unanchored, its positive weight lowered ``T`` under severe noise:
CamVid gaussian noise 5, ECE 0.712 vs 0.640 uncalibrated, ``docs/calibrators.md``).

Guarantees: one positive scalar per image, so argmax- and order-preserving; translation
invariant (the statistics are functions of ``S(z)`` and of the centred logits, and
``(z + c·1)/T = z/T + (c/T)·1``). An ``(M, C)`` table has no image: every row is an isolated
1-pixel image (as IBTS), its statistics those of the row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.base import Calibrator, inverse_softplus
from segcal.calibrators.data import Batch, FitData, prepare_data, split_val
from segcal.calibrators.registry import register
from segcal.validation import as_tensor

__all__ = ["DEFAULT_FEATURES", "FEATURES", "SPATIAL_FEATURES", "ShiftConditionedTemperature", "image_statistics",
           "interior_mask", "spatial_view"]

#: the label-free per-image statistics, each oriented "larger = less confident"
FEATURES: tuple[str, ...] = ("uncertainty", "entropy", "low_conf_50", "low_conf_90", "logit_norm",
                             "interior_low_conf_50", "interior_low_conf_90", "boundary_fraction")
#: the spatial statistics (where in the image the low confidence lies; module docstring)
SPATIAL_FEATURES: tuple[str, ...] = ("interior_low_conf_50", "interior_low_conf_90", "boundary_fraction")
#: the default features of ``sts``: the confidence statistics (``logit_norm`` is opt-in)
DEFAULT_FEATURES: tuple[str, ...] = ("uncertainty", "entropy", "low_conf_50", "low_conf_90")
_SOFT = 0.05  # width of the smoothed CDF steps
_STD_FLOOR = 1e-6
_BAND = 0.02  # the boundary band's half-width, as a fraction of the shortest spatial side
_SIDE = 96  # the spatial statistics' map: subsampled to a shortest side of at most this (spatial_view)
_PRIOR = 0.01  # the interior means' pseudo-count (a fraction of the pixels) at the whole-image mean


def spatial_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` subsampled (every ``s``-th pixel along each spatial axis, from 0) to a shortest side of
    at most :data:`_SIDE` pixels: the map the spatial statistics are computed on, so that a
    strided fit map and the full map it came from give the same statistics (CamVid 360 x 480:
    ``s = 4``, the bench's fit stride)."""
    if x.ndim <= 2:
        return x
    s = max(1, math.ceil(min(int(v) for v in x.shape[2:]) / _SIDE))
    return x if s == 1 else x[(slice(None), slice(None), *[slice(None, None, s)] * (x.ndim - 2))]


def interior_mask(x: torch.Tensor) -> torch.Tensor:
    """``(n, *spatial)`` bool of scores ``(n, C, *spatial)``: the pixels farther than ``r`` (in the
    ``(2r+1)``-cube, ``r = max(1, round(0.02·shortest side))``) from a pixel next to a change of the
    predicted class along a spatial axis; ``(M, C)``: all."""
    a = x.argmax(dim=1)
    if a.ndim == 1:
        return torch.ones_like(a, dtype=torch.bool)
    edge = torch.zeros_like(a, dtype=torch.bool)
    for d in range(1, a.ndim):
        n = a.shape[d]
        if n < 2:
            continue
        diff = a.narrow(d, 1, n - 1) != a.narrow(d, 0, n - 1)
        edge.narrow(d, 1, n - 1).logical_or_(diff)
        edge.narrow(d, 0, n - 1).logical_or_(diff)
    r = max(1, round(_BAND * min(int(v) for v in a.shape[1:])))
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[a.ndim - 2]
    return pool(edge[:, None].float(), 2 * r + 1, 1, r)[:, 0] == 0


def image_statistics(x: torch.Tensor, features: Sequence[str] = FEATURES) -> torch.Tensor:
    """Per-image statistics ``(n, len(features))`` of canonical scores (logits or log-probs).

    ``x`` is ``(n, C, *spatial)`` (one row per image, pooled over every pixel) or ``(M, C)``
    (every row an isolated pixel). Computed in float32 from ``log_softmax`` and the centred
    logits only: translation invariant, finite for finite input.
    """
    x = x.to(torch.float32)
    c = x.shape[1]
    logp = F.log_softmax(x, dim=1)
    p = logp.exp()
    maxp = p.amax(dim=1)
    dims = tuple(range(1, maxp.ndim))

    def mean(v: torch.Tensor) -> torch.Tensor:
        return v.mean(dim=dims) if dims else v

    inner = small = None
    if any(f in SPATIAL_FEATURES for f in features):
        small = spatial_view(x)
        inner = interior_mask(small)
        small = F.softmax(small, dim=1).amax(dim=1)  # its max-prob

    def interior_mean(v: torch.Tensor) -> torch.Tensor:  # shrunk to the whole-image mean by 1 % of the pixels
        if not dims:
            return v
        w = inner.to(v.dtype)
        prior = _PRIOR * v[0].numel()
        return ((v * w).sum(dim=dims) + prior * v.mean(dim=dims)) / (w.sum(dim=dims) + prior)

    out = []
    for name in features:
        if name == "uncertainty":
            out.append(1.0 - mean(maxp))
        elif name == "entropy":
            out.append(mean(-(p * logp).sum(dim=1)) / math.log(c))
        elif name == "low_conf_50":
            out.append(mean(torch.sigmoid((0.5 - maxp) / _SOFT)))
        elif name == "low_conf_90":
            out.append(mean(torch.sigmoid((0.9 - maxp) / _SOFT)))
        elif name == "logit_norm":
            out.append(-mean(torch.log(x.std(dim=1, unbiased=False) + _STD_FLOOR)))
        elif name == "interior_low_conf_50":
            out.append(interior_mean(torch.sigmoid((0.5 - small) / _SOFT)))
        elif name == "interior_low_conf_90":
            out.append(interior_mean(torch.sigmoid((0.9 - small) / _SOFT)))
        elif name == "boundary_fraction":
            out.append(1.0 - mean(inner.to(small.dtype)))
        else:  # validated in the constructor
            raise ValueError(f"features: unknown {name!r}; available: {list(FEATURES)}")
    return torch.stack(out, dim=1)


def _check_features(features: Sequence[str]) -> tuple[str, ...]:
    if isinstance(features, str):
        features = (features,)
    feats = tuple(str(f) for f in features)
    bad = [f for f in feats if f not in FEATURES]
    if not feats or bad or len(set(feats)) != len(feats):
        raise ValueError(f"features: expected distinct names from {list(FEATURES)}, got {list(features)}")
    return feats


@register
class ShiftConditionedTemperature(Calibrator):
    """Shift-conditioned TS (``sts``): ``z / T(x)``, ``T(x) = g(s(x))`` per image (module docstring).

    Parameters
    ----------
    features
        Names from :data:`FEATURES` (default :data:`DEFAULT_FEATURES`: all but ``logit_norm``).
    monotone
        Constrain every weight to be ``≥ 0`` (``softplus``): ``T`` non-decreasing in every
        uncertainty feature. ``False``: free weights.
    knots
        Hinge knots per feature at training quantiles (0 = linear ``g``, the default).
    init_temperature
        Initial ``T`` at the average training image (``a = log init_temperature``); anchored: the
        initial ``T_0``.
    t_bounds
        ``(t_min, t_max)``: ``log T`` is clamped to this range (default ``(0.05, 50)``).
    l2
        Ridge penalty ``l2 · Σ w²`` on the weights (added to the mean loss; default 0).
        ``segcal bench --shift-calibration`` chooses it (and the feature set) once per fit set from
        a small grid by leave-one-family-out within the training families
        (:class:`segcal.bench.shift_fit.Anchored`).
    spatial_dims
        2 or 3 (only used to trace :meth:`to_torchscript`; the map itself takes any rank);
        ``None`` = from the fit data.
    anchored
        The clean-anchored map (module docstring). Set by ``fit(..., anchor=...)``; pass it only to
        rebuild a saved anchored map (``fit`` without ``anchor`` then refuses).
    anchor_quantile
        Anchored map: ``k_j`` = this quantile of the anchor images' standardised statistics (in
        ``(0, 1]``; default 1, the maximum: every anchor image gets exactly ``T_0``).
    anchor_margin
        Anchored map: ``k_j`` is moved up by this many standard deviations of the anchor images'
        statistic ``j`` (``≥ 0``; default 0): a wider "looks clean" range, for in-domain test
        images more varied than the anchor images (``docs/shift_calibration.md``: CamVid test vs val).
    loss_pixels
        Full-batch (L-BFGS, in-memory) fits evaluate each image's loss on a seeded random subset
        of at most this many of its valid pixels, weighted by ``n_valid / k`` (an unbiased
        estimate of the image's sums; the statistics always use every pixel). ``None``: all
        pixels. Default 16384 (a CamVid image has 172800): the 1-D-per-image loss needs few.
    **kw
        Common :class:`Calibrator` arguments (``optimizer="auto"``: full-batch L-BFGS in memory).

    Attributes (after fit): ``fit_info["feature_mean"]`` / ``["feature_scale"]`` (the
    standardisation), :attr:`weights`, :attr:`bias` (``log T_0`` when anchored),
    ``anchor_values`` (the ``k_j``; anchored); :meth:`temperatures` gives ``T`` per image.
    """

    name = "sts"
    aliases = ("shift_ts", "shift_conditioned_temperature", "shift_aware_ts")
    description = "shift-conditioned TS z/T(x), log T monotone in label-free image statistics"
    section = "§9.1 + §3.1"
    translation_invariant = True
    argmax_preserving = True
    order_preserving = True
    spatial = True
    default_adam_lr = 0.05

    def __init__(self, num_classes: int | None = None, *, features: Sequence[str] = DEFAULT_FEATURES,
                 monotone: bool = True, knots: int = 0, init_temperature: float = 1.0,
                 t_bounds: Sequence[float] = (0.05, 50.0), l2: float = 0.0,
                 spatial_dims: int | None = None, loss_pixels: int | None = 16384,
                 anchored: bool = False, anchor_quantile: float = 1.0, anchor_margin: float = 0.0,
                 **kw: Any) -> None:
        self.features = _check_features(features)
        self.anchored = bool(anchored)
        if not (0.0 < float(anchor_quantile) <= 1.0):
            raise ValueError(f"anchor_quantile: expected a value in (0, 1], got {anchor_quantile}")
        self.anchor_quantile = float(anchor_quantile)
        if not (float(anchor_margin) >= 0 and math.isfinite(anchor_margin)):
            raise ValueError(f"anchor_margin: expected a finite value >= 0, got {anchor_margin}")
        self.anchor_margin = float(anchor_margin)
        self._anchor_data: FitData | None = None
        self._anchor_src: Any = None
        self._range_src: Any = None
        if loss_pixels is not None and int(loss_pixels) < 1:
            raise ValueError(f"loss_pixels: expected a positive integer or None, got {loss_pixels}")
        self.loss_pixels = None if loss_pixels is None else int(loss_pixels)
        self._gen: torch.Generator | None = None
        self.monotone = bool(monotone)
        if int(knots) < 0 or int(knots) > 16:
            raise ValueError(f"knots: expected an integer in [0, 16], got {knots}")
        self.knots = int(knots)
        if not (init_temperature > 0 and math.isfinite(init_temperature)):
            raise ValueError(f"init_temperature: expected a finite value > 0, got {init_temperature}")
        self.init_temperature = float(init_temperature)
        try:
            lo, hi = (float(b) for b in t_bounds)
        except (TypeError, ValueError):
            raise ValueError(f"t_bounds: expected (t_min, t_max), got {t_bounds!r}") from None
        if not (0 < lo < self.init_temperature < hi < math.inf):
            raise ValueError(f"t_bounds: expected 0 < t_min < init_temperature < t_max < inf, got {t_bounds!r}")
        self.t_bounds = (lo, hi)
        if not (l2 >= 0 and math.isfinite(l2)):
            raise ValueError(f"l2: expected a finite value >= 0, got {l2}")
        self.l2 = float(l2)
        if spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims: expected 2, 3 or None, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self._pending: tuple[torch.Tensor, ...] | None = None
        super().__init__(num_classes, **kw)

    def _extra_config(self) -> dict[str, Any]:
        return {"features": list(self.features), "monotone": self.monotone, "knots": self.knots,
                "init_temperature": self.init_temperature, "t_bounds": list(self.t_bounds),
                "l2": self.l2, "spatial_dims": self.spatial_dims, "loss_pixels": self.loss_pixels,
                "anchored": self.anchored, "anchor_quantile": self.anchor_quantile,
                "anchor_margin": self.anchor_margin}

    # ----------------------------------------------------------------- parameters
    def _build(self, num_classes: int) -> None:
        j = len(self.features)
        mean, scale, knots, anchor = self._pending or (torch.zeros(j), torch.ones(j), torch.zeros(j, self.knots),
                                                       torch.zeros(j))
        self.register_buffer("feature_mean", mean.clone().float())
        self.register_buffer("feature_scale", scale.clone().float())
        self.register_buffer("knot_values", knots.clone().float())
        self.register_buffer("anchor_values", anchor.clone().float())
        self.bias = nn.Parameter(torch.tensor(math.log(self.init_temperature), dtype=torch.float32))
        n = j * (1 + self.knots)
        init = inverse_softplus(0.01) if self.monotone else 0.0
        self.raw_weights = nn.Parameter(torch.full((n,), init, dtype=torch.float32))

    @property
    def weights(self) -> torch.Tensor:
        """The weights of the basis (features, then hinge terms feature by feature), detached."""
        return self._weights().detach().clone()

    def _weights(self) -> torch.Tensor:
        return F.softplus(self.raw_weights) if self.monotone else self.raw_weights

    def _regularizer(self) -> torch.Tensor | None:
        return self.l2 * (self._weights() ** 2).sum() if self.l2 > 0 else None

    def _basis(self, stats: torch.Tensor) -> torch.Tensor:
        z = (stats - self.feature_mean) / self.feature_scale
        lead = F.relu(z - self.anchor_values) if self.anchored else z
        if self.knots == 0:
            return lead
        hinge = F.relu(z[:, :, None] - self.knot_values[None])  # (n, J, K)
        return torch.cat([lead, hinge.flatten(1)], dim=1)

    def _log_t(self, stats: torch.Tensor) -> torch.Tensor:
        lo, hi = (math.log(b) for b in self.t_bounds)
        return (self.bias + self._basis(stats) @ self._weights()).clamp(lo, hi)

    # ----------------------------------------------------------------- fitting
    def fit(self, logits: Any, labels: Any = None, *, anchor: Any = None, anchor_range: Any = None,
            **kw: Any) -> ShiftConditionedTemperature:
        """Fit (same arguments as :meth:`Calibrator.fit`), with an optional clean ``anchor``.

        Parameters
        ----------
        anchor
            Clean, in-domain images in any form ``val`` takes (an in-memory tuple ``(scores,
            labels[, mask])`` of ``(N, C, *spatial)`` scores, or streamed batches, e.g. one
            volume each; they may also be part of ``logits``): the map is fitted clean-anchored (module
            docstring): stage 1 fits ``T_0`` (TS) on them, stage 2 the weights on ``logits``.
            ``None``: the unanchored map (refused when the calibrator was built ``anchored=True``).
        anchor_range
            More clean, in-domain scores without labels (an ``(N, C, *spatial)`` tensor / array or a
            sequence of ``(1, C, *spatial)`` ones), whose statistics widen the clean range ``k_j``
            (the quantile is taken over the anchor images and these); ``T_0`` stays TS on ``anchor``.
            Only with ``anchor``.
        """
        if anchor_range is not None and anchor is None:
            raise ValueError("anchor_range: only with anchor= (it widens the anchor's clean range)")
        if anchor is None and self.anchored:
            raise ValueError("anchor: this sts is anchored (anchored=True); fit it with anchor=(scores, labels[, mask])")
        if anchor is not None:
            self.anchored = True
        self._anchor_src = None if anchor is None else split_val(anchor)
        self._range_src = anchor_range
        try:
            super().fit(logits, labels, **kw)
        finally:
            self._anchor_src = None
            self._range_src = None
            self._anchor_data = None
        return self

    def _fit_stages(self) -> list[tuple[str, list[nn.Parameter]]]:
        if self._anchor_src is None:
            return super()._fit_stages()
        return [("anchor", [self.bias]), ("shift", [self.raw_weights])]

    def _run_stage(self, stage: str, params: list[nn.Parameter], train: FitData,
                   val: FitData | None, objective: Any) -> dict[str, Any]:
        if stage == "anchor" and self._anchor_data is not None:  # TS on the clean anchor images
            return super()._run_stage(stage, params, self._anchor_data, None, objective)
        return super()._run_stage(stage, params, train, val, objective)

    def _prepare(self, data: Any, labels: Any, mask: Any, ignore_index: int | None, what: str,
                 progress: bool = False, images: Any = None) -> FitData:
        fd = super()._prepare(data, labels, mask, ignore_index, what, progress, images)
        if what != "logits":
            return fd
        self._gen = torch.Generator().manual_seed(int(self._fit_kw["seed"]) + 104729)
        stats = []
        for b in fd.iter_batches():
            if self.spatial_dims is None and b.x.ndim > 2:
                self.spatial_dims = b.x.ndim - 2
            stats.append(image_statistics(self._canonical(b.x, dim=1), self.features))
        s = torch.cat(stats, 0).double()
        mean = s.mean(0)
        scale = s.std(0, unbiased=False) if s.shape[0] > 1 else torch.ones_like(mean)
        scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
        z = (s - mean) / scale
        anchor = torch.zeros(z.shape[1], dtype=torch.float64)
        if self._anchor_src is not None:
            ax, ay, am = self._anchor_src
            self._anchor_data = prepare_data(
                ax, ay, am, input_type=self.input_type, ignore_index=ignore_index,
                num_classes=fd.num_classes, spatial=True, memory_budget=self._fit_kw["memory_budget"],
                subsample=None, seed=self._fit_kw["seed"], what="anchor")
            za = torch.cat([image_statistics(self._canonical(b.x, dim=1), self.features)
                            for b in self._anchor_data.iter_batches()], 0).double()
            if self._range_src is not None:
                items = [self._range_src] if hasattr(self._range_src, "shape") else list(self._range_src)
                za = torch.cat([za, *[image_statistics(self._canonical(as_tensor(r, "anchor_range").float(), dim=1),
                                                       self.features).double() for r in items]], 0)
            za = (za - mean) / scale
            spread = za.std(0, unbiased=False) if za.shape[0] > 1 else torch.zeros_like(mean)
            anchor = torch.quantile(za, self.anchor_quantile, dim=0) + self.anchor_margin * spread
        if self.knots:
            qs = torch.linspace(0, 1, self.knots + 2, dtype=torch.float64)[1:-1]
            knots = torch.quantile(z, qs, dim=0).t() if z.shape[0] <= 2**24 else torch.zeros(z.shape[1], self.knots)
            if self._anchor_src is not None:  # hinges only above the anchor range
                knots = torch.maximum(knots, anchor[:, None])
        else:
            knots = torch.zeros(z.shape[1], 0)
        self._pending = (mean.float(), scale.float(), knots.float(), anchor.float())
        if self.num_classes is not None:  # a refit without rebuild: update the buffers in place
            with torch.no_grad():
                self.feature_mean.copy_(mean)
                self.feature_scale.copy_(scale)
                self.knot_values.copy_(knots)
                self.anchor_values.copy_(anchor)
        return fd

    def _post_fit(self, train: FitData, val: FitData | None) -> dict[str, Any] | None:
        self._pending = None
        self._gen = None
        out = {"anchored": self.anchored}
        if self.anchored:
            out.update(anchor_values=self.anchor_values.tolist(), anchor_temperature=float(self.bias.detach().exp()))
        return out | {"feature_mean": self.feature_mean.tolist(), "feature_scale": self.feature_scale.tolist(),
                "n_images": None if train.batches is None else sum(
                    1 if b.x.ndim > 2 else int(b.x.shape[0]) for b in train.batches),
                "weights": self.weights.tolist(), "bias": float(self.bias.detach())}

    # the statistics are parameter-free: cached per image for full-batch L-BFGS
    def _features(self, rows: torch.Tensor) -> tuple[Any, ...] | None:
        return (image_statistics(rows, self.features),)

    def _precompute_batch(self, batch: Batch) -> tuple[Any, ...] | None:
        x = self._canonical(batch.x.to(self.device, non_blocking=True), dim=1)
        stats = image_statistics(x, self.features)
        if batch.valid is None or x.ndim == 2:
            return (stats,)
        k = self.loss_pixels
        valid = batch.valid.to(x.device)
        if k is not None and x.shape[0] == 1 and batch.n > k:
            # one image: its loss on a seeded subset of k valid pixels, weighted by n_valid / k
            rows = x[0].movedim(0, -1)[valid[0]]
            labels = batch.y[0].to(x.device)[valid[0]]
            gen = self._gen if self._gen is not None else torch.Generator().manual_seed(0)
            idx = torch.randperm(rows.shape[0], generator=gen)[:k].to(x.device)
            image = torch.zeros(idx.shape[0], dtype=torch.int64, device=x.device)
            return (stats, rows[idx].contiguous(), labels[idx].contiguous(), image, rows.shape[0] / k)
        # the valid (loss-mask) pixels of every image gathered once, in the order of the full-map path
        # (the same rows and the same values: the loss is unchanged, each evaluation much cheaper)
        image = valid.nonzero()[:, 0]
        return (stats, x.movedim(1, -1)[valid].contiguous(), batch.y.to(x.device)[valid], image, 1.0)

    def _stats_fn(self, batch: Batch, objective: Any) -> torch.Tensor:
        if batch.pre is None or batch.valid is None:
            return super()._stats_fn(batch, objective)
        dev = self.device
        if len(batch.pre) == 5:  # valid pixels gathered (see _precompute_batch), per-row image index
            stats, rows, labels, image, weight = batch.pre
            t = torch.exp(self._log_t(stats.to(dev)))[image.to(dev)]
            return objective.stats(rows.to(dev) / t[:, None], labels.to(dev)) * weight
        x = self._canonical(batch.x.to(dev), dim=1)
        logits = self._scale(x, self._log_t(batch.pre[0].to(dev)))
        valid = batch.valid.to(dev)
        return objective.stats(logits.movedim(1, -1)[valid], batch.y.to(dev)[valid])

    # ----------------------------------------------------------------- the map
    @staticmethod
    def _scale(x: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        t = torch.exp(log_t).reshape(x.shape[0], *([1] * (x.ndim - 1)))
        return x / t

    def _map_image(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return self._scale(x, self._log_t(image_statistics(x, self.features)))

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return self._map_image(rows)

    def temperatures(self, logits: Any) -> torch.Tensor:
        """``T(x)`` per image ``(N,)`` of scores ``(N, C, *spatial)`` (per row of an ``(M, C)``
        table), without gradients."""
        self._check_ready()
        x = as_tensor(logits, "logits").to(self.device, torch.float32)
        with torch.no_grad():
            return torch.exp(self._log_t(image_statistics(self._canonical(x, dim=1), self.features)))

    def statistics(self, logits: Any) -> torch.Tensor:
        """The raw label-free statistics ``(N, len(features))`` of scores (before standardising)."""
        x = as_tensor(logits, "logits").to(torch.float32)
        with torch.no_grad():
            return image_statistics(self._canonical(x, dim=1), self.features)
