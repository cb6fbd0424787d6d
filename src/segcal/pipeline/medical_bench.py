"""``segcal bench --dataset hippocampus``: the medical calibration table (issue 8).

The CamVid bench protocol (:mod:`segcal.pipeline.bench`) on 3D volumes, with the reference
``unet3d-hippocampus`` model of :mod:`segcal.medical` on MSD Task04 hippocampus:

1. **Predictions** of the 50 calibration and 50 test cases of the committed split
   (``segcal/medical/hippocampus_split.json``) are written once with
   :func:`segcal.medical.predict_volumes` into ``cache/clean/`` and read back with
   :func:`segcal.medical.nnunet.read_aligned` (shape and affine checked against the label).
   Shifted test volumes (:mod:`segcal.shift.mri`, corruption seed ``derive_seed(seed, case)``)
   are written to ``cache/shift_images/<shift>_<severity>_seed<seed>/`` and predicted into
   ``cache/shift_pred/<shift>_<severity>_seed<seed>/``. A rerun reads the cache and never calls
   the model for a cached case.
2. **Calibration data**: the calibration cases are split per seed in ``seeds`` (0, 1, 2) into a
   fit half and a selection half (:func:`segcal.pipeline.bench.split_halves`; the selection half
   is the calibrators' ``val=`` early-stopping / best-iterate data). Pointwise calibrators are
   fitted on a seeded, case-stratified subsample of ``fit_voxels`` voxels of each half (the same
   number per case, :func:`segcal.pipeline.bench._draw_rows`, as ``fit_pixels`` for CamVid);
   ``fit_voxels=None`` uses every voxel. Whole-volume calibrators (LTS, LTS(log S), ``spatial``)
   get every case of the half as its own ``(1, 3, X, Y, Z)`` batch: volumes of different shapes
   are never stacked or padded.
3. **Rows**: :data:`MEDICAL_ROWS` (row name -> registry name and keyword arguments), which adds
   the soft-Dice objective variants ``ts_dice`` and ``dc_dice`` to the registered calibrators.
4. **Conditions**: ``clean`` (the test cases) and every shift x severity of ``shifts`` /
   ``severities`` on the test cases (``shift_cases``: all of them by default, else a seeded subset).
   The calibrators are the ones fitted on clean calibration cases; nothing is refitted.
5. **Columns** (15 equal-width bins unless ``n_bins``): pooled ECE, case-wise ECE (mean and std over
   cases; the image-wise ECE of this domain), case-wise ECE with 50 bins, class-wise ECE, MCE, NLL,
   Brier, Dice per foreground class pooled over the test voxels, case-wise Dice per foreground class
   (mean over cases), flip rate against the uncalibrated argmax, and the **foreground-region ECE**
   (:func:`segcal.metrics.regions.foreground_region_mask`: the ``fg_radius``-voxel cube dilation of
   true and predicted foreground, recomputed whenever the calibrator changes the argmax), the
   region-restricted counterpart of CamVid's boundary-band ECE. Mean and std over the seeds; paired
   bootstrap 95 % CIs over test cases of each row's difference to TS
   (:mod:`segcal.pipeline.bootstrap`, same code as CamVid).

:func:`run_medical_bench` returns the results dict written to ``results.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.pipeline.bench import (
    BenchDataError,
    _draw_rows,
    _ImageData,
    _prepare_run,
    _strip,
    bootstrap_condition,
    git_commit,
    split_halves,
    summarize,
)

DATASET = "hippocampus"
MODEL = "unet3d-hippocampus"
NUM_CLASSES = 3
FG_CLASSES = (1, 2)
FG_NAMES = ("ant", "post")
#: row name -> (registry name, constructor keyword arguments)
MEDICAL_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "ts": ("ts", {}),
    "vs": ("vs", {}),
    "ms": ("ms", {}),
    "msc": ("msc", {}),
    "dc": ("dc", {}),
    "ets": ("ets", {}),
    "cdc": ("cdc", {}),
    "cmsap": ("cmsap", {}),
    "cmsop": ("cmsop", {}),
    "vs_ti": ("vs_ti", {}),
    "ms_ti": ("ms_ti", {}),
    # Dice-objective rows are scored on the selection half by their own objective (validation
    # soft Dice); scored by NLL their best iterate is the identity (docs/results.md)
    "ts_dice": ("ts", {"objective": "dice", "monitor": "objective"}),
    "dc_dice": ("dc", {"objective": "dice", "monitor": "objective"}),
    "selective": ("selective", {"base": "ts"}),
    "lts": ("lts", {"spatial_dims": 3}),
    "lts_ti": ("lts_ti", {"spatial_dims": 3}),
}
#: rows that take whole volumes (minutes per fit): only with ``spatial=True`` or named in ``methods``
SPATIAL_ROWS = ("lts", "lts_ti")
MRI_SHIFTS = ("bias_field", "rician_noise", "gaussian_blur", "gamma", "ghosting", "low_resolution")
#: metrics with a paired bootstrap CI over test cases (class-wise ECE is not decomposable: none)
MEDICAL_CI_METRICS = ("ece", "image_ece", "image_ece50", "nll", "brier", "dice:1", "dice:2",
                      "case_dice:1", "case_dice:2", "fg_ece", "flip_rate")


@dataclass
class MedicalBenchConfig:
    """Everything that defines a medical bench run (recorded in ``results.json``)."""

    out: str = "segcal-out/bench-hippocampus"
    cache: str | None = None
    data_root: str | None = None
    methods: tuple[str, ...] | None = None  # None: every row of MEDICAL_ROWS (spatial ones: see spatial)
    spatial: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    fit_voxels: int | None = 250_000
    shifts: tuple[str, ...] = MRI_SHIFTS
    severities: tuple[int, ...] = (3, 5)
    shift_cases: int | None = None  # None: every test case
    shift_seed: int = 0
    test_limit: int | None = None
    calib_limit: int | None = None
    n_bins: int = 15
    n_bins_case: int = 50
    fg_radius: int = 3
    n_boot: int = 1000
    boot_seed: int = 0
    report: bool = True
    report_cases: int = 3
    threads: int = 1
    quick: bool = False
    progress: bool = False
    command: str | None = None

    @classmethod
    def quick_config(cls, **kw: Any) -> MedicalBenchConfig:
        """CI size: 4 calibration / 4 test cases, TS and DC, one shift (gamma, severity 3), 2 seeds."""
        base: dict[str, Any] = dict(
            methods=("ts", "dc"), seeds=(0, 1), shifts=("gamma",), severities=(3,), test_limit=4,
            calib_limit=4, n_boot=200, report_cases=2, quick=True, fit_voxels=50_000,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def full_config(cls, **kw: Any) -> MedicalBenchConfig:
        """Every row including LTS / LTS(log S), every voxel of the fit halves."""
        base: dict[str, Any] = dict(spatial=True, fit_voxels=None)
        base.update(kw)
        return cls(**base)


def default_medical_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "segcal" / "bench-hippocampus"


def resolve_rows(cfg: MedicalBenchConfig) -> list[str]:
    if cfg.methods is None:
        return [r for r in MEDICAL_ROWS if cfg.spatial or r not in SPATIAL_ROWS]
    unknown = [m for m in cfg.methods if m not in MEDICAL_ROWS]
    if unknown:
        raise ValueError(f"unknown medical bench row(s) {unknown}; choose from {list(MEDICAL_ROWS)}")
    return list(dict.fromkeys(cfg.methods))


def row_properties(row: str) -> dict[str, Any]:
    import segcal.calibrators as sc

    reg, kw = MEDICAL_ROWS[row]
    cls = sc.resolve(reg)
    return {"registry": cls.name, "kwargs": kw, "translation_invariant": bool(cls.translation_invariant),
            "argmax_preserving": bool(cls.argmax_preserving),
            "order_preserving": bool(getattr(cls, "order_preserving", False)),
            "spatial": row in SPATIAL_ROWS, "objective": kw.get("objective", "nll")}


def props_label(p: dict[str, Any]) -> str:
    flags = [f for f, k in (("TI", "translation_invariant"), ("AP", "argmax_preserving"),
                            ("OP", "order_preserving")) if p.get(k)]
    return "/".join(flags) or "–"


# ---------------------------------------------------------------------------------- data + cache
def find_hippocampus(data_root: str | None) -> Path:
    from segcal.medical.hippocampus import dataset_dir

    try:
        d = dataset_dir(data_root)
    except FileNotFoundError as exc:
        raise BenchDataError(
            f"{exc}. The hippocampus bench needs DIR/msd_task04_hippocampus/ with imagesTr/ and labelsTr/ "
            "(MSD Task04); pass --data-root DIR or set SEGCAL_DATA=DIR") from exc
    for sub in ("imagesTr", "labelsTr"):
        if not (d / sub).is_dir():
            raise BenchDataError(f"{d} has no {sub}/: provide {d}/{sub}/ (MSD Task04 hippocampus)")
    return d


def _ensure_predictions(model_box: dict[str, Any], images: dict[str, Path], pred_dir: Path,
                        counts: dict[str, float]) -> None:
    from segcal.medical import predict_volumes

    missing = [p for c, p in images.items() if not (pred_dir / f"{c}.npy").is_file()]
    counts["reused"] += len(images) - len(missing)
    if missing:
        if "model" not in model_box:
            from segcal.medical.unet import load_unet3d_hippocampus

            model_box["model"] = load_unet3d_hippocampus().eval()
        t0 = time.perf_counter()
        predict_volumes(model_box["model"], missing, pred_dir)
        counts["predict_s"] += time.perf_counter() - t0
        counts["predicted"] += len(missing)


def write_shifted(images: dict[str, Path], out_dir: Path, shift: str, severity: int, seed: int) -> dict[str, Path]:
    """Corrupt each raw image (seed ``derive_seed(seed, case)``) into ``out_dir`` as NIfTI (cached)."""
    import nibabel as nib

    from segcal.medical.hippocampus import load_nifti
    from segcal.shift.corruptions import derive_seed
    from segcal.shift.mri import corrupt_volume

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cid, src in images.items():
        dst = out_dir / f"{cid}.nii.gz"
        if not dst.exists():
            img, aff = load_nifti(src, what="image")
            vol = corrupt_volume(np.asarray(img, dtype=np.float32), shift, severity, seed=derive_seed(seed, cid))
            tmp = out_dir / f".{cid}.tmp.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(vol, dtype=np.float32), aff), str(tmp))
            os.replace(tmp, dst)
        paths[cid] = dst
    return paths


def read_cases(pred_dir: Path, label_dir: Path, ids: Sequence[str]) -> list[_ImageData]:
    """Logits ``(3, X, Y, Z)`` and labels of ``ids``, aligned and checked by ``read_aligned``."""
    from segcal.io.predictions import read_folder_meta
    from segcal.medical.nnunet import read_aligned

    meta = read_folder_meta(pred_dir)
    out = []
    for c in ids:
        z, y = read_aligned(pred_dir / f"{c}.npy", label_dir / f"{c}.nii.gz", num_classes=NUM_CLASSES,
                            folder_meta=meta)
        out.append(_ImageData(c, np.asarray(z, dtype=np.float32), np.asarray(y, dtype=np.int64)))
    return out


# ---------------------------------------------------------------------------------- fitting
def _create(row: str, seed: int) -> Any:
    import segcal.calibrators as sc

    reg, kw = MEDICAL_ROWS[row]
    kw = dict(kw)
    if reg != "selective":  # selective scaling has no seed of its own (its base gets the default)
        kw.setdefault("seed", seed)
    return sc.create(reg, **kw)


def _volumes(group: Sequence[_ImageData]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.from_numpy(im.logits)[None], torch.from_numpy(im.labels)[None]) for im in group]


def fit_medical(calib: list[_ImageData], rows: Sequence[str], seeds: Sequence[int], fit_voxels: int | None,
                log: Any) -> dict[str, Any]:
    """Fit every row per seed: ``{"cals": {(row, seed): cal}, "fits": [...], "skipped": {...}}``."""
    by_stem = {im.stem: im for im in calib}
    cals: dict[tuple[str, int], Any] = {}
    fits: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for seed in seeds:
        fit_stems, sel_stems = split_halves(list(by_stem), seed)
        fit_imgs = [by_stem[s] for s in fit_stems]
        sel_imgs = [by_stem[s] for s in sel_stems or fit_stems]
        if fit_voxels is None:
            x = torch.from_numpy(np.concatenate([im.logits.reshape(NUM_CLASSES, -1).T for im in fit_imgs]))
            y = torch.from_numpy(np.concatenate([im.labels.reshape(-1) for im in fit_imgs]))
            vx = torch.from_numpy(np.concatenate([im.logits.reshape(NUM_CLASSES, -1).T for im in sel_imgs]))
            vy = torch.from_numpy(np.concatenate([im.labels.reshape(-1) for im in sel_imgs]))
        else:
            x, y = _draw_rows(fit_imgs, fit_voxels, seed, None)
            vx, vy = _draw_rows(sel_imgs, fit_voxels, seed + 10_000, None)
        for row in rows:
            if row in skipped:
                continue
            t0 = time.perf_counter()
            try:
                cal = _create(row, seed)
                if row in SPATIAL_ROWS:
                    cal.fit(_volumes(fit_imgs), val=_volumes(sel_imgs))
                else:
                    cal.fit(x, y, val=(vx, vy))
                cal.eval()
            except Exception as exc:  # a failing calibrator is skipped, never fatal for the table
                skipped[row] = f"fit failed (seed {seed}): {type(exc).__name__}: {exc}"
                log(f"skip {row}: {skipped[row]}")
                continue
            dt = time.perf_counter() - t0
            rec: dict[str, Any] = {"method": row, "seed": seed, "seconds": round(dt, 3),
                                   "fit_cases": fit_stems, "selection_cases": sel_stems,
                                   "n_fit_voxels": int(x.shape[0]) if row not in SPATIAL_ROWS else
                                   int(sum(im.labels.size for im in fit_imgs))}
            if hasattr(cal, "temperature"):
                try:
                    t = cal.temperature
                    rec["temperature"] = float(t() if callable(t) else t)
                except Exception:  # informative only
                    pass
            info = getattr(cal, "fit_info", {}) or {}
            for k in ("optimizer", "mode", "iterations", "best_iteration"):
                if k in info and isinstance(info[k], int | float | str):
                    rec[k] = info[k]
            fits.append(rec)
            cals[(row, seed)] = cal
            log(f"fit {row} seed {seed}: {dt:.1f} s")
    return {"cals": cals, "fits": fits, "skipped": skipped}


# ---------------------------------------------------------------------------------- evaluation
def _argmax_channels(z: torch.Tensor) -> torch.Tensor:
    """``z.argmax(1)`` (first maximum on ties) for ``(N, C, ...)``; several times faster than
    ``torch.argmax`` over the strided class axis of a 5D tensor on the CPU."""
    best = z[:, 0]
    idx = torch.zeros(best.shape, dtype=torch.long)
    for c in range(1, z.shape[1]):
        m = z[:, c] > best
        best = torch.where(m, z[:, c], best)
        idx[m] = c
    return idx


def evaluate_cases(cases: list[_ImageData], cals: dict[tuple[str, int], Any], cfg: MedicalBenchConfig) -> dict[str, Any]:
    """Metrics of the uncalibrated model and every fitted calibrator on one set of test cases.

    Same structure as :func:`segcal.pipeline.bench.evaluate_condition` (``runs`` with ``metrics``,
    ``reliability`` and the per-case ``_stats`` that the paired bootstrap resamples).
    """
    from segcal.metrics import CalibrationMetrics
    from segcal.metrics.regions import foreground_region_mask

    keys: list[tuple[str, int]] = [("uncalibrated", 0), *cals]
    every = list(range(NUM_CLASSES))
    # "all" validates every calibrated volume (NaN/inf, label range); the other two see the same tensors
    acc = {k: {"all": CalibrationMetrics(NUM_CLASSES, n_bins=cfg.n_bins, average_classes=every),
               "c50": CalibrationMetrics(NUM_CLASSES, n_bins=cfg.n_bins_case, average_classes=every, validate=False),
               "fg": CalibrationMetrics(NUM_CLASSES, n_bins=cfg.n_bins, average_classes=every, validate=False),
               "flips": []} for k in keys}
    n_vox = 0
    for im in cases:
        z = torch.from_numpy(im.logits)[None]
        y = torch.from_numpy(im.labels)[None]
        pred0 = _argmax_channels(z)
        region0 = torch.from_numpy(foreground_region_mask(im.labels[None], pred0.numpy(), radius=cfg.fg_radius))[0]
        n_vox += int(y.numel())
        for key in keys:
            if key[0] == "uncalibrated":
                out = z
            else:
                with torch.no_grad():
                    out = cals[key](z)
            pred = _argmax_channels(out)
            same = bool(torch.equal(pred, pred0))
            region = region0 if same else torch.from_numpy(
                foreground_region_mask(im.labels[None], pred.numpy(), radius=cfg.fg_radius))[0]
            a = acc[key]
            a["all"].update(out, y)
            a["c50"].update(out, y)
            # the region's voxels as one (1, C, n) "case": the same statistics as mask=, a quarter of the work
            a["fg"].update(out[:, :, region], y[:, region])
            a["flips"].append(0 if same else int((pred != pred0).sum()))
    res: dict[str, Any] = {"n_images": len(cases), "n_eval_pixels": n_vox, "cases": [c.stem for c in cases],
                           "runs": {}}
    fg = list(FG_CLASSES)
    for key, a in acc.items():
        m = a["all"].compute()
        m50 = a["c50"].compute()
        mf = a["fg"].compute()
        st = a["all"].state_dict()
        flips = np.asarray(a["flips"], dtype=np.float64)
        case_dice = np.asarray(m["image_dice_per_class"], dtype=np.float64)[:, fg]  # (n, 2)
        with np.errstate(invalid="ignore"):
            case_mean = np.nanmean(case_dice, axis=0)
        vals: dict[str, Any] = {
            "ece": m["ece"], "image_ece": m["image_ece"], "image_ece_std": m["image_ece_std"],
            "image_ece50": m50["image_ece"], "classwise_ece": m["classwise_ece"], "mce": m["mce"],
            "nll": m["nll"], "brier": m["brier"], "accuracy": m["accuracy"],
            "mean_confidence": m["mean_confidence"],
        }
        for k, name in zip(fg, FG_NAMES, strict=True):
            vals[f"dice_{name}"] = float(m["dice_per_class"][k])
        for j, name in enumerate(FG_NAMES):
            vals[f"case_dice_{name}"] = float(case_mean[j])
        vals["case_dice_fg"] = float(np.nanmean(case_dice))
        vals["flip_rate"] = float(flips.sum() / max(m["n_pixels"], 1))
        vals["fg_ece"] = mf["ece"]
        vals["fg_nll"] = mf["nll"]
        vals["fg_fraction"] = mf["n_pixels"] / m["n_pixels"]
        vals["n_pixels"] = m["n_pixels"]
        res["runs"][f"{key[0]}@{key[1]}"] = {
            "method": key[0], "seed": key[1], "metrics": vals,
            "reliability": {k: np.asarray(v).tolist() for k, v in m["reliability"].items()},
            "fg_reliability": {k: np.asarray(v).tolist() for k, v in mf["reliability"].items()},
            "case_dice": {name: case_dice[:, j].tolist() for j, name in enumerate(FG_NAMES)},
            "case_ece": np.asarray(m["image_ece_values"], dtype=np.float64).tolist(),
            "_stats": {
                "bins": st["img_bins"].numpy(), "totals": st["img_totals"].numpy(), "cls": st["img_class"].numpy(),
                "img_ece": np.asarray(m["image_ece_values"], dtype=np.float64),
                "img_ece50": np.asarray(m50["image_ece_values"], dtype=np.float64),
                "fg_bins": a["fg"].state_dict()["img_bins"].numpy(),
                "case_dice": np.asarray(m["image_dice_per_class"], dtype=np.float64),
                "flips": flips, "avg": np.asarray(every),
            },
        }
    return res


# ---------------------------------------------------------------------------------- driver
def run_medical_bench(cfg: MedicalBenchConfig) -> dict[str, Any]:
    """Run the whole protocol; write ``results.json``, ``results.md`` and (optionally) ``report.html``."""
    from segcal.medical.hippocampus import load_split

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as exc:
        raise ImportError("the hippocampus bench needs the medical extra: pip install 'segcal[medical]'") from exc
    _prepare_run(cfg.report, cfg.threads)
    rows = resolve_rows(cfg)
    unknown = [s for s in cfg.shifts if s not in MRI_SHIFTS]
    if unknown:
        raise ValueError(f"unknown MRI shift(s) {unknown}; choose from {list(MRI_SHIFTS)}")
    if any(not 1 <= int(v) <= 5 for v in cfg.severities):
        raise ValueError(f"severities: expected values in 1-5, got {list(cfg.severities)}")
    log = (lambda msg: print(f"[bench] {msg}", flush=True)) if cfg.progress else (lambda msg: None)
    d = find_hippocampus(cfg.data_root)
    split = load_split()
    calib_ids = sorted(split["calibration"])[: cfg.calib_limit]
    test_ids = sorted(split["test"])[: cfg.test_limit]
    if cfg.shift_cases is None or cfg.shift_cases >= len(test_ids):
        shift_ids = list(test_ids)
    else:
        shift_ids = sorted(np.random.default_rng(cfg.shift_seed).choice(test_ids, cfg.shift_cases, replace=False).tolist())
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache) if cfg.cache else default_medical_cache()
    img = {c: d / "imagesTr" / f"{c}.nii.gz" for c in calib_ids + test_ids}
    labels = d / "labelsTr"

    # predictions (cached)
    box: dict[str, Any] = {}
    counts: dict[str, float] = {"predicted": 0, "reused": 0, "predict_s": 0.0}
    t0 = time.perf_counter()
    log(f"predictions: {len(calib_ids)} calibration + {len(test_ids)} test cases")
    _ensure_predictions(box, {c: img[c] for c in calib_ids + test_ids}, cache / "clean", counts)
    conds: list[tuple[str, str | None, Path, list[str]]] = [("clean", None, cache / "clean", test_ids)]
    for s in cfg.shifts:
        for v in cfg.severities:
            sub = f"{s}_{v}_seed{cfg.shift_seed}"
            paths = write_shifted({c: img[c] for c in shift_ids}, cache / "shift_images" / sub, s, int(v), cfg.shift_seed)
            _ensure_predictions(box, paths, cache / "shift_pred" / sub, counts)
            conds.append((f"{s}-{v}", f"{s}@{v}", cache / "shift_pred" / sub, shift_ids))
    timings["predict_s"] = time.perf_counter() - t0
    log(f"predicted {int(counts['predicted'])} volumes, {int(counts['reused'])} from the cache ({timings['predict_s']:.0f} s)")

    t0 = time.perf_counter()
    calib = read_cases(cache / "clean", labels, calib_ids)
    fitted = fit_medical(calib, rows, cfg.seeds, cfg.fit_voxels, log)
    timings["fit_s"] = time.perf_counter() - t0
    del calib

    t0 = time.perf_counter()
    conditions: dict[str, Any] = {}
    clean_cases: list[_ImageData] = []
    for tag, corruption, folder, ids in conds:
        log(f"evaluate {tag} ({len(ids)} cases)")
        cases = read_cases(folder, labels, ids)
        res = evaluate_cases(cases, fitted["cals"], cfg)
        res["model"] = MODEL
        res["corruption"] = corruption
        res["summary"] = summarize(res, rows)
        res["bootstrap_vs_ts"] = bootstrap_condition(res, rows, cfg, metrics=MEDICAL_CI_METRICS)
        conditions[tag] = res
        if tag == "clean":
            clean_cases = cases
    timings["evaluate_s"] = time.perf_counter() - t0

    props = {r: row_properties(r) for r in rows}
    results: dict[str, Any] = {
        "format": "segcal-bench-medical", "version": 1, "dataset": DATASET, "model": MODEL,
        "commit": git_commit(),
        "config": asdict(cfg) | {"cache": str(cache), "methods_resolved": rows},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "protocol": {
            "split": "committed split (src/segcal/medical/hippocampus_split.json): "
                     f"{len(calib_ids)} calibration / {len(test_ids)} test cases",
            "calib_split": "calibration cases split per seed into fit / selection halves (selection = val= "
                           "early stopping / best iterate)",
            "fit_voxels": ("every voxel of each half" if cfg.fit_voxels is None else
                           f"{cfg.fit_voxels} voxels per half, seeded, the same number per case")
                          + "; whole-volume rows (lts, lts_ti) get every case of the half as its own batch",
            "shift_cases": "all test cases" if shift_ids == test_ids else shift_ids,
            "shift_seed": f"corruption seed of a case: derive_seed({cfg.shift_seed}, case_id)",
            "fg_region": f"{cfg.fg_radius}-voxel cube dilation ((2r+1)^3) of true and predicted foreground, "
                         "recomputed when the argmax changes",
            "bootstrap": f"paired over test cases, {cfg.n_boot} replicates, seed {cfg.boot_seed}, 95 % percentile "
                         "CI of row - TS (values = mean over seeds)",
            "bins": cfg.n_bins, "bins_case": cfg.n_bins_case,
        },
        "properties": props,
        "fits": fitted["fits"], "skipped": fitted["skipped"],
        "conditions": {k: _strip(v) for k, v in conditions.items()},
        "cache": {"root": str(cache), "predicted_volumes": int(counts["predicted"]),
                  "reused_volumes": int(counts["reused"]), "predict_seconds": round(counts["predict_s"], 3)},
        "timings": {},
    }
    from segcal.io.predictions import atomic_write
    from segcal.report.tables import markdown_report

    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    if cfg.report:
        t0 = time.perf_counter()
        from segcal.report.html import write_report

        ctx = {"cals": fitted["cals"], "cases": clean_cases, "images": img, "rows": rows}
        write_report(results, ctx, out_dir / "report.html", n_images=cfg.report_cases)
        timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    with atomic_write(out_dir / "results.md", "w") as fh:
        fh.write(markdown_report(results))
    with atomic_write(out_dir / "results.json", "w") as fh:
        json.dump(results, fh, indent=1, allow_nan=False)
    return results


__all__ = [
    "MEDICAL_ROWS",
    "MRI_SHIFTS",
    "MedicalBenchConfig",
    "evaluate_cases",
    "fit_medical",
    "run_medical_bench",
]
