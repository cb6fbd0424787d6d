"""Selective scaling (Wang, Gong, Wang, CVPR 2023; ``../shared/methods.md`` §3.12).

Over-confident *mispredictions* dominate the miscalibration of segmenters. A per-pixel binary
classifier (the "selector") on ``log(S(z_b) + 1e-16)`` predicts which pixels are mispredicted;
pixels predicted correct keep ``t_correct = 1``, the others are divided by ``t_mispred``
(about 2 to 1e10, chosen on the validation split). ``z_b`` are the logits calibrated by an
optional base calibrator (``base="ts"``, ``"dc"``, ``"lts"``, ...; ``None`` = the raw logits),
which is fitted first on the same data by the usual loop.

The selector is trained by THE fitting loop (:func:`segcal.calibrators.fitting.minimize`) through
the calibrator's own-target hook (:meth:`Calibrator._stage_loss`), and ``t_mispred`` is chosen by
the :meth:`Calibrator._post_fit` hook. :func:`ece_vs_selector_accuracy` reproduces the paper's
sensitivity analysis ("ECE vs selector accuracy", §6.3 ``CalibratorSensitivity``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.base import Calibrator
from segcal.calibrators.data import Batch, FitData
from segcal.calibrators.registry import create, register
from segcal.metrics.binning import bin_index
from segcal.metrics.scores import ece_from_bins
from segcal.validation import check_labels, check_scores, valid_labels

__all__ = ["MispredictionSelector", "SelectiveScaling", "ece_vs_selector_accuracy"]

SELECTOR_EPS = 1e-16
DEFAULT_T_GRID = (1.5, 2.0, 3.0, 5.0, 10.0, 100.0, 1e10)


class MispredictionSelector(nn.Module):
    """The binary classifier of [SEL] (``Binary_Classifier``, methods.md §3.12), per pixel.

    ``Linear(C→C)`` (identity / zero-bias init) → BN → ReLU → ``Linear(C→2C)`` → BN → ReLU →
    ``Linear(2C→C)`` → BN → ReLU → ``Linear(C→2)``; output logits of {0: mispredicted,
    1: correct}. ``5C² + 14C + 2`` parameters plus BatchNorm buffers.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        c = int(num_classes)
        first = nn.Linear(c, c)
        with torch.no_grad():
            first.weight.copy_(torch.eye(c))
            first.bias.zero_()
        self.net = nn.Sequential(
            first, nn.BatchNorm1d(c), nn.ReLU(),
            nn.Linear(c, 2 * c), nn.BatchNorm1d(2 * c), nn.ReLU(),
            nn.Linear(2 * c, c), nn.BatchNorm1d(c), nn.ReLU(),
            nn.Linear(c, 2),
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net(u)


def selector_input(z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``log(S(z) + 1e-16)``: the selector's input (translation invariant up to the epsilon)."""
    return torch.log(F.softmax(z, dim=dim) + SELECTOR_EPS)


def _binned(conf: torch.Tensor, correct: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``(3, n_bins)`` float64 count / sum of confidence / sum of accuracy (``bin_index``)."""
    b = bin_index(conf, n_bins)
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=conf.device)
    out[0].index_add_(0, b, torch.ones_like(conf, dtype=torch.float64))
    out[1].index_add_(0, b, conf.to(torch.float64))
    out[2].index_add_(0, b, correct.to(torch.float64))
    return out


def _ece(stats: torch.Tensor) -> float:
    """Top-label ECE of ``(3, n_bins)`` bins (:func:`segcal.metrics.scores.ece_from_bins`)."""
    count, sum_conf, sum_acc = stats.cpu().numpy()
    return float(ece_from_bins(count, sum_conf, sum_acc))


@register
class SelectiveScaling(Calibrator):
    """Selective scaling ([SEL], methods.md §3.12), optionally on top of a base calibrator.

    Map, per pixel: ``z_b = base(z)``; ``z' = z_b / 1`` if the selector predicts "correct",
    ``z' = z_b / t_mispred`` otherwise.

    Parameters
    ----------
    base
        Name of a registered calibrator fitted first (``"ts"``, ``"dc"``, ``"lts"``, ...), or
        ``None`` (default, the paper's "Selective"): the selector acts on the raw logits. The base
        shares this calibrator's ``input_type`` and fitting keyword arguments.
    base_config
        Extra constructor arguments of the base (e.g. ``{"init_temperature": 1.5}``).
    t_mispred
        Temperature of the pixels flagged as mispredicted; ``None`` (default) = chosen on the
        validation split over ``t_grid`` by ``selection``.
    t_grid
        Candidate ``t_mispred`` values (default 1.5, 2, 3, 5, 10, 100, 1e10).
    selection
        ``"nll"`` (default) or ``"ece"`` (pooled, ``selection_bins`` bins) on the validation split
        (on the fit data when ``fit`` gets no ``val``; recorded in ``fit_info``).
    mispred_weight
        Loss weight of mispredicted pixels: 2.0 = [SEL]'s "duplicate the mispredictions once per
        batch" (implemented as a weight, which gives the same loss without copying pixels).
    selector_epochs, selector_batch_size, pixels_per_epoch
        At most 40 epochs (the paper) of mini-batches of ``selector_batch_size`` valid pixels
        (default 1024; the README's 20 pixels per batch is far too slow on CPU for 10⁶⁺ pixels;
        on small data the batch is reduced so that an epoch has at least 32 steps, >= 20 pixels);
        an "epoch" is ``min(n_pixels, pixels_per_epoch)`` pixels (default 2¹⁸), drawn in seeded
        random order (consecutive epochs continue through the shuffled data). The epoch with the
        lowest validation loss (the weighted selector CE) is restored.
    selector_lr, selector_weight_decay
        AdamW, lr 1e-3, weight decay 1e-6 (the paper's defaults).
    selector_patience
        Early stopping after this many epochs without improvement (default ``None``: all epochs).
    **kw
        The common :class:`Calibrator` arguments (also passed to the base).

    Guarantees: declared from the base. With ``base=None`` or a TI base (``ts``, ``dc``,
    ``lts_ti``, ...) it is translation invariant (the selector sees log-probabilities, up to the
    1e-16 epsilon); argmax/order preserving when the base is, since ``T ∈ {1, t_mispred} > 0``.
    Ignored / masked pixels are excluded from the selector's training data ([SEL] code pitfall,
    methods.md §7.2). Fitted attributes: :attr:`selector_accuracy` (overall, on correct and on
    mispredicted pixels of the selection split), :attr:`t_mispred`.
    """

    name = "selective"
    aliases = ("selective_scaling", "sel")
    description = "selective scaling: z_b / t_mispred where a classifier flags mispredictions"
    section = "§3.12"
    translation_invariant = True
    argmax_preserving = True
    order_preserving = True
    default_adam_lr = 1e-3

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        base: str | None = None,
        base_config: dict[str, Any] | None = None,
        t_mispred: float | None = None,
        t_grid: Sequence[float] = DEFAULT_T_GRID,
        selection: str = "nll",
        mispred_weight: float = 2.0,
        selector_epochs: int = 40,
        selector_batch_size: int = 1024,
        pixels_per_epoch: int = 2**18,
        selector_lr: float = 1e-3,
        selector_weight_decay: float = 1e-6,
        selector_patience: int | None = None,
        selection_bins: int = 15,
        **kw: Any,
    ) -> None:
        if selection not in ("nll", "ece"):
            raise ValueError(f"selection: expected 'nll' or 'ece', got {selection!r}")
        if t_mispred is not None and not float(t_mispred) > 0:
            raise ValueError(f"t_mispred: expected > 0, got {t_mispred}")
        grid = [float(t) for t in t_grid]
        if not grid or any(not t > 0 for t in grid):
            raise ValueError(f"t_grid: expected positive temperatures, got {list(t_grid)}")
        if not float(mispred_weight) > 0:
            raise ValueError(f"mispred_weight: expected > 0, got {mispred_weight}")
        for k, v in (("selector_epochs", selector_epochs), ("selector_batch_size", selector_batch_size),
                     ("pixels_per_epoch", pixels_per_epoch), ("selection_bins", selection_bins)):
            if int(v) < 1:
                raise ValueError(f"{k}: expected a positive integer, got {v}")
        base_obj = None
        if base is not None:
            if str(base).lower().replace("-", "_") in ("selective", "selective_scaling", "sel"):
                raise ValueError("base: selective scaling cannot be its own base")
            base_obj = create(base, **{**kw, **(base_config or {})})
        super().__init__(None, **kw)
        self.base = base_obj
        self.base_name = None if base_obj is None else base_obj.name
        self.base_config = dict(base_config or {})
        self._t_fixed = None if t_mispred is None else float(t_mispred)
        self.t_grid = grid
        self.selection = selection
        self.mispred_weight = float(mispred_weight)
        self.selector_epochs = int(selector_epochs)
        self.selector_batch_size = int(selector_batch_size)
        self.pixels_per_epoch = int(pixels_per_epoch)
        self.selector_lr = float(selector_lr)
        self.selector_weight_decay = float(selector_weight_decay)
        self.selector_patience = selector_patience
        self.selection_bins = int(selection_bins)
        if base_obj is not None:
            self._declare_from(base_obj)
        self._training_selector = False
        self._rows_are_base = False
        self._fix_classes(num_classes)

    def _extra_config(self) -> dict[str, Any]:
        return {
            "base": self.base_name, "base_config": self.base_config, "t_mispred": self._t_fixed,
            "t_grid": list(self.t_grid), "selection": self.selection,
            "mispred_weight": self.mispred_weight, "selector_epochs": self.selector_epochs,
            "selector_batch_size": self.selector_batch_size, "pixels_per_epoch": self.pixels_per_epoch,
            "selector_lr": self.selector_lr, "selector_weight_decay": self.selector_weight_decay,
            "selector_patience": self.selector_patience, "selection_bins": self.selection_bins,
        }

    def _build(self, num_classes: int) -> None:
        with torch.random.fork_rng(devices=[]):  # seeded initialisation (``seed``)
            torch.manual_seed(self._fit_kw["seed"])
            self.selector = MispredictionSelector(num_classes)
        t = self._t_fixed if self._t_fixed is not None else 1e10
        self.register_buffer("t_mispred_", torch.tensor(float(t), dtype=torch.float32))
        if self.base is not None and self.base.num_classes != num_classes:
            self.base._build_params(num_classes)

    # ----------------------------------------------------------------- the map
    @property
    def t_mispred(self) -> float:
        """The temperature of the pixels flagged as mispredicted (fitted or given)."""
        return float(self.t_mispred_)

    @property
    def selector_accuracy(self) -> dict[str, float]:
        """Selector accuracy on the selection split: ``overall``, ``correct``, ``mispredicted``."""
        self._check_ready()
        return dict(self.fit_info.get("selector_accuracy", {}))

    @property
    def uses_image(self) -> bool:
        """True when the base has an image branch (e.g. ``base="lts"`` with ``use_image``)."""
        return self.base is not None and self.base.uses_image

    @property
    def image_channels_needed(self) -> int | None:
        return None if self.base is None else self.base.image_channels_needed

    def _base_map(self, x: torch.Tensor, image: bool, img: torch.Tensor | None = None) -> torch.Tensor:
        """Canonical scores (and the input image, for a base with an image branch) -> base-calibrated
        logits ``z_b``."""
        if self.base is None:
            return x
        u = F.log_softmax(x, 1) if self.base.input_space == "logprobs" else x
        return self.base._map_image(u, img) if image else self.base._map(u)

    def _flag(self, zb: torch.Tensor) -> torch.Tensor:
        """Rows ``(P, C)`` of base logits -> True where the selector predicts a misprediction."""
        self.selector.eval()
        out = self.selector(selector_input(zb))
        return out[:, 0] > out[:, 1]

    def _scale(self, zb: torch.Tensor) -> torch.Tensor:
        flag = self._flag(zb)
        one = torch.ones((), dtype=zb.dtype, device=zb.device)
        t = torch.where(flag, self.t_mispred_.to(zb.dtype), one)
        return zb / t[:, None]

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return self._scale(self._base_map(rows, image=False))

    def _map_image(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        zb = self._base_map(x, image=True, img=image)
        if x.ndim == 2:  # an (M, C) table of isolated pixels
            return self._scale(zb)
        moved = zb.movedim(1, -1)
        out = self._scale(moved.reshape(-1, zb.shape[1]))
        return out.reshape(moved.shape).movedim(-1, 1)

    # ----------------------------------------------------------------- fitting
    def fit(self, logits: Any, labels: Any = None, *, ignore_index: int | None = None,
            mask: Any = None, val: Any = None, progress: bool = False, images: Any = None,
            val_images: Any = None) -> SelectiveScaling:
        """Fit the base (if any) by the usual loop, then the selector, then ``t_mispred``.

        Same arguments as :meth:`Calibrator.fit` (``images`` / ``val_images`` when the base has an
        image branch, e.g. ``base="lts", base_config={"use_image": True}``: the base sees them and
        the selector is trained on the base's outputs); the data are read once per stage, so a
        single-pass generator is not enough when a base is used (pass a list, a callable or a
        folder). Without ``val`` the selector's best epoch and ``t_mispred`` are selected on the
        fit data (recorded as ``fit_info["selection_split"] = "fit"``).
        """
        if self.base is not None:
            self.base.fit(logits, labels, ignore_index=ignore_index, mask=mask, val=val,
                          progress=progress, images=images, val_images=val_images)
        try:
            super().fit(logits, labels, ignore_index=ignore_index, mask=mask, val=val,
                        progress=progress, images=images, val_images=val_images)
        finally:
            self._rows_are_base = False
        if self.base is not None:
            self.fit_info["base"] = {"name": self.base.name, **{
                k: self.base.fit_info.get(k) for k in ("optimizer", "mode", "n_pixels")}}
            if hasattr(self.base, "temperature"):
                self.fit_info["base"]["temperature"] = float(self.base.temperature)
        return self

    def _prepare(self, data: Any, labels: Any, mask: Any, ignore_index: int | None, what: str,
                 progress: bool = False, images: Any = None) -> FitData:
        """The data, and with a fitted whole-image base (LTS/IBTS) the selector's training data:
        the base-calibrated logits of the valid pixels, computed once (one base forward per image)
        and kept as pixel rows, so that the selector is trained on batches of pixels (§3.12) like
        with a pointwise base. Above ``memory_budget`` the whole images are kept instead (one image
        per step, the base re-applied at every pass)."""
        fd = super()._prepare(data, labels, mask, ignore_index, what, progress, images)
        if self.base is None or not self.base.spatial or not self.base.is_fitted:
            return fd
        dev = self.device
        rows: list[Batch] = []
        nbytes = 0
        with torch.no_grad():
            for b in fd.iter_batches():
                x = self._canonical(b.x.to(dev), dim=1)
                img = None if b.image is None else b.image.to(dev, torch.float32)
                zb = self._base_map(x, image=True, img=img)
                valid = b.valid.to(dev) if b.valid is not None else None
                if valid is None:
                    r, y = zb, b.y
                else:
                    r = (zb if zb.ndim == 2 else zb.movedim(1, -1))[valid]
                    y = b.y.to(dev)[valid]
                nbytes += r.numel() * 4 + y.numel() * 8
                if nbytes > self._fit_kw["memory_budget"]:
                    return fd
                rows.append(Batch(r.float().cpu().contiguous(), y.cpu()))
        self._rows_are_base = True
        info = {**fd.info, "mode": "in-memory", "nbytes": nbytes, "rows": "base-calibrated logits"}
        return FitData(fd.num_classes, fd.n, batches=rows, info=info)

    def _fit_stages(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [("selector", list(self.selector.parameters()))]

    def _stage_settings(self, stage: str, train: FitData) -> dict[str, Any]:
        epoch = min(train.n, self.pixels_per_epoch)
        bs = self._selector_batch(epoch)
        per_epoch = max(1, math.ceil(epoch / bs))
        self._selector_settings = {"batch_size": bs, "steps_per_epoch": per_epoch, "epoch_pixels": epoch}
        # whole-image data (a spatial base): one image per step, its valid pixels being the batch
        return dict(optimizer="adamw", lr=self.selector_lr, weight_decay=self.selector_weight_decay,
                    batch_size=bs, images_per_step=1, eval_every=per_epoch,
                    max_steps=per_epoch * self.selector_epochs, patience=self.selector_patience,
                    lr_patience=None, min_delta=0.0)

    def _selector_batch(self, epoch_pixels: int) -> int:
        """Pixels per step: ``selector_batch_size``, reduced on small data so that an epoch has
        at least 32 steps (never below the README's 20 pixels)."""
        return int(min(self.selector_batch_size, max(20, math.ceil(epoch_pixels / 32))))

    def _rows_and_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits of the batch's valid pixels and their labels (no gradients)."""
        dev = self.device
        with torch.no_grad():
            if batch.valid is None and self._rows_are_base:  # rows of base logits (see _prepare)
                return batch.x.to(dev, torch.float32), batch.y.to(dev)
            x = self._canonical(batch.x.to(dev), dim=1)
            y = batch.y.to(dev)
            if batch.valid is None:
                return self._base_map(x, image=False), y
            valid = batch.valid.to(dev)
            img = None if batch.image is None else batch.image.to(dev, torch.float32)
            zb = self._base_map(x, image=True, img=img)
            return zb.movedim(1, -1)[valid], y[valid]

    def _selector_loss(self, batch: Batch, objective: Any) -> torch.Tensor:
        zb, y = self._rows_and_targets(batch)
        correct = (zb.argmax(1) == y).long()
        u = selector_input(zb)
        training = torch.is_grad_enabled()
        if training and u.shape[0] < 2:  # BatchNorm needs two pixels: skip a 1-pixel remainder
            return sum(p.sum() for p in self.selector.parameters()) * 0.0
        self.selector.train(training)
        out = self.selector(u)
        w = torch.where(correct == 0, self.mispred_weight, 1.0).to(out.dtype)
        return (w * F.cross_entropy(out, correct, reduction="none")).sum()

    def _stage_loss(self, stage: str) -> Any:
        return self._selector_loss if stage == "selector" else None

    def _set_stage(self, stage: str | None) -> None:
        if stage is None and hasattr(self, "selector"):
            self.selector.eval()

    def _post_fit(self, train: FitData, val: FitData | None) -> dict[str, Any]:
        data = val if val is not None else train
        grid = [self._t_fixed] if self._t_fixed is not None else list(self.t_grid)
        nll = torch.zeros(len(grid), dtype=torch.float64)
        bins = [torch.zeros(3, self.selection_bins, dtype=torch.float64) for _ in grid]
        conf_mat = torch.zeros(2, 2, dtype=torch.float64)  # [true correct?, predicted correct?]
        with torch.no_grad():
            for b in data.iter_chunks(self._fit_kw["chunk_size"]):
                zb, y = self._rows_and_targets(b)
                zb, y = zb.float(), y
                flag = self._flag(zb)
                correct = zb.argmax(1) == y
                idx = correct.long() * 2 + (~flag).long()
                conf_mat += torch.bincount(idx, minlength=4).reshape(2, 2).to(torch.float64).cpu()
                for i, t in enumerate(grid):
                    z = torch.where(flag[:, None], zb / t, zb)
                    nll[i] += float(F.cross_entropy(z, y, reduction="sum"))
                    q = F.softmax(z, 1)
                    conf, pred = q.max(1)
                    bins[i] += _binned(conf, pred == y, self.selection_bins).cpu()
        n = float(conf_mat.sum())
        table = {repr(t): {"nll": float(nll[i]) / n, "ece": _ece(bins[i])} for i, t in enumerate(grid)}
        key = self.selection
        best = min(range(len(grid)), key=lambda i: table[repr(grid[i])][key])
        self.t_mispred_.fill_(float(grid[best]))
        n_c, n_m = float(conf_mat[1].sum()), float(conf_mat[0].sum())
        acc = {
            "overall": float(conf_mat[1, 1] + conf_mat[0, 0]) / max(n, 1.0),
            "correct": float(conf_mat[1, 1]) / n_c if n_c else float("nan"),
            "mispredicted": float(conf_mat[0, 0]) / n_m if n_m else float("nan"),
            "n_correct": n_c,
            "n_mispredicted": n_m,
            "flagged_fraction": float(conf_mat[:, 0].sum()) / max(n, 1.0),
        }
        return {
            "selector_training": {**dict(getattr(self, "_selector_settings", {})),
                                  "data": train.info.get("rows", "pixels" if not self.spatial else "whole images")},
            "selector_accuracy": acc,
            "t_mispred": float(grid[best]),
            "t_mispred_grid": table,
            "t_mispred_selected_by": key if self._t_fixed is None else "given",
            "selection_split": "val" if val is not None else "fit",
        }

    @classmethod
    def _from_payload(cls, payload: dict[str, Any]) -> Calibrator:
        obj = super()._from_payload(payload)
        if obj.base is not None:  # type: ignore[attr-defined]
            obj.base.is_fitted = True  # type: ignore[attr-defined]
        obj.selector.eval()  # type: ignore[attr-defined]
        return obj


def ece_vs_selector_accuracy(
    logits: Any,
    labels: Any,
    *,
    accuracies: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    t_mispred: float = 1e10,
    base: Calibrator | None = None,
    which: str = "mispredicted",
    ignore_index: int | None = None,
    n_bins: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    """ECE of the selective rule under simulated selectors of controlled accuracy ([SEL] §6.3).

    The paper's sensitivity figure (``CalibratorSensitivity``): a selector of accuracy ``a`` is
    simulated by flipping the ground-truth correctness of each valid pixel at random (seeded) with
    probability ``1 − a``; the flagged pixels get ``t_mispred``, the others temperature 1 (on the
    ``base``-calibrated logits when a fitted ``base`` calibrator is given), and the pooled top-label
    ECE (``n_bins`` equal-width bins, :func:`segcal.metrics.bin_index`) is measured.

    Parameters
    ----------
    logits
        ``(N, C, *spatial)`` or ``(M, C)`` logits (numpy or torch).
    labels
        Matching integer labels.
    accuracies
        Target selector accuracies in ``[0, 1]``.
    which
        ``"mispredicted"`` (default; the paper's x-axis "misprediction detection accuracy"):
        only mispredicted pixels are detected with accuracy ``a``, correct pixels are always kept
        at temperature 1; ``"both"``: correct and mispredicted pixels are both classified with
        accuracy ``a``.

    Returns
    -------
    dict
        ``accuracies``, ``ece`` (one per accuracy), ``upper_bound`` (ECE of the input: no
        selective scaling), ``lower_bound`` (ECE with a perfect selector), ``n_pixels``.
    """
    if which not in ("mispredicted", "both"):
        raise ValueError(f"which: expected 'mispredicted' or 'both', got {which!r}")
    accs = [float(a) for a in accuracies]
    if any(not 0 <= a <= 1 for a in accs):
        raise ValueError(f"accuracies: expected values in [0, 1], got {accs}")
    if not t_mispred > 0:
        raise ValueError(f"t_mispred: expected > 0, got {t_mispred}")
    x = check_scores(logits, "logits")
    expected = (x.shape[0],) if x.ndim == 2 else (x.shape[0], *x.shape[2:])
    y = check_labels(labels, "labels", expected_shape=expected).to(torch.int64)
    with torch.no_grad():
        z = x.float()
        if base is not None:
            z = base(z)
        z = z.movedim(1, -1).reshape(-1, z.shape[1]) if z.ndim > 2 else z
        y = y.reshape(-1)
        valid = valid_labels(y, ignore_index)
        z, y = z[valid], y[valid]
        if z.shape[0] == 0:
            raise ValueError("labels: no valid pixels")
        correct = z.argmax(1) == y

        def ece_of(flag: torch.Tensor) -> float:
            zz = torch.where(flag[:, None], z / t_mispred, z)
            conf, pred = F.softmax(zz, 1).max(1)
            return _ece(_binned(conf, pred == y, n_bins))

        gen = torch.Generator().manual_seed(int(seed))
        draws = torch.rand(z.shape[0], generator=gen)
        out = []
        for a in accs:
            right = draws < a  # the simulated selector is right on these pixels
            if which == "mispredicted":
                right = right | correct
            flag = torch.where(right, ~correct, correct)
            out.append(ece_of(flag))
        upper = ece_of(torch.zeros_like(correct))
        lower = ece_of(~correct)
    return {"accuracies": accs, "ece": out, "upper_bound": upper, "lower_bound": lower,
            "n_pixels": int(z.shape[0]), "t_mispred": float(t_mispred), "which": which}

