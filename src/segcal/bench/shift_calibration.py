"""``segcal bench --shift-calibration``: calibration under shifts nobody labelled (issue 17).

Leave-one-family-out (LOFO) protocol over the corruption families of
:data:`~segcal.bench.spec.SHIFT_FAMILIES` (noise, blur, weather, digital; ImageNet-C's grouping),
in-domain model ``espnet-camvid``:

1. **Perturbed validation copies.** For every family, each CamVid val image gets one perturbed copy:
   a corruption of the family and a severity in 1-5, both drawn per image from
   ``SeedSequence([val_seed, crc32(stem)])`` (:class:`FamilyMix`; a spread of strengths, Tomani et
   al., CVPR 2021). Predicted by the model and cached (:class:`~segcal.bench.cache.PredictionCache`).
2. **Fits per held-out family F.** ``*_clean`` rows are fitted on clean val only; ``*_aug`` rows on
   clean val plus the perturbed copies of the families other than F (perturbation-augmented
   fitting). The one fit loop (:func:`segcal.bench.protocol.fit_rows`): per seed a fit / selection
   split, ``fit_pixels`` seeded image-stratified pixels per half. The split is over image copies
   (a perturbed copy of a val image may fall in the other half than its clean copy); it only
   chooses the early-stopping data, the test images are never seen. Rows (``spec.SHIFT_ROWS``):
   ``ts_clean``, ``ts_aug``, ``cmsop_aug``, ``sts_aug`` (shift-conditioned TS), and the ``target:``
   rows ``ts_aug_pc`` / ``sts_aug_pc``: their base corrected on each test set's unlabelled images by
   PseudoCal through the model (:func:`adapt_rows`).
3. **Test per held-out family F and severity s in ``severities``.** A seeded subset of
   ``test_images`` CamVid test images (the same for every set), each corrupted by one corruption of F
   (drawn per image as above) at severity s. Every row against TS fitted on clean val
   (``ts_clean``), paired bootstrap CIs over images (:mod:`segcal.bench.bootstrap`); rows that
   declare argmax preservation must keep the argmax on every evaluated pixel and the mIoU exactly
   (checked, a violation raises).
4. **Clean and model-shift rows.** CamVid test clean (all test images) for the in-domain model and
   under the model shift (``espnet-cityscapes-camvid``, fitted on its own val predictions), with the
   ``*_aug`` rows fitted on clean val plus the perturbed copies of all families (nothing is held out
   there: no corruption is tested).
5. **MRI rows** (``mri``; :mod:`segcal.bench.shift_mri`): leave-one-shift-out for the 3D U-Net on
   MSD hippocampus over the six MRI shifts, ``ts_clean`` / ``ts_aug`` / ``sts_aug``, Dice kept exactly.
6. **Label-free estimator.** The logits-input value net (:class:`~segcal.estimation.ECEEstimator`)
   trained on clean val only vs on clean val plus the perturbed copies of the other families, and the
   max-prob / entropy baselines: MAE and Spearman correlation of estimated vs true per-image ECE
   (top-label, 15 bins, void excluded; :func:`~segcal.estimation.ece_targets` on every valid pixel)
   of the uncalibrated model on each held-out set.

:func:`run_shift_calibration` returns a :class:`~segcal.bench.results.BenchRun`;
:func:`segcal.report.shift_tables.write_shift_outputs` writes ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segcal.calibrators as sc
from segcal.bench.bootstrap import bootstrap_condition, summarize
from segcal.bench.cache import (
    PredictionCache,
    default_cache_dir,
    environment,
    git_commit,
    prepare_run,
)
from segcal.bench.camvid import find_camvid, miou_columns, read_split
from segcal.bench.protocol import (
    FitResult,
    ImageData,
    WholeImages,
    evaluate,
    fit_rows,
    pixel_sample,
)
from segcal.bench.results import BenchRun
from segcal.bench.shift_config import FamilyMix, ShiftCalConfig, check_config, mri_config
from segcal.bench.shift_estimator import estimate_all, estimator_data, fit_estimator
from segcal.bench.shift_fit import SELECTION_RULES, Anchored, argmax_check, copies
from segcal.bench.shift_mri import run_mri_rows
from segcal.bench.spec import (
    CAMVID_IGNORE,
    IN_DOMAIN,
    SHIFT_CALIBRATION,
    SHIFT_FAMILIES,
    SHIFT_MODEL,
    SHIFT_REFERENCE,
    SHIFT_ROW_DATA,
    SHIFT_ROWS,
    create_row,
    row_properties,
)
from segcal.datasets.camvid import camvid_split
from segcal.estimation.target_adaptive import adapt_to_target
from segcal.io.files import to_jsonable
from segcal.models import create_model, get_spec


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[shift-calibration] {msg}", file=sys.stderr, flush=True)


def fit_group(data: Sequence[ImageData], rows: Sequence[str], cfg: ShiftCalConfig,
              log: Callable[[str], None], range_images: Sequence[ImageData] | None = None) -> FitResult:
    """The one fit loop on one fit set (``rows`` may be empty); ``sts`` rows clean-anchored
    (:class:`Anchored`) when the set has clean images."""
    create = partial(create_row, SHIFT_CALIBRATION)
    whole = [r for r in rows if getattr(create(r), "spatial", False)]
    out = FitResult()
    for group, imgs in (([r for r in rows if r not in whole], data), (whole, strided(data, cfg.spatial_stride))):
        if group:
            rng = None if range_images is None else strided(range_images, cfg.spatial_stride)
            strategy = Anchored(WholeImages(), rng, cfg.sts_l2_grid, cfg.sts_feature_sets, cfg.sts_selection)
            res = fit_rows(imgs, group, cfg.seeds, create=create, strategy=strategy,
                           total=cfg.fit_pixels, ignore=CAMVID_IGNORE, log=log)
            out.cals.update(res.cals)
            out.fits += res.fits
            out.skipped.update(res.skipped)
    return out


def strided(imgs: Sequence[ImageData], stride: int) -> list[ImageData]:
    """Every ``stride``-th pixel along each axis of the logit and label maps (views, no copy)."""
    if stride <= 1:
        return list(imgs)
    return [ImageData(im.stem, im.logits[:, ::stride, ::stride], im.labels[::stride, ::stride], im.item, im.transform)
            for im in imgs]


class MemoModel:
    """``images -> logits`` of a loaded model, remembered per image (PseudoCal runs the same images
    for every seed of a row), every ``stride``-th pixel along each axis (PseudoCal's correction is
    a TS fit on these pixels; whole-image statistics of ``sts`` from them, as in its fit)."""

    def __init__(self, loaded: Any, stride: int = 1) -> None:
        self.loaded = loaded
        self.stride = max(1, int(stride))
        self.memo: dict[str, torch.Tensor] = {}

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        outs = []
        for im in images:
            key = hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest()
            if key not in self.memo:
                z = self.loaded.logits([im]).float().cpu()
                self.memo[key] = z[..., :: self.stride, :: self.stride].contiguous()
            outs.append(self.memo[key])
        return torch.cat(outs)


def adapt_rows(cals: Mapping[tuple[str, int], Any], methods: Sequence[str], target: Sequence[ImageData],
               source: Sequence[ImageData], loaded: Any, cfg: ShiftCalConfig) -> dict[tuple[str, int], Any]:
    """The target-adaptive rows of one condition: their base rows corrected on its unlabelled images
    (PseudoCal, input mixup through the model, anchored on clean val images; labels never read).
    On a clean-anchored ``sts`` base the factor is floored at ``cfg.pc_min_correction`` (1: the
    correction may soften the base, never sharpen it below clean TS's temperature)."""
    rows = [m for m in methods if SHIFT_ROW_DATA[m].startswith("target:")]
    if not rows:
        return {}
    rng = np.random.default_rng(cfg.test_seed + 7)
    tgt = [target[i].raw_image() for i in np.sort(rng.choice(len(target), min(cfg.adapt_images, len(target)), replace=False))]
    src = [source[i].raw_image() for i in np.sort(rng.choice(len(source), min(cfg.adapt_images, len(source)), replace=False))]
    model = MemoModel(loaded, cfg.spatial_stride)
    out: dict[tuple[str, int], Any] = {}
    for m in rows:
        base = SHIFT_ROW_DATA[m].split(":", 1)[1]
        for (row, seed), cal in cals.items():
            if row == base:
                floor = cfg.pc_min_correction if getattr(cal, "anchored", False) else None
                out[(m, seed)] = adapt_to_target(cal, how="pseudocal", model=model, images=tgt,
                                                 source_images=src, max_images=None, seed=0,
                                                 min_correction=floor)
    return out


def score(imgs: Sequence[ImageData], cals: Mapping[tuple[str, int], Any], methods: Sequence[str],
          cfg: ShiftCalConfig, num_classes: int) -> dict[str, Any]:
    """The one evaluation of one condition, its seed summary, CIs against ``ts_clean``, argmax check."""
    res = evaluate(imgs, cals, num_classes=num_classes, n_bins=cfg.n_bins,
                   view=pixel_sample(cfg.eval_fraction, cfg.eval_seed, CAMVID_IGNORE),
                   metrics_kw={"ignore_index": CAMVID_IGNORE}, extras=miou_columns)
    present = [m for m in methods if any(k[0] == m for k in cals)]
    res["summary"] = summarize(res, present)
    res["bootstrap_vs_ts_clean"] = bootstrap_condition(res, present, n_boot=cfg.n_boot, seed=cfg.boot_seed,
                                                       metrics=SHIFT_CALIBRATION.ci_metrics,
                                                       reference=SHIFT_REFERENCE)
    res["argmax_check"] = argmax_check(res, present)
    res["stems"] = [im.stem for im in imgs]
    return res


# ---------------------------------------------------------------------------------- driver
def run_shift_calibration(cfg: ShiftCalConfig) -> BenchRun:
    """Run the LOFO protocol; :func:`segcal.report.shift_tables.write_shift_outputs` writes its files."""
    check_config(cfg)
    # ESPNet on CPU spends most of its time on denormal floats: flushing them gives bitwise the same
    # float16 logits here, 3-7x faster (measured: docs/shift_calibration.md); restored at the end
    torch.set_flush_denormal(True)
    try:
        return _run(cfg)
    finally:
        torch.set_flush_denormal(False)


def _run(cfg: ShiftCalConfig) -> BenchRun:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    prepare_run(False, cfg.threads)
    root, _cam = find_camvid(cfg.data_root)
    cache = PredictionCache(cfg.cache or default_cache_dir(SHIFT_CALIBRATION.cache_name))
    log = partial(_log, cfg.progress)
    methods = list(cfg.methods)
    clean_rows = [m for m in methods if SHIFT_ROW_DATA[m] == "clean"]
    aug_rows = [m for m in methods if SHIFT_ROW_DATA[m] == "augmented"]  # target:* rows: adapt_rows
    val_items = camvid_split(root, "val")[: cfg.val_limit]
    test_items = camvid_split(root, "test")[: cfg.test_limit]
    if cfg.test_images is None or cfg.test_images >= len(test_items):
        shift_items = list(test_items)
    else:
        pick = np.sort(np.random.default_rng(cfg.test_seed).choice(len(test_items), cfg.test_images, replace=False))
        shift_items = [test_items[i] for i in pick]
    families = list(cfg.families)
    val_mix = {f: FamilyMix(f, SHIFT_FAMILIES[f], None, cfg.val_seed) for f in families}
    test_mix = {(f, s): FamilyMix(f, SHIFT_FAMILIES[f], s, cfg.test_seed) for f in families for s in cfg.severities}
    models = [IN_DOMAIN] + ([SHIFT_MODEL] if cfg.model_shift else [])

    # ------------------------------------------------------------ predictions (cached)
    t0 = time.perf_counter()
    loaded: dict[str, Any] = {}
    folders: dict[str, Any] = {}

    def ensure(key: str, model: str, items: Sequence[Any], tr: Any) -> None:
        log(f"predictions {key} ({len(items)} images)")
        folders[key] = cache.ensure(key, model, items, tr, root, loaded, False)

    needs_range = cfg.sts_anchor_range == "val+train" and any(SHIFT_ROWS[m].registry == "sts" for m in aug_rows)
    train_items = camvid_split(root, "train")[: cfg.val_limit] if needs_range else []
    for model in models:
        ensure(cache.key(model, "val"), model, val_items, None)
        ensure(cache.key(model, "test"), model, test_items, None)
        if train_items:
            ensure(cache.key(model, "train"), model, train_items, None)
        for f in families:
            ensure(cache.key(model, "val", f"mix-{f}", 0, cfg.val_seed), model, val_items, val_mix[f])
    for (f, s), tr in test_mix.items():
        ensure(cache.key(IN_DOMAIN, "test", f"mix-{f}", s, cfg.test_seed), IN_DOMAIN, shift_items, tr)
    timings["predict_s"] = time.perf_counter() - t0

    def model_of(name: str) -> Any:
        if name not in loaded:
            loaded[name] = create_model(name, root, "cpu")
        return loaded[name]

    def read(model: str, split: str, items: Sequence[Any], fam: str | None = None, sev: int = 0,
             seed: int = 0, tr: Any = None) -> list[ImageData]:
        key = cache.key(model, split, None if fam is None else f"mix-{fam}", sev, seed)
        return read_split(folders[key], items, get_spec(model).num_classes, CAMVID_IGNORE, tr)

    conditions: dict[str, Any] = {}
    fits: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    estimator: dict[str, Any] = {"conditions": {}, "fits": {}}
    t_fit = t_eval = t_est = 0.0
    C = get_spec(IN_DOMAIN).num_classes
    clean_val = read(IN_DOMAIN, "val", val_items)
    train_range = read(IN_DOMAIN, "train", train_items) if train_items else None
    pert_val = {f: copies(read(IN_DOMAIN, "val", val_items, f, 0, cfg.val_seed, val_mix[f]), f) for f in families}

    t0 = time.perf_counter()
    clean_fit = fit_group(clean_val, clean_rows, cfg, log)
    t_fit += time.perf_counter() - t0
    fits["clean"], skipped["clean"] = clean_fit.fits, clean_fit.skipped
    if cfg.estimator:
        t0 = time.perf_counter()
        ex = {f: estimator_data(pert_val[f]) for f in families}
        x_clean, y_clean = estimator_data(clean_val)
        est_clean = fit_estimator(x_clean, y_clean, C)
        estimator["fits"]["clean"] = est_clean.fit_info
        t_est += time.perf_counter() - t0

    for fam in families:
        others = [f for f in families if f != fam]
        t0 = time.perf_counter()
        fold = fit_group(clean_val + [im for f in others for im in pert_val[f]], aug_rows, cfg, log, train_range)
        t_fit += time.perf_counter() - t0
        fits[f"no-{fam}"], skipped[f"no-{fam}"] = fold.fits, fold.skipped
        cals = {**clean_fit.cals, **fold.cals}
        ests: dict[str, Any] = {}
        if cfg.estimator:
            t0 = time.perf_counter()
            xa = torch.cat([x_clean, *[ex[f][0] for f in others]])
            ya = np.concatenate([y_clean, *[ex[f][1] for f in others]])
            ests = {"value-net (clean val)": est_clean, "value-net (clean + perturbed val)": fit_estimator(xa, ya, C)}
            estimator["fits"][f"no-{fam}"] = ests["value-net (clean + perturbed val)"].fit_info
            t_est += time.perf_counter() - t0
        for sev in cfg.severities:
            tag = f"{fam}-{sev}"
            imgs = read(IN_DOMAIN, "test", shift_items, fam, sev, cfg.test_seed, test_mix[(fam, sev)])
            log(f"evaluate {tag} ({len(imgs)} images)")
            t0 = time.perf_counter()
            adapted = adapt_rows(cals, methods, imgs, clean_val, model_of(IN_DOMAIN), cfg)
            res = score(imgs, {**cals, **adapted}, methods, cfg, C)
            res["adaptation"] = {f"{k[0]}@{k[1]}": c.fit_info.get("target_adaptation") for k, c in adapted.items()}
            res.update(model=IN_DOMAIN, family=fam, severity=sev, held_out=fam, fitted_with=others,
                       assignment=_counts(test_mix[(fam, sev)], imgs))
            conditions[tag] = res
            t_eval += time.perf_counter() - t0
            if cfg.estimator:
                t0 = time.perf_counter()
                x, y = estimator_data(imgs)
                estimator["conditions"][tag] = estimate_all(ests, x, imgs, y)
                t_est += time.perf_counter() - t0

    for model in models:
        Cm = get_spec(model).num_classes
        tag = "clean" if model == IN_DOMAIN else "model-shift"
        t0 = time.perf_counter()
        if model == IN_DOMAIN:
            base = clean_fit
            all_val = clean_val + [im for f in families for im in pert_val[f]]
            rng_imgs = train_range
        else:
            sval = read(model, "val", val_items)
            base = fit_group(sval, clean_rows, cfg, log)
            all_val = sval + [im for f in families
                              for im in copies(read(model, "val", val_items, f, 0, cfg.val_seed, val_mix[f]), f)]
            rng_imgs = read(model, "train", train_items) if train_items else None
        full = fit_group(all_val, aug_rows, cfg, log, rng_imgs)
        t_fit += time.perf_counter() - t0
        fits[f"all:{model}"], skipped[f"all:{model}"] = base.fits + full.fits, {**base.skipped, **full.skipped}
        t0 = time.perf_counter()
        imgs = read(model, "test", test_items)
        log(f"evaluate {tag} ({len(imgs)} images)")
        cals = {**base.cals, **full.cals}
        adapted = adapt_rows(cals, methods, imgs, clean_val if model == IN_DOMAIN else sval, model_of(model), cfg)
        res = score(imgs, {**cals, **adapted}, methods, cfg, Cm)
        res["adaptation"] = {f"{k[0]}@{k[1]}": c.fit_info.get("target_adaptation") for k, c in adapted.items()}
        res.update(model=model, family=None, severity=None, held_out=None, fitted_with=families)
        conditions[tag] = res
        t_eval += time.perf_counter() - t0
        if cfg.estimator and model == IN_DOMAIN:
            t0 = time.perf_counter()
            x, y = estimator_data(imgs)
            estimator["conditions"]["clean"] = estimate_all({"value-net (clean val)": est_clean}, x, imgs, y)
            t_est += time.perf_counter() - t0
    timings.update(fit_s=t_fit, evaluate_s=t_eval, estimator_s=t_est)
    mri: dict[str, Any] | None = None
    if cfg.mri:
        t0 = time.perf_counter()
        mri = run_mri_rows(mri_config(cfg), log)
        timings["mri_s"] = time.perf_counter() - t0

    results = {
        "format": SHIFT_CALIBRATION.format, "version": 1, "commit": git_commit(),
        "config": asdict(cfg) | {"cache": str(cache.root)}, "environment": environment(),
        "families": {f: list(SHIFT_FAMILIES[f]) for f in families},
        "protocol": {
            "perturbed_val": {f: m.describe() for f, m in val_mix.items()},
            "test": {"images": [it.stem for it in shift_items], "per_set": "each image: one corruption of the "
                     "held-out family (drawn per image), at the set's severity", "seed": cfg.test_seed},
            "fit": f"per seed a fit / selection split of the fit set's image copies, {cfg.fit_pixels} valid pixels "
                   "per half (seeded, the same number per image); *_aug rows: clean val + the perturbed copies "
                   "of every family except the held-out one (clean / model-shift rows: of every family)",
            "eval_pixels": f"a seeded {cfg.eval_fraction:g} fraction of the valid pixels of every test image",
            "bootstrap": f"paired over test images, {cfg.n_boot} replicates, seed {cfg.boot_seed}, 95 % percentile "
                         f"CI of method - {SHIFT_REFERENCE} (values = mean over seeds)",
            "sts": f"clean-anchored on the clean images of the fit half, clean range from {cfg.sts_anchor_range}; "
                   f"ridge l2 from {list(cfg.sts_l2_grid)} and features from "
                   f"{[list(f) for f in cfg.sts_feature_sets]} chosen once per fit set (first seed's split) by "
                   "leave-one-family-out within the fit set's families (criterion "
                   f"{cfg.sts_selection!r}: {SELECTION_RULES[cfg.sts_selection]}); PseudoCal's factor on it "
                   f"floored at {cfg.pc_min_correction}",
            "bins": cfg.n_bins, "ignore_label": CAMVID_IGNORE,
            "estimator_truth": "per-image top-label ECE, 15 bins, void excluded, every valid pixel "
                               "(segcal.estimation.ece_targets, kind='image')",
        },
        "properties": {m: row_properties(SHIFT_CALIBRATION, m) | {"data": SHIFT_ROW_DATA[m]} for m in methods},
        "fits": fits, "skipped": skipped,
        "conditions": to_jsonable(conditions, drop_private=True),
        "estimator": to_jsonable(estimator),
        "registered_calibrators": [a["name"] for a in sc.available()],
        "cache": {"root": str(cache.root), "predicted_images": cache.predicted_images,
                  "reused_images": cache.reused_images, "predict_seconds": round(cache.predict_seconds, 3)},
    }
    results["lofo"] = lofo_summary(results, methods)
    if mri is not None:
        results["mri"] = mri
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return BenchRun(SHIFT_CALIBRATION, results, Path(cfg.out), {}, timings, t_start, False, 0)


def _counts(mix: FamilyMix, imgs: Sequence[ImageData]) -> dict[str, int]:
    out: dict[str, int] = {}
    for im in imgs:
        name = mix.assign(im.stem)[0]
        out[name] = out.get(name, 0) + 1
    return out


def lofo_summary(results: Mapping[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Means over the held-out sets and the issue's targets, per row (numbers; the report words them)."""
    conds = results["conditions"]
    lofo = [t for t, c in conds.items() if c.get("held_out")]
    out: dict[str, Any] = {"sets": lofo, "rows": {}}
    if not lofo:
        return out
    ref = np.mean([conds[t]["summary"][SHIFT_REFERENCE]["ece"] for t in lofo])
    clean = conds.get("clean", {}).get("summary", {})
    for m in methods:
        if not all(m in conds[t]["summary"] for t in lofo):
            continue
        ece = float(np.mean([conds[t]["summary"][m]["ece"] for t in lofo]))
        per_sev = {str(s): float(np.mean([conds[t]["summary"][m]["ece"] for t in lofo if conds[t]["severity"] == s]))
                   for s in sorted({conds[t]["severity"] for t in lofo})}
        dn = [conds[t]["bootstrap_vs_ts_clean"].get(m, {}).get("nll") for t in lofo]
        worse = [t for t, ci in zip(lofo, dn, strict=True) if ci and ci["significant"] and ci["diff"] > 0]
        row: dict[str, Any] = {
            "mean_ece": ece, "mean_ece_by_severity": per_sev, "ratio_to_ts_clean": float(ece / ref),
            "mean_image_ece": float(np.mean([conds[t]["summary"][m]["image_ece"] for t in lofo])),
            "mean_nll": float(np.mean([conds[t]["summary"][m]["nll"] for t in lofo])),
            "nll_significantly_worse_than_ts_clean": worse,
            "target_half_ece": bool(ece <= 0.5 * ref),
            "target_nll_not_worse": not worse,
        }
        if m in clean and SHIFT_REFERENCE in clean:
            row["clean_ece_minus_ts_clean"] = float(clean[m]["ece"] - clean[SHIFT_REFERENCE]["ece"])
            row["target_clean_within_0.005"] = bool(row["clean_ece_minus_ts_clean"] <= 0.005)
        ap = [conds[t]["argmax_check"][m]["argmax_kept"] for t in conds if m in conds[t].get("argmax_check", {})]
        row["argmax_preserving"] = bool(row_properties(SHIFT_CALIBRATION, m)["argmax_preserving"])
        row["miou_kept_everywhere"] = bool(ap and all(ap)) if row["argmax_preserving"] else None
        out["rows"][m] = row
    out["ts_clean_mean_ece"] = float(ref)
    return out


__all__ = ["MemoModel", "adapt_rows", "fit_group", "lofo_summary", "run_shift_calibration", "score",
           "strided"]
