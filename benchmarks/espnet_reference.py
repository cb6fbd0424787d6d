"""Reproduce the ESPNet reference figures of ``<data root>/espnet/README.md`` independently.

Metrics are computed here in float64 NumPy (no segcal metric code): confusion matrix -> mIoU
over the 11 CamVid classes, pooled top-label ECE with 15 equal-width bins (bin = floor(conf*15)
clipped to 14), NLL, pixel accuracy, mean confidence, mean per-image ECE, predicted-void share.
Void pixels (label 11) are excluded everywhere.

Sources: ``--pred DIR`` reads a prediction folder written by ``segcal predict`` (float16 logits);
``--float32`` instead runs the model in-process and uses its float32 logits directly.

Usage::

    PYTHONPATH=src python3 benchmarks/espnet_reference.py --model espnet-camvid --split test \
        --pred /tmp/segcal_pred/camvid_test_espnet-camvid [--float32] [--temperature 1.3279]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

NB = 15
K = 11  # CamVid classes
VOID = 11


class Acc:
    """Float64 accumulators for one variant (softmax over given logits at temperature T)."""

    def __init__(self, name: str, temperature: float = 1.0, drop_void_logit: bool = False):
        self.name, self.t, self.drop = name, temperature, drop_void_logit
        self.cm = np.zeros((K, 12), np.int64)  # true class x predicted output index
        self.bconf = np.zeros(NB)
        self.bcorr = np.zeros(NB)
        self.bcnt = np.zeros(NB, np.int64)
        self.nll = 0.0
        self.n = 0
        self.conf = 0.0
        self.per_image_ece: list[float] = []

    def add(self, logits: np.ndarray, label: np.ndarray) -> None:
        x = logits.reshape(logits.shape[0], -1).astype(np.float64)
        y = label.reshape(-1).astype(np.int64)
        keep = y != VOID
        x, y = x[:, keep], y[keep]
        if self.drop:
            x = x[:K]
        x = x / self.t
        m = x.max(0)
        lse = m + np.log(np.exp(x - m).sum(0))
        conf = np.exp(m - lse)
        pred = x.argmax(0)
        corr = (pred == y).astype(np.float64)
        self.nll += float((lse - x[y, np.arange(y.size)]).sum())
        self.cm += np.bincount(y * 12 + pred, minlength=K * 12).reshape(K, 12)
        b = np.minimum(np.floor(conf * NB).astype(np.int64), NB - 1)
        sc = np.bincount(b, weights=conf, minlength=NB)
        sk = np.bincount(b, weights=corr, minlength=NB)
        cnt = np.bincount(b, minlength=NB)
        self.bconf += sc
        self.bcorr += sk
        self.bcnt += cnt
        self.n += y.size
        self.conf += float(conf.sum())
        if y.size:
            self.per_image_ece.append(float(np.abs(sc - sk).sum() / y.size))

    def result(self) -> dict:
        tp = np.diag(self.cm[:, :K]).astype(np.float64)
        fn = self.cm.sum(1) - tp  # includes predictions of void / out-of-class outputs
        fp = self.cm[:, :K].sum(0) - tp
        iou = tp / np.maximum(tp + fp + fn, 1)
        return {
            "variant": self.name,
            "temperature": self.t,
            "non_void_px": int(self.n),
            "pixel_acc": float(tp.sum() / self.n),
            "mIoU": float(iou.mean()),
            "ECE15": float(np.abs(self.bconf - self.bcorr).sum() / self.n),
            "NLL": self.nll / self.n,
            "mean_conf": self.conf / self.n,
            "mean_per_image_ECE": float(np.mean(self.per_image_ece)),
            "pred_void_pct": float(100 * self.cm[:, K:].sum() / self.n),
            "per_class_IoU": [round(float(v), 4) for v in iou],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=("espnet-camvid", "espnet-cityscapes-camvid"))
    ap.add_argument("--split", required=True, choices=("val", "test"))
    ap.add_argument("--pred", help="prediction folder from segcal predict")
    ap.add_argument("--float32", action="store_true", help="run the model, use float32 logits")
    ap.add_argument("--temperature", type=float, action="append", default=[],
                    help="also report metrics at this temperature (repeatable)")  # fmt: skip
    ap.add_argument("--limit", type=int)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    if not a.pred and not a.float32:
        ap.error("give --pred DIR or --float32")

    from segcal.datasets import camvid_split, load_image
    from segcal.io import read_label

    items = camvid_split(None, a.split)[: a.limit]
    accs = [Acc("softmax over all outputs")]
    accs += [Acc(f"T={t}", t) for t in a.temperature]
    if a.model == "espnet-camvid":
        accs.append(Acc("void logit dropped (11-way)", drop_void_logit=True))
    lm = None
    if a.float32:
        from segcal.models import create_model

        lm = create_model(a.model, device="cpu")
    t0 = time.perf_counter()
    for it in items:
        label = read_label(it.label_path)
        if lm is not None:
            logits = lm.logits([load_image(it.image_path)])[0].numpy()
        else:
            logits = np.load(f"{a.pred}/{it.stem}.npy")
        for acc in accs:
            acc.add(logits, label)
    out = {
        "model": a.model,
        "split": a.split,
        "source": "float32 in-process" if a.float32 else f"float16 files {a.pred}",
        "n_images": len(items),
        "seconds": round(time.perf_counter() - t0, 1),
        "results": [acc.result() for acc in accs],
    }
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
