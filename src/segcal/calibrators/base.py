"""The calibrator base class: one contract for every calibrator of segcal.

A calibrator is a :class:`torch.nn.Module` mapping scores ``(N, C, *spatial)`` or ``(M, C)``
(logits, or probabilities with ``input_type="probs"``; numpy or torch; CPU or CUDA; 2D or 3D) to
calibrated logits of the same shape (log-probabilities up to a per-pixel constant).

* ``fit(logits, labels, *, ignore_index=None, mask=None, val=None) -> self`` runs THE fitting loop
  (:mod:`segcal.calibrators.fitting`) on in-memory tensors, an iterable of batches or a prediction
  folder;
* ``forward(logits)`` returns calibrated logits (numpy in -> numpy out), processed in chunks of
  pixels; it keeps autograd unless called under ``torch.no_grad()``;
* ``predict_proba(logits)`` returns calibrated probabilities (no gradients);
* ``save(path)`` / :func:`segcal.load` persist config + state; ``to_torchscript(path)`` exports a
  module that runs without segcal.

Subclasses declare ``name``, ``aliases``, ``description``, ``section`` (of ``methods.md``) and the
properties ``translation_invariant``, ``argmax_preserving``, ``order_preserving``; they implement
``_build(C)`` (create parameters), ``_map(rows)`` (canonical ``(P, C)`` rows -> calibrated logits)
and optionally ``_regularizer()`` and ``_fit_stages()``. ``input_space`` is ``"logits"`` (the map
takes raw logits) or ``"logprobs"`` (it takes ``log S(z)``; probabilities are logged with a 1e-12
floor either way). Spatial calibrators (``spatial = True``; LTS/IBTS) implement
``_map_image(x, image)`` on canonical ``(n, C, *spatial)`` images instead and are fitted on whole
images. Calibrators with an image branch (:attr:`Calibrator.uses_image`; LTS/IBTS with
``use_image=True``, selective scaling on such a base) take the input image
``(N, image_channels, *spatial)`` at fit (``images=``, ``val_images=``, or inside streamed batches)
and at apply time (``forward(logits, image=...)``); without it they raise a ``ValueError``. Data
hooks receive :class:`~segcal.calibrators.data.Batch`; :func:`~segcal.calibrators.check_calibrator`
checks a new calibrator against its declared properties.
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators import registry
from segcal.calibrators.chunked_forward import calibrated_logits
from segcal.calibrators.data import Batch, FitData, check_image, prepare_data, split_val
from segcal.calibrators.fitting import FitSettings, fit_config, fit_summary, minimize
from segcal.calibrators.objectives import NLL, get_objective
from segcal.calibrators.persistence import check_finite_state, export_torchscript, save_calibrator
from segcal.errors import InputError
from segcal.validation import as_tensor, check_input_type, check_scores

PROB_FLOOR = 1e-12


class NotFittedError(RuntimeError):
    """Raised when a calibrator is used before ``fit`` (or ``load``)."""


def inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (``y > 0``)."""
    y = float(y)
    return y + float(np.log(-np.expm1(-y)))


class Calibrator(nn.Module):
    """Base class of all calibrators (see the module docstring for the contract).

    Parameters
    ----------
    num_classes
        Number of classes; inferred at ``fit`` when None.
    input_type
        ``"logits"`` or ``"probs"`` (probabilities are mapped to log space with a 1e-12 floor).
    objective
        ``"nll"`` (default), ``"brier"``, ``"dice"`` (soft Dice) or ``"dece"`` (differentiable ECE,
        methods.md §3.15(a)).
    optimizer
        ``"auto"`` (L-BFGS when the data fit ``memory_budget``, else mini-batch Adam), ``"lbfgs"``
        or ``"adam"``.
    lr
        Learning rate (default 1.0 for L-BFGS, a per-calibrator default for Adam).
    max_iter
        L-BFGS iteration budget. ``max_steps``: Adam step budget.
    batch_size
        Pixels per Adam step. ``chunk_size``: pixels per chunk of full-batch evaluation.
    memory_budget
        Bytes of gathered pixels kept in memory; above it the data are streamed.
    patience, min_delta, lr_patience, lr_factor
        Early stopping on the validation NLL (evaluations without an improvement > ``min_delta``)
        and ``ReduceLROnPlateau`` (Adam). The best iterate is restored.
    monitor
        What the validation split is scored by for early stopping and the best iterate: ``"nll"``
        (default, whatever the objective) or ``"objective"`` (the fitting objective itself, e.g.
        soft Dice: with a non-likelihood objective, selecting by NLL tends to keep the start).
    eval_every
        Steps between evaluations of the monitored loss.
    seed
        Seed of batch order and subsampling.
    subsample
        Fraction of valid pixels kept per batch (seeded); ``None`` = all (the default).
    device
        Device the parameters are created on at ``fit`` (``.to()`` moves them later).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    section: ClassVar[str] = ""
    translation_invariant: ClassVar[bool] = False
    argmax_preserving: ClassVar[bool] = False
    order_preserving: ClassVar[bool] = False
    spatial: ClassVar[bool] = False
    input_space: ClassVar[str] = "logits"
    default_adam_lr: ClassVar[float] = 0.01

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        input_type: str = "logits",
        objective: str = "nll",
        optimizer: str = "auto",
        lr: float | None = None,
        max_iter: int = 100,
        max_steps: int = 500,
        batch_size: int = 2**20,
        chunk_size: int = 2**20,
        memory_budget: float = 2 * 2**30,
        patience: int | None = None,
        min_delta: float = 0.0,
        lr_patience: int | None = None,
        lr_factor: float = 0.1,
        eval_every: int = 10,
        seed: int = 0,
        subsample: float | None = None,
        monitor: str = "nll",
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.input_type = check_input_type(input_type)
        self._fit_kw: dict[str, Any] = fit_config(
            objective=objective, optimizer=optimizer, lr=lr, max_iter=max_iter, max_steps=max_steps,
            batch_size=batch_size, chunk_size=chunk_size, memory_budget=memory_budget,
            patience=patience, min_delta=min_delta, lr_patience=lr_patience, lr_factor=lr_factor,
            eval_every=eval_every, seed=seed, subsample=subsample, monitor=monitor,
        )
        self._device_hint = torch.device(device) if device is not None else torch.device("cpu")
        self.num_classes: int | None = None
        self.is_fitted = False
        self.fit_info: dict[str, Any] = {}
        self._fix_classes(num_classes)

    # ----------------------------------------------------------------- subclass API
    def _build(self, num_classes: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _map(self, rows: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Canonical ``(P, C)`` rows -> calibrated logits ``(P, C)``."""
        raise NotImplementedError

    def _map_image(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """Canonical ``(N, C, *spatial)`` images (and their input images, for calibrators with an
        image branch) -> calibrated logits (spatial calibrators)."""
        c = x.shape[1]
        moved = x.transpose(1, -1)
        out = self._map(moved.reshape(-1, c))
        return out.reshape(moved.shape).transpose(1, -1)

    def _apply_image_map(self, x: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """``_map_image(x)``, or ``_map_image(x, image)`` when there is an image (subclasses
        without an image branch may define ``_map_image(x)`` only)."""
        return self._map_image(x) if image is None else self._map_image(x, image)

    def _regularizer(self) -> torch.Tensor | None:
        return None

    def _row_temperature(self) -> torch.Tensor | None:
        """The scalar ``t`` when ``_map(rows)`` is ``rows / t`` (TS), else None: the NLL of
        pointwise chunks is then fitted in closed form (:meth:`~segcal.calibrators.objectives.NLL.scaled_stats`)."""
        return None

    def _extra_config(self) -> dict[str, Any]:
        """Subclass constructor arguments (plain Python values)."""
        return {}

    def _fit_stages(self) -> list[tuple[str, list[nn.Parameter]]]:
        """``[(stage_name, params), ...]`` fitted in order; default: one stage, all parameters."""
        return [("all", list(self.parameters()))]

    def _set_stage(self, stage: str | None) -> None:
        """Hook called before each stage (``None`` after fitting)."""

    def _stage_loss(self, stage: str) -> Any:
        """Optional ``stats_fn(batch, objective)`` with the calibrator's own training target.

        Return ``None`` (default) to fit the stage on the objective through ``_stats_fn``;
        otherwise the returned function gives additive loss statistics of a batch (ignoring the
        objective) and is also the monitored validation value (best iterate / early stopping).
        """
        return None

    def _stage_settings(self, stage: str, train: FitData) -> dict[str, Any]:
        """:class:`FitSettings` overrides for one stage (e.g. AdamW and epochs for a classifier)."""
        return {}

    def _post_fit(self, train: FitData, val: FitData | None) -> dict[str, Any] | None:
        """Hook after the stages: non-differentiable steps (hyper-parameter searches on ``val``,
        histogram statistics). It may call :meth:`_run_stage` again; returns extra ``fit_info``."""
        return None

    # ----------------------------------------------------------------- helpers
    def _fix_classes(self, num_classes: int | None) -> None:
        """Fix the class count and build the parameters (``None``: inferred at ``fit``); every
        constructor ends with it, after the attributes ``_build`` reads."""
        self._fixed_classes = num_classes is not None
        if num_classes is not None:
            if int(num_classes) < 2:
                raise ValueError(f"num_classes: expected at least 2, got {num_classes}")
            self._build_params(int(num_classes))

    def _declare_from(self, base: Calibrator) -> None:
        """Declare the properties of ``base`` (a calibrator wrapping a base keeps what it keeps)."""
        self.translation_invariant = bool(base.translation_invariant)
        self.argmax_preserving = bool(base.argmax_preserving)
        self.order_preserving = bool(base.order_preserving)
        self.spatial = bool(base.spatial)

    def _build_params(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self._build(self.num_classes)
        self.to(self._device_hint)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return self._device_hint

    def _canonical(self, rows: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Raw scores -> the space the map consumes (float32)."""
        rows = rows.to(torch.float32)
        if self.input_type == "probs":
            return torch.log(rows.clamp_min(PROB_FLOOR))
        if self.input_space == "logprobs":
            return F.log_softmax(rows, dim=dim)
        return rows

    @property
    def uses_image(self) -> bool:
        """True when the map needs the input image (an image branch): ``image=`` is mandatory."""
        return False

    @property
    def image_channels_needed(self) -> int | None:
        """Channels of the input image the map needs (``None``: no image branch)."""
        return int(getattr(self, "image_channels", 3)) if self.uses_image else None

    def properties(self) -> dict[str, bool]:
        return {
            "translation_invariant": bool(self.translation_invariant),
            "argmax_preserving": bool(self.argmax_preserving),
            "order_preserving": bool(self.order_preserving),
            "spatial": bool(self.spatial),
        }

    def get_config(self) -> dict[str, Any]:
        """Constructor keyword arguments (plain values) that rebuild this calibrator."""
        cfg = {"num_classes": self.num_classes, "input_type": self.input_type, **self._fit_kw}
        cfg.update(self._extra_config())
        return cfg

    @property
    def fit_settings(self) -> dict[str, Any]:
        """A copy of the fit settings (``objective``, ``optimizer``, ``lr``, ``max_iter``,
        ``max_steps``, ``batch_size``, ``chunk_size``, ``memory_budget``, ``patience``,
        ``min_delta``, ``lr_patience``, ``lr_factor``, ``eval_every``, ``seed``, ``subsample``,
        ``monitor``): the constructor's fitting keyword arguments, as plain values."""
        return dict(self._fit_kw)

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "unfitted"
        return f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, {state})"

    # ----------------------------------------------------------------- fitting
    # parameter-free features cached by the fitting loop (full-batch L-BFGS, in memory): a
    # calibrator whose map starts with work that does not depend on its parameters (a sort, a
    # routing of pixels to experts) returns it from ``_features(canonical_rows)`` and computes
    # ``_map`` from it in ``_map_features``; ``_map_features(_features(r)) == _map(r)``.
    def _features(self, rows: torch.Tensor) -> tuple[Any, ...] | None:
        return None

    def _map_features(self, feats: tuple[Any, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _precompute_batch(self, batch: Batch) -> tuple[Any, ...] | None:
        if batch.valid is not None:
            return None
        return self._features(self._canonical(batch.x.to(self.device, non_blocking=True)))

    def _stats_fn(self, batch: Batch, objective: Any) -> torch.Tensor:
        dev = self.device
        if batch.pre is not None:
            return objective.stats(self._map_features(batch.pre), batch.y.to(dev))
        if batch.valid is None:
            rows = self._canonical(batch.x.to(dev, non_blocking=True))
            t = self._row_temperature() if isinstance(objective, NLL) else None
            if t is not None:  # map z / t: the NLL and its gradient in closed form
                return objective.scaled_stats(rows, t, batch.y.to(dev))
            return objective.stats(self._map(rows), batch.y.to(dev))
        x = batch.x.to(dev)
        img = None if batch.image is None else batch.image.to(dev, torch.float32)
        logits = self._apply_image_map(self._canonical(x, dim=1), img)
        valid = batch.valid.to(dev)
        return objective.stats(logits.movedim(1, -1)[valid], batch.y.to(dev)[valid])

    def _prepare(self, data: Any, labels: Any, mask: Any, ignore_index: int | None, what: str,
                 progress: bool = False, images: Any = None) -> FitData:
        return prepare_data(
            data,
            labels,
            mask,
            input_type=self.input_type,
            ignore_index=ignore_index,
            num_classes=self.num_classes if (self._fixed_classes or what != "logits") else None,
            spatial=self.spatial,
            memory_budget=self._fit_kw["memory_budget"],
            subsample=self._fit_kw["subsample"] if what == "logits" else None,
            seed=self._fit_kw["seed"],
            what=what,
            progress=progress,
            images=images,
            image_channels=self.image_channels_needed,
        )

    def fit(
        self,
        logits: Any,
        labels: Any = None,
        *,
        ignore_index: int | None = None,
        mask: Any = None,
        val: Any = None,
        progress: bool = False,
        images: Any = None,
        val_images: Any = None,
    ) -> Calibrator:
        """Fit on held-out data; returns ``self``.

        Parameters
        ----------
        logits
            ``(N, C, *spatial)`` / ``(M, C)`` scores (numpy or torch), an iterable of
            ``(scores, labels[, mask])`` batches, a :class:`~segcal.io.PredictionFolder`,
            :class:`~segcal.calibrators.data.FolderBatches`, or a prediction-folder path (then
            ``labels`` is the label-folder path).
        labels
            ``(N, *spatial)`` / ``(M,)`` integer labels (in-memory input only).
        ignore_index
            Label value to ignore (``None``: every label must be in ``[0, C)``).
        mask
            Boolean mask, True = pixel counts (in-memory input only).
        val
            Validation data for early stopping / best-iterate selection on NLL: a tuple
            ``(scores, labels[, mask])`` or any of the streamed forms above.
        progress
            Show progress bars on stderr: while reading the data, and over the optimiser steps of
            every stage (tqdm; off by default, ``segcal fit`` turns it on).
        images, val_images
            Input images ``(N, image_channels, *spatial)`` of ``logits`` / of the ``val`` tuple, for
            calibrators with an image branch (:attr:`uses_image`); with a prediction folder (path,
            :class:`~segcal.io.PredictionFolder`) an image folder path; streamed batches carry their
            image instead (a mapping with an ``"image"`` entry). Required when the calibrator uses
            images, rejected when it does not.
        """
        train = self._prepare(logits, labels, mask, ignore_index, "logits", progress, images)
        if self._fixed_classes and train.num_classes != self.num_classes:
            raise ValueError(
                f"logits: expected {self.num_classes} classes, got {train.num_classes}"
            )
        backup = copy.deepcopy(self.state_dict()) if self.is_fitted else None
        old_classes = self.num_classes
        if self.num_classes != train.num_classes or not self._fixed_classes:
            self._build_params(train.num_classes)  # (re)fit from scratch
        val_data = None
        if val is None and val_images is not None:
            raise ValueError("val_images: given without val")
        if val is not None:
            vdata, vlab, vmask = split_val(val)
            val_data = self._prepare(vdata, vlab, vmask, ignore_index, "val", progress, val_images)
            if val_data.num_classes != train.num_classes:
                raise ValueError(
                    f"val: expected {train.num_classes} classes, got {val_data.num_classes}"
                )
        objective = get_objective(self._fit_kw["objective"])
        records = []
        self._progress = bool(progress)
        try:
            for stage, params in self._fit_stages():
                records.append(self._run_stage(stage, params, train, val_data, objective))
            extra = self._post_fit(train, val_data) or {}
            check_finite_state(self.state_dict(), f"fit: the {self.name} calibrator's",
                               "became NaN or infinite; check the data (extreme logits?) or fit "
                               "with a lower lr / another method")
        except BaseException:
            if backup is not None and old_classes is not None:
                self._build_params(old_classes)
                self.load_state_dict(backup)
            else:
                self.is_fitted = False
            raise
        finally:
            self._progress = False
            self._set_stage(None)
            for p in self.parameters():
                p.requires_grad_(True)
        self.is_fitted = True
        self.fit_info = fit_summary(records, train, val_data, objective, ignore_index, self._fit_kw, extra)
        return self

    def _run_stage(self, stage: str, params: list[nn.Parameter], train: FitData,
                   val: FitData | None, objective: Any) -> dict[str, Any]:
        """Run THE fitting loop (:func:`minimize`) on one stage; hooks may call it again.

        The stage's training statistic is ``_stage_loss(stage)`` when the calibrator provides one
        (its own target, e.g. the misprediction classifier of selective scaling; it is then also
        the monitored validation value), else the objective through ``_stats_fn``; settings are
        the calibrator's, updated with ``_stage_settings(stage)``.
        """
        self._set_stage(stage)
        ids = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)
        custom = self._stage_loss(stage)
        rec = minimize(
            params, custom or self._stats_fn, train, objective,
            FitSettings.from_config(self._fit_kw, progress=getattr(self, "_progress", False),
                                    progress_label=f"fit {self.name}: {stage}",
                                    **self._stage_settings(stage, train)), val=val,
            val_stats_fn=custom, regularizer=self._regularizer,
            default_lr=(1.0, self.default_adam_lr), buffers=list(self.buffers()),
            precompute=None if custom is not None or type(self)._features is Calibrator._features
            else self._precompute_batch,
            precompute_budget=self._fit_kw["memory_budget"] - train.nbytes - (val.nbytes if val is not None else 0),
        )
        rec["stage"] = stage
        return rec

    # ----------------------------------------------------------------- inference
    def _check_ready(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__}: call fit() (or segcal.load) before use")

    def forward(self, logits: Any, image: Any = None) -> Any:
        """Calibrated logits of the input's shape (numpy in -> numpy out; float32), chunk by chunk.

        ``image``: the input images ``(N, image_channels, *spatial)`` of ``logits``, required by
        calibrators with an image branch (:attr:`uses_image`) and rejected by the others."""
        self._check_ready()
        if torch.compiler.is_compiling():  # torch.export: the map, without validation or chunks
            return self._apply_image_map(self._canonical(torch.as_tensor(logits), dim=1), image)
        is_np = isinstance(logits, np.ndarray)
        t = check_scores(logits, "logits", num_classes=self.num_classes)
        img = None
        if self.uses_image:
            if image is None:
                raise ValueError(
                    f"image: this {self.name} calibrator has an image branch (use_image=True); pass "
                    f"image= ({t.shape[0]}, {self.image_channels_needed}, *spatial of the logits)"
                )
            img = check_image(image, t, int(self.image_channels_needed), "image")  # type: ignore[arg-type]
        elif image is not None:
            raise ValueError(f"image: given, but this {self.name} calibrator has no image branch")
        out = calibrated_logits(self, t, img)
        return out.detach().numpy() if is_np else out

    def predict_proba(self, logits: Any, image: Any = None) -> Any:
        """Calibrated probabilities of the input's shape (numpy in -> numpy out); ``image`` as in
        :meth:`forward`."""
        is_np = isinstance(logits, np.ndarray)
        with torch.no_grad():
            out = self.forward(as_tensor(logits, "logits") if is_np else logits, image=image)
            p = F.softmax(out, dim=1)
        return p.numpy() if is_np else p

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save config + state (format ``segcal-calibrator``, version 1) with ``torch.save``
        (atomically; :mod:`segcal.calibrators.persistence`)."""
        self._check_ready()
        save_calibrator(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> Calibrator:
        """Load a calibrator file (as :func:`segcal.load`); on a subclass, the file must hold that
        class (else an :class:`~segcal.errors.InputError`)."""
        obj = registry.load(path, map_location=map_location)
        if not isinstance(obj, cls):
            raise InputError(f"calibrator: {os.fspath(path)} holds a {obj.name!r} calibrator, "
                             f"not a {cls.__name__}")
        return obj

    @classmethod
    def _from_payload(cls, payload: dict[str, Any]) -> Calibrator:
        """Rebuild from a checked file payload: in eval mode, parameters without gradients (``fit``
        turns them back on)."""
        obj = cls(**dict(payload["config"]))
        if obj.num_classes is None:
            raise ValueError("calibrator file: config has no num_classes")
        obj.load_state_dict(payload["state_dict"])
        obj.is_fitted = True
        obj.fit_info = dict(payload.get("fit_info") or {})
        obj.eval()
        for p in obj.parameters():
            p.requires_grad_(False)
        return obj

    def to_torchscript(self, path: str | os.PathLike | None = None) -> torch.jit.ScriptModule:
        """Export ``logits (N, C, *spatial) or (M, C) -> calibrated logits`` as TorchScript.

        The exported module needs only ``torch`` (``torch.jit.load(path)``); it performs no input
        validation. Spatial calibrators (LTS/IBTS) are traced on an image of their rank: the export
        takes ``(N, C, *spatial)`` images of that rank with every spatial size > 4 (reflect padding).
        With an image branch the export takes ``(logits, image)``. Returns the scripted module and
        saves it when ``path`` is given.
        """
        self._check_ready()
        return export_torchscript(self, path)
