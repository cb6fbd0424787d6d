"""Conformal risk control on real data: CamVid (ESPNet) and MSD hippocampus (3D U-Net), issue 18.

One command reproduces every number of ``docs/conformal.md``::

    nice -n 10 python3 benchmarks/conformal_experiments.py --out /tmp/conformal_exp     # full
    python3 benchmarks/conformal_experiments.py --quick --out /tmp/conformal_quick       # seconds

Protocol (the image or volume is the exchangeable unit, never the pixel):

1. **Predictions.** CamVid: ESPNet (``espnet-camvid``) logits of the val (101) and test (233)
   images from the bench cache (:class:`segcal.bench.cache.PredictionCache`, the one ``segcal
   bench`` fills; missing files are predicted). Hippocampus: the committed ``unet3d-hippocampus``
   weights, predictions of the committed split's 50 calibration and 50 test cases
   (:func:`segcal.bench.hippocampus.ensure_predictions`, cached like ``segcal bench --dataset
   hippocampus``; read back by :func:`segcal.bench.hippocampus.read_cases`, shape and affine
   checked).
2. **Calibrators underneath** (``segcal.calibrators.create(name).fit``): TS and CMSop, fitted on
   data disjoint from the conformal pool: CamVid val pixels (``--fit-pixels`` random valid pixels
   per image), the hippocampus calibration cases (every voxel). "none" = softmax of the logits.
3. **Per-image loss tables**, one streaming pass per dataset (:func:`segcal.conformal.image_row`,
   the function :func:`segcal.conformal.loss_table` uses): for every calibrator and risk, the loss
   and set size / mask volume of each pool image over a λ grid, and the pixel weight of the image
   (valid pixels for miscoverage, class-K pixels for FNR) for the pixel-pooled baseline.
   Risks: CamVid miscoverage of the pixel sets and the Pedestrian FNR; hippocampus the anterior
   (class 1) and posterior (class 2) FNR.
4. **Random splits** of the pool images (``--splits``, paired across calibrators), calibration
   half / test half:

   * CRC (:func:`segcal.conformal.crc_index`): realised risk = mean test-half loss at λ̂; its mean
     over splits estimates ``E[L_{n+1}(λ̂)]``, the guaranteed quantity (the test image is uniform
     over the held-out ones), with the Monte-Carlo standard error ``std / sqrt(splits)``.
   * LTT (:func:`segcal.conformal.ltt_index`): violation = test-half risk above α, frequency over
     the splits (the test half is a finite sample, so this also counts its own noise); and, the
     setting where the guarantee is exact, calibration sets drawn iid (with replacement) from the
     pool with the pool mean as the true risk. Where no λ is certified, the trivial λ = 1 is used
     and counted.
   * pixel-pooled threshold: the same finite-sample rule on the pooled pixels of the calibration
     half (``(W R_pix(λ) + 1) / (W + 1) <= α``, ``W`` pooled pixels, ``R_pix`` the pooled pixel
     rate): not image-exchangeable, shown against the image-level target.

Writes ``results.json``, ``results.md`` (the tables of docs/conformal.md) and ``hist.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import torch

import segcal.calibrators as sc
from segcal.bench.cache import PredictionCache, default_cache_dir, environment, git_commit
from segcal.bench.camvid import find_camvid
from segcal.bench.hippocampus import ensure_predictions, find_hippocampus, read_cases
from segcal.bench.spec import CAMVID_IGNORE
from segcal.conformal import as_probabilities, crc_index, image_row, ltt_index
from segcal.datasets.camvid import CAMVID_CLASSES, camvid_split
from segcal.datasets.hippocampus import load_split
from segcal.errors import InputError
from segcal.io import atomic_write, read_label, read_prediction, to_jsonable

ALPHAS = (0.05, 0.1, 0.2)
DELTAS = (0.05, 0.1)
CALIBRATORS = ("none", "ts", "cmsop")
#: --quick: (fit images, pool images) per dataset; CMSop left out (its fit and map are the slow part)
QUICK = {"camvid": (3, 12), "hippocampus": (6, 14)}
PEDESTRIAN = CAMVID_CLASSES.index("Pedestrian")
Item = tuple[str, np.ndarray, np.ndarray]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ data
def camvid_items(folder: Path, items: list[Any]) -> Iterator[Item]:
    """``(stem, logits (C, H, W) float32, labels (H, W) int64)`` of cached CamVid predictions."""
    for it in items:
        z, _ = read_prediction(folder / f"{it.stem}.npy")
        yield it.stem, np.asarray(z, dtype=np.float32), np.asarray(read_label(it.label_path), dtype=np.int64)


def camvid_data(quick: bool) -> tuple[Any, ...]:
    """Val and test items, streamed from the bench cache (one image in memory at a time)."""
    root, _ = find_camvid(None)
    cache = PredictionCache(default_cache_dir("bench"))
    loaded: dict[str, Any] = {}
    out: list[Any] = []
    for split, limit in (("val", QUICK["camvid"][0] if quick else None), ("test", QUICK["camvid"][1] if quick else None)):
        items = camvid_split(root, split)[:limit]
        folder = cache.ensure(cache.key("espnet-camvid", split), "espnet-camvid", items, None, root, loaded)
        out += [camvid_items(folder, items), len(items)]
    return tuple(out)


def hippocampus_data(quick: bool) -> tuple[list[Item], list[Item]]:
    d = find_hippocampus(None)
    split = load_split()
    n_fit, n_pool = QUICK["hippocampus"] if quick else (None, None)
    calib, test = split["calibration"][:n_fit], split["test"][:n_pool]
    pred = default_cache_dir("bench-hippocampus") / "clean"
    counts: dict[str, float] = {"predicted": 0, "reused": 0, "predict_s": 0.0}
    ensure_predictions({}, {c: d / "imagesTr" / f"{c}.nii.gz" for c in calib + test}, pred, counts)
    cases = [[(c.stem, c.logits, c.labels) for c in read_cases(pred, d / "labelsTr", ids)] for ids in (calib, test)]
    return cases[0], cases[1]


def fit_calibrators(fit_items: Iterable[Item], ignore: int | None, per_image: int | None,
                    names: tuple[str, ...] = CALIBRATORS, seed: int = 0) -> dict[str, sc.Calibrator | None]:
    """TS and CMSop fitted on (a seeded per-image sample of) the valid pixels of ``fit_items``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _, z, y in fit_items:
        zz, yy = z.reshape(z.shape[0], -1), y.reshape(-1)
        idx = np.flatnonzero(yy != ignore) if ignore is not None else np.arange(yy.size)
        if per_image is not None and idx.size > per_image:
            idx = rng.choice(idx, per_image, replace=False)
        xs.append(zz[:, idx].T)
        ys.append(yy[idx])
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    out: dict[str, sc.Calibrator | None] = {"none": None}
    for name in names[1:]:
        t0 = time.perf_counter()
        out[name] = sc.create(name).fit(x, y)
        log(f"fitted {name} on {x.shape[0]} pixels in {time.perf_counter() - t0:.1f} s")
    return out


def build_tables(items: Iterable[Item], cals: dict[str, sc.Calibrator | None], risks: dict[str, int | None],
                 grid: np.ndarray, ignore: int | None) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """One streaming pass: ``tables[calibrator][risk] = {losses, sizes, weights}`` (rows = images).

    ``risks`` maps a name to the FNR class (``None`` = miscoverage of the pixel sets).
    """
    acc: dict[str, dict[str, dict[str, list]]] = {c: {r: {"losses": [], "sizes": [], "weights": []} for r in risks}
                                                  for c in cals}
    stems = []
    for stem, z, y in items:
        stems.append(stem)
        valid = np.ones(y.shape, bool) if ignore is None else y != ignore
        for cname, cal in cals.items():
            p = as_probabilities(z, "logits", cal, stem)
            for rname, k in risks.items():
                risk = "miscoverage" if k is None else "fnr"
                loss, size, nv = image_row(p, y, grid, risk, class_index=k, ignore_index=ignore)
                a = acc[cname][rname]
                a["losses"].append(loss)
                a["sizes"].append(size)
                a["weights"].append(nv if k is None else int((valid & (y == k)).sum()))
    return {c: {r: {key: np.asarray(v, dtype=np.float64) for key, v in d.items()} | {"stems": stems}
                for r, d in per.items()} for c, per in acc.items()}


# ------------------------------------------------------------------------------ splits
def pooled_index(losses: np.ndarray, weights: np.ndarray, alpha: float) -> int:
    """The pixel-pooled threshold: the finite-sample rule on the pooled pixels (not image-exchangeable)."""
    w = weights.sum()
    if w == 0:
        return 0
    rate = (losses * weights[:, None]).sum(axis=0) / w
    ok = np.flatnonzero(w * rate + 1.0 <= alpha * (w + 1.0))
    return int(ok[0]) if ok.size else losses.shape[1] - 1


def mean_se(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0,
            "n": int(x.size)}


def split_experiment(t: dict[str, np.ndarray], grid: np.ndarray, n_cal: int, n_splits: int,
                     seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """CRC, LTT and pixel-pooled thresholds over ``n_splits`` random splits (same splits for the same seed)."""
    L, S, w = t["losses"], t["sizes"], t["weights"]
    n = L.shape[0]
    perms = np.stack([np.random.default_rng([seed, s]).permutation(n) for s in range(n_splits)])
    draws = np.random.default_rng([seed, 10**6]).integers(0, n, (n_splits, n_cal))
    pool_risk = L.mean(axis=0)
    out: dict[str, Any] = {"n_pool": n, "n_cal": n_cal, "n_test": n - n_cal, "n_splits": n_splits}
    hists: dict[str, np.ndarray] = {}
    for a in ALPHAS:
        crc, crc_s, crc_lam, pooled, pooled_s = (np.full(n_splits, np.nan) for _ in range(5))
        refused = 0
        for s in range(n_splits):
            cal, test = perms[s, :n_cal], perms[s, n_cal:]
            try:
                j = crc_index(L[cal], a)
                crc[s], crc_s[s], crc_lam[s] = L[test, j].mean(), S[test, j].mean(), grid[j]
            except InputError:
                refused += 1
            jp = pooled_index(L[cal], w[cal], a)
            pooled[s], pooled_s[s] = L[test, jp].mean(), S[test, jp].mean()
        row: dict[str, Any] = {
            "crc": {"risk": mean_se(crc), "size": mean_se(crc_s), "lambda": mean_se(crc_lam), "refused": refused,
                    "split_above_alpha": float(np.mean(crc[np.isfinite(crc)] > a)) if refused < n_splits else None},
            "pooled": {"risk": mean_se(pooled), "size": mean_se(pooled_s),
                       "split_above_alpha": float(np.mean(pooled > a))},
            "ltt": {},
        }
        hists[f"crc@{a}"], hists[f"pooled@{a}"] = crc, pooled
        for d in DELTAS:
            r_split, s_split, r_iid = np.empty(n_splits), np.empty(n_splits), np.empty(n_splits)
            unc_split = unc_iid = 0
            for s in range(n_splits):
                cal, test = perms[s, :n_cal], perms[s, n_cal:]
                try:
                    j = ltt_index(L[cal], a, d)
                except InputError:
                    j, unc_split = grid.size - 1, unc_split + 1
                r_split[s], s_split[s] = L[test, j].mean(), S[test, j].mean()
                try:
                    j = ltt_index(L[draws[s]], a, d)
                except InputError:
                    j, unc_iid = grid.size - 1, unc_iid + 1
                r_iid[s] = pool_risk[j]
            hists[f"ltt@{a},{d}"] = r_split
            row["ltt"][str(d)] = {
                "risk": mean_se(r_split), "size": mean_se(s_split),
                "violations_split": float(np.mean(r_split > a)), "violations_iid": float(np.mean(r_iid > a)),
                "mean_true_risk_iid": float(r_iid.mean()), "uncertified_split": unc_split, "uncertified_iid": unc_iid,
            }
        out[str(a)] = row
    return out, hists


# ------------------------------------------------------------------------------ outputs
def fmt(ms: dict[str, float], digits: int = 4) -> str:
    return "—" if not ms["n"] else f"{ms['mean']:.{digits}f} ± {ms['se']:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/conformal.md: one row per (dataset, risk, α[, δ]), calibrators side by side."""
    exps = results["experiments"]
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for key, e in exps.items():
        ds, risk, cal = key.split("/")
        groups.setdefault((ds, risk), {})[cal] = e
    cals = [c for c in CALIBRATORS if any(c in g for g in groups.values())]
    extra = [POOL100] if any(POOL100 in g for g in groups.values()) else []

    def pool_note(g: dict[str, Any], cal: str) -> str:
        e = g[cal]
        return f"{e['n_pool']} ({e['n_cal']} / {e['n_test']})"

    crc = ["| dataset | risk | α | pool (cal / test) | " + " | ".join(f"CRC risk ± MC s.e., {c}" for c in cals)
           + " | " + " | ".join(f"size, {c}" for c in cals) + " |", "|---|---|---|---|" + "---|" * (2 * len(cals))]
    pooled = ["| dataset | risk | α | image-level CRC risk ± s.e. (none) | pixel-pooled risk ± s.e. (none) | "
              "pooled splits above α | pooled size | CRC size |", "|---|---|---|---|---|---|---|---|"]
    ltt = ["| dataset | risk | α | δ | " + " | ".join(f"violations split / iid, {c}" for c in cals) + " | "
           + " | ".join(f"risk, {c}" for c in cals) + " | " + " | ".join(f"size, {c}" for c in cals)
           + " | uncertified splits |", "|---|---|---|---|" + "---|" * (3 * len(cals) + 1)]
    for (ds, risk), g in groups.items():
        rows = [(c, g[c]) for c in cals if c in g]
        for a in ALPHAS:
            r = {c: e[str(a)] for c, e in rows}
            refused = sum(x["crc"]["refused"] for x in r.values())
            crc.append(f"| {ds} | {risk} | {a} | {pool_note(g, cals[0])} | "
                       + " | ".join(fmt(r[c]["crc"]["risk"]) for c in cals) + " | "
                       + " | ".join(fmt(r[c]["crc"]["size"], 3) for c in cals) + " |"
                       + (f" CRC refused in {refused} splits" if refused else ""))
            for c in [cals[0], *extra]:
                if c not in g:
                    continue
                x = g[c][str(a)]
                label = risk if c == cals[0] else f"{risk}, pool {pool_note(g, c)}"
                pooled.append(f"| {ds} | {label} | {a} | {fmt(x['crc']['risk'])} | {fmt(x['pooled']['risk'])} | "
                              f"{x['pooled']['split_above_alpha']:.3f} | {fmt(x['pooled']['size'], 3)} | "
                              f"{fmt(x['crc']['size'], 3)} |")
            for d in DELTAS:
                t = {c: r[c]["ltt"][str(d)] for c in cals}
                unc = ", ".join(f"{c} {t[c]['uncertified_split']}" for c in cals if t[c]["uncertified_split"])
                ltt.append(f"| {ds} | {risk} | {a} | {d} | "
                           + " | ".join(f"{t[c]['violations_split']:.3f} / {t[c]['violations_iid']:.3f}" for c in cals)
                           + " | " + " | ".join(f"{t[c]['risk']['mean']:.4f}" for c in cals) + " | "
                           + " | ".join(f"{t[c]['size']['mean']:.3f}" for c in cals) + f" | {unc or '0'} |")
        for c in extra:
            if c in g:
                for a in ALPHAS:
                    x = g[c][str(a)]
                    crc.append(f"| {ds} | {risk}, pool {pool_note(g, c)} | {a} | none only | {fmt(x['crc']['risk'])} |"
                               + " |" * (len(cals) - 1) + f" {fmt(x['crc']['size'], 3)} |" + " |" * (len(cals) - 1))
                    for d in DELTAS:
                        t = x["ltt"][str(d)]
                        ltt.append(f"| {ds} | {risk}, pool {pool_note(g, c)} | {a} | {d} | "
                                   f"{t['violations_split']:.3f} / {t['violations_iid']:.3f} |" + " |" * (len(cals) - 1)
                                   + f" {t['risk']['mean']:.4f} |" + " |" * (len(cals) - 1)
                                   + f" {t['size']['mean']:.3f} |" + " |" * (len(cals) - 1)
                                   + f" {t['uncertified_split']} |")
    env = results["environment"]
    head = (f"Run {results['date']}, git {results['git']}, splits {results['seconds']:.0f} s; {results['n_splits']} "
            f"random splits per row (paired across calibrators); grid of {results['grid_size']} values of λ in [0, 1]; "
            f"python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, {env['cpus']} CPUs.\n")
    return (head + "\n### CRC: mean realised risk (± Monte-Carlo s.e.) and mean set size / mask volume\n\n"
            + "\n".join(crc) + "\n\n### Learn-then-Test (Hoeffding–Bentkus): violation frequency, mean realised risk, "
            "size\n\n" + "\n".join(ltt) + "\n\n### Pixel-pooled threshold vs image-level CRC (no calibrator)\n\n"
            + "\n".join(pooled) + "\n")


def plot(hists: dict[str, dict[str, np.ndarray]], path: Path, alphas: tuple[float, ...] = (0.1, 0.2)) -> None:
    """Histograms of the realised test-half risks over the splits: one panel per (α, dataset/risk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in hists if k.endswith("/none")]
    fig, axes = plt.subplots(len(alphas), len(panels), figsize=(4.2 * len(panels), 3.2 * len(alphas)), squeeze=False)
    for row, alpha in enumerate(alphas):
        for ax, key in zip(axes[row], panels, strict=True):
            base = key.rsplit("/", 1)[0]
            series = [(f"CRC {c}", hists[f"{base}/{c}"][f"crc@{alpha}"]) for c in CALIBRATORS if f"{base}/{c}" in hists]
            series += [("LTT none δ=0.1", hists[key][f"ltt@{alpha},0.1"]),
                       ("pixel-pooled none", hists[key][f"pooled@{alpha}"])]
            vals = np.concatenate([v[np.isfinite(v)] for _, v in series])
            bins = np.linspace(vals.min(), max(vals.max(), alpha), 40) if vals.size else 10
            for label, v in series:
                ax.hist(v[np.isfinite(v)], bins=bins, histtype="step", label=label)
            ax.axvline(alpha, color="k", ls="--", lw=1)
            ax.set_title(f"{base.replace('/', ': ')}, α = {alpha}", fontsize=9)
            ax.set_xlabel("realised risk on the test half", fontsize=8)
        axes[row][0].set_ylabel("splits")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ driver
#: the share of a pool's images used for calibration in each split
CAL_SHARE = {"camvid": 0.5, "hippocampus": 0.7}
KEYS = ("losses", "sizes", "weights")


def build_all(quick: bool, grid: np.ndarray, fit_pixels: int, datasets: list[str]) -> dict[str, Any]:
    """``tables[dataset][calibrator][risk] = {losses, sizes, weights}``: the one streaming pass per dataset."""
    tables: dict[str, Any] = {}
    names = CALIBRATORS[:2] if quick else CALIBRATORS
    if "camvid" in datasets:
        val, n_val, test, n_test = camvid_data(quick)
        log(f"camvid: {n_val} val, {n_test} test images (streamed)")
        cals = fit_calibrators(val, CAMVID_IGNORE, fit_pixels, names)
        t0 = time.perf_counter()
        tables["camvid"] = build_tables(test, cals, {"miscoverage": None, "fnr-pedestrian": PEDESTRIAN}, grid,
                                        CAMVID_IGNORE)
        log(f"camvid tables in {time.perf_counter() - t0:.1f} s")
    if "hippocampus" in datasets:
        calib, test = hippocampus_data(quick)
        log(f"hippocampus: {len(calib)} calibration (fit) cases, {len(test)} pool cases")
        cals = fit_calibrators(calib, None, None, names)
        risks = {"fnr-anterior": 1, "fnr-posterior": 2}
        t0 = time.perf_counter()
        tables["hippocampus"] = build_tables(test, cals, risks, grid, None)
        tables["hippocampus"][POOL100] = build_tables(calib + test, {"none": None}, risks, grid, None)["none"]
        log(f"hippocampus tables in {time.perf_counter() - t0:.1f} s")
    return tables


POOL100 = "none (pool: calibration + test cases)"


def save_tables(tables: dict[str, Any], path: Path, grid: np.ndarray) -> None:
    arrays = {f"{ds}|{c}|{r}|{k}": d[k] for ds, per in tables.items() for c, rs in per.items()
              for r, d in rs.items() for k in KEYS}
    with atomic_write(path) as fh:
        np.savez_compressed(fh, grid=grid, **arrays)


def load_tables(path: Path) -> tuple[dict[str, Any], np.ndarray]:
    tables: dict[str, Any] = {}
    with np.load(path) as z:
        for key in z.files:
            if key == "grid":
                continue
            ds, c, r, k = key.split("|")
            tables.setdefault(ds, {}).setdefault(c, {}).setdefault(r, {})[k] = z[key]
        return tables, z["grid"]


def run(quick: bool, out: Path, n_splits: int, grid_size: int, fit_pixels: int, datasets: list[str],
        seed: int = 0, from_tables: list[Path] | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if from_tables:
        tables, grid = {}, None
        for path in from_tables:  # e.g. one file per dataset, built by separate runs
            more, g = load_tables(path)
            if grid is not None and not np.array_equal(g, grid):
                raise InputError(f"--from-tables: {path} has another lambda grid")
            tables, grid = tables | more, g
    else:
        grid = np.linspace(0.0, 1.0, grid_size)
        tables = build_all(quick, grid, fit_pixels, datasets)
        save_tables(tables, out / "tables.npz", grid)
    experiments: dict[str, Any] = {}
    hists: dict[str, dict[str, np.ndarray]] = {}
    for ds, per in tables.items():
        for cal, rs in per.items():
            for risk, t in rs.items():
                t0 = time.perf_counter()
                key = f"{ds}/{risk}/{cal}"
                n_cal = round(CAL_SHARE[ds] * t["losses"].shape[0])
                experiments[key], hists[key] = split_experiment(t, grid, n_cal, n_splits, seed)
                log(f"{key}: {n_splits} splits in {time.perf_counter() - t0:.1f} s")
    experiments = dict(sorted(experiments.items(), key=lambda kv: (kv[0].split("/")[0], kv[0].split("/")[1])))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_commit(),
               "environment": environment(), "quick": quick, "n_splits": n_splits, "grid_size": int(grid.size),
               "fit_pixels_per_val_image": fit_pixels, "seconds": time.perf_counter() - t_start,
               "experiments": experiments}
    with atomic_write(out / "results.json", "w") as fh:
        json.dump(to_jsonable(results), fh, indent=1)
    with atomic_write(out / "results.md", "w") as fh:
        fh.write(markdown(results))
    plot(hists, out / "hist.png")
    log(f"wrote {out}/results.json, results.md, hist.png{'' if from_tables else ', tables.npz'} "
        f"({results['seconds']:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/conformal_experiments"))
    ap.add_argument("--quick", action="store_true",
                    help="12 CamVid / 14 hippocampus pool images, no CMSop, grid of 201, 100 splits (the test's path)")
    ap.add_argument("--splits", type=int, default=None, help="random splits per row (default 1000; quick 100)")
    ap.add_argument("--grid-size", type=int, default=None, help="lambda values in [0, 1] (default 1001; quick 201)")
    ap.add_argument("--fit-pixels", type=int, default=2000,
                    help="valid pixels per CamVid val image for TS/CMSop (default 2000: 202,000 in all)")
    ap.add_argument("--datasets", nargs="+", default=["camvid", "hippocampus"], choices=["camvid", "hippocampus"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--from-tables", type=Path, nargs="+", default=None,
                    help="tables.npz of earlier runs (e.g. one per --datasets): redo the splits only (no data read)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    n_splits = a.splits or (100 if a.quick else 1000)
    run(a.quick, a.out, n_splits, a.grid_size or (201 if a.quick else 1001), a.fit_pixels,
        a.datasets, from_tables=a.from_tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
