"""Medical calibration table: post-hoc calibrators on the reference 3D U-Net (MSD hippocampus).

Protocol (``../shared/methods.md`` §5 [RPH], adapted):

* Model: the committed ``unet3d-hippocampus`` (``segcal.medical``); predictions of the 50
  calibration and 50 test cases of the committed split are written with
  :func:`segcal.medical.predict_volumes` to a cache folder (default ``/tmp/segcal_med_cache``,
  never the repository) and reused on the next run.
* Fitting: for each repeat ``r`` the 50 calibration cases are shuffled with
  ``numpy.random.default_rng(seed + r)`` and split into a **fit** half (25 cases) and a
  **selection** half (25 cases, passed as ``val=`` for early stopping / best-iterate selection on
  NLL). Cases are passed as an iterable of per-case ``(1, 3, X, Y, Z)`` batches: volumes of
  different shapes are never stacked or padded.
* Evaluation: the 50 test cases clean, and under the six MRI shifts of
  :mod:`segcal.shift.mri` at the chosen severities on a seeded subset of the test cases
  (``--shift-cases``; the corruption seed of a case is ``derive_seed(seed, case_id)``).
  Metrics (15 equal-width bins): pooled ECE, case-wise ECE (mean and std over cases), class-wise
  ECE, **foreground-region ECE** (ECE restricted to the 3-voxel cube dilation of true ∪ predicted
  foreground, :func:`segcal.metrics.regions.foreground_region_mask`, recomputed per calibrator
  since the prediction may change), NLL, Brier, Dice per class pooled and case-wise mean, and the
  flip rate (fraction of voxels whose argmax differs from the uncalibrated argmax).

Outputs a JSON with every number (per repeat) and a Markdown table (means ± std over repeats).

Usage::

    nice -n 10 python3 benchmarks/medical_calibration.py --out /tmp/med_calib
    python3 benchmarks/medical_calibration.py --quick --out /tmp/med_quick   # 2+2 cases, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segcal.calibrators import create
from segcal.metrics import CalibrationMetrics, to_jsonable
from segcal.metrics.regions import foreground_region_mask

NUM_CLASSES = 3
FG_CLASSES = (1, 2)
N_BINS = 15
FG_RADIUS = 3

#: row name -> (registry name, constructor kwargs)
CALIBRATORS: dict[str, tuple[str, dict]] = {
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
    "ts_dice": ("ts", {"objective": "dice"}),
    "dc_dice": ("dc", {"objective": "dice"}),
    "lts": ("lts", {"spatial_dims": 3}),
    "lts_ti": ("lts_ti", {"spatial_dims": 3}),
    "selective": ("selective", {"base": "ts"}),
}
QUICK_CALIBRATORS = ["ts", "cmsap"]
SHIFTS = ["bias_field", "rician_noise", "gaussian_blur", "gamma", "ghosting", "low_resolution"]


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------- data
def predict_cached(model, image_paths: dict[str, Path], pred_dir: Path) -> None:
    """Predict the cases of ``image_paths`` missing from ``pred_dir`` (``predict_volumes``)."""
    from segcal.medical import predict_volumes

    missing = [p for cid, p in image_paths.items() if not (pred_dir / f"{cid}.npy").exists()]
    if missing:
        predict_volumes(model, missing, pred_dir)


def load_logits(pred_dir: Path, cid: str) -> torch.Tensor:
    return torch.from_numpy(np.load(pred_dir / f"{cid}.npy").astype(np.float32))[None]


def write_shifted(images: dict[str, Path], out_dir: Path, shift: str, severity: int, seed: int) -> dict[str, Path]:
    """Corrupt each raw image (seed ``derive_seed(seed, case)``) into ``out_dir`` as NIfTI."""
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
            vol = corrupt_volume(np.asarray(img, dtype=np.float32), shift, severity,
                                 seed=derive_seed(seed, cid))
            tmp = out_dir / f".{cid}.tmp.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(vol, dtype=np.float32), aff), str(tmp))
            os.replace(tmp, dst)
        paths[cid] = dst
    return paths


# ----------------------------------------------------------------------------- evaluation
def evaluate(cal, logits: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
    """Every metric of one calibrator (``None``: uncalibrated) on a list of per-case volumes."""
    allm = CalibrationMetrics(NUM_CLASSES, n_bins=N_BINS, average_classes=list(range(NUM_CLASSES)))
    fgm = CalibrationMetrics(NUM_CLASSES, n_bins=N_BINS, per_image=False)
    flips = 0
    n = 0
    for z, y in zip(logits, labels, strict=True):
        if cal is None:
            out = z
        else:
            with torch.no_grad():
                out = cal(z)
        pred = out.argmax(1)
        flips += int((pred != z.argmax(1)).sum())
        n += int(pred.numel())
        allm.update(out, y)
        region = foreground_region_mask(y.numpy(), pred.numpy(), radius=FG_RADIUS)
        fgm.update(out, y, mask=torch.from_numpy(region))
    a = allm.compute()
    f = fgm.compute()
    fg = list(FG_CLASSES)
    case_dice = a["image_dice_per_class"][:, fg]
    with np.errstate(invalid="ignore"):
        case_dice_mean = np.nanmean(case_dice, axis=0)
    return {
        "ece": a["ece"],
        "case_ece_mean": a["image_ece"],
        "case_ece_std": a["image_ece_std"],
        "classwise_ece": a["classwise_ece"],
        "fg_ece": f["ece"],
        "fg_nll": f["nll"],
        "fg_fraction": f["n_pixels"] / a["n_pixels"],
        "fg_accuracy": f["accuracy"],
        "fg_confidence": f["mean_confidence"],
        "nll": a["nll"],
        "brier": a["brier"],
        "accuracy": a["accuracy"],
        "dice_pooled": [float(a["dice_per_class"][k]) for k in fg],
        "dice_pooled_mean": float(np.mean(a["dice_per_class"][fg])),
        "dice_case_mean": [float(v) for v in case_dice_mean],
        "dice_case_mean_fg": float(np.nanmean(case_dice)),
        "flip_rate": flips / n,
        "n_cases": len(logits),
        "n_voxels": n,
    }


def fit_one(row: str, fit_b, sel_b, seed: int):
    reg, kw = CALIBRATORS[row]
    kw = dict(kw)
    if reg != "selective":
        kw.setdefault("seed", seed)
    cal = create(reg, **kw)
    t0 = time.perf_counter()
    cal.fit(fit_b, val=sel_b)
    return cal.eval(), time.perf_counter() - t0


# ----------------------------------------------------------------------------- report
def _ms(vals: list[float], fmt: str, scale: float = 1.0) -> str:
    v = np.asarray(vals, dtype=float) * scale
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(v.mean(), fmt)} ± {format(v.std(), fmt)}"


def markdown(res: dict) -> str:
    rows = [r for r in ["none", *res["config"]["calibrators"]] if r in res["repeats"][-1]["clean"]]
    reps = res["repeats"]
    props = res["properties"]
    L = []
    nrep = len(reps)
    L.append(f"Clean test set ({res['config']['n_test']} cases); mean ± std over {nrep} repeat(s) "
             "of the fit/selection split" if nrep > 1 else
             f"Clean test set ({res['config']['n_test']} cases); 1 repeat")
    L.append("")
    L.append("| calibrator | TI | AP | ECE % | case ECE % (mean ± sd over cases) | cw-ECE % | fg-ECE % | "
             "NLL | Brier | Dice ant / post (pooled) | case Dice (fg mean) | flip % |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ev = [rep["clean"][r] for rep in reps]
        p = props.get(r, {"translation_invariant": True, "argmax_preserving": True})

        def g(k: str, ev: list = ev) -> list:
            return [e[k] for e in ev]

        case = f"{np.mean(g('case_ece_mean')) * 100:.2f} ± {np.mean(g('case_ece_std')) * 100:.2f}"
        d = np.asarray([e["dice_pooled"] for e in ev])
        L.append(
            f"| {r} | {'y' if p['translation_invariant'] else 'n'} | {'y' if p['argmax_preserving'] else 'n'} "
            f"| {_ms(g('ece'), '.3f', 100)} | {case} | {_ms(g('classwise_ece'), '.3f', 100)} "
            f"| {_ms(g('fg_ece'), '.2f', 100)} | {_ms(g('nll'), '.4f')} | {_ms(g('brier'), '.4f')} "
            f"| {d[:, 0].mean():.4f} / {d[:, 1].mean():.4f} | {_ms(g('dice_case_mean_fg'), '.4f')} "
            f"| {_ms(g('flip_rate'), '.3f', 100)} |"
        )
    conds = res["config"]["shift_conditions"]
    if conds:
        L.append("")
        for key, title, scale, fmt in (
            ("ece", "pooled ECE %", 100, ".3f"),
            ("fg_ece", "foreground-region ECE %", 100, ".2f"),
            ("nll", "NLL", 1, ".4f"),
            ("dice_pooled_mean", "pooled Dice (mean of anterior, posterior)", 1, ".4f"),
        ):
            L.append(f"Shifted test subset ({res['config']['n_shift_cases']} cases): {title}, "
                     f"mean over {nrep} repeat(s)")
            L.append("")
            L.append("| calibrator | clean (subset) | " + " | ".join(conds) + " |")
            L.append("|---|" + "---|" * (len(conds) + 1))
            for r in rows:
                cells = []
                for c in ["clean_subset", *conds]:
                    v = np.mean([rep["shift"][c][r][key] for rep in reps]) * scale
                    cells.append(format(v, fmt))
                L.append(f"| {r} | " + " | ".join(cells) + " |")
            L.append("")
    L.append("")
    L.append("Fit time (s, mean over repeats): " + ", ".join(
        f"{r} {np.mean([rep['fit_seconds'][r] for rep in reps]):.1f}" for r in rows if r != "none"))
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/segcal_med_calib", help="folder for results.json / table.md")
    ap.add_argument("--cache", default="/tmp/segcal_med_cache", help="prediction cache (not the repo)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibrators", nargs="+", default=None)
    ap.add_argument("--shifts", nargs="*", default=None)
    ap.add_argument("--severities", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--shift-cases", type=int, default=20, help="seeded subset of the test cases")
    ap.add_argument("--n-calib", type=int, default=None, help="first N calibration cases (debug)")
    ap.add_argument("--n-test", type=int, default=None, help="first N test cases (debug)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="2 calibration + 2 test cases, ts and "
                    "cmsap, one shift (gamma, severity 3), 1 repeat")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n_calib, args.n_test, args.repeats = 2, 2, 1
        args.calibrators = args.calibrators or QUICK_CALIBRATORS
        args.shifts = ["gamma"] if args.shifts is None else args.shifts
        args.severities = [3]
        args.shift_cases = 2
    calibrators = args.calibrators or list(CALIBRATORS)
    unknown = [c for c in calibrators if c not in CALIBRATORS]
    if unknown:
        ap.error(f"unknown calibrator row(s) {unknown}; choose from {list(CALIBRATORS)}")
    shifts = SHIFTS if args.shifts is None else args.shifts
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    from segcal.io.predictions import read_label
    from segcal.medical.hippocampus import dataset_dir, load_split
    from segcal.medical.unet import load_unet3d_hippocampus

    d = dataset_dir(args.data_root)
    split = load_split()
    calib_ids = list(split["calibration"])[: args.n_calib]
    test_ids = list(split["test"])[: args.n_test]
    img = lambda c: d / "imagesTr" / f"{c}.nii.gz"  # noqa: E731
    cache = Path(args.cache)
    model = load_unet3d_hippocampus()
    model.eval()
    t0 = time.perf_counter()
    predict_cached(model, {c: img(c) for c in calib_ids + test_ids}, cache / "clean")
    t_predict = time.perf_counter() - t0
    lab = {c: torch.from_numpy(read_label(d / "labelsTr" / f"{c}.nii.gz").astype(np.int64))[None]
           for c in calib_ids + test_ids}
    cal_logits = {c: load_logits(cache / "clean", c) for c in calib_ids}
    test_logits = [load_logits(cache / "clean", c) for c in test_ids]
    test_labels = [lab[c] for c in test_ids]
    for c in calib_ids + test_ids:
        z = cal_logits[c] if c in cal_logits else test_logits[test_ids.index(c)]
        if tuple(z.shape[2:]) != tuple(lab[c].shape[1:]):
            raise RuntimeError(f"{c}: logits {tuple(z.shape)} do not match label {tuple(lab[c].shape)}")

    # shifted test subset
    rng = np.random.default_rng(args.seed)
    n_sc = min(args.shift_cases, len(test_ids))
    shift_ids = sorted(rng.choice(test_ids, size=n_sc, replace=False).tolist()) if shifts else []
    conds = [f"{s}@{v}" for s in shifts for v in args.severities]
    shift_data: dict[str, tuple[list, list]] = {}
    t0 = time.perf_counter()
    if shifts:
        shift_data["clean_subset"] = ([test_logits[test_ids.index(c)] for c in shift_ids],
                                      [lab[c] for c in shift_ids])
        for s in shifts:
            for v in args.severities:
                name = f"{s}@{v}"
                paths = write_shifted({c: img(c) for c in shift_ids}, cache / "shift_images" / f"{s}_{v}_seed{args.seed}",
                                      s, v, args.seed)
                pdir = cache / "shift_pred" / f"{s}_{v}_seed{args.seed}"
                predict_cached(model, paths, pdir)
                shift_data[name] = ([load_logits(pdir, c) for c in shift_ids], [lab[c] for c in shift_ids])
    t_shift_predict = time.perf_counter() - t0
    print(f"predicted: {len(calib_ids)} calibration + {len(test_ids)} test cases ({t_predict:.0f} s), "
          f"{len(conds)} shift conditions x {len(shift_ids)} cases ({t_shift_predict:.0f} s)", flush=True)

    from segcal.calibrators import resolve

    properties = {r: {"translation_invariant": bool(resolve(CALIBRATORS[r][0]).translation_invariant),
                      "argmax_preserving": bool(resolve(CALIBRATORS[r][0]).argmax_preserving),
                      "objective": CALIBRATORS[r][1].get("objective", "nll")} for r in calibrators}
    repeats: list[dict] = []

    def write(final: bool, current: dict | None = None) -> None:
        """Write results.json / table.md (also after each calibrator: a killed run keeps its rows)."""
        wall = time.perf_counter() - t_start
        res = {
            "commit": git_commit(),
            "command": "python3 " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
            "wall_seconds": wall,
            "predict_seconds": t_predict,
            "shift_predict_seconds": t_shift_predict,
            "host": {"python": platform.python_version(), "torch": torch.__version__,
                     "threads": torch.get_num_threads()},
            "config": {
                "seed": args.seed, "n_calib": len(calib_ids), "n_test": len(test_ids),
                "n_fit": len(calib_ids) // 2 or len(calib_ids),
                "n_selection": len(calib_ids) - len(calib_ids) // 2,
                "repeats_requested": args.repeats, "repeats_done": len(repeats), "complete": final,
                "calibrators": calibrators,
                "calibrator_kwargs": {r: CALIBRATORS[r][1] for r in calibrators},
                "n_bins": N_BINS, "fg_radius": FG_RADIUS, "fg_structure": "cube (2r+1)^3",
                "shifts": shifts, "severities": args.severities, "shift_conditions": conds,
                "n_shift_cases": len(shift_ids), "shift_case_ids": shift_ids, "cache": str(cache),
            },
            "properties": properties,
            "repeats": repeats + ([current] if current is not None else []),
        }
        outd = Path(args.out)
        outd.mkdir(parents=True, exist_ok=True)
        (outd / "results.json").write_text(json.dumps(to_jsonable(res), indent=1))
        md = markdown(res)
        (outd / "table.md").write_text(md)
        if final:
            print(md)
        print(f"wall time {wall:.0f} s; wrote {outd / 'results.json'} and {outd / 'table.md'}")

    for rep in range(args.repeats):
        perm = np.random.default_rng(args.seed + rep).permutation(len(calib_ids))
        half = len(calib_ids) // 2
        fit_ids = [calib_ids[i] for i in perm[:half]] if half else list(calib_ids)
        sel_ids = [calib_ids[i] for i in perm[half:]]
        fit_b = [(cal_logits[c], lab[c]) for c in fit_ids]
        sel_b = [(cal_logits[c], lab[c]) for c in sel_ids]
        out = {"fit_ids": fit_ids, "selection_ids": sel_ids, "clean": {}, "shift": {k: {} for k in shift_data},
               "fit_seconds": {}, "fit_info": {}}
        out["clean"]["none"] = evaluate(None, test_logits, test_labels)
        for k, (zs, ys) in shift_data.items():
            out["shift"][k]["none"] = evaluate(None, zs, ys)
        for r in calibrators:
            t0 = time.perf_counter()
            cal, t_fit = fit_one(r, fit_b, sel_b, args.seed + rep)
            out["fit_seconds"][r] = t_fit
            out["fit_info"][r] = {k: v for k, v in cal.fit_info.items() if k != "stages"}
            out["clean"][r] = evaluate(cal, test_logits, test_labels)
            for k, (zs, ys) in shift_data.items():
                out["shift"][k][r] = evaluate(cal, zs, ys)
            e = out["clean"][r]
            print(f"[rep {rep}] {r:10s} fit {t_fit:6.1f}s total {time.perf_counter() - t0:6.1f}s "
                  f"ECE {e['ece'] * 100:.3f} fg-ECE {e['fg_ece'] * 100:.2f} NLL {e['nll']:.4f} "
                  f"Dice {e['dice_pooled_mean']:.4f} flip {e['flip_rate'] * 100:.3f}%", flush=True)
            write(final=False, current=out)
        repeats.append(out)
        write(final=rep == args.repeats - 1)

    return 0


if __name__ == "__main__":
    sys.exit(main())
