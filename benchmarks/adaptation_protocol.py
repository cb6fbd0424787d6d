"""Evaluate ``segcal adapt`` runs on CamVid test (issue 9 protocols; labels of *test* only).

For every run folder under ``--runs`` (a folder holding ``adapt_log.json``), evaluate the source
model once, the selected checkpoint and (``--all-checkpoints``) every epoch on CamVid test, under
the same corruption as the adaptation for protocol 1. Metrics: mIoU, image-wise ECE (10 bins,
void excluded), pooled ECE, NLL. With ``--all-checkpoints`` each run also gets a summary: the
selected epoch, the last epoch, the epoch with the best test mIoU in hindsight (``oracle_epoch``),
the one with the best test image ECE (``oracle_ece_epoch``) and the one with the lowest estimated
target ECE (``est_argmin_epoch``: what ECE selection would have kept, also for the baselines).
Runs named ``<group>_s<seed>`` are aggregated over seeds (mean ± sample std) per group.

``--rescore-estimator EST`` also scores every evaluated checkpoint with another ECE estimator on
the run's own target images (the stems in its log, corrupted as in the run, with the run's seed;
still no target label), so that selection by a different estimator can be compared on the same
checkpoints (``rescore_argmin_epoch``), e.g. a logits estimator that sees decoder training where
the features estimator hooked in the frozen encoder cannot.

The test images are corrupted once and kept in memory. Runs can be evaluated separately
(``--no-source``, one ``--json`` each, e.g. in parallel) and merged afterwards with ``--merge``,
which only aggregates and prints the tables.

Example (protocol 1, after the ``segcal adapt`` commands of ``docs/adaptation.md``)::

    python3 benchmarks/adaptation_protocol.py --runs /tmp/adapt_p1 --model espnet-camvid \\
        --corruption gaussian_noise --severity 3 --all-checkpoints --json /tmp/adapt_p1/eval.json
    # or: the source model alone, then each run, then merge
    python3 benchmarks/adaptation_protocol.py --model espnet-camvid --corruption gaussian_noise \\
        --severity 3 --json src.json
    python3 benchmarks/adaptation_protocol.py --runs /tmp/adapt_p1/calsfda_s0 --no-source ... --json r0.json
    python3 benchmarks/adaptation_protocol.py --merge src.json r0.json ... --json eval.json

Protocol 2: ``--model espnet-cityscapes --mapping cityscapes-camvid`` (the adapted 20-class model
is evaluated through the Cityscapes->CamVid mapping, 11 classes, void ignored).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segcal.adaptation import (
    estimate_target_ece,
    load_checkpoint,
    quick_subset,
    resolve_target_images,
)
from segcal.datasets import camvid_split
from segcal.datasets.folders import load_image
from segcal.metrics import CalibrationMetrics
from segcal.models import ClassMapping, MappedModel, create_model
from segcal.models.espnet import CITYSCAPES_TO_CAMVID

N_BINS = 10
VOID = 11
METRICS = ("miou", "image_ece", "ece", "nll", "accuracy")
SEED_SUFFIX = re.compile(r"_s\d+$")


def load_items(items, transform) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Test images (corrupted once, kept in memory) and their labels: evaluated many times."""
    out = []
    for it in items:
        img = load_image(it.image_path)
        if transform is not None:
            img = np.asarray(transform(img, it.stem), dtype=np.uint8)
        out.append((img, torch.from_numpy(it.load_label().astype(np.int64)).unsqueeze(0)))
    return out


def evaluate(module, preprocess, data, num_classes: int) -> dict:
    cm = CalibrationMetrics(num_classes, n_bins=N_BINS, ignore_index=VOID, per_image=True)
    module.eval()
    for img, lab in data:
        with torch.no_grad():
            logits = module(preprocess(img))
        cm.update(logits, lab)
    r = cm.compute()
    return {k: float(r[k]) for k in METRICS}


def spread(seq: list, n: int | None) -> list:
    """At most ``n`` items evenly spread over ``seq``: the subset ``segcal adapt --max-images`` takes
    (its own helper), all of ``seq`` when ``n`` is ``None``."""
    return list(seq) if not n else quick_subset(list(seq), n)


def load_targets(log: dict, args, preprocess) -> list[torch.Tensor]:
    """The run's target images (images only), corrupted as in the run, as batches of 4."""
    paths = spread(resolve_target_images("camvid:train"), log["config"].get("max_images"))
    by_stem = {p.stem: p for p in paths}
    if sorted(by_stem) != sorted(log["images"]):
        raise SystemExit("rescore: the run's target images are not a CamVid train subset this script can rebuild")
    transform = None
    if args.corruption:
        from segcal.shift import make_transform

        transform = make_transform(args.corruption, args.severity, log["config"]["seed"])
    xs = []
    for stem in log["images"]:
        img = load_image(by_stem[stem])
        if transform is not None:
            img = np.asarray(transform(img, stem), dtype=np.uint8)
        xs.append(preprocess(img))
    return [torch.cat(xs[i:i + 4], 0) for i in range(0, len(xs), 4)]


def run_summary(res: dict, log: dict) -> dict:
    """Selected / last / oracle (best test mIoU in hindsight) / estimated-ECE-argmin checkpoints of one run."""
    eps = {int(k): v for k, v in res["epochs"].items()}
    s = {"method": res["method"], "seed": log["config"]["seed"], "lr": log["config"]["lr"],
         "selected_epoch": res["selected_epoch"], "selection_rule": log.get("selection_rule"),
         "initial_estimated_ece": log.get("initial_estimated_ece"),
         "seconds": log["epochs"][-1]["seconds"] if log["epochs"] else None}
    if len(eps) > 1:
        last = max(eps)
        est = {e: eps[e]["estimated_ece"] for e in eps if eps[e]["estimated_ece"] is not None}
        s["last_epoch"] = last
        s["oracle_epoch"] = max(eps, key=lambda e: (eps[e]["miou"], -e))  # best test mIoU in hindsight
        s["oracle_ece_epoch"] = min(eps, key=lambda e: (eps[e]["image_ece"], e))  # best test image ECE
        if est:
            s["est_argmin_epoch"] = min(est, key=lambda e: (est[e], e))  # what ECE selection would pick
        resc = {e: eps[e]["rescored_ece"] for e in eps if eps[e].get("rescored_ece") is not None}
        if resc:
            s["rescore_argmin_epoch"] = min(resc, key=lambda e: (resc[e], e))
    return s


def aggregate(runs: dict) -> dict:
    """Mean and std over the seeds of each group (run folder name without ``_s<seed>``)."""
    groups: dict = {}
    for name, r in runs.items():
        groups.setdefault(SEED_SUFFIX.sub("", name), []).append(r)
    out = {}
    for g, rs in sorted(groups.items()):
        rows: dict = {}

        def add(key, vals, rows=rows):
            vals = [v for v in vals if v is not None]
            if vals:
                rows[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1
                             else float("nan"), "n": len(vals), "values": vals}

        for m in (*METRICS, "estimated_ece"):
            add(f"selected.{m}", [r["epochs"][str(r["summary"]["selected_epoch"])].get(m) for r in rs])
        for which in ("last", "oracle", "est_argmin", "rescore_argmin"):
            if all(f"{which}_epoch" in r["summary"] for r in rs):
                for m in ("miou", "image_ece", "ece"):
                    add(f"{which}.{m}", [r["epochs"][str(r["summary"][f"{which}_epoch"])][m] for r in rs])
        if all("oracle_epoch" in r["summary"] for r in rs):
            add("gap_selected_oracle_miou", [r["epochs"][str(r["summary"]["oracle_epoch"])]["miou"]
                                             - r["epochs"][str(r["summary"]["selected_epoch"])]["miou"] for r in rs])
            if all("rescore_argmin_epoch" in r["summary"] for r in rs):
                add("gap_rescore_oracle_miou", [r["epochs"][str(r["summary"]["oracle_epoch"])]["miou"]
                                                - r["epochs"][str(r["summary"]["rescore_argmin_epoch"])]["miou"]
                                                for r in rs])
            add("gap_last_oracle_miou", [r["epochs"][str(r["summary"]["oracle_epoch"])]["miou"]
                                         - r["epochs"][str(r["summary"]["last_epoch"])]["miou"] for r in rs])
        add("seconds", [r["summary"]["seconds"] for r in rs])
        out[g] = {"method": rs[0]["method"], "n_runs": len(rs), "seeds": [r["summary"]["seed"] for r in rs],
                  "metrics": rows}
    return out


def _pm(rows: dict, key: str, fmt: str = ".3f") -> str:
    if key not in rows:
        return "-"
    r = rows[key]
    if r["n"] == 1:
        return f"{r['mean']:{fmt}}"
    return f"{r['mean']:{fmt}} ± {r['std']:{fmt}}"


def print_tables(out: dict) -> None:
    s = out["source"]
    agg = out["aggregate"]
    print(f"\nCamVid test ({out['n_test']} images)\n")
    print("| run | method | seeds | mIoU | pooled ECE | image ECE | NLL | est. ECE (target) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| source | - | - | {s['miou']:.3f} | {s['ece']:.3f} | {s['image_ece']:.3f} | {s['nll']:.3f} | - |")
    if out.get("adabn"):
        a = out["adabn"]
        print(f"| AdaBN ({a['n_images']} target images, {a.get('scope', 'all')} BN) | - | - | {a['miou']:.3f} | {a['ece']:.3f} | "
              f"{a['image_ece']:.3f} | {a['nll']:.3f} | - |")
    for g, a in agg.items():
        r = a["metrics"]
        print(f"| {g} | {a['method']} | {a['n_runs']} | {_pm(r, 'selected.miou')} | {_pm(r, 'selected.ece')} | "
              f"{_pm(r, 'selected.image_ece')} | {_pm(r, 'selected.nll')} | {_pm(r, 'selected.estimated_ece')} |")
    if any("oracle.miou" in a["metrics"] for a in agg.values()):
        print("\n| run | selected mIoU | est.-ECE argmin mIoU | last mIoU | oracle mIoU | oracle − selected |"
              " oracle − last |")
        print("|---|---|---|---|---|---|---|")
        for g, a in agg.items():
            r = a["metrics"]
            print(f"| {g} | {_pm(r, 'selected.miou')} | {_pm(r, 'est_argmin.miou')} | {_pm(r, 'last.miou')} | "
                  f"{_pm(r, 'oracle.miou')} | {_pm(r, 'gap_selected_oracle_miou')} | "
                  f"{_pm(r, 'gap_last_oracle_miou')} |")
        if any("rescore_argmin.miou" in a["metrics"] for a in agg.values()):
            print("\n| run | rescored-ECE argmin mIoU | oracle − rescored argmin | est. argmin mIoU | last mIoU |")
            print("|---|---|---|---|---|")
            for g, a in agg.items():
                r = a["metrics"]
                print(f"| {g} | {_pm(r, 'rescore_argmin.miou')} | {_pm(r, 'gap_rescore_oracle_miou')} | "
                      f"{_pm(r, 'est_argmin.miou')} | {_pm(r, 'last.miou')} |")
        print("\n| run | seed | epochs (est. ECE[/rescored ECE] → test mIoU) | selected | est. argmin | oracle (mIoU) |"
              " last |")
        print("|---|---|---|---|---|---|---|")
        for name, r in out["runs"].items():
            sm = r["summary"]
            eps = " ".join(
                (f"{e}: {v['estimated_ece']:.3f}" if v["estimated_ece"] is not None else f"{e}: -")
                + (f"/{v['rescored_ece']:.3f}" if v.get("rescored_ece") is not None else "")
                + f"→{v['miou']:.3f}" for e, v in r["epochs"].items())
            print(f"| {name} | {sm['seed']} | {eps} | {sm['selected_epoch']} | {sm.get('est_argmin_epoch', '-')} | "
                  f"{sm.get('oracle_epoch', '-')} | {sm.get('last_epoch', '-')} |")


def merge(paths: list[str]) -> dict:
    """Merge evaluation JSONs of one protocol (the same model, corruption and test set)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    out = {"config": parts[0]["config"], "n_test": parts[0]["n_test"], "source": None, "runs": {}}
    for p, d in zip(paths, parts, strict=True):
        for k in ("model", "mapping", "corruption", "severity", "seed", "max_images"):
            if d["config"].get(k) != out["config"].get(k):
                raise SystemExit(f"{p}: config {k}={d['config'].get(k)!r} differs from {out['config'].get(k)!r}")
        if d.get("source") is not None:
            out["source"] = out["source"] or d["source"]
        if d.get("adabn") is not None:
            out["adabn"] = d["adabn"]
        out["runs"].update(d["runs"])
    if out["source"] is None:
        raise SystemExit("no source evaluation among the merged files")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=None, help="folder of adapt output folders (or one of them)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--mapping", choices=["cityscapes-camvid"], default=None)
    ap.add_argument("--corruption", default=None)
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="corruption seed of the test images")
    ap.add_argument("--max-images", type=int, default=None, help="evaluate on an evenly spread test subset")
    ap.add_argument("--all-checkpoints", action="store_true")
    ap.add_argument("--no-source", action="store_true", help="skip the source model (merged from another file)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no evaluation: merge these evaluation files, aggregate over seeds, print the tables")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rescore-estimator", default=None, metavar="EST",
                    help="also score every evaluated checkpoint with this estimator on the run's target images")
    ap.add_argument("--adabn", type=int, default=None, metavar="N",
                    help="also evaluate AdaBN: the source model with its BN running statistics re-estimated on N "
                    "CamVid train images (evenly spread, corrupted with seed 0 under --corruption; no training)")
    ap.add_argument("--adabn-scope", default="all", choices=["all", "encoder"],
                    help="AdaBN on every BN layer (default) or only on those of the model's encoder")
    ap.add_argument("--reuse", default=None, metavar="JSON",
                    help="an earlier evaluation file of the same runs: test metrics found there are reused (no test "
                    "pass), e.g. to add --rescore-estimator scores to finished evaluations")
    args = ap.parse_args()
    if args.merge:
        out = merge(args.merge)
        out["aggregate"] = aggregate(out["runs"])
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        print_tables(out)
        return
    if not args.model or (not args.runs and args.no_source):
        ap.error("--model is required, and --runs unless only the source model is evaluated (or --merge)")
    torch.set_num_threads(args.threads)

    runs: list[Path] = []
    if args.runs:
        runs_root = Path(args.runs)
        runs = [runs_root] if (runs_root / "adapt_log.json").is_file() else sorted(
            p for p in runs_root.iterdir() if (p / "adapt_log.json").is_file())
        if not runs:
            raise SystemExit(f"no adapt_log.json under {runs_root}")
    items = camvid_split(None, "test")
    items = spread(items, args.max_images)
    transform = None
    if args.corruption:
        from segcal.shift import make_transform

        transform = make_transform(args.corruption, args.severity, args.seed)
    t0 = time.perf_counter()
    old = json.loads(Path(args.reuse).read_text()) if args.reuse else {"runs": {}, "source": None}
    if args.reuse:
        for k in ("model", "mapping", "corruption", "severity", "seed", "max_images"):
            if old["config"].get(k) != getattr(args, k):
                raise SystemExit(f"--reuse {args.reuse}: config {k}={old['config'].get(k)!r} differs from {getattr(args, k)!r}")
    data = None

    def test_data():
        nonlocal data
        if data is None:
            data = load_items(items, transform)
            print(f"loaded {len(data)} test images ({time.perf_counter() - t0:.0f} s)", flush=True)
        return data

    lm = create_model(args.model, device="cpu")
    base = lm.module

    def wrapped():
        return MappedModel(base, ClassMapping(CITYSCAPES_TO_CAMVID, 20)) if args.mapping else base

    nc = 11 if args.mapping else lm.num_classes
    rescorer = None
    if args.rescore_estimator:
        from segcal.estimation import load_estimator

        rescorer = load_estimator(args.rescore_estimator)
    out: dict = {"config": vars(args), "n_test": len(items), "source": None, "runs": {}}
    if not args.no_source:
        out["source"] = old["source"] or evaluate(wrapped(), lm.preprocess, test_data(), nc)
        print(f"source: {out['source']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.adabn:
        from segcal.estimation import warmup_bn

        stems = [p.stem for p in spread(resolve_target_images("camvid:train"), args.adabn)]
        fake_log = {"config": {"max_images": args.adabn, "seed": 0}, "images": stems}
        src_state = {k: v.clone() for k, v in base.state_dict().items()}
        scope = base if args.adabn_scope == "all" else base.get_submodule("encoder")
        warmup_bn(scope, load_targets(fake_log, args, lm.preprocess), forward=lambda _m, b: base(b))
        out["adabn"] = {"n_images": len(stems), "scope": args.adabn_scope,
                        **evaluate(wrapped(), lm.preprocess, test_data(), nc)}
        base.load_state_dict(src_state)
        print(f"adabn ({len(stems)} target images): {out['adabn']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    for run in runs:
        log = json.loads((run / "adapt_log.json").read_text())
        if log.get("model") != args.model:
            print(f"skip {run}: adapted model {log.get('model')!r} is not {args.model!r}", flush=True)
            continue
        epochs = [e["epoch"] for e in log["epochs"]] if args.all_checkpoints else [log["selected_epoch"]]
        res = {"method": log["method"], "selected_epoch": log["selected_epoch"], "epochs": {}}
        targets = load_targets(log, args, lm.preprocess) if rescorer is not None else None
        for ep in epochs:
            base.load_state_dict(load_checkpoint(run / f"epoch_{ep:03d}.pt")["state_dict"])
            prev = old["runs"].get(run.name, {}).get("epochs", {}).get(str(ep))
            m = ({k: prev[k] for k in METRICS} if prev is not None
                 else evaluate(wrapped(), lm.preprocess, test_data(), nc))
            m["estimated_ece"] = next(e["estimated_ece"] for e in log["epochs"] if e["epoch"] == ep)
            if rescorer is not None:
                m["rescored_ece"] = float(estimate_target_ece(
                    base, targets, rescorer, num_classes=lm.num_classes,
                    class_mapping=ClassMapping(CITYSCAPES_TO_CAMVID, 20) if args.mapping else None,
                    model_name=args.model).mean())
                m["rescore_estimator"] = args.rescore_estimator
            res["epochs"][str(ep)] = m
            print(f"{run.name} epoch {ep}: {m}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        res["summary"] = run_summary(res, log)
        out["runs"][run.name] = res
    out["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if out["source"] is not None:
        out["aggregate"] = aggregate(out["runs"])
        print_tables(out)


if __name__ == "__main__":
    main()
