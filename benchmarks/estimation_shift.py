"""Label-free ECE estimation under covariate shift, and ECE-weighted pseudo-labels (issue 6).

Stages (run in order; each caches its outputs under ``--cache``, default /tmp/segcal_feat):

``cache``   run ``espnet-camvid`` on CamVid val (clean) and on a seeded subset of CamVid test,
            clean and corrupted (``segcal.shift.make_transform``), writing float16 logits (a
            prediction folder) and the pooled ``encoder.b3`` features (a feature folder) per
            condition; also ``espnet-cityscapes-camvid`` logits on CamVid train (pseudo-labels).
``eval``    train the estimators on the clean val images only (b3 features; logits-only), predict
            the test conditions, compare with the two label-free baselines against the true
            image-wise (top-label, 10-bin, void excluded) ECE; writes a JSON + markdown table.
``pseudo``  pseudo-label precision of the Cal-SFDA rule vs plain max-probability thresholding at
            equal coverage.

Example::

    nice -n 10 python3 benchmarks/estimation_shift.py cache
    python3 benchmarks/estimation_shift.py eval --json /tmp/segcal_feat/estimation_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segcal.data import data_root
from segcal.datasets import camvid_split
from segcal.datasets.folders import load_image
from segcal.estimation.features import FeatureExtractor, write_feature_map
from segcal.io import write_prediction
from segcal.io.predictions import write_folder_meta

CORRUPTIONS = ("gaussian_noise", "fog", "defocus_blur", "contrast")
SEVERITIES = (1, 3, 5)
N_TEST = 48
SEED = 0
LAYER = "encoder.b3"


def conditions() -> list[tuple[str, int]]:
    return [("clean", 0)] + [(c, s) for c in CORRUPTIONS for s in SEVERITIES]


def cond_name(c: str, s: int) -> str:
    return "clean" if c == "clean" else f"{c}-{s}"


def test_subset(root: Path) -> list:
    items = camvid_split(root, "test", check_sizes=False)
    rng = np.random.default_rng(SEED)
    idx = np.sort(rng.choice(len(items), size=N_TEST, replace=False))
    return [items[i] for i in idx]


def run_model(lm, items, out: Path, transform=None, layer: str | None = LAYER) -> None:
    pred_dir, feat_dir = out / "pred", out / "feat"
    if (pred_dir / "segcal.json").exists() and len(list(pred_dir.glob("*.npy"))) == len(items):
        print(f"  cached: {out}", flush=True)
        return
    pred_dir.mkdir(parents=True, exist_ok=True)
    fx = FeatureExtractor(lm.module, layer) if layer else None
    t0 = time.perf_counter()
    for it in items:
        if (pred_dir / f"{it.stem}.npy").exists() and (layer is None or (feat_dir / f"{it.stem}.npy").exists()):
            continue
        img = load_image(it.image_path)
        if transform is not None:
            img = transform(img, it.stem)
        x = lm.preprocess(img).to(lm.device)
        if fx is not None:
            logits, feats = fx(x)
            write_feature_map(feat_dir / f"{it.stem}.npy", feats[0])
        else:
            with torch.no_grad():
                logits = lm.module(x)
        write_prediction(pred_dir / f"{it.stem}.npy", logits[0].float().numpy(), dtype=np.float16)
    if fx is not None:
        fx.remove()
    write_folder_meta(
        pred_dir, input_type="logits", num_classes=lm.num_classes, ignore_index=lm.ignore_index,
        model=lm.name, n_images=len(items), labels=str(items[0].label_path.parent),
        transform=getattr(transform, "__name__", None if transform is None else repr(transform)),
    )
    print(f"  {out}: {len(items)} images in {time.perf_counter() - t0:.0f} s", flush=True)


def stage_cache(args: argparse.Namespace) -> None:
    from segcal.models import create_model
    from segcal.shift import make_transform

    root = Path(data_root())
    cache = Path(args.cache)
    lm = create_model("espnet-camvid", device="cpu")
    run_model(lm, camvid_split(root, "val", check_sizes=False), cache / "espnet-camvid" / "val-clean")
    sub = test_subset(root)
    for c, s in conditions():
        tf = None if c == "clean" else make_transform(c, s, seed=SEED)
        run_model(lm, sub, cache / "espnet-camvid" / f"test-{cond_name(c, s)}", tf)
    if args.with_train:
        lm2 = create_model("espnet-cityscapes-camvid", device="cpu")
        run_model(lm2, camvid_split(root, "train", check_sizes=False),
                  cache / "espnet-cityscapes-camvid" / "train-clean", layer=None)


IGNORE = 11  # CamVid void
N_BINS = 10


def load_condition(folder: Path, with_features: bool = True) -> dict:
    """Per-image true ECEs (top-label image ECE from CalibrationMetrics; class-level), baselines,
    logits-only inputs and features of one cached condition."""
    from segcal.estimation import ConfidenceBaseline, ece_targets, logit_features
    from segcal.estimation.features import read_feature_map
    from segcal.io import PredictionFolder
    from segcal.metrics import CalibrationMetrics

    meta = json.loads((folder / "pred" / "segcal.json").read_text())
    pf = PredictionFolder(folder / "pred", meta["labels"], strict=False)  # test subset
    cm = CalibrationMetrics(meta["num_classes"], n_bins=N_BINS, ignore_index=IGNORE)
    out: dict = {"stems": [], "class_level": [], "lx": [], "feat": [], "maxprob": [], "entropy": []}
    for stem, scores, lab, _ in pf:
        x = torch.from_numpy(np.asarray(scores, dtype=np.float32)).unsqueeze(0)
        y = torch.from_numpy(lab.astype(np.int64)).unsqueeze(0)
        cm.update(x, y)
        out["stems"].append(stem)
        out["class_level"].append(float(ece_targets(x, y, kind="class_level", ignore_index=IGNORE)[0]))
        out["lx"].append(logit_features(x)[0])
        for b in ("maxprob", "entropy"):
            out[b].append(float(ConfidenceBaseline(b).predict_scores(x)[0]))
        if with_features:
            out["feat"].append(read_feature_map(folder / "feat" / f"{stem}.npy"))
    res = cm.compute()
    out["image_ece"] = np.asarray(res["image_ece_values"], dtype=np.float64)
    out["class_level"] = np.asarray(out["class_level"])
    out["lx"] = torch.stack(out["lx"])
    out["feat"] = torch.stack(out["feat"]) if out["feat"] else None
    for b in ("maxprob", "entropy"):
        out[b] = np.asarray(out[b])
    out["accuracy"] = float(res["accuracy"])
    return out


def _agree(est: np.ndarray, true: np.ndarray) -> dict:
    from scipy import stats

    return {
        "mae": float(np.mean(np.abs(est - true))),
        "spearman": float(stats.spearmanr(est, true).statistic),
        "kendall": float(stats.kendalltau(est, true).statistic),
    }


def stage_eval(args: argparse.Namespace) -> None:
    from segcal.estimation import ECEEstimator

    cache = Path(args.cache) / "espnet-camvid"
    t0 = time.perf_counter()
    val = load_condition(cache / "val-clean")
    tests = {cond_name(c, s): load_condition(cache / f"test-{cond_name(c, s)}") for c, s in conditions()}
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    ests = {}
    for target in ("image", "class_level"):
        y = val["image_ece"] if target == "image" else val["class_level"]
        yt = torch.from_numpy(y).float()
        e = ECEEstimator(val["feat"].shape[1], meta={"layer": LAYER, "target": target, "model": "espnet-camvid"})
        ests[f"value-net features ({target})"] = ("feat", e.fit(val["feat"], yt, seed=SEED))
        el = ECEEstimator(val["lx"].shape[1], input_kind="logits", num_classes=val["lx"].shape[1] - 3,
                          meta={"target": target, "model": "espnet-camvid"})
        ests[f"value-net logits ({target})"] = ("lx", el.fit(val["lx"], yt, seed=SEED))
    if args.save_estimators:
        Path(args.save_estimators).mkdir(parents=True, exist_ok=True)
        for name, (_, e) in ests.items():
            tag = name.replace("value-net ", "").replace(" (", "_").replace(")", "")
            e.save(Path(args.save_estimators) / f"{tag}.pt")
    results: dict = {"conditions": {}, "config": {
        "n_val": len(val["stems"]), "n_test": N_TEST, "seed": SEED, "layer": LAYER, "n_bins": N_BINS,
        "truth": "top-label image-wise ECE (CalibrationMetrics, 10 bins, void excluded)"}}
    pooled: dict = {}
    for cname, d in tests.items():
        row = {"true_mean_ece": float(d["image_ece"].mean()), "accuracy": d["accuracy"]}
        preds = {"1 - mean max-prob": d["maxprob"], "mean entropy": d["entropy"]}
        for name, (key, e) in ests.items():
            preds[name] = e.predict(d[key])
        for name, v in preds.items():
            row[name] = _agree(v, d["image_ece"])
            row[name]["mean_estimate"] = float(v.mean())
            pooled.setdefault(name, ([], []))
            pooled[name][0].append(v)
            pooled[name][1].append(d["image_ece"])
        results["conditions"][cname] = row
    results["pooled"] = {n: _agree(np.concatenate(a), np.concatenate(b)) for n, (a, b) in pooled.items()}
    shifted = [c for c in tests if c != "clean"]
    results["pooled_shifted"] = {
        n: _agree(np.concatenate([a[i] for i, c in enumerate(tests) if c != "clean"]),
                  np.concatenate([b[i] for i, c in enumerate(tests) if c != "clean"]))
        for n, (a, b) in pooled.items()}
    # condition-level ranking: does the mean estimate order the 13 conditions like the true mean?
    results["condition_ranking"] = {
        n: _agree(np.array([results["conditions"][c][n]["mean_estimate"] for c in tests]),
                  np.array([results["conditions"][c]["true_mean_ece"] for c in tests]))
        for n in pooled}
    results["fit_info"] = {n: e.fit_info for n, (_, e) in ests.items()}
    results["shifted_conditions"] = shifted
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    names = list(results["pooled"])
    print("| condition | true ECE | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for c, row in results["conditions"].items():
        cells = [f"{row[n]['mae']:.4f} / {row[n]['spearman']:.2f} / {row[n]['kendall']:.2f}" for n in names]
        print(f"| {c} | {row['true_mean_ece']:.4f} | " + " | ".join(cells) + " |")
    for key in ("pooled", "pooled_shifted", "condition_ranking"):
        cells = [f"{results[key][n]['mae']:.4f} / {results[key][n]['spearman']:.2f} / {results[key][n]['kendall']:.2f}"
                 for n in names]
        print(f"| **{key}** | | " + " | ".join(cells) + " |")


def stage_pseudo(args: argparse.Namespace) -> None:
    """Cal-SFDA pseudo-labels vs max-probability thresholding at equal coverage (CamVid train,
    Cityscapes->CamVid ESPNet; the train labels are used for the precision only)."""
    from segcal.estimation import (
        ConfidenceBaseline,
        class_thresholds,
        estimate_images,
        maxprob_pseudo_labels,
        maxprob_threshold_for_coverage,
        proportion_schedule,
        pseudo_label,
    )
    from segcal.estimation.pseudolabels import pseudo_label_precision
    from segcal.io import PredictionFolder

    folder = Path(args.cache) / "espnet-cityscapes-camvid" / "train-clean" / "pred"
    meta = json.loads((folder / "segcal.json").read_text())
    pf = PredictionFolder(folder, meta["labels"])

    def scores():
        for it in pf.items:
            yield torch.from_numpy(np.asarray(pf.read(it)[0], dtype=np.float32))

    # the value nets of ``eval`` were trained for espnet-camvid's 12 outputs (11 + void); this model
    # has 11, so the estimator refuses it: the label-free "1 - mean max-prob" estimate weights here
    est = ConfidenceBaseline("maxprob")
    ece = [float(estimate_images(est, s[None])[0]) for s in scores()]
    labels = [pf.read(it)[1] for it in pf.items]
    results: dict = {"n_images": len(pf), "mean_estimated_ece": float(np.mean(ece)), "estimator": "1 - mean max-prob", "rounds": {}}
    for r in (0, 2):
        prop, local = proportion_schedule(r)
        for wname, w in (("ece-weighted", ece), ("unweighted", None)):
            thr, _ = class_thresholds(scores(), prop=prop, ece=w)
            tot = np.zeros(3, dtype=np.int64)
            npx = lab_px = 0
            for s, y in zip(scores(), labels, strict=True):
                pl, _ = pseudo_label(s, thr, local_prop=local)
                tot += pseudo_label_precision(pl, y, label_ignore=IGNORE)
                npx += pl.size
                lab_px += int((pl != 255).sum())
            cov = lab_px / npx
            t = maxprob_threshold_for_coverage(scores(), cov)
            base = np.zeros(3, dtype=np.int64)
            for s, y in zip(scores(), labels, strict=True):
                base += pseudo_label_precision(maxprob_pseudo_labels(s, t), y, label_ignore=IGNORE)
            row = {"prop": prop, "local_prop": local, "coverage": cov, "precision": tot[0] / tot[1],
                   "maxprob_threshold": t, "maxprob_precision": base[0] / base[1],
                   "thresholds": thr.tolist()}
            results["rounds"][f"round{r}-{wname}"] = row
            print(f"round {r} {wname}: coverage {cov:.4f} precision {row['precision']:.4f} vs max-prob "
                  f"{row['maxprob_precision']:.4f} (thr {t:.4f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["cache", "eval", "pseudo"])
    ap.add_argument("--cache", default="/tmp/segcal_feat")
    ap.add_argument("--with-train", action="store_true", help="cache: also the Cityscapes->CamVid train logits")
    ap.add_argument("--json", default=None)
    ap.add_argument("--save-estimators", default=None, help="eval: save the fitted estimators here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"cache": stage_cache, "eval": stage_eval, "pseudo": stage_pseudo}[args.stage](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
