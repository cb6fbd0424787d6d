"""The Cal-SFDA value network: a per-image ECE estimate from features or logits (§3.15(e)(f)).

Architecture (``../shared/methods.md`` §3.15(e)):
``BN(C_in) -> Conv1x1(C_in -> 128, no bias, Xavier-uniform) -> resize to 4x4 -> flatten ->
Linear(128*16 -> 1) -> sigmoid``. The resize is an adaptive average pool by default
(``resize="bilinear"`` gives the reference's bilinear resize; on small pooled inputs the two are
close, on large maps the bilinear resize samples only 16 neighbourhoods).

Training (:meth:`ECEEstimator.fit`): mean squared error against a per-image ECE target, the target
**detached** (the reference code lets gradients reach the segmenter through the target, §7 item 6);
Adam, seeded, early stopping on a held-out fraction (best weights restored). The reference trains
jointly with SGD lr 5e-5 for 30 epochs on 2048-channel ResNet features; a post-hoc estimator on
frozen features is fitted here instead, which is what a user with a trained model needs.

Targets (:func:`ece_targets`): ``"class_level"`` -- the per-image class-level ECE of §3.15(b)
(Cal-SFDA's training signal) -- or ``"image"`` -- the per-image top-label ECE, i.e. the quantity
the image-wise ECE averages (§4). Ignored pixels are **excluded** in both (the reference's
validation ECE counts them as errors).

BatchNorm warm-up (:func:`warmup_bn`, §3.15(f)): re-estimates the running statistics of every
BatchNorm layer on unlabeled target data by putting **the BN modules** (not flags on parameter
tensors, the reference's no-op) in train mode and running forward passes without gradients.
Only statistics change: BN affine parameters and all other weights are left untouched (training the
affine parameters needs an adaptation objective, which is outside this module).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcal.errors import InputError, reason, unreadable
from segcal.estimation.features import DEFAULT_GRID, logit_features
from segcal.io import atomic_write
from segcal.io.files import to_jsonable
from segcal.losses import ClassLevelECE, DifferentiableECE

__all__ = ["FORMAT", "ECEEstimator", "ece_targets", "warmup_bn"]

FORMAT = "segcal-ece-estimator"
VERSION = 1
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def ece_targets(
    scores: Any,
    labels: Any,
    *,
    kind: str = "image",
    n_bins: int = 10,
    ignore_index: int | None = None,
    input_type: str = "logits",
    t: float = 1e-5,
) -> torch.Tensor:
    """Per-image ECE targets ``(N,)``, detached, ignored pixels excluded.

    ``kind="class_level"``: §3.15(b) (mean over all ``C`` classes, absent classes 0, the class
    ``ignore_index`` is never a ground truth); ``kind="image"``: top-label ECE per image. Both use
    the LSE confidence of :mod:`segcal.losses` (within ``t·log C`` of the hard ECE).
    """
    x = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores).float()
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    if x.ndim == y.ndim + 1 and x.ndim >= 3 and y.shape == x.shape[1:]:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if kind == "class_level":
        loss = ClassLevelECE(n_bins, t, input_type=input_type, ignore_index=ignore_index, reduction="none")
        if ignore_index is not None and 0 <= ignore_index < x.shape[1]:
            # the ignore class has no pixels by construction: average over the other classes
            vals = loss(x, y) * x.shape[1] / (x.shape[1] - 1)
        else:
            vals = loss(x, y)
    elif kind == "image":
        vals = DifferentiableECE(n_bins, t, input_type=input_type, ignore_index=ignore_index, reduction="none")(x, y)
    else:
        raise InputError(f"kind: expected 'image' or 'class_level', got {kind!r}")
    return vals.detach()


def warmup_bn(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    momentum: float | None = None,
    reset: bool = True,
    forward: Any = None,
) -> int:
    """Re-estimate the BatchNorm running statistics of ``module`` on unlabeled ``batches``.

    Parameters
    ----------
    momentum
        BN momentum during the warm-up; ``None`` (default) gives the cumulative average over all
        batches (with ``reset=True`` the statistics are then exactly those of the target data).
    reset
        Reset the running statistics before the warm-up.
    forward
        ``forward(module, batch)`` (default ``module(batch)``).

    Only the BN modules are put in train mode; the rest stays in eval mode (dropout etc. off);
    the module's previous modes are restored. Returns the number of batches seen.
    """
    bns = [m for m in module.modules() if isinstance(m, _BN)]
    if not bns:
        raise InputError(f"warmup_bn: {type(module).__name__} has no BatchNorm layers")
    modes = {m: m.training for m in module.modules()}
    saved = [(m.momentum, m.track_running_stats) for m in bns]
    n = 0
    try:
        module.eval()
        for m in bns:
            m.train()
            m.track_running_stats = True
            m.momentum = momentum
            if reset:
                m.reset_running_stats()
        with torch.no_grad():
            for b in batches:
                module(b) if forward is None else forward(module, b)
                n += 1
    finally:
        for m, (mom, trs) in zip(bns, saved, strict=True):
            m.momentum, m.track_running_stats = mom, trs
        for m, mode in modes.items():
            m.training = mode
    if n == 0:
        raise InputError("warmup_bn: no batches given")
    return n


class ECEEstimator(nn.Module):
    """Cal-SFDA value net: ``(N, C_in, h, w)`` inputs -> estimated ECE in ``(0, 1)`` per image.

    Parameters
    ----------
    in_channels
        Channels of the input map (256 for ESPNet's ``encoder.b3``; ``C + 3`` for logits input).
    input_kind
        ``"features"`` (a hooked feature map; :class:`~segcal.estimation.features.FeatureExtractor`)
        or ``"logits"`` (built from scores by :func:`~segcal.estimation.features.logit_features`;
        then ``num_classes`` is required and ``in_channels`` must be ``num_classes + 3``).
    hidden, pool
        Conv width (128) and pooled size (4).
    resize
        ``"adaptive"`` (average pool, default) or ``"bilinear"`` (the reference).
    meta
        Free-form JSON-able metadata saved with the weights (layer name, target kind, model ...).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        input_kind: str = "features",
        num_classes: int | None = None,
        hidden: int = 128,
        pool: int = 4,
        resize: str = "adaptive",
        grid: tuple[int, int] | None = DEFAULT_GRID,
        bn_momentum: float = 0.1,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if input_kind not in ("features", "logits"):
            raise InputError(f"input_kind: expected 'features' or 'logits', got {input_kind!r}")
        if input_kind == "logits":
            if num_classes is None:
                raise InputError("num_classes is required when input_kind='logits'")
            if in_channels != num_classes + 3:
                raise InputError(f"in_channels: logits input has num_classes + 3 = {num_classes + 3} channels")
        if resize not in ("adaptive", "bilinear"):
            raise InputError(f"resize: expected 'adaptive' or 'bilinear', got {resize!r}")
        self.config = {
            "in_channels": int(in_channels), "input_kind": input_kind,
            "num_classes": None if num_classes is None else int(num_classes), "hidden": int(hidden),
            "pool": int(pool), "resize": resize, "grid": None if grid is None else [int(g) for g in grid],
            "bn_momentum": float(bn_momentum),
        }
        self.meta: dict[str, Any] = dict(meta or {})
        self.fit_info: dict[str, Any] = {}
        self.bn = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        nn.init.xavier_uniform_(self.conv.weight)
        self.fc = nn.Linear(hidden * pool * pool, 1)
        self.fitted = False

    # ------------------------------------------------------------------ properties
    @property
    def input_kind(self) -> str:
        return self.config["input_kind"]

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def num_classes(self) -> int | None:
        return self.config["num_classes"]

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise InputError(f"estimator input: expected (N, C_in, h, w), got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            what = f"{self.num_classes} classes (+3 channels)" if self.input_kind == "logits" else "feature channels"
            raise InputError(
                f"estimator input has {x.shape[1]} channels but the estimator expects {self.in_channels} ({what})"
            )
        return x.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        h = self.conv(self.bn(x))
        p = self.config["pool"]
        if self.config["resize"] == "bilinear":
            h = F.interpolate(h, size=(p, p), mode="bilinear", align_corners=False)
        else:
            h = F.adaptive_avg_pool2d(h, (p, p))
        return torch.sigmoid(self.fc(h.flatten(1))).squeeze(1)

    def inputs_from_scores(self, scores: Any, input_type: str = "logits") -> torch.Tensor:
        """Estimator input from scores ``(C, H, W)``/``(N, C, H, W)`` (``input_kind="logits"`` only)."""
        if self.input_kind != "logits":
            raise InputError("this estimator was trained on features: pass feature maps (--features), not logits")
        x = torch.as_tensor(np.asarray(scores)) if not isinstance(scores, torch.Tensor) else scores
        c = x.shape[0] if x.ndim == 3 else x.shape[1]
        if c != self.num_classes:
            raise InputError(f"predictions have {c} classes but the estimator was trained for {self.num_classes}")
        grid = self.config["grid"]
        return logit_features(x, input_type, None if grid is None else tuple(grid))

    # ------------------------------------------------------------------ fit / predict
    def fit(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        epochs: int = 300,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 16,
        val_fraction: float = 0.2,
        patience: int = 30,
        seed: int = 0,
    ) -> ECEEstimator:
        """MSE fit against **detached** per-image targets; early stopping on a held-out part."""
        x = self.check_input(torch.as_tensor(inputs))
        y = torch.as_tensor(targets, dtype=torch.float32).detach().reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise InputError(f"targets: {y.shape[0]} values for {x.shape[0]} inputs")
        if x.shape[0] < 2:
            raise InputError("fit: need at least 2 images")
        if not torch.isfinite(y).all() or (y < 0).any() or (y > 1).any():
            raise InputError("targets: expected finite ECE values in [0, 1]")
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        nn.init.xavier_uniform_(self.conv.weight, generator=g)
        self.fc.reset_parameters()
        self.bn.reset_parameters()
        self.bn.reset_running_stats()
        perm = torch.randperm(x.shape[0], generator=g)
        n_val = round(val_fraction * x.shape[0]) if val_fraction > 0 else 0
        n_val = min(n_val, x.shape[0] - 2)
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        best = (math.inf, copy.deepcopy(self.state_dict()), 0)
        history: list[tuple[float, float]] = []
        bad = 0
        for ep in range(epochs):
            self.train()
            order = tr_idx[torch.randperm(tr_idx.shape[0], generator=g)]
            tot = 0.0
            for i in range(0, order.shape[0], batch_size):
                b = order[i : i + batch_size]
                if b.shape[0] < 2:  # BN needs 2 samples in train mode
                    continue
                loss = F.mse_loss(self(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * b.shape[0]
            self.eval()
            with torch.no_grad():
                ref = val_idx if n_val > 0 else tr_idx
                vloss = float(F.mse_loss(self(x[ref]), y[ref]))
            history.append((tot / max(tr_idx.shape[0], 1), vloss))
            if vloss < best[0] - 1e-9:
                best, bad = (vloss, copy.deepcopy(self.state_dict()), ep), 0
            else:
                bad += 1
                if bad >= patience:
                    break
        self.load_state_dict(best[1])
        self.eval()
        self.fitted = True
        self.fit_info = {
            "n_train": int(tr_idx.shape[0]), "n_val": int(n_val), "best_epoch": int(best[2]),
            "best_val_mse": float(best[0]), "epochs_run": len(history), "seed": int(seed), "lr": float(lr),
        }
        return self

    @torch.no_grad()
    def predict(self, inputs: Any, batch_size: int = 64) -> np.ndarray:
        """Estimated ECE per image ``(N,)`` (eval mode; float64 numpy)."""
        x = self.check_input(torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs))
        was = self.training
        self.eval()
        out = torch.cat([self(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        self.train(was)
        return out.double().numpy()

    def warmup_bn(self, unlabeled: Iterable[Any], *, momentum: float | None = None, reset: bool = True) -> int:
        """Re-estimate the value net's BN statistics on unlabeled target inputs (§3.15(f))."""
        return warmup_bn(self, (self.check_input(torch.as_tensor(b)) for b in unlabeled), momentum=momentum, reset=reset)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        payload = {
            "format": FORMAT, "version": VERSION, "config": dict(self.config), "meta": to_jsonable(self.meta, finite=False, unknown="str"),
            "fit_info": to_jsonable(self.fit_info, finite=False, unknown="str"), "fitted": bool(self.fitted),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        with atomic_write(path) as fh:
            torch.save(payload, fh)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ECEEstimator:
        """Load an estimator saved by :meth:`save` (restricted unpickler: tensors and plain values).

        Raises
        ------
        InputError
            The file is not a segcal ECE estimator (random bytes, truncated, another format, a
            missing key, parameters of the wrong shape, NaN or infinite parameters).
        """
        try:
            with warnings.catch_warnings():  # torch's notes on foreign pickles: the error says it all
                warnings.simplefilter("ignore", UserWarning)
                payload = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, EOFError) as exc:
            if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
                raise
            raise unreadable(path, exc, "a segcal ECE estimator (.pt)") from exc
        except (RuntimeError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile) as exc:
            raise unreadable(path, exc, "a segcal ECE estimator (.pt)") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise InputError(f"{path}: not a segcal ECE estimator file")
        if int(payload.get("version", 0)) > VERSION:
            raise InputError(f"{path}: estimator format version {payload['version']} is newer than supported")
        try:
            cfg = dict(payload["config"])
            in_ch = cfg.pop("in_channels")
            grid = cfg.pop("grid")
            state = payload["state_dict"]
            est = cls(in_ch, grid=None if grid is None else tuple(grid), meta=payload.get("meta"), **cfg)
            est.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise InputError(f"{path}: a damaged segcal ECE estimator file ({reason(exc)})") from exc
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise InputError(f"{path}: the estimator's parameters {bad[:5]} hold NaN or infinite values")
        est.fit_info = payload.get("fit_info", {})
        est.fitted = bool(payload.get("fitted", True))
        est.eval()
        return est
