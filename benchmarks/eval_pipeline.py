"""``segcal eval`` end to end vs the in-memory metric engine, on the same data, in one run (issue 20).

Workload: a synthetic CamVid-shaped prediction folder (default 50 images x 12 classes x 360 x 480,
float16 peaked logits ``.npy``, uint8 PNG labels with 5 % void = 255), written to a temporary
folder (so the files are in the page cache: this measures decoding and compute, not the disk).

Timed, each the median of ``--repeats`` runs:

1. ``engine``: the arrays already in memory (float16 tensors), ``CalibrationMetrics.update`` per
   image + ``compute`` -- the in-memory engine time;
2. ``evaluate_folder(prefetch=0)`` and ``evaluate_folder(prefetch=2)``: the folder evaluation in
   this process, reading in the caller's thread vs the bounded prefetch thread;
3. ``segcal eval`` as a subprocess, process start included (``--json``), one process;
4. ``torchrun --nproc-per-node 2 ... segcal eval`` (``--procs 2``; skipped with ``--procs 1``).

Also timed: reading alone (``PredictionFolder.read`` of every file) and the process start
(``python -c "import segcal.cli.eval_cmd"``, and within it the interpreter alone and ``import
torch``), and the engine's first update in a fresh process (timed inside it, on a tiny batch: the
compiled kernels loaded from numba's cache, and numba's registries, which import scipy.linalg) --
the parts of the gap between (3) and (1). The ``/ engine`` column of (3) is the issue's "end to
end within 1.25x of the in-memory engine". The repeats run in rounds (every row once per round,
so that a change of the shared machine's load falls on every row alike); each row's median is
printed with the range of the 1-minute load average over the rounds (``--json``: every time).

Usage: ``python benchmarks/eval_pipeline.py [--images 50] [--repeats 3] [--procs 2]``, or on a real
folder: ``--pred DIR --labels DIR --ignore-index 11`` (e.g. the 233 CamVid test predictions of
``segcal predict --model espnet-camvid --images camvid:test``; the issue's workload).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segcal.io import PredictionFolder
from segcal.metrics import CalibrationMetrics
from segcal.pipeline.evaluate import evaluate_folder
from segcal.validation import as_tensor


def write_folder(root: Path, n: int, c: int, h: int, w: int, seed: int = 0) -> tuple[Path, Path]:
    """A prediction folder of peaked float16 logits and PNG labels (about 70 % accuracy)."""
    rng = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True)
    lab.mkdir(parents=True)
    for i in range(n):
        truth = rng.integers(0, c, size=(h // 8, w // 8)).repeat(8, 0).repeat(8, 1)
        z = rng.normal(size=(c, h, w)).astype(np.float32)
        hit = rng.random((h, w)) < 0.7
        guess = np.where(hit, truth, rng.integers(0, c, size=(h, w)))
        np.put_along_axis(z, guess[None], 4.0 + rng.random((1, h, w)).astype(np.float32) * 2, axis=0)
        y = truth.astype(np.uint8)
        y[rng.random((h, w)) < 0.05] = 255
        np.save(pred / f"img_{i:04d}.npy", z.astype(np.float16))
        Image.fromarray(y).save(lab / f"img_{i:04d}.png")
    return pred, lab


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--width", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2, help="also time torchrun with this many processes (1: skip)")
    ap.add_argument("--pred", default=None, help="an existing prediction folder instead of the synthetic one")
    ap.add_argument("--labels", default=None, help="its label folder (with --pred)")
    ap.add_argument("--ignore-index", type=int, default=255)
    ap.add_argument("--json", default=None, help="write every timing here")
    args = ap.parse_args()
    if (args.pred is None) != (args.labels is None):
        ap.error("--pred and --labels go together")
    ignore = args.ignore_index
    with tempfile.TemporaryDirectory(prefix="segcal-evalbench-") as tmp:
        t0 = time.perf_counter()
        if args.pred is None:
            pred, lab = write_folder(Path(tmp), args.images, args.classes, args.height, args.width)
            print(f"wrote {args.images} x {args.classes} x {args.height} x {args.width} float16 in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        else:
            pred, lab = Path(args.pred), Path(args.labels)
        folder = PredictionFolder(pred, lab)
        num_classes = int(folder.read(folder.items[0])[0].shape[0])
        print(f"{len(folder.items)} files, {num_classes} classes", flush=True)
        data = [folder.read(it)[:2] for it in folder.items]
        # the same tensors evaluate_folder hands to the engine (float16 scores, uint8 labels)
        xs = [as_tensor(np.array(s), "pred").unsqueeze(0) for s, _ in data]
        ys = [as_tensor(np.array(y), "labels").unsqueeze(0) for _, y in data]

        def engine() -> None:
            m = CalibrationMetrics(num_classes, ignore_index=ignore)
            for x, y in zip(xs, ys, strict=True):
                m.update(x, y)
            m.compute()

        def folder_eval(depth: int) -> None:
            evaluate_folder(pred, lab, ignore_index=ignore, prefetch=depth).metrics.compute()

        cli = [sys.executable, "-m", "segcal", "eval", "--pred", str(pred), "--labels", str(lab),
               "--ignore-index", str(ignore), "--no-progress", "--json", str(Path(tmp) / "m.json")]

        def end_to_end() -> None:
            subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)

        def torchrun() -> None:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.procs),
                            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cli[1:]],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def read_only() -> None:
            for it in folder.items:
                folder.read(it)

        def start_up() -> None:
            subprocess.run([sys.executable, "-c", "import segcal.cli.eval_cmd"], check=True)

        def interpreter() -> None:
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        def import_torch() -> None:
            subprocess.run([sys.executable, "-c", "import torch"], check=True)

        first_calls: list[float] = []

        def first_update() -> None:
            # a fresh process: the engine's first update on a tiny batch (loading the compiled
            # kernels from numba's cache and numba's own registries), timed inside the child
            out = subprocess.run([sys.executable, "-c", FIRST_UPDATE, str(num_classes)], check=True,
                                 capture_output=True, text=True)
            first_calls.append(float(out.stdout.split()[-1]))

        engine()  # warm-up (kernels, allocator)
        plan = [("in-memory engine (update + compute)", engine),
                ("reading only (folder.read of every file)", read_only),
                ("process start (python -c 'import segcal.cli.eval_cmd')", start_up),
                ("  of which: the interpreter (python -c pass)", interpreter),
                ("  of which: python -c 'import torch'", import_torch),
                ("first engine update in a fresh process (numba cache + registries), inside it", None),
                ("evaluate_folder, prefetch=0", lambda: folder_eval(0)),
                ("evaluate_folder, prefetch=2", lambda: folder_eval(2)),
                ("segcal eval, 1 process, end to end", end_to_end)]
        if args.procs > 1:
            plan.append((f"torchrun {args.procs} processes segcal eval, end to end", torchrun))
        # repeats in rounds (every row once per round), so that a change of the machine's load
        # falls on every row alike; the median of each row over the rounds
        times: dict[str, list[float]] = {name: [] for name, _ in plan}
        load = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            for name, fn in plan:
                if fn is None:
                    first_update()
                    times[name].append(first_calls[-1])
                    continue
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            load.append(os.getloadavg()[0])
        rows = [(name, statistics.median(ts)) for name, ts in times.items()]
    base = rows[0][1]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, median of {args.repeats} rounds, "
          f"1-min load average {min(load):.2f}-{max(load):.2f}")
    print("| run | wall s | / engine |\n|---|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {t / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_avg_1": load,
            "repeats": args.repeats, "files": len(folder.items), "rows": times}, indent=2))


FIRST_UPDATE = """
import sys, time
import torch
from segcal.metrics import CalibrationMetrics
c = int(sys.argv[1])
x, y = torch.randn(1, c, 8, 8).half(), torch.randint(0, c, (1, 8, 8))
m = CalibrationMetrics(c)
t0 = time.perf_counter()
m.update(x, y)
print(time.perf_counter() - t0)
"""

if __name__ == "__main__":
    main()
