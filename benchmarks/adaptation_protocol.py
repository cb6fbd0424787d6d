"""Evaluate ``segcal adapt`` runs on CamVid test (issue 9 protocols; labels of *test* only).

For every run folder under ``--runs`` (a folder holding ``adapt_log.json``), evaluate the source
model once, the selected checkpoint and (``--all-checkpoints``) every epoch on CamVid test, under
the same corruption as the adaptation for protocol 1. Metrics: mIoU, image-wise ECE (10 bins,
void excluded), pooled ECE, NLL. With ``--all-checkpoints`` it also reports the epoch the *true*
test ECE would pick next to the one the estimated ECE picked.

Example (protocol 1, after the ``segcal adapt`` commands of ``docs/adaptation.md``)::

    nice -n 10 python3 benchmarks/adaptation_protocol.py --runs /tmp/adapt_p1 --model espnet-camvid \\
        --corruption gaussian_noise --severity 3 --max-images 64 --json /tmp/adapt_p1/eval.json

Protocol 2: ``--model espnet-cityscapes --mapping cityscapes-camvid`` (the adapted 20-class model
is evaluated through the Cityscapes->CamVid mapping, 11 classes, void ignored).
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

from segcal.adaptation import load_checkpoint
from segcal.datasets import camvid_split
from segcal.datasets.folders import load_image
from segcal.metrics import CalibrationMetrics
from segcal.models import ClassMapping, MappedModel, create_model
from segcal.models.espnet import CITYSCAPES_TO_CAMVID

N_BINS = 10
VOID = 11


def evaluate(module, preprocess, items, transform, num_classes: int) -> dict:
    cm = CalibrationMetrics(num_classes, n_bins=N_BINS, ignore_index=VOID, per_image=True)
    module.eval()
    for it in items:
        img = load_image(it.image_path)
        if transform is not None:
            img = transform(img, it.stem)
        with torch.no_grad():
            logits = module(preprocess(img))
        cm.update(logits, torch.from_numpy(it.load_label().astype(np.int64)).unsqueeze(0))
    r = cm.compute()
    return {k: float(r[k]) for k in ("miou", "image_ece", "ece", "nll", "accuracy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="folder of adapt output folders (or one of them)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--mapping", choices=["cityscapes-camvid"], default=None)
    ap.add_argument("--corruption", default=None)
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=None, help="evaluate on an evenly spread test subset")
    ap.add_argument("--all-checkpoints", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    runs_root = Path(args.runs)
    runs = [runs_root] if (runs_root / "adapt_log.json").is_file() else sorted(
        p for p in runs_root.iterdir() if (p / "adapt_log.json").is_file())
    if not runs:
        raise SystemExit(f"no adapt_log.json under {runs_root}")
    items = camvid_split(None, "test")
    if args.max_images:
        idx = np.linspace(0, len(items) - 1, args.max_images).round().astype(int)
        items = [items[i] for i in idx]
    transform = None
    if args.corruption:
        from segcal.shift import make_transform

        transform = make_transform(args.corruption, args.severity, args.seed)
    lm = create_model(args.model, device="cpu")
    base = lm.module

    def wrapped():
        return MappedModel(base, ClassMapping(CITYSCAPES_TO_CAMVID, 20)) if args.mapping else base

    nc = 11 if args.mapping else lm.num_classes
    t0 = time.perf_counter()
    out: dict = {"config": vars(args), "n_test": len(items), "source": evaluate(wrapped(), lm.preprocess, items,
                                                                             transform, nc), "runs": {}}
    print(f"source: {out['source']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    for run in runs:
        log = json.loads((run / "adapt_log.json").read_text())
        if log.get("model") != args.model:
            print(f"skip {run}: adapted model {log.get('model')!r} is not {args.model!r}", flush=True)
            continue
        epochs = [e["epoch"] for e in log["epochs"]] if args.all_checkpoints else [log["selected_epoch"]]
        res = {"method": log["method"], "selected_epoch": log["selected_epoch"], "epochs": {}}
        for ep in epochs:
            base.load_state_dict(load_checkpoint(run / f"epoch_{ep:03d}.pt")["state_dict"])
            m = evaluate(wrapped(), lm.preprocess, items, transform, nc)
            m["estimated_ece"] = next(e["estimated_ece"] for e in log["epochs"] if e["epoch"] == ep)
            res["epochs"][ep] = m
            print(f"{run.name} epoch {ep}: {m}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.all_checkpoints:
            res["oracle_epoch"] = min(res["epochs"], key=lambda e: res["epochs"][e]["image_ece"])
        out["runs"][run.name] = res
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print("\n| run | method | selected epoch | mIoU | image ECE | NLL |\n|---|---|---|---|---|---|")
    s = out["source"]
    print(f"| source | - | - | {s['miou']:.4f} | {s['image_ece']:.4f} | {s['nll']:.4f} |")
    for name, r in out["runs"].items():
        m = r["epochs"][r["selected_epoch"]]
        print(f"| {name} | {r['method']} | {r['selected_epoch']} | {m['miou']:.4f} | {m['image_ece']:.4f} | "
              f"{m['nll']:.4f} |")


if __name__ == "__main__":
    main()
