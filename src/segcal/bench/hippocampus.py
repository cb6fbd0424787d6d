"""``segcal bench --dataset hippocampus``: the medical calibration table (issue 8).

The CamVid bench protocol (:mod:`segcal.bench.protocol`) on 3D volumes, with the reference
``unet3d-hippocampus`` model (:mod:`segcal.models.unet3d`) on MSD Task04 hippocampus:

1. **Predictions** of the 50 calibration and 50 test cases of the committed split
   (``segcal/datasets/hippocampus_split.json``) are written once with
   :func:`segcal.pipeline.predict.predict_volumes` into ``cache/clean/`` and read back with
   :func:`segcal.io.nnunet.read_aligned` (shape and affine checked against the label).
   Shifted test volumes (:mod:`segcal.shift.mri`, corruption seed ``derive_seed(seed, case)``)
   are written to ``cache/shift_images/<shift>_<severity>_seed<seed>/`` and predicted into
   ``cache/shift_pred/<shift>_<severity>_seed<seed>/``. A rerun reads the cache and never calls
   the model for a cached case.
2. **Calibration data**: the calibration cases are split per seed in ``seeds`` (0, 1, 2) into a
   fit half and a selection half (:func:`segcal.bench.protocol.split_halves`; the selection half
   is the calibrators' ``val=`` early-stopping / best-iterate data). Pointwise calibrators are
   fitted on a seeded, case-stratified subsample of ``fit_voxels`` voxels of each half (the same
   number per case, :func:`segcal.bench.protocol.draw_rows`, as ``fit_pixels`` for CamVid);
   ``fit_voxels=None`` uses every voxel. Whole-volume calibrators (LTS, LTS(log S), ``spatial``)
   get every case of the half as its own ``(1, 3, X, Y, Z)`` batch
   (:class:`~segcal.bench.protocol.WholeVolumes`): volumes of different shapes are never stacked
   or padded.
3. **Rows**: :data:`~segcal.bench.spec.MEDICAL_ROWS` (row name -> registry name and keyword
   arguments), which adds the soft-Dice objective variants ``ts_dice`` and ``dc_dice`` to the
   registered calibrators.
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
   (:mod:`segcal.bench.bootstrap`, same code as CamVid).

:func:`run_medical_bench` returns a :class:`~segcal.bench.results.BenchRun`;
:func:`segcal.report.write_outputs` writes its ``results.json``, ``results.md`` and ``report.html``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from segcal.bench.bootstrap import bootstrap_condition, summarize
from segcal.bench.cache import default_cache_dir, environment, find_dataset, git_commit, prepare_run
from segcal.bench.protocol import (
    ForegroundRegion,
    ImageData,
    RebinnedRegion,
    WholeVolumes,
    evaluate,
    fit_rows,
    whole_volume,
)
from segcal.bench.results import BenchRun, FigureData
from segcal.bench.spec import (
    FG_CLASSES,
    FG_NAMES,
    HIPPOCAMPUS,
    MEDICAL_ROWS,
    MODEL,
    MRI_SHIFTS,
    NUM_CLASSES,
    SPATIAL_ROWS,
    create_row,
    row_properties,
)
from segcal.datasets.hippocampus import dataset_dir, load_split
from segcal.io.files import to_jsonable
from segcal.io.nifti import load_nifti, nibabel
from segcal.io.nnunet import read_aligned
from segcal.io.predictions import read_folder_meta
from segcal.models.unet3d import load_unet3d_hippocampus
from segcal.pipeline.predict import predict_volumes
from segcal.shift.corruptions import derive_seed
from segcal.shift.mri import corrupt_volume

DATASET = "hippocampus"


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


def resolve_rows(cfg: MedicalBenchConfig) -> list[str]:
    """The rows of a run: ``cfg.methods``, or every row (the whole-volume ones with ``spatial``)."""
    if cfg.methods is None:
        return [r for r in MEDICAL_ROWS if cfg.spatial or r not in SPATIAL_ROWS]
    unknown = [m for m in cfg.methods if m not in MEDICAL_ROWS]
    if unknown:
        raise ValueError(f"unknown medical bench row(s) {unknown}; choose from {list(MEDICAL_ROWS)}")
    return list(dict.fromkeys(cfg.methods))


# ---------------------------------------------------------------------------------- data + cache
def find_hippocampus(data_root: str | None) -> Path:
    """The MSD Task04 folder; raises :class:`~segcal.bench.cache.BenchDataError` saying what to provide."""
    return find_dataset(dataset_dir, data_root, subdirs=("imagesTr", "labelsTr"),
                        needs="The hippocampus bench needs DIR/msd_task04_hippocampus/ with imagesTr/ and "
                              "labelsTr/ (MSD Task04)",
                        provide="MSD Task04 hippocampus")


@dataclass(frozen=True)
class CaseImage:
    """The MRI volume of a case (what the report's slices show)."""

    path: Path

    def load_image(self) -> np.ndarray:
        return np.asarray(load_nifti(self.path, what="image")[0], dtype=np.float32)


def ensure_predictions(model_box: dict[str, Any], images: Mapping[str, Path], pred_dir: Path,
                       counts: dict[str, float]) -> None:
    """Predict the volumes of ``images`` not cached in ``pred_dir`` yet (the model is loaded once)."""
    missing = [p for c, p in images.items() if not (pred_dir / f"{c}.npy").is_file()]
    counts["reused"] += len(images) - len(missing)
    if missing:
        if "model" not in model_box:
            model_box["model"] = load_unet3d_hippocampus().eval()
        t0 = time.perf_counter()
        predict_volumes(model_box["model"], missing, pred_dir)
        counts["predict_s"] += time.perf_counter() - t0
        counts["predicted"] += len(missing)


def write_shifted(images: Mapping[str, Path], out_dir: Path, shift: str, severity: int | Callable[[str], int],
                  seed: int) -> dict[str, Path]:
    """Corrupt each raw image (seed ``derive_seed(seed, case)``) into ``out_dir`` as NIfTI (cached);
    ``severity``: one for every case, or a function of the case id."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cid, src in images.items():
        dst = out_dir / f"{cid}.nii.gz"
        if not dst.exists():
            nib = nibabel()
            img, aff = load_nifti(src, what="image")
            sev = severity(cid) if callable(severity) else severity
            vol = corrupt_volume(np.asarray(img, dtype=np.float32), shift, sev, seed=derive_seed(seed, cid))
            tmp = out_dir / f".{cid}.tmp.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(vol, dtype=np.float32), aff), str(tmp))
            os.replace(tmp, dst)
        paths[cid] = dst
    return paths


def read_cases(pred_dir: Path, label_dir: Path, ids: Sequence[str],
               images: Mapping[str, Path] | None = None) -> list[ImageData]:
    """Logits ``(3, X, Y, Z)`` and labels of ``ids``, aligned and checked by ``read_aligned``."""
    meta = read_folder_meta(pred_dir)
    out = []
    for c in ids:
        z, y = read_aligned(pred_dir / f"{c}.npy", label_dir / f"{c}.nii.gz", num_classes=NUM_CLASSES,
                            folder_meta=meta)
        item = CaseImage(images[c]) if images and c in images else None
        out.append(ImageData(c, np.asarray(z, dtype=np.float32), np.asarray(y, dtype=np.int64), item))
    return out


def dice_columns(m: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """The medical columns beyond the common ones: pooled and case-wise Dice of each foreground class."""
    fg = list(FG_CLASSES)
    case_dice = np.asarray(m["image_dice_per_class"], dtype=np.float64)[:, fg]  # (n, 2)
    with np.errstate(invalid="ignore"):
        case_mean = np.nanmean(case_dice, axis=0)
    vals: dict[str, Any] = {}
    for k, name in zip(fg, FG_NAMES, strict=True):
        vals[f"dice_{name}"] = float(m["dice_per_class"][k])
    for j, name in enumerate(FG_NAMES):
        vals[f"case_dice_{name}"] = float(case_mean[j])
    vals["case_dice_fg"] = float(np.nanmean(case_dice))
    run = {"case_dice": {name: case_dice[:, j].tolist() for j, name in enumerate(FG_NAMES)},
           "case_ece": np.asarray(m["image_ece_values"], dtype=np.float64).tolist()}
    return vals, run, {"case_dice": np.asarray(m["image_dice_per_class"], dtype=np.float64)}


def evaluate_cases(cases: Sequence[ImageData], cals: Mapping[tuple[str, int], Any],
                   cfg: MedicalBenchConfig) -> dict[str, Any]:
    """Metrics of the uncalibrated model and every fitted calibrator on one set of test cases
    (:func:`segcal.bench.protocol.evaluate` on whole volumes, with the 50-bin and foreground regions)."""
    res = evaluate(cases, cals, num_classes=NUM_CLASSES, n_bins=cfg.n_bins, view=whole_volume,
                   metrics_kw={"average_classes": list(range(NUM_CLASSES))},
                   regions=[RebinnedRegion(cfg.n_bins_case), ForegroundRegion(cfg.fg_radius)], extras=dice_columns)
    res["cases"] = [c.stem for c in cases]
    return res


# ---------------------------------------------------------------------------------- driver
def run_medical_bench(cfg: MedicalBenchConfig) -> BenchRun:
    """Run the whole protocol; the returned run's outputs are written by :func:`segcal.report.write_outputs`."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        import monai  # noqa: F401
        import nibabel as _nib  # noqa: F401
    except ImportError as exc:
        raise ImportError("the hippocampus bench needs the medical extra: pip install 'segcal[medical]'") from exc
    prepare_run(cfg.report, cfg.threads)
    rows = resolve_rows(cfg)
    unknown = [s for s in cfg.shifts if s not in MRI_SHIFTS]
    if unknown:
        raise ValueError(f"unknown MRI shift(s) {unknown}; choose from {list(MRI_SHIFTS)}")
    if any(not 1 <= int(v) <= 5 for v in cfg.severities):
        raise ValueError(f"severities: expected values in 1-5, got {list(cfg.severities)}")
    log = (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)) if cfg.progress else (lambda msg: None)
    d = find_hippocampus(cfg.data_root)
    split = load_split()
    calib_ids = sorted(split["calibration"])[: cfg.calib_limit]
    test_ids = sorted(split["test"])[: cfg.test_limit]
    if cfg.shift_cases is None or cfg.shift_cases >= len(test_ids):
        shift_ids = list(test_ids)
    else:
        shift_ids = sorted(np.random.default_rng(cfg.shift_seed).choice(test_ids, cfg.shift_cases, replace=False).tolist())
    cache = Path(cfg.cache) if cfg.cache else default_cache_dir(HIPPOCAMPUS.cache_name)
    img = {c: d / "imagesTr" / f"{c}.nii.gz" for c in calib_ids + test_ids}
    labels = d / "labelsTr"

    # predictions (cached)
    box: dict[str, Any] = {}
    counts: dict[str, float] = {"predicted": 0, "reused": 0, "predict_s": 0.0}
    t0 = time.perf_counter()
    log(f"predictions: {len(calib_ids)} calibration + {len(test_ids)} test cases")
    ensure_predictions(box, {c: img[c] for c in calib_ids + test_ids}, cache / "clean", counts)
    conds: list[tuple[str, str | None, Path, list[str]]] = [("clean", None, cache / "clean", test_ids)]
    for s in cfg.shifts:
        for v in cfg.severities:
            sub = f"{s}_{v}_seed{cfg.shift_seed}"
            paths = write_shifted({c: img[c] for c in shift_ids}, cache / "shift_images" / sub, s, int(v), cfg.shift_seed)
            ensure_predictions(box, paths, cache / "shift_pred" / sub, counts)
            conds.append((f"{s}-{v}", f"{s}@{v}", cache / "shift_pred" / sub, shift_ids))
    timings["predict_s"] = time.perf_counter() - t0
    log(f"predicted {int(counts['predicted'])} volumes, {int(counts['reused'])} from the cache ({timings['predict_s']:.0f} s)")

    t0 = time.perf_counter()
    calib = read_cases(cache / "clean", labels, calib_ids)
    fitted = fit_rows(calib, rows, cfg.seeds, create=partial(create_row, HIPPOCAMPUS), strategy=WholeVolumes(),
                      total=cfg.fit_voxels, ignore=None, log=log)
    timings["fit_s"] = time.perf_counter() - t0
    del calib

    t0 = time.perf_counter()
    conditions: dict[str, Any] = {}
    figures: dict[str, FigureData] = {}
    for tag, corruption, folder, ids in conds:
        log(f"evaluate {tag} ({len(ids)} cases)")
        cases = read_cases(folder, labels, ids, img if tag == "clean" else None)
        res = evaluate_cases(cases, fitted.cals, cfg)
        res["model"] = MODEL
        res["corruption"] = corruption
        res["summary"] = summarize(res, rows)
        res["bootstrap_vs_ts"] = bootstrap_condition(res, rows, n_boot=cfg.n_boot, seed=cfg.boot_seed,
                                                     metrics=HIPPOCAMPUS.ci_metrics)
        conditions[tag] = res
        if tag == "clean":
            figures[MODEL] = FigureData(fitted.cals, cases)
    timings["evaluate_s"] = time.perf_counter() - t0

    results: dict[str, Any] = {
        "format": HIPPOCAMPUS.format, "version": 1, "dataset": DATASET, "model": MODEL,
        "commit": git_commit(),
        "config": asdict(cfg) | {"cache": str(cache), "methods_resolved": rows},
        "environment": environment(),
        "protocol": {
            "split": "committed split (src/segcal/datasets/hippocampus_split.json): "
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
        "properties": {r: row_properties(HIPPOCAMPUS, r) for r in rows},
        "fits": fitted.fits, "skipped": fitted.skipped,
        "conditions": to_jsonable(conditions, drop_private=True),
        "cache": {"root": str(cache), "predicted_volumes": int(counts["predicted"]),
                  "reused_volumes": int(counts["reused"]), "predict_seconds": round(counts["predict_s"], 3)},
    }
    timings["total_s"] = time.perf_counter() - t_start  # before the report; the report completes it
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return BenchRun(HIPPOCAMPUS, results, Path(cfg.out), figures, timings, t_start,
                    cfg.report, cfg.report_cases)


__all__ = [
    "CaseImage", "MedicalBenchConfig", "dice_columns", "ensure_predictions", "evaluate_cases", "find_hippocampus",
    "read_cases", "resolve_rows", "run_medical_bench", "write_shifted",
]
