"""Scale benchmark (issue 20): ``segcal eval`` and distributed fitting on a Cityscapes-shaped folder.

Workload: a synthetic prediction folder of ``--images`` images x ``--classes`` x ``--height`` x
``--width`` float16 peaked logits (``.npy``) and uint8 PNG labels with 5 % void (= 255), written
by ``eval_pipeline.write_folder`` (about 70 % accuracy, over-confident). Cityscapes val is
``--images 500 --classes 19 --height 1024 --width 2048`` (1.05e9 labelled pixels, 40 GB of
float16 logits); the defaults are a reduced size for a small shared machine. Several image
counts (``--images 8,32``) show whether the peak memory depends on the number of images.

Measured, every run in its own process tree (``_measure``: the wall time of the command, and
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak resident memory of the largest
process in the tree -- under ``torchrun`` the peak of one rank):

* ``eval``: ``segcal eval --pred --labels --ignore-index 255 --json`` with 1 process and under
  ``python -m torch.distributed.run --standalone --nproc-per-node N`` (``--procs 1,2``), process
  start included; throughput in labelled pixels per second;
* ``fit``: the fit of ``--methods`` (default ``ts,cmsop``) on all images with the library
  (``FolderBatches`` of this rank's contiguous block inside
  :func:`segcal.calibrators.collective.sharded` -- what ``segcal fit`` does under ``torchrun``),
  1 and N processes; the fitted parameters of N processes are compared with 1 process
  (``max |delta|``); ``--fit-memory-budget-mb`` and ``--fit-optimizer`` are passed to the calibrator
  (default: the library's, 2 GiB: in memory, L-BFGS, at reduced sizes), and so are
  ``--fit-max-iter`` and ``--fit-chunk-size``; the worker counts the files it reads (``passes`` =
  files read / images: a streamed L-BFGS fit reads the folder once to count, then once per
  evaluation of the objective);
* on the largest size, or at the sizes of ``--peers-at`` (``--peers torchmetrics,fiducio``): torchmetrics'
  ``MulticlassCalibrationError`` (15 bins, l1, ``ignore_index=255``) updated image by image with
  the softmax probabilities (it keeps every pixel's confidence: O(pixels) memory), and fiducio's
  TS / CMSop ``fit`` on the in-memory float32 array (its defaults: full-batch Adam, 200 iterations).

Usage::

    python benchmarks/scale.py                                  # 8,32 x 19 x 256 x 512, 1 and 2 procs
    python benchmarks/scale.py --images 500 --height 1024 --width 2048 --peers ""   # Cityscapes size
    python benchmarks/scale.py --json /tmp/scale.json --root /big/disk/scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_pipeline import write_folder  # the benchmarks' one synthetic folder writer

HERE = Path(__file__).resolve()
FIDUCIO = {"ts": "TS", "vs": "VS", "dc": "DC", "cmsop": "CMSop"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(procs: int) -> list[str]:
    """The command prefix that runs a Python module or script on ``procs`` local processes."""
    if procs == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "--master-port", str(free_port())]


def measure(cmd: list[str], threads: int | None = None) -> dict[str, float]:
    """Wall time and peak RSS (largest process of the tree) of ``cmd``, in a fresh wrapper process
    (``threads``: its ``OMP_NUM_THREADS``; torchrun sets 1 per rank itself)."""
    env = dict(os.environ) if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, str(HERE), "_measure", "--", *cmd], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(cmd: list[str]) -> int:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return proc.returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": secs, "peak_rss_mb": peak}))
    return 0


# ----------------------------------------------------------------------------------- workers
def _fit_worker(pred: str, labels: str, method: str, out: str, budget_mb: float | None,
                optimizer: str | None, max_iter: int | None = None, chunk_size: int | None = None) -> int:
    from segcal.calibrators import FolderBatches, create
    from segcal.calibrators.collective import sharded
    from segcal.io import PredictionFolder
    from segcal.pipeline.distributed import shard, world

    folder = PredictionFolder(pred, labels)
    read = [0]
    inner_read = folder.read

    def counted_read(item: Any) -> Any:
        read[0] += 1
        return inner_read(item)

    folder.read = counted_read  # type: ignore[method-assign]  # count the files read: passes over the data
    kw: dict[str, Any] = {}
    if budget_mb is not None:
        kw["memory_budget"] = budget_mb * 2**20
    if optimizer is not None:
        kw["optimizer"] = optimizer
    if max_iter is not None:
        kw["max_iter"] = max_iter
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    with world() as w:
        cal = create(method, **kw)
        t0 = time.perf_counter()
        mine = FolderBatches(folder, shard(folder.stems, w.rank, w.size))
        if w.distributed:
            with sharded():
                cal.fit(mine, ignore_index=255)
        else:
            cal.fit(mine, ignore_index=255)
        secs = time.perf_counter() - t0
        if w.is_main:
            info = cal.fit_info
            payload = {"fit_seconds": secs, "optimizer": info["optimizer"], "mode": info["mode"],
                       "files_read": read[0], "passes": read[0] / max(1, len(mine)),
                       "n_pixels": info["n_pixels"], "steps": [s["steps"] for s in info["stages"]],
                       "state": {k: v.detach().cpu().double().reshape(-1).tolist()
                                 for k, v in cal.state_dict().items() if v.is_floating_point()}}
            Path(out).write_text(json.dumps(payload))
    return 0


def _torchmetrics_worker(pred: str, labels: str, classes: int, out: str) -> int:
    from PIL import Image
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=classes, n_bins=15, norm="l1", ignore_index=255)
    t0 = time.perf_counter()
    for p in sorted(Path(pred).glob("*.npy")):
        z = torch.from_numpy(np.load(p).astype(np.float32))
        y = torch.from_numpy(np.asarray(Image.open(Path(labels) / f"{p.stem}.png")).astype(np.int64))
        metric.update(torch.softmax(z, 0).reshape(classes, -1).T, y.reshape(-1))
    ece = float(metric.compute())
    Path(out).write_text(json.dumps({"ece": ece, "inner_seconds": time.perf_counter() - t0}))
    return 0


def _fiducio_worker(pred: str, labels: str, method: str, out: str) -> int:
    import fiducio.calibrators as fc
    from PIL import Image

    files = sorted(Path(pred).glob("*.npy"))
    x = torch.stack([torch.from_numpy(np.load(p).astype(np.float32)) for p in files])
    y = torch.stack([torch.from_numpy(np.asarray(Image.open(Path(labels) / f"{p.stem}.png")).astype(np.int64))
                     for p in files])
    y[y == 255] = 0  # fiducio has no ignore label: void pixels counted as class 0 (5 % of the pixels)
    cal = getattr(fc, FIDUCIO[method])(device="cpu")
    t0 = time.perf_counter()
    cal.fit(x, y)
    Path(out).write_text(json.dumps({"fit_seconds": time.perf_counter() - t0}))
    return 0


# -------------------------------------------------------------------------------------- main
def reusable(folder: Path, n: int, c: int, h: int, w: int) -> bool:
    """Whether ``folder`` already holds a complete synthetic folder of ``n`` images of this shape
    (``--reuse``: the 500-image Cityscapes-sized folder takes minutes to write)."""
    preds = sorted((folder / "pred").glob("*.npy"))
    labs = sorted((folder / "labels").glob("*.png"))
    if len(preds) != n or len(labs) != n:
        return False
    return all(np.load(p, mmap_mode="r").shape == (c, h, w) for p in (preds[0], preds[-1]))



def _labelled_pixels(lab: Path) -> int:
    from PIL import Image

    return int(sum((np.asarray(Image.open(p)) != 255).sum() for p in sorted(lab.glob("*.png"))))


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in str(args.images).split(",")]
    procs = [int(p) for p in str(args.procs).split(",")]
    methods = [m for m in args.methods.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]
    peer_sizes = [int(s) for s in str(args.peers_at).split(",")] if args.peers_at else [max(sizes)]
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="segcal-scale-"))
    result: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_avg_1_5_15": os.getloadavg(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "ref_threads": args.ref_threads,
        "shape": {"classes": args.classes, "height": args.height, "width": args.width}, "sizes": []}
    try:
        for n in sizes:
            folder = root / f"n{n}"
            t0 = time.perf_counter()
            if args.reuse and reusable(folder, n, args.classes, args.height, args.width):
                pred, lab = folder / "pred", folder / "labels"
            else:
                if folder.exists():
                    shutil.rmtree(folder)
                pred, lab = write_folder(folder, n, args.classes, args.height, args.width)
            gib = sum(p.stat().st_size for p in pred.glob("*.npy")) / 2**30
            row: dict[str, Any] = {"images": n, "pixels": n * args.height * args.width,
                                   "labelled_pixels": _labelled_pixels(lab), "logits_gib": gib,
                                   "write_seconds": time.perf_counter() - t0, "eval": {}, "fit": {}, "peers": {}}
            print(f"[{n} images] folder {'reused' if args.reuse and row['write_seconds'] < 5 else 'written'} "
                  f"({gib:.2f} GiB) in {row['write_seconds']:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
            for p in procs if args.eval else ():
                js = folder / f"eval{p}.json"
                cmd = [*launcher(p), "-m", "segcal", "eval", "--pred", str(pred), "--labels", str(lab),
                       "--ignore-index", "255", "--json", str(js), "--no-progress"]
                m = measure(cmd, args.ref_threads if p == 1 else None)
                m["ece"] = json.loads(js.read_text())["ece"]
                m["pixels_per_s"] = row["labelled_pixels"] / m["seconds"]
                m["load_avg_1"] = os.getloadavg()[0]
                row["eval"][p] = m
                print(f"  eval  {p} proc: {m['seconds']:.2f} s, peak RSS {m['peak_rss_mb']:.0f} MiB, "
                      f"ECE {m['ece']:.6f}, load {m['load_avg_1']:.2f}", flush=True)
            for method in methods:
                row["fit"][method] = {}
                for p in procs:
                    js = folder / f"fit_{method}_{p}.json"
                    cmd = [*launcher(p), str(HERE), "_fit", str(pred), str(lab), method, str(js)]
                    if args.fit_memory_budget_mb is not None:
                        cmd += ["--budget-mb", str(args.fit_memory_budget_mb)]
                    if args.fit_optimizer is not None:
                        cmd += ["--optimizer", args.fit_optimizer]
                    if args.fit_max_iter is not None:
                        cmd += ["--max-iter", str(args.fit_max_iter)]
                    if args.fit_chunk_size is not None:
                        cmd += ["--chunk-size", str(args.fit_chunk_size)]
                    m = measure(cmd, args.ref_threads if p == 1 else None)
                    got = json.loads(js.read_text())
                    m.update({k: got[k] for k in ("fit_seconds", "optimizer", "mode", "n_pixels", "steps", "passes")})
                    m["load_avg_1"] = os.getloadavg()[0]
                    one = row["fit"][method].get(procs[0])
                    if one is not None and p != procs[0]:
                        m["max_param_diff_vs_1"] = max(
                            float(np.abs(np.subtract(got["state"][k], one["state"][k])).max()) for k in got["state"])
                    m["state"] = got["state"]
                    row["fit"][method][p] = m
                    print(f"  fit {method} {p} proc: {m['seconds']:.2f} s (fit {m['fit_seconds']:.2f} s, "
                          f"{m['optimizer']}, {m['mode']}, {m['steps']} steps, {m['passes']:.0f} passes), "
                          f"peak RSS {m['peak_rss_mb']:.0f} MiB, load {m['load_avg_1']:.2f}"
                          + (f", max |param diff| vs 1 proc {m['max_param_diff_vs_1']:.2e}"
                             if "max_param_diff_vs_1" in m else ""), flush=True)
            if n in peer_sizes:
                for peer in peers:
                    if peer == "torchmetrics":
                        js = folder / "tm.json"
                        m = measure([sys.executable, str(HERE), "_torchmetrics", str(pred), str(lab),
                                     str(args.classes), str(js)])
                        m.update(json.loads(js.read_text()))
                        m["pixels_per_s"] = row["labelled_pixels"] / m["seconds"]
                        row["peers"]["torchmetrics"] = m
                        print(f"  torchmetrics ECE: {m['seconds']:.2f} s, peak RSS {m['peak_rss_mb']:.0f} MiB, "
                              f"ECE {m['ece']:.6f}", flush=True)
                    elif peer == "fiducio":
                        for method in methods:
                            js = folder / f"fid_{method}.json"
                            m = measure([sys.executable, str(HERE), "_fiducio", str(pred), str(lab), method,
                                         str(js)])
                            m.update(json.loads(js.read_text()))
                            row["peers"][f"fiducio {method}"] = m
                            print(f"  fiducio {method}: {m['seconds']:.2f} s (fit {m['fit_seconds']:.2f} s), "
                                  f"peak RSS {m['peak_rss_mb']:.0f} MiB", flush=True)
            result["sizes"].append(row)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["load_avg_after"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_measure":
        return _measure(argv[argv.index("--") + 1 :])
    if argv and argv[0] == "_fit":
        ap = argparse.ArgumentParser()
        ap.add_argument("pred")
        ap.add_argument("labels")
        ap.add_argument("method")
        ap.add_argument("out")
        ap.add_argument("--budget-mb", type=float, default=None)
        ap.add_argument("--optimizer", default=None)
        ap.add_argument("--max-iter", type=int, default=None)
        ap.add_argument("--chunk-size", type=int, default=None)
        a = ap.parse_args(argv[1:])
        return _fit_worker(a.pred, a.labels, a.method, a.out, a.budget_mb, a.optimizer, a.max_iter,
                           a.chunk_size)
    if argv and argv[0] == "_torchmetrics":
        return _torchmetrics_worker(argv[1], argv[2], int(argv[3]), argv[4])
    if argv and argv[0] == "_fiducio":
        return _fiducio_worker(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default="8,32", help="image counts, comma-separated (500: Cityscapes val)")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--procs", default="1,2", help="process counts (the first is the reference)")
    ap.add_argument("--methods", default="ts,cmsop", help="calibrators fitted ('' for none)")
    ap.add_argument("--peers", default="torchmetrics,fiducio", help="peers on the largest size ('' for none)")
    ap.add_argument("--fit-memory-budget-mb", type=float, default=None)
    ap.add_argument("--fit-optimizer", default=None, choices=[None, "lbfgs", "adam"])
    ap.add_argument("--fit-max-iter", type=int, default=None,
                    help="the calibrator's L-BFGS iteration budget (default: the library's, 100); a cap "
                    "makes a streamed fit of many parameters (CMS-OP) affordable: every iteration re-reads "
                    "the folder")
    ap.add_argument("--fit-chunk-size", type=int, default=None,
                    help="pixels per chunk of the full-batch evaluation (default: the library's, 2^20); "
                    "the chunk's autograd graph is most of a streamed fit's working memory")
    ap.add_argument("--peers-at", default=None,
                    help="image counts at which the peers run, comma-separated (default: the largest)")
    ap.add_argument("--ref-threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the 1-process runs (torchrun gives each rank 1): with 1, the "
                    "1- and N-process fits add in the same order and their parameters are bitwise equal")
    ap.add_argument("--root", default=None, help="where to write the folders (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the folders")
    ap.add_argument("--reuse", action="store_true",
                    help="with --root: use a complete folder of the same size and shape already there")
    ap.add_argument("--no-eval", dest="eval", action="store_false", help="skip the segcal eval runs")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args(argv)
    result = run(args)
    if args.json:
        for row in result["sizes"]:
            for per in row["fit"].values():
                for m in per.values():
                    m.pop("state", None)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
