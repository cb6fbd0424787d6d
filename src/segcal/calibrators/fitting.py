"""THE fitting loop of segcal: every calibrator is fitted by :func:`minimize` on a :class:`FitData`.

The data side (what ``fit`` accepts, :class:`~segcal.calibrators.data.Batch`,
:class:`~segcal.calibrators.data.FitData`, streaming) is :mod:`segcal.calibrators.data`; this
module holds the settings and the optimisation loops.

* ``optimizer="auto"``: full-batch L-BFGS (strong-Wolfe line search) when the data are in memory,
  mini-batch Adam over streamed batches otherwise. ``"lbfgs"`` on streamed data evaluates the exact
  full-batch objective by streaming (bounded memory, one read of the data per evaluation);
  ``"adam"`` on in-memory data takes mini-batches of ``batch_size`` pixels.
* Full-batch objectives are evaluated chunk by chunk (at most ``chunk_size`` rows and
  ``chunk_elements`` values: :meth:`FitSettings.chunk_rows`) with a backward pass per chunk, so
  memory is bounded by one chunk's autograd graph, whatever the class count; non-linear objectives (soft Dice,
  differentiable ECE) are handled exactly through their additive statistics (see
  :mod:`segcal.calibrators.objectives`). The chunks of one batch (a folder's file) are added in
  order into the batch's gradient, and the batches in one fixed pairwise tree
  (:class:`~segcal.calibrators.collective.FileSums`): ``O(log batches)`` gradient vectors alive,
  and the same additions in one process as on N.
* Early stopping on the validation NLL (``patience`` evaluations without an improvement larger
  than ``min_delta``), ``ReduceLROnPlateau`` (Adam, ``lr_patience``), and the iterate with the best
  monitored value (validation NLL, else training loss) is restored at the end. With
  ``monitor="objective"`` the validation split is scored by the fitting objective instead.
* Seeded (``seed``): the order of batches and the optional pixel subsampling are drawn from a
  ``torch.Generator``. Subsampling (``subsample``: fraction of valid pixels kept per batch) is never
  done implicitly; it is recorded in the calibrator's config.
* Spatial calibrators take Adam steps on groups of ``batch_size`` whole images (the mean loss over
  their valid pixels; accumulated image by image for linear objectives).
* ``progress=True`` shows a tqdm bar over the optimiser steps on stderr (the training loss and,
  with validation data, the monitored validation value in the postfix).
* Distributed (data prepared inside :func:`segcal.calibrators.collective.sharded`, so
  ``FitData.group`` is set): every full-batch value, statistic and gradient is summed over the
  ranks in that tree (bitwise the single-process sums), Adam
  replays the single-process step sequence over the shards, the stop / convergence decisions
  are rank 0's, and the final parameters are broadcast from rank 0 (see
  :mod:`segcal.calibrators.collective`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from segcal.calibrators.collective import (
    FileSums,
    FitGroup,
    active,
    all_sum,
    broadcast_tensors,
    decide,
)
from segcal.calibrators.data import Batch, FitData
from segcal.calibrators.objectives import NLL
from segcal.calibrators.settings import FitSettings, fit_config
from segcal.calibrators.shards import owned_steps

__all__ = ["FitSettings", "StatsFn", "check_finite_loss", "evaluate", "fit_config", "fit_summary",
           "group_step", "minimize", "value_and_grad"]

#: ``stats_fn(batch, objective)``: the additive statistics of one batch (see :func:`minimize`)
StatsFn = Callable[[Batch, Any], torch.Tensor]


def _stack_images(group: list[Batch]) -> Batch:
    """Whole-image batches of equal spatial size -> one ``(n, C, *spatial)`` batch."""
    if len(group) == 1:
        return group[0]
    image = None if group[0].image is None else torch.cat([b.image for b in group], 0)  # type: ignore[misc]
    return Batch(torch.cat([b.x for b in group], 0), torch.cat([b.y for b in group], 0),
                 torch.cat([b.valid for b in group], 0), image)  # type: ignore[misc]


def group_step(stats_fn: StatsFn, group: list[Batch], objective: Any,
               regularizer: Callable[[], torch.Tensor | None]) -> float:
    """Loss and gradients of one mini-batch step (``backward`` done); returns the loss.

    A group of whole images is the mean loss over all their valid pixels. For linear objectives it
    is accumulated image by image (``Σ_i stats_i / n``; the same gradient as one stacked batch,
    with the memory of one image: stacking 4 CamVid images was slower than 4 single passes on
    CPU); other objectives stack images of equal size.
    """
    n = sum(b.n for b in group)
    if len(group) > 1 and objective.linear:
        total = 0.0
        for b in group:
            part = objective.finalize(stats_fn(b, objective), n)
            check_finite_loss(part.detach(), "training loss")
            part.backward()
            total += float(part.detach())
        reg = regularizer()
        if reg is not None:
            reg.backward()
            total += float(reg.detach())
        return total
    if len(group) > 1 and any(b.x.shape[2:] != group[0].x.shape[2:] for b in group):
        raise ValueError("fit: a non-linear objective needs images of equal size within a step; "
                         "use batch_size=1")
    b = _stack_images(group)
    loss = objective.finalize(stats_fn(b, objective), b.n)
    reg = regularizer()
    if reg is not None:
        loss = loss + reg
    check_finite_loss(loss.detach(), "training loss")
    loss.backward()
    return float(loss.detach())


def check_finite_loss(v: torch.Tensor | float, what: str) -> None:
    """Raise a ``ValueError`` naming ``what`` when the loss value ``v`` is NaN or infinite."""
    if not math.isfinite(float(v)):
        raise ValueError(f"fit: the {what} became non-finite (NaN/inf); check the inputs or lower lr")


def evaluate(stats_fn: StatsFn, data: FitData, objective: Any, chunk: int) -> float:
    """Objective value on all the data, without gradients (statistics summed as in
    :func:`value_and_grad`)."""
    with torch.no_grad():
        (total,) = _over_files(data, chunk, lambda: [stats_fn(data.empty_batch(), objective)],
                               lambda chunks: [_stats_sum(stats_fn, chunks, objective)])
    return float(objective.finalize(total, data.n))


def _over_files(data: FitData, chunk: int, like: Callable[[], list[torch.Tensor]],
                per_file: Callable[[Iterator[Batch]], list[torch.Tensor]]) -> list[torch.Tensor]:
    """``per_file(chunks of one batch)`` summed over every batch of every rank, on every rank.

    The batches (the files of a folder: the unit of sharding) are the leaves of one fixed
    pairwise tree over the batches of all ranks (:class:`~segcal.calibrators.collective.FileSums`),
    in one process as on N: so N processes are bitwise one process, and a rank holds
    ``O(log batches)`` partial sums of ``like()``'s shapes, whatever the number of chunks.
    """
    sums = FileSums(data.first_batch)
    for _, group in itertools.groupby(data.iter_file_chunks(chunk), key=lambda t: t[0]):
        sums.add(per_file(b for _, b in group))
    return sums.total(data.group, like)


def _stats_sum(stats_fn: StatsFn, chunks: Iterator[Batch], objective: Any) -> torch.Tensor:
    """The statistics of one batch: its chunks' added in order (``acc = acc + s``)."""
    acc = None
    for b in chunks:
        s = stats_fn(b, objective).detach()
        acc = s if acc is None else acc + s
    assert acc is not None
    return acc


def value_and_grad(
    stats_fn: StatsFn,
    params: list[torch.nn.Parameter],
    data: FitData,
    objective: Any,
    chunk: int,
    regularizer: Callable[[], torch.Tensor | None],
) -> torch.Tensor:
    """Exact full-batch objective + regulariser.

    The gradient of every batch (file) is accumulated chunk by chunk by ``backward`` (memory:
    one chunk's autograd graph and one gradient); the batches' gradients and values are then
    summed in the fixed pairwise tree of :func:`_over_files`, the same in one process and on N
    (bitwise), holding ``O(log batches) x parameters`` values per rank. Non-linear objectives:
    the same sums of the additive statistics first, then of the chunks' ``(stats * dv/dstats)``.
    """
    for p in params:
        p.grad = None
    if objective.linear:
        def per_file(chunks: Iterator[Batch]) -> list[torch.Tensor]:
            total = 0.0
            for b in chunks:
                s = stats_fn(b, objective) / data.n
                s.backward()
                total += float(s.detach())
            return [_take_grads(params), torch.tensor([total], dtype=torch.float64)]

        flat, v64 = _over_files(data, chunk, lambda: [_flat_zeros(params), torch.zeros(1, dtype=torch.float64)], per_file)
        value = torch.tensor(float(v64))
    else:
        with torch.no_grad():
            (acc,) = _over_files(data, chunk, lambda: [stats_fn(data.empty_batch(), objective)],
                                 lambda chunks: [_stats_sum(stats_fn, chunks, objective)])
        acc = acc.detach().requires_grad_(True)
        v = objective.finalize(acc, data.n)
        (g,) = torch.autograd.grad(v, acc)

        def grad_file(chunks: Iterator[Batch]) -> list[torch.Tensor]:
            for b in chunks:
                s = stats_fn(b, objective)
                if s.requires_grad:
                    (s * g).sum().backward()
            return [_take_grads(params)]

        (flat,) = _over_files(data, chunk, lambda: [_flat_zeros(params)], grad_file)
        value = v.detach()
    _set_grads(params, flat)
    reg = regularizer()
    if reg is not None and reg.requires_grad:
        reg.backward()
        value = value + reg.detach()
    for p in params:
        if not bool(torch.isfinite(p.grad).all()):  # type: ignore[arg-type]
            raise ValueError("fit: non-finite gradients; check the inputs or lower lr")
    check_finite_loss(value, "training loss")
    return value


def _flat_zeros(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([torch.zeros_like(p).reshape(-1) for p in params]) if params else torch.zeros(0)


def _take_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The accumulated gradients, flattened (zeros for parameters not reached); ``grad`` reset."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p in params:
        p.grad = None
    return torch.cat([t.reshape(-1) for t in grads]) if grads else torch.zeros(0)


def _set_grads(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _sum_grads(fg: FitGroup, params: list[torch.nn.Parameter], *values: torch.Tensor) -> None:
    """All-reduce (sum) the gradients of ``params`` (zeros where a rank has none) and ``values``."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_sum(fg, [p.grad for p in params] + list(values))  # type: ignore[misc]


def _shard_step(fg: FitGroup, params: list[torch.nn.Parameter], stats_fn: StatsFn, part: Batch | None,
                objective: Any, regularizer: Callable[[], torch.Tensor | None]) -> float:
    """One distributed Adam step: the rank holding the step's chunk computes its loss and
    gradients (:func:`group_step`), the others zeros; both are summed over the ranks."""
    loss = torch.zeros((), dtype=torch.float64)
    failure: ValueError | None = None
    if part is not None:
        try:
            loss += group_step(stats_fn, [part], objective, regularizer)
        except ValueError as exc:  # e.g. a non-finite loss: every rank stops below, none waits
            failure, loss = exc, torch.full((), math.nan, dtype=torch.float64)
            for p in params:
                p.grad = None
    _sum_grads(fg, params, loss)
    if failure is not None:
        raise failure
    check_finite_loss(loss, "training loss")
    return float(loss)


class _BestIterate:
    """The monitored values of one run: history, best iterate (parameters and buffers), early stop."""

    def __init__(self, params: list[torch.nn.Parameter], buffers: list[torch.Tensor],
                 settings: FitSettings, monitor: Callable[[float], float]) -> None:
        self.params, self.buffers = params, buffers
        self.patience, self.min_delta = settings.patience, settings.min_delta
        self.monitor = monitor
        self.history: list[dict[str, float]] = []
        self.best = math.inf
        self.stop_best = math.inf
        self.stale = 0
        self.scheduler: Any = None  # ReduceLROnPlateau, stepped on every monitored value
        self.group: FitGroup | None = None  # distributed: stop decisions are rank 0's
        self.keep_current()

    def keep_current(self) -> None:
        """Take the current parameters and buffers as the best iterate."""
        self.best_state = [p.detach().clone() for p in self.params]
        self.best_bufs = [b.detach().clone() for b in self.buffers]

    def record(self, step: int, train_value: float) -> bool:
        """Monitor the current iterate (keeping it if best); return True to stop early."""
        m = self.monitor(train_value)
        self.history.append({"step": step, "train": train_value, "monitor": m})
        if m < self.best:
            self.best = m
            self.keep_current()
        if m < self.stop_best - self.min_delta:
            self.stop_best = m
            self.stale = 0
        else:
            self.stale += 1
        if self.scheduler is not None:
            self.scheduler.step(m)
        return decide(self.group, self.patience is not None and self.stale >= self.patience)

    def restore(self) -> None:
        """Copy the best iterate back into the parameters and buffers."""
        with torch.no_grad():
            for p, q in zip(self.params, self.best_state, strict=True):
                p.copy_(q)
            for b, q in zip(self.buffers, self.best_bufs, strict=True):
                b.copy_(q)


def _lbfgs(params: list[torch.nn.Parameter], stats_fn: StatsFn, train: FitData, objective: Any,
           settings: FitSettings, val: FitData | None, regularizer: Callable[[], torch.Tensor | None],
           lr: float, track: _BestIterate, bar: Any) -> tuple[int, bool]:
    """Full-batch L-BFGS (strong Wolfe), ``eval_every`` iterations per outer step; returns
    (iterations, stopped early)."""
    inner = max(1, min(settings.eval_every, settings.max_iter))
    opt = torch.optim.LBFGS(
        params,
        lr=lr,
        max_iter=inner,
        max_eval=inner * 3,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        return value_and_grad(stats_fn, params, train, objective, settings.chunk_size, regularizer)

    steps = 0
    if val is not None:
        track.record(steps, math.nan)
    prev = math.inf
    while steps < settings.max_iter:
        before = [p.detach().clone() for p in params]
        value = float(opt.step(closure))  # objective at the start of this step
        # the iteration count LBFGS keeps in the state of its first parameter (our params[0])
        steps = int(opt.state[params[0]].get("n_iter", 0))
        if bar is not None:
            bar.update(min(steps, settings.max_iter) - bar.n)
            bar.set_postfix(loss=f"{value:.5g}", refresh=False)
        if val is not None:
            stop = track.record(steps, value)
            if bar is not None:  # the monitored value (validation objective) beside the loss
                bar.set_postfix(loss=f"{value:.5g}", val=f"{track.history[-1]['monitor']:.5g}")
            if stop:
                return steps, True
        else:
            track.history.append({"step": steps, "train": value, "monitor": value})
        moved = max(float((p.detach() - q).abs().max()) for p, q in zip(params, before, strict=True))
        if decide(train.group, moved < 1e-9 or prev - value < settings.tol * max(1.0, abs(value))):
            break  # converged: no movement, or no decrease over a whole outer step
        prev = value
    if val is None:  # strong-Wolfe L-BFGS decreases monotonically: the last iterate is best
        track.keep_current()
        track.best = (evaluate(stats_fn, train, objective, settings.chunk_size) if not track.history
                      else track.history[-1]["train"])
    return steps, False


def _adam(params: list[torch.nn.Parameter], stats_fn: StatsFn, train: FitData, objective: Any,
          settings: FitSettings, val: FitData | None, regularizer: Callable[[], torch.Tensor | None],
          lr: float, adamw: bool, track: _BestIterate, bar: Any) -> tuple[int, bool]:
    """Mini-batch Adam / AdamW up to ``max_steps``; returns (steps, stopped early)."""
    if adamw:
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr)
    if settings.lr_patience is not None:
        track.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=settings.lr_factor, patience=settings.lr_patience
        )
    gen = torch.Generator().manual_seed(int(settings.seed))
    steps = 0
    track.record(steps, evaluate(stats_fn, train, objective, settings.chunk_size) if val is None else math.nan)
    window: list[float] = []
    per_step = settings.batch_size if settings.images_per_step is None else settings.images_per_step
    fg = train.group
    while True:
        steps_iter = (train.iter_steps(settings.batch_size, gen, images=per_step) if fg is None
                      else ([b] for b in owned_steps(train, settings.batch_size, gen)))
        for group in steps_iter:
            opt.zero_grad()
            if fg is None:
                loss_value = group_step(stats_fn, group, objective, regularizer)
            else:
                loss_value = _shard_step(fg, params, stats_fn, group[0], objective, regularizer)
            opt.step()
            steps += 1
            window.append(loss_value)
            if bar is not None:
                bar.update(1)
            if steps % settings.eval_every == 0 or steps >= settings.max_steps:
                mean = sum(window) / len(window)
                window = []
                stop = track.record(steps, mean)
                if bar is not None:
                    post = {"loss": f"{mean:.5g}"}
                    if val is not None:
                        post["val"] = f"{track.history[-1]['monitor']:.5g}"
                    bar.set_postfix(post)  # drawn now: evaluation points are few
                if stop:
                    return steps, True
            if steps >= settings.max_steps:
                return steps, False


def minimize(
    params: list[torch.nn.Parameter],
    stats_fn: StatsFn,
    train: FitData,
    objective: Any,
    settings: FitSettings,
    *,
    val: FitData | None = None,
    val_stats_fn: StatsFn | None = None,
    regularizer: Callable[[], torch.Tensor | None] = lambda: None,
    default_lr: tuple[float, float] = (1.0, 0.01),
    buffers: Iterable[torch.Tensor] = (),
    precompute: Callable[[Batch], Any] | None = None,
    precompute_budget: float = 0.0,
) -> dict[str, Any]:
    """Minimise ``objective`` (+ regulariser) over ``params`` in place; returns a fit record.

    ``stats_fn(batch, objective)`` returns the objective's additive statistics of one chunk,
    computed through the calibrator. The validation NLL is computed with ``val_stats_fn``.
    ``default_lr`` is ``(lbfgs_lr, adam_lr)`` used when ``settings.lr`` is None.

    A calibrator with its own training target (e.g. the misprediction classifier of selective
    scaling) passes a ``stats_fn`` that ignores ``objective`` and returns its own additive loss
    (and the same function as ``val_stats_fn`` to select the best iterate on it). Mini-batch
    optimisation with ``settings.optimizer = "adamw"`` uses ``torch.optim.AdamW`` with
    ``settings.weight_decay``; ``buffers`` (e.g. BatchNorm running statistics) are restored
    together with the parameters of the best iterate.

    ``precompute(chunk)``: parameter-free features of a chunk (e.g. sorted log-probabilities) that
    ``stats_fn`` reads from ``chunk.pre`` instead of recomputing them at every evaluation; cached
    once for full-batch L-BFGS on in-memory data when they fit ``precompute_budget`` bytes, and
    released before returning.

    ``settings.progress``: a tqdm bar on stderr over the optimiser steps (L-BFGS iterations up to
    ``max_iter``, Adam steps up to ``max_steps``), the last loss in its postfix.
    """
    t0 = time.perf_counter()
    params = [p for p in params if p.requires_grad]
    # from here on ``chunk_size`` is the rows of one chunk: bounded by rows and by values
    settings = dataclasses.replace(settings, chunk_size=settings.chunk_rows(train.num_classes))
    if active() is not None and (train.group is None or val_stats_fn is not None):
        raise ValueError("fit: this calibrator's fit (its own training data or target: selective scaling, "
                         "independent experts, ...) is not distributed yet; fit it in one process")
    opt_name = settings.optimizer
    if opt_name not in ("auto", "lbfgs", "adam", "adamw"):
        raise ValueError(f"optimizer: expected 'auto', 'lbfgs', 'adam' or 'adamw', got {opt_name!r}")
    if opt_name == "auto":
        opt_name = "lbfgs" if train.in_memory else "adam"
    vfn = val_stats_fn or stats_fn
    val_objective = objective if settings.monitor == "objective" else NLL()

    def monitor(train_value: float) -> float:
        if val is None:
            return train_value
        v = evaluate(vfn, val, val_objective, settings.chunk_size)
        check_finite_loss(v, f"validation {val_objective.name}")
        return v

    buffers = list(buffers)
    if train.group is not None:  # one starting point on every rank: rank 0's
        broadcast_tensors(train.group, params + buffers)
    track = _BestIterate(params, buffers, settings, monitor)
    track.group = train.group
    steps, stopped_early, cached = 0, False, 0
    bar = None
    if params and settings.progress:
        total = settings.max_iter if opt_name == "lbfgs" else settings.max_steps
        bar = tqdm(total=total, desc=f"{settings.progress_label} ({opt_name})", unit="step",
                   file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        if not params:
            pass
        elif opt_name == "lbfgs":
            if precompute is not None and train.in_memory:
                with torch.no_grad():
                    cached = train.precompute(settings.chunk_size, precompute, precompute_budget)
                    if cached and val is not None:
                        val.precompute(settings.chunk_size, precompute, precompute_budget - cached)
            lr = settings.lr if settings.lr is not None else default_lr[0]
            steps, stopped_early = _lbfgs(params, stats_fn, train, objective, settings, val, regularizer,
                                          lr, track, bar)
        else:
            lr = settings.lr if settings.lr is not None else default_lr[1]
            steps, stopped_early = _adam(params, stats_fn, train, objective, settings, val, regularizer,
                                         lr, opt_name == "adamw", track, bar)
    finally:
        if bar is not None:
            bar.close()
        train.cached = None  # release the feature cache
        if val is not None:
            val.cached = None
    track.restore()
    if train.group is not None:  # the same calibrator on every rank: rank 0's best iterate
        broadcast_tensors(train.group, params + buffers)
    return {
        "optimizer": opt_name,
        "mode": train.info.get("mode"),
        "n_pixels": train.n,
        "n_val_pixels": val.n if val is not None else 0,
        "steps": steps,
        "best_monitor": track.best,
        "monitor": f"val_{val_objective.name}" if val is not None else f"train_{objective.name}",
        "stopped_early": stopped_early,
        "seconds": time.perf_counter() - t0,
        "cached_feature_mb": round(cached / 2**20, 1),
        "history": track.history[-50:],
    }


def fit_summary(records: list[dict[str, Any]], train: FitData, val: FitData | None, objective: Any,
                ignore_index: int | None, config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A calibrator's ``fit_info``: the objective, ``ignore_index``, ``subsample`` and ``seed`` of
    ``config``, the stage ``records`` of :func:`minimize` (optimizer, mode and pixel counts of the
    last one), whether the training data were read a second time to be kept in memory
    (``read_again``: :func:`segcal.calibrators.data.prepare_data`) and the ``extra`` of the
    ``_post_fit`` hook."""
    if active() is not None and extra:
        raise ValueError("fit: this calibrator's post-fit step (binning, a hyper-parameter search, ...) "
                         "works on one rank's data and is not distributed yet; fit it in one process")
    last = records[-1] if records else {
        "optimizer": "none", "mode": train.info.get("mode"), "n_pixels": train.n,
        "n_val_pixels": val.n if val is not None else 0,
    }
    return {
        "objective": objective.name,
        "ignore_index": ignore_index,
        "subsample": config["subsample"],
        "seed": config["seed"],
        "stages": records,
        **{k: last[k] for k in ("optimizer", "mode", "n_pixels", "n_val_pixels")},
        "read_again": bool(train.info.get("read_again")),
        **extra,
    }
