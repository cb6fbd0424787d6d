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

Under ``torchrun`` (an initialised default process group of several ranks) every rank runs
:func:`adapt` with the same arguments and the result is the one-process run's: each global batch
is split over the ranks, BatchNorm statistics (:mod:`~segcal.adaptation.sync_bn`), losses and
gradients are summed over them, the per-image passes are sharded and gathered, and rank 0 writes
(:mod:`~segcal.adaptation.distributed`, ``docs/adaptation.md`` "Under torchrun"). One process runs
exactly the code of before.

Estimators: an :class:`~segcal.estimation.ECEEstimator` trained on ``"logits"`` (then its class
count must equal the model's, or ``class_mapping.num_target`` when a mapping is given: the
estimator then sees the mapped logits while the model is adapted in its own label space), one
trained on ``"features"`` (its ``meta["layer"]`` names the hooked sub-module), or a
:class:`~segcal.estimation.ConfidenceBaseline` (``"maxprob"``/``"entropy"``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from segcal.adaptation.bn import bn_train_mode, set_trainable, tent_step
from segcal.adaptation.checkpoints import (
    CHECKPOINT_FORMAT,
    LOG_NAME,
    load_checkpoint,
    save_checkpoint,
    select_checkpoint,
    write_log,
)
from segcal.adaptation.distributed import Team, batch_input, check_empty_batches, gather_rows
from segcal.adaptation.estimates import EstimatorGlue
from segcal.adaptation.losses import CalSFDALoss
from segcal.adaptation.rounds import round_labels, sharded_step
from segcal.adaptation.sync_bn import synced_batchnorm
from segcal.adaptation.target import (
    TargetImages,
    batches,
    load_target_images,
    stack,
)
from segcal.errors import InputError
from segcal.estimation.pseudolabels import proportion_schedule
from segcal.estimation.value_net import warmup_bn
from segcal.io.files import to_jsonable
from segcal.models.registry import default_preprocess

__all__ = ["IGNORE", "METHODS", "QUICK_IMAGES", "AdaptConfig", "AdaptResult", "adapt"]

METHODS = ("calsfda", "tent", "selftrain")
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
            raise InputError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("rounds", "epochs_per_round", "batch_size", "subsample"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.method == "calsfda":
            proportion_schedule(self.rounds - 1)  # raises when the schedule leaves (0, 1]
        if self.method == "calsfda" and not (self.bn_stats_pass or self.warmup_affine):
            raise InputError("bn_stats_pass=False and warmup_affine=False leave nothing for the calsfda warm-up epoch")
        if not self.lr > 0:
            raise InputError(f"lr: expected > 0, got {self.lr}")
        if not 0 < self.selftrain_threshold <= 1:
            raise InputError(f"selftrain_threshold: expected a value in (0, 1], got {self.selftrain_threshold}")


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
        raise InputError("method 'calsfda' needs an ECE estimator (a trained estimator file or a baseline: maxprob)")

    # ---- model
    if isinstance(model, nn.Module):
        module = copy.deepcopy(model)
        if num_classes is None:
            raise InputError("num_classes is required when model is a plain nn.Module")
        if preprocess is None:
            preprocess = default_preprocess
        ignore_classes = tuple(cfg.ignore_classes)
    elif hasattr(model, "module") and hasattr(model, "num_classes"):
        module = copy.deepcopy(model.module)
        if num_classes is not None and num_classes != model.num_classes:
            raise InputError(f"num_classes={num_classes} but model {model.name!r} has {model.num_classes} outputs")
        num_classes = model.num_classes
        preprocess = preprocess or model.preprocess
        ii = getattr(model, "ignore_index", None)
        ignore_classes = tuple(cfg.ignore_classes) or ((ii,) if ii is not None and 0 <= ii < num_classes else ())
    else:
        raise TypeError(f"model: expected an nn.Module or a LoadedModel, got {type(model).__name__}")
    cfg.ignore_classes = tuple(int(c) for c in ignore_classes)
    num_classes = int(num_classes)
    if num_classes < 2 or num_classes >= IGNORE:
        raise InputError(f"num_classes: expected 2..{IGNORE - 1}, got {num_classes}")
    device = next(iter(module.parameters())).device

    # ---- target images (images only; never a label)
    stems, inputs = load_target_images(target_images, preprocess, max_images=cfg.max_images, transform=transform,
                                       data_root=data_root)

    out = Path(out_dir)
    team = Team.here(device)
    team.main(lambda: out.mkdir(parents=True, exist_ok=True))
    model_name = getattr(model, "name", type(model).__name__)
    glue = EstimatorGlue(estimator, module, num_classes, class_mapping, model_name)
    try:
        with synced_batchnorm(module, team.distributed):
            return _run(cfg, module, inputs, stems, glue, num_classes, out, resume, progress and team.is_main,
                        device, t0, model_name, team)
    finally:
        glue.close()


def _run(
    cfg: AdaptConfig,
    module: nn.Module,
    inputs: TargetImages,
    stems: list[str],
    glue: EstimatorGlue,
    num_classes: int,
    out: Path,
    resume: str | os.PathLike | None,
    progress: bool,
    device: torch.device,
    t0: float,
    model_name: str,
    team: Team,
) -> AdaptResult:
    n = len(inputs)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    total_epochs = cfg.rounds * cfg.epochs_per_round
    cfg_json = to_jsonable(asdict(cfg))

    def evaluate() -> np.ndarray | None:
        """Per-image estimated ECE of the current model (eval mode)."""
        module.eval()
        if glue.estimator is None:
            return None
        if team.distributed:  # whole global batches per rank, gathered in image order
            return np.concatenate(gather_rows(team, lambda: [
                np.asarray(glue.forward(module, stack(inputs, b, device))[1], dtype=np.float64).reshape(-1)
                for b in team.batches(list(batches(range(n), cfg.batch_size)))]))
        est = []
        for b in batches(range(n), cfg.batch_size):
            _, e = glue.forward(module, stack(inputs, b, device))
            est.append(np.asarray(e, dtype=np.float64).reshape(-1))
        return np.concatenate(est)

    def check_output() -> None:
        module.eval()
        logits, _ = glue.forward(module, stack(inputs, [0], device))
        if logits.ndim != 4 or logits.shape[1] != num_classes:
            raise InputError(
                f"model output has shape {tuple(logits.shape)} but num_classes={num_classes} (expected (N, C, H, W))"
            )

    def logits_iter(idx=None):
        module.eval()
        for i in range(n) if idx is None else idx:
            with torch.no_grad():
                yield module(stack(inputs, [i], device))[0].float().cpu()

    shapes: list[tuple[int, ...]] = []
    sizes: list[tuple[int, ...]] = []
    dtype = torch.float32
    if team.distributed:  # every rank needs the shape of every batch (a rank may hold no row of one)
        shapes = gather_rows(team, lambda: [tuple(inputs[i].shape) for i in team.images(n)])
        dtype = inputs[0].dtype
        sizes = sorted({s[1:] for s in shapes})
    elif cfg.batch_size > 1 and len({r.shape[:2] for r in inputs.raw}) > 1:
        # one process: the preprocessed shapes, looked at only when the raw sizes differ (a
        # preprocess may resize)
        sizes = sorted({tuple(inputs[i].shape[1:]) for i in range(n)})
    if cfg.batch_size > 1 and len(sizes) > 1:  # refused now: stacking a batch would fail later
        raise InputError(f"target images of different sizes {sizes[:3]} with batch_size={cfg.batch_size}; "
                         "use images of one size or a batch size of 1")
    if team.distributed:
        check_empty_batches(team, module, [len(b) for b in batches(range(n), cfg.batch_size)], shapes[0], dtype,
                            device)

    # ---- state (fresh or resumed)
    log: dict[str, Any] = {"method": cfg.method, "model": model_name, "config": cfg_json, "images": stems,
                           "rounds": [], "epochs": []}
    start_epoch = 0
    opt_state: dict[str, Any] | None = None
    opt_phase_saved = None
    if resume is not None:
        ck = load_checkpoint(resume)
        if ck["method"] != cfg.method:
            raise InputError(f"resume: checkpoint was made with method {ck['method']!r}, not {cfg.method!r}")
        module.load_state_dict(ck["state_dict"])
        log = json.loads(ck["log"])
        if log.get("images") != stems:
            raise InputError("resume: the checkpoint was made on a different set of target images")
        log["config"] = cfg_json
        start_epoch = int(ck["epoch"]) + 1
        g.set_state(ck["rng"])
        opt_state, opt_phase_saved = ck.get("optimizer"), ck.get("phase")
        if start_epoch >= total_epochs:
            raise InputError(f"resume: checkpoint is at epoch {ck['epoch']}; nothing left of {total_epochs} epochs")
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
        if team.distributed:
            warmup_bn(module, (batch_input(inputs, team.part(b), b, shapes, dtype, device)
                               for b in batches(range(n), cfg.batch_size)))
        else:
            warmup_bn(module, (stack(inputs, b, device) for b in batches(range(n), cfg.batch_size)))
        last_est = None  # the BN statistics changed

    bar = tqdm(range(start_epoch, total_epochs), desc=f"adapt[{cfg.method}]", disable=not progress, unit="epoch")
    for epoch in bar:
        rnd = epoch // cfg.epochs_per_round
        # ---- pseudo-labels of the round
        if cfg.method != "tent" and rnd != current_round:
            est_fn = evaluate if last_est is None else (lambda e=last_est: e)
            pseudo, weights, rinfo = round_labels(cfg, rnd, out, logits_iter, est_fn, num_classes, n,
                                                  fresh=epoch % cfg.epochs_per_round == 0, team=team)
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
        for b in tqdm([] if stats_only else list(batches(order, cfg.batch_size)), desc=f"epoch {epoch}",
                      leave=False, disable=not progress):
            if team.distributed:  # this rank's rows of the global batch; losses and gradients summed
                x = batch_input(inputs, team.part(b), b, shapes, dtype, device)
                value, parts = sharded_step(team, module, opt, params, cfg.method, x, b, pseudo, loss_fn, g)
                for k, v in parts.items():
                    part_sums[k] = part_sums.get(k, 0.0) + v
                batch_losses.append(value)
                nb += 1
                continue
            x = stack(inputs, b, device)
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
        select_checkpoint(cfg.method, log, out)

        header = {
            "format": CHECKPOINT_FORMAT, "method": cfg.method, "epoch": epoch, "round": rnd, "phase": phase,
            "estimated_ece": entry["estimated_ece"], "config": cfg_json,
        }
        # rank 0 writes; every rank waits for it (and stops if it failed)
        team.main(functools.partial(_write_epoch, path, header, module, opt, g, out / LOG_NAME, log))
        checkpoints.append(path)
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


def _write_epoch(
    path: Path, header: dict[str, Any], module: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator,
    log_path: Path, log: dict[str, Any],
) -> None:
    """Write an epoch's checkpoint (weights, optimizer, generator state, log so far), then the log."""
    save_checkpoint(path, {
        **header, "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": opt.state_dict(), "rng": g.get_state(), "log": json.dumps(log),
    })
    write_log(log_path, log)
