"""Calibrator fitting speed and peak memory: segcal vs fiducio (the [RPH] library) in one run.

Workload: ``--images`` images of ``--classes`` x ``--height`` x ``--width`` logits (default
20 x 19 x 512 x 1024 = 1.05e7 pixels), generated deterministically (seed 0) from a calibrated
source: ``z ~ 2·N(0, 1)``, labels drawn from ``softmax(z)`` (Gumbel-max), stored logits ``3·z``
(over-confident, so T ≈ 3 is the answer), float16 ``.npy`` + uint8 labels in a temporary folder.

Every (library, method) fit runs in its own subprocess so its peak resident memory is measured
cleanly: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end (peak RSS of the process), and
the RSS just before the fit (data loaded) so that the fit's own working memory is ``peak − before``.
Only ``fit`` is timed (wall clock, ``time.perf_counter``). The quality column is the NLL of the
calibrated predictions on the same pixels (computed after timing).

Variants:

* ``fiducio``: fiducio 0.2.0 defaults (full-batch Adam, 200 iterations) on an in-memory float32
  tensor ``(N, C, H, W)``;
* ``segcal``: the same in-memory float32 tensor, defaults (full-batch L-BFGS, chunked; CDC /
  CMSap / CMSop cache their parameter-free features — sort, routing to experts — once);
* ``segcal-nocache`` (not in the default ``--libs``): as ``segcal`` but with no memory budget left
  for that cache, i.e. the features recomputed at every L-BFGS evaluation;
* ``segcal-stream``: streamed from the prediction folder (float16 on disk), ``memory_budget``
  256 MiB (``--stream-budget-mb``), so mini-batch Adam (1 image per step, ``max_steps`` 100)
  with bounded memory once the data exceed the budget.

``--fused-ratio N`` (instead of the table): the TS fit's fused NLL (``objectives.ScaledNLL``: the
loss and its closed-form ``t``-gradient, what ``TemperatureScaling._row_temperature`` routes the
NLL chunks to) against the autograd path through ``z / t`` (the same calibrator with
``_row_temperature`` returning None), in one process on the same data, alternately, best of
``N`` each: in memory (float16 rows, full-batch L-BFGS) and streamed from the folder (L-BFGS,
``--stream-budget-mb``, which must be under the data for the streamed rows); the temperatures of both paths are printed with their relative
difference.

Usage::

    python benchmarks/fit_speed.py            # full scale (slow on a small CPU)
    python benchmarks/fit_speed.py --fused-ratio 5 --images 4   # fused vs autograd TS loss
    python benchmarks/fit_speed.py --small    # 4 x 19 x 64 x 128, a quick check
    python benchmarks/fit_speed.py --height 128 --width 256 --methods ts,vs,dc,cmsop
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FIDUCIO = {"ts": "TS", "vs": "VS", "dc": "DC", "cmsop": "CMSop", "ms": "MS", "ets": "ETS", "cmsap": "CMSap"}


def rss_mb() -> float:
    """Current resident set size (MiB), from /proc (Linux)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_data(folder: Path, n: int, c: int, h: int, w: int) -> None:
    (folder / "pred").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        z = 2 * torch.randn(c, h, w, generator=g)
        gumbel = -torch.log(-torch.log(torch.rand(c, h, w, generator=g).clamp_min(1e-20)))
        y = (z + gumbel).argmax(0).to(torch.uint8)
        np.save(folder / "pred" / f"img{i:03d}.npy", (3 * z).numpy().astype(np.float16))
        np.save(folder / "labels" / f"img{i:03d}.npy", y.numpy())


def load_arrays(folder: Path):
    preds = sorted((folder / "pred").glob("*.npy"))
    x = torch.stack([torch.from_numpy(np.load(p).astype(np.float32)) for p in preds])
    y = torch.stack([torch.from_numpy(np.load(folder / "labels" / p.name).astype(np.int64)) for p in preds])
    return x, y


def nll_of(logits_fn, x, y) -> float:
    tot = 0.0
    with torch.no_grad():
        for i in range(x.shape[0]):
            out = logits_fn(x[i : i + 1])
            tot += float(F.cross_entropy(out, y[i : i + 1], reduction="sum"))
    return tot / y.numel()


def worker(lib: str, method: str, folder: Path) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    # segcal is imported only in its own workers, so that fiducio's peak RSS does not include it
    if lib == "segcal-stream":
        import segcal.calibrators as sc
        from segcal.io import PredictionFolder

        src = sc.FolderBatches(PredictionFolder(folder / "pred", folder / "labels"))
        budget = float(os.environ.get("BENCH_STREAM_BUDGET_MB", "256")) * 2**20
        cal = sc.create(method, memory_budget=budget, max_steps=100, batch_size=2**20)
        before = rss_mb()
        t0 = time.perf_counter()
        cal.fit(src)
        secs = time.perf_counter() - t0
        peak = peak_mb()
        x, y = load_arrays(folder)
        nll = nll_of(cal, x, y)
        info = cal.fit_info
        extra = {"optimizer": info["optimizer"], "mode": info["mode"]}
    else:
        x, y = load_arrays(folder)
        if lib in ("segcal", "segcal-nocache"):
            import segcal.calibrators as sc

            # segcal-nocache: the same in-memory L-BFGS fit with no room left in memory_budget for
            # the parameter-free feature cache (sorts / expert routing recomputed every evaluation)
            kw = {"memory_budget": x.numel() * 4 + y.numel() * 8 + 1} if lib == "segcal-nocache" else {}
            cal = sc.create(method, **kw)
            before = rss_mb()
            t0 = time.perf_counter()
            cal.fit(x, y)
            secs = time.perf_counter() - t0
            peak = peak_mb()
            nll = nll_of(cal, x, y)
            extra = {"optimizer": cal.fit_info["optimizer"], "mode": cal.fit_info["mode"],
                     "cached_feature_mb": cal.fit_info["stages"][-1].get("cached_feature_mb")}
        else:
            import fiducio.calibrators as fc  # optional: only for the fiducio rows

            iters = os.environ.get("BENCH_FIDUCIO_ITERS")
            kw = {"max_iter": int(iters)} if iters else {}
            cal = getattr(fc, FIDUCIO[method])(device="cpu", **kw)
            before = rss_mb()
            t0 = time.perf_counter()
            cal.fit(x, y)
            secs = time.perf_counter() - t0
            peak = peak_mb()
            nll = nll_of(cal.decision_function, x, y)
            extra = {"optimizer": f"adam ({iters} it)" if iters else "adam (default, 200 it)", "mode": "in-memory",
                     "iterations": int(iters) if iters else 200}
    return {"lib": lib, "method": method, "seconds": secs, "rss_before_mb": before, "peak_rss_mb": peak,
            "fit_mem_mb": peak - before, "nll": nll, **extra}


def fused_ratio(folder: Path, repeats: int, budget_mb: float) -> dict:
    """Best-of-``repeats`` seconds of the TS fit with the fused NLL and with autograd through the
    map, alternately in this process, in memory and streamed; and both temperatures."""
    import segcal.calibrators as sc
    from segcal.io import PredictionFolder

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    pf = PredictionFolder(folder / "pred", folder / "labels")
    x = torch.stack([torch.from_numpy(np.load(it.path)) for it in pf.items])  # float16, as stored
    y = torch.stack([torch.from_numpy(np.load(it.label_path).astype(np.int64)) for it in pf.items])
    sources = {"in-memory": (lambda: (x, y), 2.0 * 2**30),
               "streaming": (lambda: (sc.FolderBatches(pf), None), budget_mb * 2**20)}
    out: dict = {}
    for mode, (src, budget) in sources.items():
        secs: dict[str, list[float]] = {"fused": [], "autograd": []}
        temps: dict[str, float] = {}
        for _ in range(repeats):
            for path in ("fused", "autograd"):
                cal = sc.create("ts", optimizer="lbfgs", memory_budget=budget)
                if path == "autograd":
                    cal._row_temperature = lambda: None  # the map z / t, autograd's gradient
                data, labels = src()
                t0 = time.perf_counter()
                cal.fit(data, labels)
                secs[path].append(time.perf_counter() - t0)
                assert cal.fit_info["mode"] == mode, cal.fit_info["mode"]
                temps[path] = cal.temperature
        best = {k: min(v) for k, v in secs.items()}
        out[mode] = {"best_s": best, "all_s": secs, "ratio_autograd_over_fused": best["autograd"] / best["fused"],
                     "temperature": temps,
                     "rel_diff": abs(temps["fused"] - temps["autograd"]) / temps["autograd"]}
        print(f"{mode:10s} fused {best['fused']:.3f} s, autograd {best['autograd']:.3f} s (best of {repeats}): "
              f"autograd / fused = {out[mode]['ratio_autograd_over_fused']:.2f}; T fused {temps['fused']:.9f}, "
              f"autograd {temps['autograd']:.9f} (rel. diff {out[mode]['rel_diff']:.2e})", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="4 x 19 x 64 x 128 quick run")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--methods", default="ts,vs,dc,cmsop")
    ap.add_argument("--libs", default="segcal,segcal-stream,fiducio")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--stream-budget-mb", type=float, default=256,
                    help="memory_budget of the segcal-stream variant (default 256 MiB)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per fit (default 900)")
    ap.add_argument("--fiducio-iters", default=None, metavar="N1,N2",
                    help="instead of fiducio's default 200 Adam iterations (too slow for some methods at full "
                    "scale), time fiducio with N1 and with N2 iterations and extrapolate linearly to 200: "
                    "full-batch Adam costs one pass over the data per iteration, so t(n) = a + b·n")
    ap.add_argument("--fused-ratio", type=int, default=None, metavar="N",
                    help="time the TS fit with the fused NLL vs autograd through z / t (best of N each, "
                    "one process, in memory and streamed) instead of the table")
    ap.add_argument("--worker", nargs=3, metavar=("LIB", "METHOD", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], Path(a.worker[2]))))
        return 0
    if a.small:
        a.images, a.height, a.width = 4, 64, 128
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["BENCH_STREAM_BUDGET_MB"] = str(a.stream_budget_mb)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory(prefix="segcal-bench-") as tmp:
        t0 = time.perf_counter()
        make_data(Path(tmp), a.images, a.classes, a.height, a.width)
        npx = a.images * a.height * a.width
        print(f"workload: {a.images} x {a.classes} x {a.height} x {a.width} = {npx:.3g} pixels "
              f"(generated in {time.perf_counter() - t0:.1f}s)", flush=True)
        if a.fused_ratio:
            res = fused_ratio(Path(tmp), a.fused_ratio, a.stream_budget_mb)
            if a.json:
                Path(a.json).write_text(json.dumps({"args": vars(a), "fused_ratio": res}, indent=2))
            return 0
        print(f"{'method':7s} {'library':14s} {'optimizer':24s} {'fit s':>8s} {'peak RSS MiB':>13s} "
              f"{'fit mem MiB':>12s} {'NLL':>8s}", flush=True)
        fid_iters = [int(v) for v in a.fiducio_iters.split(",")] if a.fiducio_iters else [None]
        if len(fid_iters) not in (1, 2) or (len(fid_iters) == 2 and fid_iters[0] == fid_iters[1]):
            ap.error("--fiducio-iters: expected two different iteration counts, e.g. 10,20")
        for m in a.methods.split(","):
            fid_rows = []
            runs = [(lib, it) for lib in a.libs.split(",") for it in (fid_iters if lib == "fiducio" else [None])]
            for lib, it in runs:
                wenv = dict(env, BENCH_FIDUCIO_ITERS=str(it)) if it else env
                try:
                    p = subprocess.run([sys.executable, __file__, "--worker", lib, m, tmp], env=wenv,
                                       capture_output=True, text=True, timeout=a.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{m:7s} {lib:14s} TIMED OUT after {a.timeout:.0f}s", flush=True)
                    rows.append({"lib": lib, "method": m, "seconds": None, "timeout": a.timeout})
                    continue
                if p.returncode != 0:
                    print(f"{m:7s} {lib:14s} FAILED: {p.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"{m:7s} {lib:14s} {r['optimizer']:24s} {r['seconds']:8.2f} {r['peak_rss_mb']:13.0f} "
                      f"{r['fit_mem_mb']:12.0f} {r['nll']:8.4f}", flush=True)
                if it:
                    fid_rows.append(r)
            if len(fid_rows) == 2:
                (n1, t1), (n2, t2) = ((r["iterations"], r["seconds"]) for r in fid_rows)
                b = (t2 - t1) / (n2 - n1)
                est = {"lib": "fiducio", "method": m, "extrapolated": True, "seconds": t1 + b * (200 - n1),
                       "per_iteration_s": b, "fixed_s": t1 - b * n1, "from": [[n1, t1], [n2, t2]]}
                rows.append(est)
                print(f"{m:7s} {'fiducio':14s} {'adam 200 it, EXTRAPOLATED':24s} {est['seconds']:8.2f} "
                      f"(fixed {est['fixed_s']:.1f} s + {b:.2f} s/iteration from the {n1}- and {n2}-iteration fits)",
                      flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
