"""Cost of the failure-detection metrics and smECE, and of ``segcal conformal fit``, against
``segcal eval`` on one prediction folder, in one process (issue 18: at most 15 %).

The new metrics are computed by ``compute()`` only (no state field, no change to ``update()``), so
"eval with vs without them" is ``eval``'s time against the time of the three functions they add to
``compute()`` (:func:`segcal.metrics.failure.histogram_failure`, :func:`~segcal.metrics.failure.
image_failure`, :func:`segcal.metrics.smooth.histogram_smooth_ece`) on the final state. ``segcal
eval`` and ``segcal conformal fit`` run through the command-line entry point (``segcal.cli.app.main``)
alternately, ``--reps`` times each, so a change of machine load hits both alike.

``--exact`` also checks the histogram values on the folder's pixels against exact sort-based
values (NumPy sort, scikit-learn AUROC / average precision) and smECE against relplot, and
reports the tie bounds at 65,536 and 262,144 fine bins.

Usage::

    segcal predict --model espnet-camvid --images camvid:test --out /tmp/D/pred
    python benchmarks/failure_overhead.py --pred /tmp/D/pred --labels ../shared/data/camvid/testannot \\
        --ignore-index 11 --reps 5 --out /tmp/D/failure_overhead.json [--exact]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from segcal.cli.app import main as segcal_main
from segcal.io.files import atomic_write, to_jsonable
from segcal.io.predictions import PredictionFolder
from segcal.metrics import CalibrationMetrics
from segcal.metrics.failure import histogram_failure, image_failure
from segcal.metrics.smooth import histogram_smooth_ece


def timed_cli(argv: list[str]) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = segcal_main(argv)
    dt = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"segcal {' '.join(argv)} exited with {rc}")
    return dt


def new_metric_seconds(state: dict, avg: list[int], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        histogram_failure(state["fine"].numpy())
        histogram_smooth_ece(state["fine"].numpy())
        image_failure(state["img_bins"].numpy(), state["img_class"].numpy(), avg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def exact_check(pred: str, labels: str, ignore_index: int | None) -> dict:
    """Histogram values against the exact values on every valid pixel of the folder."""
    import relplot
    from sklearn.metrics import average_precision_score, roc_auc_score

    folder = PredictionFolder(pred, labels)
    metrics = {fb: None for fb in (1 << 16, 1 << 18)}
    confs, errs = [], []
    for _stem, scores, lab, itype in folder:
        x = torch.from_numpy(np.asarray(scores))[None]
        y = torch.from_numpy(np.asarray(lab).astype(np.int64))[None]
        for fb in metrics:
            if metrics[fb] is None:
                metrics[fb] = CalibrationMetrics(x.shape[1], ignore_index=ignore_index, fine_bins=fb,
                                                 input_type=itype)
            metrics[fb].update(x, y)
        q = torch.softmax(x[0].float(), 0) if itype == "logits" else x[0].float()
        conf, p = q.max(0)  # first index of the maximum, as the engine
        v = (y[0] != ignore_index) if ignore_index is not None else torch.ones_like(y[0], dtype=torch.bool)
        confs.append(conf[v].double().numpy())
        errs.append((p != y[0])[v].numpy())
    c = np.concatenate(confs)
    e = np.concatenate(errs).astype(np.float64)
    order = np.argsort(-c, kind="stable")
    x = e[order]
    n = len(x)
    k = np.arange(1, n + 1)
    cum = np.cumsum(x)
    exact = {"aurc": float((cum / k).mean()), "augrc": float((cum / n).mean())}
    best = np.cumsum(np.sort(e)) / k
    exact["eaurc"] = exact["aurc"] - float(best.mean())
    for pct in (50, 80, 90, 95):
        m = max(-(-pct * n // 100), 1)
        exact[f"risk_at_coverage_{pct}"] = float(cum[m - 1] / m)
    exact["failure_auroc"] = float(roc_auc_score(e, -c))
    exact["failure_aupr"] = float(average_precision_score(e, -c))
    t0 = time.perf_counter()
    exact["smece"], exact["smece_sigma"] = relplot.smECE(c, 1 - e, return_width=True)
    relplot_s = time.perf_counter() - t0
    out: dict = {"n_pixels": n, "exact": exact, "relplot_seconds": relplot_s}
    for fb, m in metrics.items():
        r = m.compute()
        keys = [*exact]
        out[f"fine_bins_{fb}"] = {
            "values": {key: r[key] for key in keys},
            "abs_diff": {key: abs(r[key] - exact[key]) for key in keys},
            "tie_bounds": {key: r[key] for key in r if key.endswith("_tie_bound")},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--ignore-index", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--exact", action="store_true")
    args = ap.parse_args()
    common = ["--pred", args.pred, "--labels", args.labels]
    if args.ignore_index is not None:
        common += ["--ignore-index", str(args.ignore_index)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        state_path = str(Path(tmp) / "state.pt")
        eval_argv = ["eval", *common, "--no-progress"]
        conf_argv = ["conformal", "fit", *common, "--alpha", "0.1", "--out", str(Path(tmp) / "cr.json")]
        timed_cli([*eval_argv, "--save-state", state_path])  # warm-up: imports, numba, page cache
        timed_cli(conf_argv)
        t_eval, t_conf = [], []
        for _ in range(args.reps):  # interleaved A/B
            t_eval.append(timed_cli(eval_argv))
            t_conf.append(timed_cli(conf_argv))
        m = CalibrationMetrics.load(state_path)
        state = m.state_dict()
        t_new = new_metric_seconds(state, m.average_classes, max(args.reps, 5))
        t0 = time.perf_counter()
        m.compute()
        t_compute = time.perf_counter() - t0
    ev, cf = statistics.median(t_eval), statistics.median(t_conf)
    res = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "pred": args.pred,
        "n_images": m.n_images,
        "reps": args.reps,
        "eval_seconds": t_eval,
        "conformal_fit_seconds": t_conf,
        "eval_median_s": ev,
        "conformal_fit_median_s": cf,
        "compute_s": t_compute,
        "new_metrics_s": t_new,
        "new_metrics_over_eval": t_new / ev,
        "conformal_fit_over_eval": cf / ev,
        "new_metrics_plus_conformal_fit_over_eval": (t_new + cf) / ev,
    }
    if args.exact:
        res["exact_check"] = exact_check(args.pred, args.labels, args.ignore_index)
    text = json.dumps(to_jsonable(res), indent=2)
    print(text)
    if args.out:
        with atomic_write(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
