"""Target-adaptive recalibration from unlabelled target predictions (issue 17; methods.md §9.2).

A calibrator fitted on the labelled source (clean validation data, possibly with perturbed copies)
is corrected on the **unlabelled** target itself by one temperature factor ``c``:
:func:`adapt_to_target` returns a :class:`~segcal.calibrators.TargetCorrected` whose output is
``base(z) / c`` (argmax- and order-preserving whenever the base is). Labels of the target are never
read: a prediction folder is opened without a label folder.

Two ways to choose ``c``:

``how="pseudocal"`` (Hu et al., ICML 2024, "PseudoCal"; §9.2)
    A labelled pseudo-target set is built from the target by mixup of pairs of target samples
    with a fixed ratio ``mix`` (0.65 in the paper), labelled with the model's hard prediction of the
    dominant sample; ``c`` is fitted on it by temperature scaling on the base's outputs, through the
    one fitting loop (``TargetCorrected.fit``). For segmentation the unit is the whole image and
    the labels are the per-pixel predictions of the dominant image.

    * With ``model`` and ``images`` (the paper's recipe): the images are mixed,
      ``x̃ = mix·x_i + (1 − mix)·x_j``, and the model is run on ``x̃``.
    * With predictions only (simplification, stated): the **logits** are mixed,
      ``z̃ = mix·z_i + (1 − mix)·z_j``, a first-order stand-in for the model on the mixed image. It
      cannot see how the network reacts to the mixture; it measures the target's margins, so it is
      only used anchored on ``source`` (below; without it an ``InputError``): on a synthetic
      tempered target the unanchored value moved T the wrong way (2.07 -> 1.24, optimum 2.99),
      the anchored one to 2.99.

    ``source`` (unlabelled source predictions, e.g. the validation predictions the base was fitted
    on; an extension of PseudoCal, not in the paper): the pseudo-target ``c`` is divided by the one
    the same recipe gives on the source, where the base is calibrated and the right answer is 1.
    The recipe's own bias (the pseudo set is not the target) then cancels to first order.

``how="ece-estimate"``
    ``c`` minimises the mean label-free ECE estimate of ``base(z) / c`` over the target images
    (coarse log-grid in ``bounds``, then golden-section search). ``estimator`` must respond to the
    temperature: an :class:`~segcal.estimation.ECEEstimator` trained on logits (``input_kind``
    ``"logits"``, ideally on tempered and perturbed source predictions) or a callable
    ``scores (n, C, H, W) -> per-image estimates (n,)``. The confidence baselines are refused
    (``1 − mean max-prob`` and the entropy fall monotonically as ``c → 0``), and so is a
    features-trained estimator (the features do not change with ``c``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.calibrators import Calibrator
from segcal.calibrators.target_corrected import TargetCorrected
from segcal.errors import InputError
from segcal.estimation.baselines import ConfidenceBaseline, estimate_images
from segcal.io.images import image_files, load_image
from segcal.io.predictions import PredictionFolder

__all__ = ["HOWS", "adapt_to_target", "pseudo_target_set", "read_unlabelled"]

HOWS = ("pseudocal", "ece-estimate")
_GOLDEN = (math.sqrt(5) - 1) / 2


# ----------------------------------------------------------------------------- inputs
def read_unlabelled(data: Any, what: str = "target", *, max_images: int | None = None,
                    seed: int = 0) -> tuple[list[torch.Tensor], str | None]:
    """Unlabelled scores as a list of ``(1, C, *spatial)`` tensors (their dtype kept), and the
    folder's input type (``None`` for arrays).

    ``data``: a prediction-folder path or :class:`~segcal.io.PredictionFolder` (opened **without**
    labels), an ``(N, C, *spatial)`` array / tensor, or an iterable of ``(n, C, *spatial)`` batches
    (a 3-D item is one ``(C, H, W)`` image; a volume is a ``(1, C, D, H, W)`` batch).
    ``max_images``: a seeded random subset of that many images.
    """
    itype = None
    if isinstance(data, str | os.PathLike | PredictionFolder):
        where = data.pred_dir if isinstance(data, PredictionFolder) else Path(data)
        if not Path(where).is_dir():
            raise InputError(f"{what}: prediction folder {where} does not exist")
        folder = PredictionFolder(where)  # no label folder: labels are never read
        items = list(folder.items)
        if max_images is not None and len(items) > max_images:
            keep = np.sort(np.random.default_rng(seed).choice(len(items), int(max_images), replace=False))
            items = [items[i] for i in keep]
        out = []
        for it in items:
            scores, _, itype = folder.read(it)
            out.append(torch.from_numpy(np.array(scores, copy=True))[None])  # a writable copy
        return out, itype
    if isinstance(data, np.ndarray | torch.Tensor):
        data = [data]
    if not isinstance(data, Iterable):
        raise InputError(f"{what}: expected a prediction folder, an (N, C, *spatial) array or an "
                         f"iterable of score arrays, got {type(data).__name__}")
    out = []
    for arr in data:
        if not isinstance(arr, np.ndarray | torch.Tensor):
            raise InputError(f"{what}: expected score arrays (no labels), got a {type(arr).__name__}")
        t = torch.as_tensor(arr)
        if t.ndim < 3:
            raise InputError(f"{what}: expected (C, *spatial) or (N, C, *spatial) scores, got shape "
                             f"{tuple(t.shape)}")
        if t.ndim == 3:  # one (C, H, W) image; every other item is an (n, C, *spatial) batch
            t = t[None]
        out.extend(t[i : i + 1] for i in range(t.shape[0]))
    if not out:
        raise InputError(f"{what}: no predictions")
    if max_images is not None and len(out) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(out), int(max_images), replace=False))
        out = [out[i] for i in keep]
    return out, itype


def _read_images(images: Any, max_images: int | None, seed: int) -> list[np.ndarray]:
    if isinstance(images, str | os.PathLike):
        files = image_files(images)
        if not files:
            raise InputError(f"images: no image files in {images}")
        stems = sorted(files)
        if max_images is not None and len(stems) > max_images:
            keep = np.sort(np.random.default_rng(seed).choice(len(stems), int(max_images), replace=False))
            stems = [stems[i] for i in keep]
        return [load_image(files[s]) for s in stems]
    out = [np.asarray(im) for im in images]
    if not out:
        raise InputError("images: no images")
    return out


def _pairs(shapes: list[tuple[int, ...]], seed: int) -> list[tuple[int, int]]:
    """A seeded pairing ``i -> j != i`` within groups of equal shape (one pair per sample with a
    partner of its shape)."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    pairs = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        perm = rng.permutation(len(idx))
        shift = int(rng.integers(1, len(idx)))  # a derangement: i is never paired with itself
        pairs.extend((idx[perm[k]], idx[perm[(k + shift) % len(idx)]]) for k in range(len(idx)))
    if not pairs:
        raise InputError("pseudocal: no two target samples of the same size to mix")
    return pairs


def _check_mix(mix: float) -> float:
    if not 0.5 < float(mix) < 1:
        raise InputError(f"mix: expected a mixing ratio in (0.5, 1) (the dominant sample's weight), got {mix}")
    return float(mix)


@torch.no_grad()
def _hard_labels(cal: Calibrator, z: torch.Tensor) -> torch.Tensor:
    """The (calibrated) model's hard prediction: ``argmax`` of the calibrated logits (the raw
    argmax for an argmax-preserving calibrator)."""
    return (z.argmax(1) if cal.argmax_preserving else cal(z).argmax(1)).to(torch.int64)


def pseudo_target_set(cal: Calibrator, scores: list[torch.Tensor] | None = None, *, mix: float = 0.65,
                      seed: int = 0, model: Callable[[list[np.ndarray]], Any] | None = None,
                      images: list[np.ndarray] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The PseudoCal pseudo-target set: ``[(mixed scores (1, C, *spatial), labels (1, *spatial))]``.

    With ``model`` and ``images`` the images are mixed and the model run on them (labels: the
    prediction on the dominant image); otherwise the logits ``scores`` are mixed (the
    predictions-only simplification of the module docstring).
    """
    mix = _check_mix(mix)
    out = []
    if model is not None:
        if images is None:
            raise InputError("pseudocal: a model needs the target images (images=/--target-images)")
        for i, j in _pairs([im.shape for im in images], seed):
            a, b = images[i].astype(np.float64), images[j].astype(np.float64)
            m = mix * a + (1 - mix) * b
            if np.issubdtype(images[i].dtype, np.integer):
                m = np.clip(np.rint(m), np.iinfo(images[i].dtype).min, np.iinfo(images[i].dtype).max)
            z_dom = torch.as_tensor(model([images[i]])).float().cpu()
            z_mix = torch.as_tensor(model([m.astype(images[i].dtype)])).float().cpu()
            out.append((z_mix, _hard_labels(cal, z_dom)))
        return out
    if scores is None:
        raise InputError("pseudocal: pass the target predictions, or a model and the target images")
    if cal.input_type == "probs":
        raise InputError("pseudocal: mixing predictions needs logits (input_type='logits'); with "
                         "probabilities pass a model and the target images")
    for i, j in _pairs([tuple(s.shape) for s in scores], seed):
        zi, zj = scores[i].float(), scores[j].float()
        out.append(((mix * zi + (1 - mix) * zj).to(scores[i].dtype if scores[i].is_floating_point()
                                                    else torch.float32), _hard_labels(cal, zi)))
    return out


# ----------------------------------------------------------------------------- the two searches
def _fit_correction(cal: Calibrator, pseudo: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``c`` of TS on the base's outputs of a pseudo-labelled set (the one fitting loop)."""
    corr = TargetCorrected.wrap(cal)
    corr.fit(pseudo)
    return corr.correction


def _estimate_fn(estimator: Any, input_type: str) -> Callable[[torch.Tensor], np.ndarray]:
    if estimator is None:
        raise InputError("how='ece-estimate': pass estimator= (an ECEEstimator trained on logits, "
                         "or a callable scores -> per-image ECE estimates)")
    if isinstance(estimator, ConfidenceBaseline):
        raise InputError(f"estimator: the {estimator.kind!r} baseline falls monotonically as the "
                         "temperature goes to 0, so minimising it is meaningless; pass an "
                         "ECEEstimator trained on logits")
    kind = getattr(estimator, "input_kind", None)
    if kind == "features":
        raise InputError("estimator: trained on features, which do not change with the temperature; "
                         "pass an ECEEstimator trained on logits (input_kind='logits')")
    if kind == "logits":
        return lambda s: np.asarray(estimate_images(estimator, s, None, input_type="logits"), dtype=float)
    if callable(estimator):
        return lambda s: np.asarray(estimator(s), dtype=float).reshape(-1)
    raise InputError(f"estimator: unsupported object {type(estimator).__name__}")


def _golden(f: Callable[[float], float], lo: float, hi: float, grid: int, iters: int,
            curve: list[tuple[float, float]]) -> float:
    """Minimise ``f`` over ``[lo, hi]`` (log c): a coarse grid, then golden-section search in the
    bracket of the best grid point."""
    xs = np.linspace(lo, hi, grid)
    vals = [f(float(x)) for x in xs]
    curve.extend(zip(xs.tolist(), vals, strict=True))
    k = int(np.argmin(vals))
    a, b = float(xs[max(k - 1, 0)]), float(xs[min(k + 1, grid - 1)])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    best = min([(vals[k], float(xs[k])), (fc, c), (fd, d)])
    return best[1]


def adapt_to_target(
    calibrator: Calibrator,
    target: Any = None,
    *,
    how: str = "pseudocal",
    estimator: Any = None,
    source: Any = None,
    model: Callable[[list[np.ndarray]], Any] | None = None,
    images: Any = None,
    source_images: Any = None,
    mix: float = 0.65,
    bounds: tuple[float, float] = (0.2, 5.0),
    max_images: int | None = 64,
    seed: int = 0,
    min_correction: float | None = None,
) -> TargetCorrected:
    """Correct a fitted calibrator on unlabelled target data (see the module docstring).

    Parameters
    ----------
    calibrator
        A fitted calibrator (a :class:`~segcal.calibrators.TargetCorrected` is re-corrected: the
        factors multiply).
    target
        Unlabelled target predictions: a prediction folder (opened without labels), an
        ``(N, C, *spatial)`` array or an iterable of score arrays. Not needed for PseudoCal with
        ``model`` and ``images``.
    how
        ``"pseudocal"`` or ``"ece-estimate"``.
    estimator
        For ``"ece-estimate"``: an ECEEstimator trained on logits, or a callable
        ``scores (n, C, H, W) -> (n,)`` estimates.
    source, source_images
        Unlabelled source predictions (or, with ``model``, source images) to anchor PseudoCal:
        ``c = c_target / c_source``. ``None``: the paper's absolute PseudoCal.
    model, images
        PseudoCal by input mixup: ``model(list of images) -> (n, C, *spatial)`` logits (e.g.
        ``LoadedModel.logits`` of :func:`segcal.models.create_model`) and the target images (a
        folder of RGB files, read as ``H x W x 3`` uint8, or a list of arrays).
    mix
        PseudoCal's fixed mixing ratio of the dominant sample (in ``(0.5, 1)``; 0.65).
    bounds
        Search interval of ``c`` (``"ece-estimate"``); the result of PseudoCal is clipped to it.
    max_images
        A seeded random subset of target (and source) images used, bounding time and memory
        (``None``: all).
    seed
        Seed of the subsets and of the mixup pairs.
    min_correction
        A floor on ``c`` (within ``bounds``; ``None``: none). ``1.0`` lets the correction only
        soften the base, never sharpen it: the bench uses it on a clean-anchored ``sts`` base,
        whose temperature is never below clean TS's, where PseudoCal's sharpening corrections
        (``c < 1`` on seven of eight held-out sets) made NLL worse (``docs/shift_calibration.md``).
        Recorded as ``c_unclamped`` / ``min_correction`` in ``fit_info["target_adaptation"]``.

    Returns
    -------
    TargetCorrected
        Fitted; ``fit_info["target_adaptation"]`` records ``how``, ``correction``, the images used
        and (``"ece-estimate"``) the objective curve.
    """
    if how not in HOWS:
        raise InputError(f"how: expected one of {', '.join(HOWS)}, got {how!r}")
    if not isinstance(calibrator, Calibrator):
        raise InputError(f"calibrator: expected a fitted segcal Calibrator, got {type(calibrator).__name__}")
    calibrator._check_ready()
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo < 1 < hi < math.inf:
        raise InputError(f"bounds: expected (lo, hi) with 0 < lo < 1 < hi, got {bounds!r}")
    if min_correction is not None and not lo <= float(min_correction) <= hi:
        raise InputError(f"min_correction: expected a value in bounds [{lo}, {hi}], got {min_correction!r}")
    base = calibrator.base if isinstance(calibrator, TargetCorrected) else calibrator
    prior = calibrator.correction if isinstance(calibrator, TargetCorrected) else 1.0
    scores: list[torch.Tensor] | None = None
    itype = None
    if target is not None:
        scores, itype = read_unlabelled(target, "target", max_images=max_images, seed=seed)
        if itype is not None and itype != base.input_type:
            raise InputError(f"target: the folder holds {itype} but the calibrator takes {base.input_type}")
    info: dict[str, Any] = {"how": how, "n_images": None if scores is None else len(scores)}
    if how == "pseudocal":
        imgs = None if images is None else _read_images(images, max_images, seed)
        if model is None and scores is None:
            raise InputError("pseudocal: pass target predictions, or a model and the target images")
        use_model = model is not None and imgs is not None
        if not use_model and source is None:
            raise InputError("pseudocal from predictions only (logit mixup) needs source= (unlabelled "
                             "source predictions, e.g. the validation predictions the calibrator was "
                             "fitted on) to anchor it: unanchored, logit mixup measures the margins, "
                             "not the errors, and moves T the wrong way; or pass model= and images=")
        c_tgt = _fit_correction(base, pseudo_target_set(base, None if use_model else scores, mix=mix,
                                                        seed=seed, model=model if use_model else None,
                                                        images=imgs))
        c = c_tgt
        info.update(mix=mix, mode="input mixup" if use_model else "logit mixup (predictions only)",
                    c_target=c_tgt, n_images=len(imgs) if use_model else info["n_images"])
        if source is not None or (use_model and source_images is not None):
            if use_model:
                src_imgs = _read_images(source_images, max_images, seed) if source_images is not None else None
                pseudo = pseudo_target_set(base, None, mix=mix, seed=seed, model=model, images=src_imgs)
            else:
                src, _ = read_unlabelled(source, "source", max_images=max_images, seed=seed)
                pseudo = pseudo_target_set(base, src, mix=mix, seed=seed)
            c_src = _fit_correction(base, pseudo)
            c = c_tgt / c_src
            info.update(c_source=c_src, anchored=True)
        else:
            info["anchored"] = False
        c = float(np.clip(c, lo, hi))
    else:
        if scores is None:
            raise InputError("ece-estimate: pass the target predictions (target=/--target-pred)")
        est = _estimate_fn(estimator, base.input_type)
        with torch.no_grad():
            outs = [base(s.float()) for s in scores]  # the base's calibrated logits, once

        def objective(log_c: float) -> float:
            cc = math.exp(log_c)
            return float(np.mean(np.concatenate([est(o / cc) for o in outs])))

        curve: list[tuple[float, float]] = []
        c = math.exp(_golden(objective, math.log(lo), math.log(hi), 13, 20, curve))
        info["curve"] = [[math.exp(x), v] for x, v in curve]
        info["estimate_before"] = objective(0.0)
        info["estimate_after"] = objective(math.log(c))
    if min_correction is not None:
        info.update(c_unclamped=c, min_correction=float(min_correction))
        c = max(c, float(min_correction))
    out = TargetCorrected.wrap(base, correction=c * prior)
    info["correction"] = out.correction
    out.fit_info = {**base.fit_info, "target_adaptation": info}
    return out
