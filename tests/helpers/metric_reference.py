"""An independent float64 NumPy reference for segcal's metrics (written from the definitions in
../shared/methods.md §4, sharing no code with segcal)."""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def binned(conf: np.ndarray, acc: np.ndarray, n_bins: int) -> dict[str, float]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # (lo, hi]: bin b holds edges[b] < c <= edges[b+1]; c == 0 goes to bin 0
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = len(conf)
    ece = mce = rms = 0.0
    gaps = []
    for k in range(n_bins):
        sel = b == k
        if not sel.any():
            continue
        gap = abs(acc[sel].mean() - conf[sel].mean())
        ece += sel.sum() / n * gap
        rms += sel.sum() / n * gap**2
        mce = max(mce, gap)
        gaps.append(gap)
    return {"ece": ece, "mce": mce, "rmsce": np.sqrt(rms), "unweighted": float(np.mean(gaps))}


def adaptive_ece(conf: np.ndarray, acc: np.ndarray, n_bins: int) -> float:
    order = np.argsort(conf, kind="stable")
    n = len(conf)
    grp = (np.arange(n) * n_bins) // n
    tot = 0.0
    for g in range(n_bins):
        sel = order[grp == g]
        if len(sel):
            tot += abs(acc[sel].sum() - conf[sel].sum())
    return tot / n


def reference_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    n_bins: int = 15,
    ignore_index: int | None = None,
    nll_floor: float = 1e-12,
    average_classes=None,
) -> dict:
    """probs: (N, C, *S) float64 probabilities; labels: (N, *S)."""
    N, C = probs.shape[:2]
    P = probs.reshape(N, C, -1)
    Y = labels.reshape(N, -1)
    if average_classes is None:
        average_classes = [k for k in range(C) if k != ignore_index]
    confs, accs, qs, ys, preds, img_ece = [], [], [], [], [], []
    for i in range(N):
        v = np.ones(Y.shape[1], bool) if ignore_index is None else Y[i] != ignore_index
        q = P[i][:, v].T
        y = Y[i][v]
        pred = q.argmax(1)
        c = q[np.arange(len(y)), pred]
        a = (pred == y).astype(float)
        if len(y):
            img_ece.append(binned(c, a, n_bins)["ece"])
        confs.append(c)
        accs.append(a)
        qs.append(q)
        ys.append(y)
        preds.append(pred)
    c = np.concatenate(confs)
    a = np.concatenate(accs)
    q = np.concatenate(qs)
    y = np.concatenate(ys)
    pred = np.concatenate(preds)
    out = binned(c, a, n_bins)
    out["ace_unweighted"] = out.pop("unweighted")
    out["ace_adaptive_exact"] = adaptive_ece(c, a, n_bins)
    out["image_ece"] = float(np.mean(img_ece))
    out["image_ece_std"] = float(np.std(img_ece))
    out["accuracy"] = a.mean()
    qy = q[np.arange(len(y)), y]
    out["nll"] = float(np.mean(-np.log(np.maximum(qy, nll_floor))))
    onehot = np.eye(C)[y]
    out["brier"] = float(np.mean(((q - onehot) ** 2).sum(1)))
    cw = []
    for k in range(C):
        r = binned(q[:, k], (y == k).astype(float), n_bins)
        cw.append(r["ece"])
    out["classwise_ece_per_class"] = np.array(cw)
    out["classwise_ece"] = float(np.mean(np.array(cw)[average_classes]))
    corr = a == 1
    out["ece_correct"] = binned(c[corr], a[corr], n_bins)["ece"]
    out["ece_mispredicted"] = binned(c[~corr], a[~corr], n_bins)["ece"]
    # LTS-style SCE: per predicted class, weighted by n_kb / N
    sce = 0.0
    for k in range(C):
        sel = pred == k
        if sel.any():
            sce += sel.sum() / len(c) * binned(c[sel], a[sel], n_bins)["ece"]
    out["sce_lts"] = sce
    cl = []
    for k in range(C):
        sel = y == k
        cl.append(binned(c[sel], a[sel], n_bins)["ece"] if sel.any() else 0.0)
    out["class_level_ece"] = float(np.mean(np.array(cl)[average_classes]))
    cm = np.zeros((C, C))
    np.add.at(cm, (y, pred), 1)
    out["confusion_matrix"] = cm
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    out["iou_per_class"] = iou
    out["dice_per_class"] = dice
    out["miou"] = float(np.nanmean(iou[average_classes]))
    out["mdice"] = float(np.nanmean(dice[average_classes]))
    out["class_level_ece_per_class"] = np.array(cl, dtype=np.float64)
    if ignore_index is not None and 0 <= ignore_index < C and ignore_index not in average_classes:
        for key in ("iou_per_class", "dice_per_class", "classwise_ece_per_class", "class_level_ece_per_class"):
            out[key] = out[key].astype(np.float64)  # the ignore channel is never a label: no per-class value
            out[key][ignore_index] = np.nan
    return out


def risk_coverage_reference(conf: np.ndarray, risk: np.ndarray, coverages=(50, 80, 90, 95)) -> dict:
    """Exact sort-based failure-detection values: units sorted by decreasing ``conf`` (a stable sort,
    so equal confidences keep their input order), ``risk`` per unit; AUROC / AUPR with the errors
    (``risk > 0``) as positives and ``-conf`` as the detector, by scikit-learn."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    conf = np.asarray(conf, dtype=np.float64)
    risk = np.asarray(risk, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    x = risk[order]
    n = len(x)
    k = np.arange(1, n + 1)
    cum = np.cumsum(x)
    sel_risk = cum / k
    out = {"aurc": float(sel_risk.mean()), "augrc": float((cum / n).mean())}
    best = np.cumsum(np.sort(risk)) / k
    out["eaurc"] = out["aurc"] - float(best.mean())
    for p in coverages:
        m = max(int(np.ceil(p * n / 100 - 1e-9)), 1)
        out[f"risk_at_coverage_{p}"] = float(cum[m - 1] / m)
    fail = risk > 0
    if fail.any() and not fail.all():
        out["failure_auroc"] = float(roc_auc_score(fail, -conf))
        out["failure_aupr"] = float(average_precision_score(fail, -conf))
    return out
