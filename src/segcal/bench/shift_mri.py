"""The MRI rows of ``segcal bench --shift-calibration``: leave-one-shift-out for the 3D U-Net (issue 17).

The CamVid leave-one-family-out protocol (:mod:`segcal.bench.shift_calibration`) on MSD Task04
hippocampus with ``unet3d-hippocampus`` and the six MRI acquisition shifts of
:data:`~segcal.bench.spec.MRI_SHIFTS` (:mod:`segcal.shift.mri`; they are not ImageNet-C families, so
each shift is its own "family"):

1. **Perturbed calibration copies.** For every shift, each of the committed split's calibration
   cases gets one shifted copy at a severity in 1-5 drawn per case from
   ``derive_seed(val_seed, "<case>:<shift>")`` (corruption seed ``derive_seed(val_seed + 1, case)``),
   written to ``<cache>/shift_images/mix-<shift>_seed<val_seed>/`` and predicted into
   ``<cache>/shift_pred/mix-<shift>_seed<val_seed>/``.
2. **Fits per held-out shift H.** ``ts_clean`` on the clean calibration cases; ``ts_aug`` and
   ``sts_aug`` (clean-anchored on the clean cases of the fit half,
   :class:`~segcal.bench.shift_fit.Anchored`) on the clean cases plus the copies of the five
   other shifts (H never seen). The one fit loop (:func:`segcal.bench.protocol.fit_rows`, whole
   volumes: :class:`~segcal.bench.protocol.WholeVolumes`), per seed (default one, seed 0: the
   whole-volume ``sts`` fits take about a minute each on a loaded 2-core machine) a fit / selection
   split of the case copies, ``fit_voxels`` voxels per half for the pointwise rows, ``sts_loss_pixels``
   voxels per volume for the ``sts`` loss.
3. **Test per H and severity.** All test cases shifted by H at that severity (the hippocampus
   bench's layout and seeds: ``<cache>/shift_pred/<shift>_<severity>_seed<shift_seed>/``, shared with
   ``segcal bench --dataset hippocampus`` when the cache is), every voxel; plus the clean test cases
   (``*_aug`` fitted with all six shifts there). Pooled and case-wise ECE, NLL, Brier, Dice per
   foreground class; paired bootstrap over test cases of row − ``ts_clean``; Dice and the argmax
   checked to be kept exactly by every argmax-preserving row (a violation raises).

:func:`run_mri_rows` returns the ``"mri"`` section of the shift-calibration ``results.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from segcal.bench.bootstrap import bootstrap_condition, summarize
from segcal.bench.cache import default_cache_dir
from segcal.bench.hippocampus import (
    dice_columns,
    ensure_predictions,
    find_hippocampus,
    read_cases,
    write_shifted,
)
from segcal.bench.protocol import (
    FitResult,
    ImageData,
    WholeVolumes,
    evaluate,
    fit_rows,
    whole_volume,
)
from segcal.bench.shift_fit import Anchored, argmax_check, copies
from segcal.bench.spec import (
    HIPPOCAMPUS,
    MODEL,
    MRI_SHIFTS,
    NUM_CLASSES,
    SHIFT_CALIBRATION,
    SHIFT_REFERENCE,
    create_row,
    row_properties,
)
from segcal.datasets.hippocampus import load_split
from segcal.errors import InputError
from segcal.io.files import to_jsonable
from segcal.shift.corruptions import derive_seed

#: the MRI rows: TS on clean calibration cases (the reference), augmented TS, anchored sts
MRI_ROWS = ("ts_clean", "ts_aug", "sts_aug")
#: metrics with a paired bootstrap CI (Dice of the two foreground classes pooled over voxels)
MRI_CI_METRICS = ("ece", "image_ece", "nll", "brier", "dice:1", "dice:2", "flip_rate")


@dataclass
class MriShiftConfig:
    """The MRI part of a shift-calibration run (recorded in ``results.json``)."""

    cache: str | None = None
    data_root: str | None = None
    shifts: tuple[str, ...] = MRI_SHIFTS
    severities: tuple[int, ...] = (3, 5)
    methods: tuple[str, ...] = MRI_ROWS
    seeds: tuple[int, ...] = (0,)
    fit_voxels: int | None = 250_000
    #: ``loss_pixels`` of the whole-volume ``sts`` fits (its statistics always use every voxel)
    sts_loss_pixels: int | None = 4096
    val_seed: int = 1
    shift_seed: int = 0
    calib_limit: int | None = None
    test_limit: int | None = None
    n_bins: int = 15
    n_boot: int = 1000
    boot_seed: int = 0


def check_mri_config(cfg: MriShiftConfig) -> None:
    """Refuse unknown shifts / rows / severities before any work."""
    bad = [s for s in cfg.shifts if s not in MRI_SHIFTS]
    if bad or len(cfg.shifts) < 2:
        raise InputError(f"mri shifts: {bad or list(cfg.shifts)}; expected at least two of {', '.join(MRI_SHIFTS)}")
    rows = [m for m in cfg.methods if m not in MRI_ROWS]
    if rows or SHIFT_REFERENCE not in cfg.methods:
        raise InputError(f"mri methods: {list(cfg.methods)}; expected {SHIFT_REFERENCE} and some of {', '.join(MRI_ROWS)}")
    if not cfg.severities or any(int(v) not in (1, 2, 3, 4, 5) for v in cfg.severities):
        raise InputError(f"mri severities: expected values in 1-5, got {list(cfg.severities)}")


def write_mixed(images: Mapping[str, Path], out_dir: Path, shift: str, seed: int) -> dict[str, Path]:
    """One shifted copy of each case at a severity drawn per case (:func:`mixed_severity`), the
    corruption's noise seeded by ``derive_seed(seed + 1, case)`` (cached NIfTI, by
    :func:`segcal.bench.hippocampus.write_shifted`)."""
    return write_shifted(images, out_dir, shift, lambda cid: mixed_severity(cid, shift, seed), seed + 1)


def mixed_severity(case: str, shift: str, seed: int) -> int:
    """The severity (1-5) of ``case``'s shifted calibration copy under ``shift``."""
    return int(np.random.default_rng(derive_seed(seed, f"{case}:{shift}")).integers(1, 6))


def _fit(data: Sequence[ImageData], rows: Sequence[str], cfg: MriShiftConfig, log: Callable[[str], None]) -> FitResult:
    if not rows:
        return FitResult()
    return fit_rows(data, rows, cfg.seeds, create=partial(_create, cfg.sts_loss_pixels),
                    strategy=Anchored(WholeVolumes()), total=cfg.fit_voxels, ignore=None, log=log)


def _create(loss_pixels: int | None, row: str, **kw: Any) -> Any:
    """A row's calibrator; the ``sts`` rows with ``loss_pixels`` (fit time: 150 volumes per half)."""
    if SHIFT_CALIBRATION.rows[row].registry == "sts":
        kw.setdefault("loss_pixels", loss_pixels)
    return create_row(SHIFT_CALIBRATION, row, **kw)


def _score(cases: Sequence[ImageData], cals: Mapping[tuple[str, int], Any], rows: Sequence[str],
           cfg: MriShiftConfig) -> dict[str, Any]:
    res = evaluate(cases, cals, num_classes=NUM_CLASSES, n_bins=cfg.n_bins, view=whole_volume,
                   metrics_kw={"average_classes": list(range(NUM_CLASSES))}, extras=dice_columns)
    present = [m for m in rows if any(k[0] == m for k in cals)]
    res["summary"] = summarize(res, present)
    res["bootstrap_vs_ts_clean"] = bootstrap_condition(res, present, n_boot=cfg.n_boot, seed=cfg.boot_seed,
                                                       metrics=MRI_CI_METRICS, reference=SHIFT_REFERENCE)
    res["argmax_check"] = argmax_check(res, present, ("dice_ant", "dice_post"))
    res["cases"] = [c.stem for c in cases]
    return res


def run_mri_rows(cfg: MriShiftConfig, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Leave-one-shift-out on hippocampus (module docstring): the ``"mri"`` results section."""
    check_mri_config(cfg)
    try:
        import nibabel as _nib  # noqa: F401
    except ImportError as exc:
        raise ImportError("the MRI rows need the medical extra: pip install 'segcal[medical]'") from exc
    timings: dict[str, float] = {}
    d = find_hippocampus(cfg.data_root)
    split = load_split()
    calib_ids = sorted(split["calibration"])[: cfg.calib_limit]
    test_ids = sorted(split["test"])[: cfg.test_limit]
    cache = Path(cfg.cache) if cfg.cache else default_cache_dir(HIPPOCAMPUS.cache_name)
    img = {c: d / "imagesTr" / f"{c}.nii.gz" for c in calib_ids + test_ids}
    labels = d / "labelsTr"
    rows = list(cfg.methods)
    clean_rows = [m for m in rows if m == SHIFT_REFERENCE]
    aug_rows = [m for m in rows if m != SHIFT_REFERENCE]

    t0 = time.perf_counter()
    box: dict[str, Any] = {}
    counts: dict[str, float] = {"predicted": 0, "reused": 0, "predict_s": 0.0}
    log(f"mri predictions: {len(calib_ids)} calibration + {len(test_ids)} test cases, {len(cfg.shifts)} shifts")
    ensure_predictions(box, {c: img[c] for c in calib_ids + test_ids}, cache / "clean", counts)
    for s in cfg.shifts:
        sub = f"mix-{s}_seed{cfg.val_seed}"
        paths = write_mixed({c: img[c] for c in calib_ids}, cache / "shift_images" / sub, s, cfg.val_seed)
        ensure_predictions(box, paths, cache / "shift_pred" / sub, counts)
        for v in cfg.severities:
            sub = f"{s}_{v}_seed{cfg.shift_seed}"
            paths = write_shifted({c: img[c] for c in test_ids}, cache / "shift_images" / sub, s, int(v), cfg.shift_seed)
            ensure_predictions(box, paths, cache / "shift_pred" / sub, counts)
    timings["predict_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clean = read_cases(cache / "clean", labels, calib_ids)
    pert = {s: copies(read_cases(cache / "shift_pred" / f"mix-{s}_seed{cfg.val_seed}", labels, calib_ids), s)
            for s in cfg.shifts}
    clean_fit = _fit(clean, clean_rows, cfg, log)
    fits: dict[str, Any] = {"clean": clean_fit.fits}
    skipped: dict[str, Any] = {"clean": clean_fit.skipped}
    folds: dict[str, FitResult] = {}
    for h in [*cfg.shifts, None]:
        others = [s for s in cfg.shifts if s != h]
        folds["all" if h is None else h] = res = _fit(clean + [c for s in others for c in pert[s]], aug_rows, cfg, log)
        fits[f"no-{h}" if h else "all"], skipped[f"no-{h}" if h else "all"] = res.fits, res.skipped
    timings["fit_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    conditions: dict[str, Any] = {}
    for h in [*cfg.shifts, None]:
        cals = {**clean_fit.cals, **folds["all" if h is None else h].cals}
        for v in cfg.severities if h else (None,):
            tag = f"{h}-{v}" if h else "clean"
            folder = cache / "shift_pred" / f"{h}_{v}_seed{cfg.shift_seed}" if h else cache / "clean"
            log(f"mri evaluate {tag} ({len(test_ids)} cases)")
            res = _score(read_cases(folder, labels, test_ids), cals, rows, cfg)
            res.update(model=MODEL, shift=h, severity=v, held_out=h,
                       fitted_with=[s for s in cfg.shifts if s != h])
            conditions[tag] = res
    timings["evaluate_s"] = time.perf_counter() - t0
    out = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()} | {"cache": str(cache)},
        "model": MODEL,
        "protocol": {
            "split": f"committed split: {len(calib_ids)} calibration / {len(test_ids)} test cases",
            "perturbed_calibration": f"per shift one copy of each calibration case, severity uniform 1-5 per case "
                                     f"(derive_seed({cfg.val_seed}, '<case>:<shift>')), corruption seed "
                                     f"derive_seed({cfg.val_seed + 1}, case)",
            "fit": "*_aug rows: clean calibration cases + the copies of every shift except the held-out one (clean: "
                   "of every shift); sts_aug anchored on the clean cases of the fit half; whole volumes",
            "test": f"every test case, every voxel; corruption seed derive_seed({cfg.shift_seed}, case)",
            "bootstrap": f"paired over test cases, {cfg.n_boot} replicates, seed {cfg.boot_seed}, 95 % percentile CI "
                         f"of method - {SHIFT_REFERENCE} (values = mean over seeds)",
        },
        "properties": {m: row_properties(SHIFT_CALIBRATION, m) | {"data": "clean" if m == SHIFT_REFERENCE else "augmented"}
                       for m in rows},
        "fits": fits, "skipped": skipped,
        "conditions": to_jsonable(conditions, drop_private=True),
        "cache": {"root": str(cache), "predicted_volumes": int(counts["predicted"]),
                  "reused_volumes": int(counts["reused"]), "predict_seconds": round(counts["predict_s"], 3)},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    out["loso"] = loso_summary(out["conditions"], rows)
    return out


def loso_summary(conds: Mapping[str, Any], rows: Sequence[str]) -> dict[str, Any]:
    """Means over the held-out shift sets and the issue's targets per row (numbers)."""
    sets = [t for t, c in conds.items() if c.get("held_out")]
    out: dict[str, Any] = {"sets": sets, "rows": {}}
    if not sets:
        return out
    ref = float(np.mean([conds[t]["summary"][SHIFT_REFERENCE]["ece"] for t in sets]))
    clean = conds.get("clean", {}).get("summary", {})
    for m in rows:
        if not all(m in conds[t]["summary"] for t in sets):
            continue
        ece = float(np.mean([conds[t]["summary"][m]["ece"] for t in sets]))
        cis = [conds[t]["bootstrap_vs_ts_clean"].get(m, {}).get("nll") for t in sets]
        worse = [t for t, ci in zip(sets, cis, strict=True) if ci and ci["significant"] and ci["diff"] > 0]
        row: dict[str, Any] = {"mean_ece": ece, "ratio_to_ts_clean": ece / ref if ref > 0 else None,
                               "mean_nll": float(np.mean([conds[t]["summary"][m]["nll"] for t in sets])),
                               "nll_significantly_worse_than_ts_clean": worse, "target_half_ece": bool(ece <= 0.5 * ref),
                               "target_nll_not_worse": not worse}
        if m in clean and SHIFT_REFERENCE in clean:
            row["clean_ece_minus_ts_clean"] = float(clean[m]["ece"] - clean[SHIFT_REFERENCE]["ece"])
            row["target_clean_within_0.005"] = bool(row["clean_ece_minus_ts_clean"] <= 0.005)
        kept = [conds[t]["argmax_check"][m]["argmax_kept"] for t in conds if m in conds[t].get("argmax_check", {})]
        row["dice_kept_everywhere"] = bool(kept and all(kept))
        out["rows"][m] = row
    out["ts_clean_mean_ece"] = ref
    return out


__all__ = ["MRI_CI_METRICS", "MRI_ROWS", "MriShiftConfig", "check_mri_config", "loso_summary",
           "mixed_severity", "run_mri_rows", "write_mixed"]
