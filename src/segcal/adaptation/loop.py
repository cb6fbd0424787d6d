"""Source-free adaptation guided by estimated calibration (Cal-SFDA, §3.15(f)-(h)) and baselines.

:func:`adapt` runs one of three methods on a folder of **unlabeled** target images:

``"calsfda"``
    Epoch 0 is the BatchNorm warm-up (§3.15(f)): the BN running statistics are first re-estimated
    on the target images (BN *modules* in train mode, cumulative average, no gradients;
    ``bn_stats_pass=False`` skips this). By default that is all (``warmup_affine=False``: epoch 0
    is plain AdaBN); ``warmup_affine=True`` then also trains the BN affine parameters for one epoch,
    as the reference does, which collapsed ESPNet in both protocol runs (docs/adaptation.md,
    "Session 3"). Every round ``r`` starts with ECE-weighted,
    class-balanced pseudo-labels (§3.15(g); ``prop = 0.15 + 0.05 r``, ``local_prop = 0.1 + 0.05 r``)
    from the current model and the estimator's per-image ECE; training uses the §3.15(h) loss
    (:class:`~segcal.adaptation.losses.CalSFDALoss`, class weights ``softmax(1/thr)``). After the
    warm-up the parameters whose name has a component in ``freeze`` (default ``"encoder"``, as the
    reference freezes its encoder) stay frozen; BN stays in train mode while training. The
    checkpoint with the lowest **estimated** target ECE is selected.
``"tent"``
    TENT: entropy minimisation of the BN affine parameters, BN in train mode (batch statistics;
    running statistics also updated so that the saved checkpoints evaluate in eval mode on
    target-like statistics). Last epoch selected.
``"selftrain"``
    Plain self-training: pseudo-labels = argmax where ``max_k p_k >= selftrain_threshold``
    (default 0.9), regenerated each round, unweighted cross-entropy; no warm-up; last epoch
    selected.

Every epoch writes ``epoch_XXX.pt`` (model ``state_dict``, optimizer state, RNG state, the log so
far) and rewrites ``adapt_log.json``: per epoch the round, mean loss, the mean estimated target
ECE over the target images (logged for every method when an estimator is given) and the
pseudo-label coverage per class; per round the thresholds and coverage. ``resume=`` continues
from a checkpoint (the round's pseudo-labels are reloaded from ``pseudo_roundR.npz``).

**No target label is ever read**: target images come from a list of paths, an image folder, or a
dataset alias such as ``camvid:train`` of which only the image folder is resolved.

Estimators: an :class:`~segcal.estimation.ECEEstimator` trained on ``"logits"`` (then its class
count must equal the model's, or ``class_mapping.num_target`` when a mapping is given: the
estimator then sees the mapped logits while the model is adapted in its own label space), one
trained on ``"features"`` (its ``meta["layer"]`` names the hooked sub-module), or a
:class:`~segcal.estimation.ConfidenceBaseline` (``"maxprob"``/``"entropy"``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcal.adaptation.bn import bn_train_mode, set_trainable, tent_step
from segcal.adaptation.losses import CalSFDALoss, class_weights

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOG_NAME",
    "METHODS",
    "AdaptConfig",
    "AdaptResult",
    "adapt",
    "estimate_target_ece",
    "load_checkpoint",
    "resolve_target_images",
]

METHODS = ("calsfda", "tent", "selftrain")
CHECKPOINT_FORMAT = "segcal-adapt-checkpoint"
LOG_NAME = "adapt_log.json"
IGNORE = 255
QUICK_IMAGES = 4


@dataclass
class AdaptConfig:
    """Hyper-parameters of :func:`adapt` (saved in the log and every checkpoint)."""

    method: str = "calsfda"
    rounds: int = 3
    epochs_per_round: int = 2
    lr: float = 5e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 4
    seed: int = 0
    quick: bool = False
    max_images: int | None = None
    freeze: tuple[str, ...] = ("encoder",)
    alpha: float = 0.1
    beta: float = 1.0
    gamma: float = 1.0
    eta: float = 0.0
    subsample: int = 5
    selftrain_threshold: float = 0.9
    ignore_classes: tuple[int, ...] = ()
    bn_stats_pass: bool = True
    warmup_affine: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("rounds", "epochs_per_round", "batch_size", "subsample"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.method == "calsfda":
            from segcal.estimation.pseudolabels import proportion_schedule

            proportion_schedule(self.rounds - 1)  # raises when the schedule leaves (0, 1]
        if self.method == "calsfda" and not (self.bn_stats_pass or self.warmup_affine):
            raise ValueError("bn_stats_pass=False and warmup_affine=False leave nothing for the calsfda warm-up epoch")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0 < self.selftrain_threshold <= 1:
            raise ValueError(f"selftrain_threshold: expected a value in (0, 1], got {self.selftrain_threshold}")


@dataclass
class AdaptResult:
    """What :func:`adapt` produced. ``model`` holds the selected checkpoint's weights."""

    method: str
    out_dir: Path
    log_path: Path
    checkpoints: list[Path]
    selected_epoch: int
    selected_checkpoint: Path
    selection_rule: str
    epochs: list[dict[str, Any]]
    model: nn.Module | None = field(default=None, repr=False)
    seconds: float = 0.0


# --------------------------------------------------------------------------- target images
def resolve_target_images(
    target: str | os.PathLike | Sequence[str | os.PathLike], data_root: str | os.PathLike | None = None
) -> list[Path]:
    """Image paths of the target set: a list of paths, an image folder, or an alias (``camvid:train``).

    Only image folders are listed; for an alias the split's *label* folder is never opened.
    """
    from segcal.datasets import IMAGE_SUFFIXES, is_alias, resolve_images
    from segcal.datasets.folders import list_files

    if isinstance(target, list | tuple):
        paths = [Path(p) for p in target]
        what = "the given list"
    else:
        folder = resolve_images(target, data_root)[0] if is_alias(target) else Path(target).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"target: {folder} does not exist (an image folder or an alias like camvid:train)")
        if not folder.is_dir():
            raise NotADirectoryError(f"target: {folder} is not a folder of images")
        paths = list(list_files(folder, IMAGE_SUFFIXES, "target").values())
        what = str(folder)
    if not paths:
        raise ValueError(f"target: no images in {what} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return paths


def _quick_subset(paths: list[Path], n: int) -> list[Path]:
    if len(paths) <= n:
        return paths
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in idx]


# --------------------------------------------------------------------------- estimator glue
class _EstimatorGlue:
    """Per-image ECE estimates of the current model, whatever the estimator kind."""

    def __init__(
        self, estimator: Any, module: nn.Module, num_classes: int, mapping: nn.Module | None, model_name: str = ""
    ) -> None:
        self.estimator = estimator
        self.mapping = mapping
        self.kind = getattr(estimator, "input_kind", None) if estimator is not None else None
        self._hook = None
        self._feat: torch.Tensor | None = None
        self.capture = False
        if estimator is None:
            return
        if self.kind not in ("scores", "logits", "features"):
            raise TypeError(f"estimator: unsupported object {type(estimator).__name__}")
        space = mapping.num_target if mapping is not None else num_classes
        if mapping is not None and getattr(mapping, "num_source", num_classes) != num_classes:
            raise ValueError(
                f"class mapping expects {mapping.num_source} source classes but the model has {num_classes} outputs"
            )
        if self.kind == "logits" and estimator.num_classes != space:
            where = f"the mapping's {space} target classes" if mapping is not None else f"the model's {space} outputs"
            raise ValueError(
                f"estimator was trained for {estimator.num_classes} classes but it would see {where}; "
                "use an estimator trained on this model's (mapped) logits, a class mapping, or a baseline (maxprob)"
            )
        if self.kind == "features":
            meta = getattr(estimator, "meta", {}) or {}
            trained_on = meta.get("model")
            if trained_on and model_name and trained_on != model_name:
                warnings.warn(
                    f"the features estimator was trained on {trained_on!r} features, not {model_name!r}; "
                    "its estimates may be meaningless", UserWarning, stacklevel=4,
                )
            layer = meta.get("layer")
            if not layer:
                raise ValueError("features estimator: its meta has no 'layer' (the hooked sub-module name)")
            mods = dict(module.named_modules())
            name = layer if layer in mods else f"model.{layer}" if f"model.{layer}" in mods else None
            if name is None:
                raise ValueError(f"features estimator: layer {layer!r} is not a sub-module of the model")
            self._hook = mods[name].register_forward_hook(self._on_forward)

    def _on_forward(self, _m: nn.Module, _i: Any, out: Any) -> None:
        if self.capture:
            self._feat = (out[0] if isinstance(out, tuple | list) else out).detach()

    def forward(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """``(logits, estimates)`` for batch ``x`` (no gradients; the caller sets eval mode)."""
        self.capture = self.kind == "features"
        try:
            with torch.no_grad():
                logits = module(x)
        finally:
            self.capture = False
        if self.estimator is None:
            return logits, None
        if self.kind == "features":
            from segcal.estimation.features import pool_map

            grid = self.estimator.config.get("grid")
            feats = pool_map(self._feat.float(), None if grid is None else tuple(grid))
            self._feat = None
            return logits, self.estimator.predict(feats)
        scores = self.mapping(logits) if self.mapping is not None else logits
        if self.kind == "scores":
            return logits, self.estimator.predict_scores(scores, "logits")
        return logits, self.estimator.predict(self.estimator.inputs_from_scores(scores, "logits"))

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def estimate_target_ece(
    module: nn.Module,
    images: Sequence[torch.Tensor],
    estimator: Any,
    *,
    num_classes: int,
    class_mapping: nn.Module | None = None,
    model_name: str = "",
) -> np.ndarray:
    """Per-image estimated ECE of ``module`` on preprocessed target batches, in eval mode.

    The yardstick :func:`adapt` logs after every epoch, usable on its own, e.g. to score the
    checkpoints of a finished run with another estimator (``benchmarks/adaptation_protocol.py
    --rescore-estimator``). ``images`` are ``(B, 3, H, W)`` tensors; ``estimator`` is any estimator
    :func:`adapt` accepts (a logits, features or baseline estimator), ``class_mapping`` is applied to
    the logits before it. Returns one estimate per image (float64). The module's train/eval mode is
    restored afterwards.
    """
    if estimator is None:
        raise ValueError("estimator: an ECE estimator is required")
    glue = _EstimatorGlue(estimator, module, int(num_classes), class_mapping, model_name)
    was_training = module.training
    try:
        module.eval()
        out = [np.asarray(glue.forward(module, x)[1], dtype=np.float64).reshape(-1) for x in images]
    finally:
        glue.close()
        module.train(was_training)
    if not out:
        raise ValueError("images: no target batch given")
    return np.concatenate(out)


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a segcal adaptation checkpoint")
    return ck


def load_adapted(model: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights of an adaptation checkpoint into a registered model, in place.

    Parameters
    ----------
    model
        A :class:`segcal.models.LoadedModel` (``create_model(...)``). Its ``module`` receives the
        checkpoint's ``state_dict`` when the checkpoint was made by adapting a model of the same
        name; when ``module`` is a :class:`segcal.models.MappedModel` (e.g.
        ``espnet-cityscapes-camvid``) the adapted weights of the un-mapped model
        (``espnet-cityscapes``) are loaded into ``module.model``, so the adapted model predicts
        in the mapped label space.
    path
        An ``epoch_XXX.pt`` written by :func:`adapt`.

    Returns
    -------
    dict
        ``{"model", "method", "epoch", "estimated_ece", "target"}``, with ``target`` the module
        (``"module"`` or ``"module.model"``) that was loaded.

    Raises
    ------
    ValueError
        Not an adaptation checkpoint, or its weights do not fit the model (another architecture or
        class count); the message names the adapted model.
    """
    from segcal.models import MappedModel

    ck = load_checkpoint(path)
    adapted = json.loads(ck["log"]).get("model") if ck.get("log") else None
    candidates = [("module", model.module)]
    if isinstance(model.module, MappedModel):
        candidates.append(("module.model", model.module.model))
    if adapted == getattr(model, "name", None):
        candidates = candidates[:1]
    errors = []
    for where, mod in candidates:
        try:
            mod.load_state_dict(ck["state_dict"], strict=True)
        except RuntimeError as exc:
            errors.append(f"{where}: {str(exc).splitlines()[0]}")
            continue
        model.module.eval()
        return {"model": adapted, "method": ck.get("method"), "epoch": int(ck["epoch"]),
                "estimated_ece": ck.get("estimated_ece"), "target": where}
    raise ValueError(
        f"{path}: checkpoint of an adapted {adapted!r} does not fit model {getattr(model, 'name', '?')!r} "
        f"({'; '.join(errors)})"
    )


def _save(path: Path, obj: Any) -> None:
    from segcal.io import atomic_write

    with atomic_write(path) as fh:
        torch.save(obj, fh)


def _write_json(path: Path, obj: Any) -> None:
    from segcal.io import atomic_write

    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=1)


# --------------------------------------------------------------------------- the loop
def adapt(
    model: Any,
    target_images: Any,
    estimator: Any = None,
    *,
    method: str = "calsfda",
    rounds: int = 3,
    epochs_per_round: int = 2,
    lr: float = 5e-5,
    seed: int = 0,
    out_dir: str | os.PathLike = "adapt_out",
    resume: str | os.PathLike | None = None,
    quick: bool = False,
    num_classes: int | None = None,
    class_mapping: nn.Module | None = None,
    transform: Callable[[np.ndarray, str], np.ndarray] | None = None,
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    progress: bool = True,
    data_root: str | os.PathLike | None = None,
    **options: Any,
) -> AdaptResult:
    """Adapt ``model`` to unlabeled ``target_images``; see the module docstring.

    Parameters
    ----------
    model
        A :class:`~segcal.models.LoadedModel` (its ``module``, ``preprocess``, ``num_classes`` and
        ignore class are used; the module is copied, never modified) or an ``nn.Module`` mapping
        ``(N, 3, H, W)`` to ``(N, C, H, W)`` logits (then ``num_classes`` is required).
    target_images
        Image paths, an image folder, or an alias (``camvid:train``); or a list of ``H x W x 3``
        uint8 arrays (tests).
    estimator
        ECE estimator (required for ``"calsfda"``; optional, logged only, for the baselines).
    quick
        At most 4 images, one round of 2 epochs (``calsfda``: the warm-up and one epoch),
        ``subsample=1``.
    class_mapping
        A :class:`~segcal.models.ClassMapping` applied to the logits before the estimator only.
    transform
        ``transform(image_uint8, stem) -> image_uint8`` applied on load (e.g. a corruption from
        :func:`segcal.shift.make_transform`).
    options
        Further :class:`AdaptConfig` fields (``batch_size``, ``momentum``, ``weight_decay``,
        ``freeze``, ``eta``, ``gamma``, ``selftrain_threshold``, ``max_images``, ...).
    """
    t0 = time.perf_counter()
    unknown = set(options) - {f for f in AdaptConfig.__dataclass_fields__} - {"quick"}
    if unknown:
        raise TypeError(f"adapt: unknown option(s) {', '.join(sorted(unknown))}")
    cfg = AdaptConfig(method=method, rounds=rounds, epochs_per_round=epochs_per_round, lr=lr, seed=seed,
                      quick=quick, **options)
    if quick:
        cfg.rounds, cfg.epochs_per_round, cfg.subsample = 1, 2, 1
        cfg.max_images = min(cfg.max_images or QUICK_IMAGES, QUICK_IMAGES)
    cfg.check()
    if cfg.method == "calsfda" and estimator is None:
        raise ValueError("method 'calsfda' needs an ECE estimator (a trained estimator file or a baseline: maxprob)")

    # ---- model
    if isinstance(model, nn.Module):
        module = copy.deepcopy(model)
        if num_classes is None:
            raise ValueError("num_classes is required when model is a plain nn.Module")
        if preprocess is None:
            from segcal.models.registry import default_preprocess

            preprocess = default_preprocess
        ignore_classes = tuple(cfg.ignore_classes)
    elif hasattr(model, "module") and hasattr(model, "num_classes"):
        module = copy.deepcopy(model.module)
        if num_classes is not None and num_classes != model.num_classes:
            raise ValueError(f"num_classes={num_classes} but model {model.name!r} has {model.num_classes} outputs")
        num_classes = model.num_classes
        preprocess = preprocess or model.preprocess
        ii = getattr(model, "ignore_index", None)
        ignore_classes = tuple(cfg.ignore_classes) or ((ii,) if ii is not None and 0 <= ii < num_classes else ())
    else:
        raise TypeError(f"model: expected an nn.Module or a LoadedModel, got {type(model).__name__}")
    cfg.ignore_classes = tuple(int(c) for c in ignore_classes)
    num_classes = int(num_classes)
    if num_classes < 2 or num_classes >= IGNORE:
        raise ValueError(f"num_classes: expected 2..{IGNORE - 1}, got {num_classes}")
    device = next(iter(module.parameters())).device

    # ---- target images (images only; never a label)
    if isinstance(target_images, list | tuple) and target_images and isinstance(target_images[0], np.ndarray):
        stems = [f"img{i:05d}" for i in range(len(target_images))]
        raw = [np.asarray(a) for a in target_images]
        if cfg.max_images:
            keep = _quick_subset(list(range(len(raw))), cfg.max_images)
            stems, raw = [stems[i] for i in keep], [raw[i] for i in keep]
    else:
        paths = resolve_target_images(target_images, data_root)
        if cfg.max_images:
            paths = _quick_subset(paths, cfg.max_images)
        from segcal.datasets.folders import load_image

        stems = [p.stem for p in paths]
        raw = [load_image(p) for p in paths]
    if transform is not None:
        raw = [np.asarray(transform(a, s), dtype=np.uint8) for a, s in zip(raw, stems, strict=True)]
    inputs = _Images(raw, preprocess)  # uint8 kept in memory, preprocessed per batch


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_name = getattr(model, "name", type(model).__name__)
    glue = _EstimatorGlue(estimator, module, num_classes, class_mapping, model_name)
    try:
        return _run(cfg, module, inputs, stems, glue, num_classes, out, resume, progress, device, t0,
                    model_name)
    finally:
        glue.close()


class _Images:
    """The (transformed) target images as uint8; ``[i]`` gives the preprocessed ``(1, 3, H, W)``."""

    def __init__(self, raw: list[np.ndarray], preprocess: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.raw, self.preprocess = raw, preprocess

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(self.raw[i])


def _batches(idx: Sequence[int], size: int):
    for i in range(0, len(idx), size):
        yield list(idx[i : i + size])


def _stack(inputs: _Images, idx: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.cat([inputs[i] for i in idx], 0).to(device)


def _run(
    cfg: AdaptConfig,
    module: nn.Module,
    inputs: _Images,
    stems: list[str],
    glue: _EstimatorGlue,
    num_classes: int,
    out: Path,
    resume: str | os.PathLike | None,
    progress: bool,
    device: torch.device,
    t0: float,
    model_name: str,
) -> AdaptResult:
    from tqdm import tqdm

    n = len(inputs)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    total_epochs = cfg.rounds * cfg.epochs_per_round
    cfg_json = _plain(asdict(cfg))

    def evaluate() -> np.ndarray | None:
        """Per-image estimated ECE of the current model (eval mode)."""
        module.eval()
        if glue.estimator is None:
            return None
        est = []
        for b in _batches(range(n), cfg.batch_size):
            _, e = glue.forward(module, _stack(inputs, b, device))
            est.append(np.asarray(e, dtype=np.float64).reshape(-1))
        return np.concatenate(est)

    def check_output() -> None:
        module.eval()
        logits, _ = glue.forward(module, _stack(inputs, [0], device))
        if logits.ndim != 4 or logits.shape[1] != num_classes:
            raise ValueError(
                f"model output has shape {tuple(logits.shape)} but num_classes={num_classes} (expected (N, C, H, W))"
            )

    def logits_iter():
        module.eval()
        for i in range(n):
            with torch.no_grad():
                yield module(_stack(inputs, [i], device))[0].float().cpu()

    # ---- state (fresh or resumed)
    log: dict[str, Any] = {"method": cfg.method, "model": model_name, "config": cfg_json, "images": stems,
                           "rounds": [], "epochs": []}
    start_epoch = 0
    opt_state: dict[str, Any] | None = None
    opt_phase_saved = None
    if resume is not None:
        ck = load_checkpoint(resume)
        if ck["method"] != cfg.method:
            raise ValueError(f"resume: checkpoint was made with method {ck['method']!r}, not {cfg.method!r}")
        module.load_state_dict(ck["state_dict"])
        log = json.loads(ck["log"])
        if log.get("images") != stems:
            raise ValueError("resume: the checkpoint was made on a different set of target images")
        log["config"] = cfg_json
        start_epoch = int(ck["epoch"]) + 1
        g.set_state(ck["rng"])
        opt_state, opt_phase_saved = ck.get("optimizer"), ck.get("phase")
        if start_epoch >= total_epochs:
            raise ValueError(f"resume: checkpoint is at epoch {ck['epoch']}; nothing left of {total_epochs} epochs")
        log["epochs"] = [e for e in log["epochs"] if e["epoch"] < start_epoch]
    else:
        check_output()
        est0 = evaluate()
        last_est = est0
        log["initial_estimated_ece"] = None if est0 is None else float(est0.mean())

    def phase_of(epoch: int) -> str:
        if cfg.method == "tent":
            return "tent"
        if cfg.method == "calsfda" and epoch == 0:
            return "warmup"
        return "main"

    def trainable(phase: str) -> list[nn.Parameter]:
        """Set ``requires_grad`` for the phase (frozen parameters get no gradient computed)."""
        which = "bn" if phase in ("warmup", "tent") else "all"
        return set_trainable(module, which, () if which == "bn" else cfg.freeze)

    def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    pseudo: np.ndarray | None = None
    # per-image estimates of the current weights (reused at a round start: saves one pass)
    if resume is not None:
        prev = log["epochs"][-1].get("estimated_ece_per_image") if log["epochs"] else None
        last_est = None if prev is None else np.asarray(prev, dtype=np.float64)
    weights: torch.Tensor | None = None
    current_round = -1
    opt, opt_phase = None, None
    checkpoints = [out / f"epoch_{e['epoch']:03d}.pt" for e in log["epochs"]]

    if cfg.method == "calsfda" and start_epoch == 0 and cfg.bn_stats_pass:
        from segcal.estimation.value_net import warmup_bn

        warmup_bn(module, (_stack(inputs, b, device) for b in _batches(range(n), cfg.batch_size)))
        last_est = None  # the BN statistics changed

    bar = tqdm(range(start_epoch, total_epochs), desc=f"adapt[{cfg.method}]", disable=not progress, unit="epoch")
    for epoch in bar:
        rnd = epoch // cfg.epochs_per_round
        # ---- pseudo-labels of the round
        if cfg.method != "tent" and rnd != current_round:
            est_fn = evaluate if last_est is None else (lambda e=last_est: e)
            pseudo, weights, rinfo = _round_labels(cfg, rnd, out, logits_iter, glue, est_fn, num_classes, n,
                                                   fresh=epoch % cfg.epochs_per_round == 0)
            current_round = rnd
            if all(r["round"] != rnd for r in log["rounds"]):
                log["rounds"].append(rinfo)
        rinfo = next((r for r in log["rounds"] if r["round"] == rnd), None)
        # ---- optimizer of the phase
        phase = phase_of(epoch)
        params = trainable(phase)
        if phase != opt_phase:
            opt, opt_phase = make_optimizer(params), phase
            if opt_state is not None and opt_phase_saved == phase:
                opt.load_state_dict(opt_state)
            opt_state = None
        bn_train_mode(module)
        loss_fn = CalSFDALoss(weights, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, eta=cfg.eta)
        order = torch.randperm(n, generator=g).tolist()
        nb = 0
        batch_losses: list[float] = []
        part_sums: dict[str, float] = {}
        stats_only = phase == "warmup" and not cfg.warmup_affine  # AdaBN: no training step at all
        for b in tqdm([] if stats_only else list(_batches(order, cfg.batch_size)), desc=f"epoch {epoch}",
                      leave=False, disable=not progress):
            x = _stack(inputs, b, device)
            if cfg.method == "tent":
                batch_losses.append(tent_step(module, x, opt))
            else:
                y = torch.from_numpy(pseudo[b].astype(np.int64)).to(device)
                logits = module(x)
                if cfg.method == "calsfda":
                    loss, parts = loss_fn(logits, y, g)
                    for k, v in parts.items():
                        part_sums[k] = part_sums.get(k, 0.0) + v
                else:
                    loss = (F.cross_entropy(logits, y, ignore_index=IGNORE) if bool((y != IGNORE).any())
                            else logits.sum() * 0.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
                batch_losses.append(float(loss.detach()))
            nb += 1
        tot = sum(batch_losses)
        for p in module.parameters():
            p.requires_grad_(True)
        est = evaluate()
        last_est = est
        entry = {
            "epoch": epoch, "round": rnd, "phase": phase, "loss": None if stats_only else tot / max(nb, 1),
            "batch_losses": batch_losses,
            "loss_parts": {k: v / max(nb, 1) for k, v in part_sums.items()} or None,
            "estimated_ece": None if est is None else float(est.mean()),
            "estimated_ece_per_image": None if est is None else [float(v) for v in est],
            "coverage": None if rinfo is None else rinfo["coverage"],
            "coverage_per_class": None if rinfo is None else rinfo["coverage_per_class"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log["epochs"].append(entry)
        path = out / f"epoch_{epoch:03d}.pt"
        _select(cfg, log, out)
        _save(path, {
            "format": CHECKPOINT_FORMAT, "method": cfg.method, "epoch": epoch, "round": rnd, "phase": phase,
            "estimated_ece": entry["estimated_ece"], "config": cfg_json,
            "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "optimizer": opt.state_dict(), "rng": g.get_state(), "log": json.dumps(log),
        })
        checkpoints.append(path)
        _write_json(out / LOG_NAME, log)
        if entry["estimated_ece"] is not None:
            bar.set_postfix(est_ece=f"{entry['estimated_ece']:.4f}",
                            loss="-" if entry["loss"] is None else f"{entry['loss']:.4f}")
    module.eval()
    sel = log["selected_epoch"]
    sel_path = out / f"epoch_{sel:03d}.pt"
    module.load_state_dict(load_checkpoint(sel_path)["state_dict"])
    return AdaptResult(
        method=cfg.method, out_dir=out, log_path=out / LOG_NAME, checkpoints=checkpoints, selected_epoch=sel,
        selected_checkpoint=sel_path, selection_rule=log["selection_rule"], epochs=log["epochs"], model=module,
        seconds=time.perf_counter() - t0,
    )


def _select(cfg: AdaptConfig, log: dict[str, Any], out: Path) -> None:
    eps = log["epochs"]
    if cfg.method == "calsfda":
        best = min(eps, key=lambda e: (e["estimated_ece"], e["epoch"]))
        log["selection_rule"] = "argmin estimated target ECE"
    else:
        best = eps[-1]
        log["selection_rule"] = "last epoch"
    log["selected_epoch"] = best["epoch"]
    log["selected_checkpoint"] = str(out / f"epoch_{best['epoch']:03d}.pt")


def _round_labels(cfg, rnd, out, logits_iter, glue, evaluate, num_classes, n, *, fresh):
    """Pseudo-labels ``(n, H, W)`` uint8, class weights and the round's log entry."""
    path = out / f"pseudo_round{rnd}.npz"
    if not fresh and path.is_file():  # resumed in the middle of a round
        z = np.load(path, allow_pickle=False)
        info = json.loads(str(z["info"]))
        w = torch.from_numpy(z["weights"]) if z["weights"].size else None
        return z["labels"], w, info
    from segcal.estimation.pseudolabels import (
        class_thresholds,
        maxprob_pseudo_labels,
        proportion_schedule,
        pseudo_label,
    )

    info: dict[str, Any] = {"round": rnd}
    if cfg.method == "calsfda":
        est = evaluate()
        prop, local_prop = proportion_schedule(rnd)
        thr, _ = class_thresholds(logits_iter(), prop=prop, num_classes=num_classes, ece=list(est),
                                  subsample=cfg.subsample)
        labels = np.stack([pseudo_label(s, thr, local_prop=local_prop)[0] for s in logits_iter()])
        w = class_weights(thr)
        info.update(prop=prop, local_prop=local_prop, thresholds=[float(t) for t in thr],
                    class_weights=[float(v) for v in w], estimated_ece=float(est.mean()))
    else:
        labels = np.stack([maxprob_pseudo_labels(s, cfg.selftrain_threshold) for s in logits_iter()])
        w = None
        info.update(threshold=cfg.selftrain_threshold)
    for c in cfg.ignore_classes:
        labels[labels == c] = IGNORE
    total = labels.size
    counts = np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes]
    info["coverage"] = float(counts.sum() / total)
    info["coverage_per_class"] = [float(v / total) for v in counts]
    np.savez_compressed(path, labels=labels, weights=np.zeros(0, np.float32) if w is None else w.numpy(),
                        info=np.array(json.dumps(info)))
    return labels, w, info


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
