"""Throughput and peak memory of segcal's streaming metrics vs two references, in one process.

Workload (issue 2): 8 x 19 x 512 x 1024 float32 logits, int64 labels with 5 % ignored pixels.
Contenders, each timed on the same tensors (best of ``--repeats`` runs):

1. segcal: the FULL metric set of ``CalibrationMetrics`` (update + compute);
2. plain: a per-image softmax + max + bincount top-label ECE written directly in torch;
3. torchmetrics: ``multiclass_calibration_error`` (functional) on the whole tensor.

Peak extra memory is the rise of the process's resident high-water mark (VmHWM, reset through
``/proc/self/clear_refs``) above the resident size before the run, i.e. beyond the inputs.

Usage: ``python benchmarks/metrics_throughput.py [--device cpu|cuda] [--small]``
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from segcal.metrics import CalibrationMetrics


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def measure(fn, repeats: int, device: torch.device):
    best = float("inf")
    peak = 0.0
    out = None
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _reset_peak()
        base_rss = _rss_kb("VmRSS:")
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if device.type == "cuda":
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            extra = (_rss_kb("VmHWM:") - base_rss) / 1024
        best = min(best, dt)
        peak = max(peak, extra)
    return best, peak, out


def plain_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int, ignore: int) -> float:
    """The straightforward per-image implementation most people write."""
    count = torch.zeros(n_bins, dtype=torch.float64, device=logits.device)
    sconf = torch.zeros_like(count)
    sacc = torch.zeros_like(count)
    for i in range(logits.shape[0]):
        p = torch.softmax(logits[i], dim=0)
        conf, pred = p.max(dim=0)
        valid = labels[i] != ignore
        conf, pred, y = conf[valid], pred[valid], labels[i][valid]
        b = (conf.double() * n_bins).ceil().sub(1).clamp(0, n_bins - 1).long()
        count += torch.bincount(b, minlength=n_bins)
        sconf += torch.bincount(b, weights=conf.double(), minlength=n_bins)
        sacc += torch.bincount(b, weights=(pred == y).double(), minlength=n_bins)
    return float((sacc - sconf).abs().sum() / count.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="2 x 19 x 256 x 512 instead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-torchmetrics", action="store_true")
    ap.add_argument("--backend", default="auto", help="segcal backend: auto, torch or numba")
    ap.add_argument(
        "--distribution",
        default="random",
        choices=["random", "segmentation"],
        help="random: N(0, 3^2) logits; segmentation: a peaked, mostly-correct net-like field",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    n, c, h, w = (2, 19, 256, 512) if args.small else (8, 19, 512, 1024)
    g = torch.Generator().manual_seed(0)
    if args.distribution == "random":
        logits = torch.randn(n, c, h, w, generator=g) * 3
        labels = torch.randint(0, c, (n, h, w), generator=g)
    else:  # blocky label field; the true class gets a margin of 2..10 logits on 85 % of pixels
        coarse = torch.randint(0, c, (n, h // 32, w // 32), generator=g)
        labels = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)
        hit = torch.where(torch.rand(n, h, w, generator=g) < 0.85, labels, torch.randint(0, c, (n, h, w), generator=g))
        logits = torch.randn(n, c, h, w, generator=g)
        logits.scatter_add_(1, hit[:, None], 2 + 8 * torch.rand(n, 1, h, w, generator=g))
    logits = logits.to(dev)
    labels[torch.rand(n, h, w, generator=g) < 0.05] = 255
    labels = labels.to(dev)
    px = n * h * w
    print(f"workload: {n}x{c}x{h}x{w} float32 logits ({logits.numel() * 4 / 2**20:.0f} MiB), "
          f"{px / 1e6:.1f} Mpx, 5% ignored, {args.distribution} logits; device {dev}; "
          f"torch threads {torch.get_num_threads()}; segcal backend {args.backend}")

    def run_segcal():
        m = CalibrationMetrics(c, n_bins=15, ignore_index=255, device=dev, backend=args.backend)
        m.update(logits, labels)
        return m.compute()

    # warm-up on a tiny batch: imports, numba compilation and allocator pools are not measured
    warm = CalibrationMetrics(c, n_bins=15, ignore_index=255, device=dev, backend=args.backend)
    warm.update(logits[:1, :, :8], labels[:1, :8])
    warm.compute()
    plain_ece(logits[:1, :, :8], labels[:1, :8], 15, 255)
    rows = []
    load0 = os.getloadavg()[0]
    t_s, m_s, res = measure(run_segcal, args.repeats, dev)
    rows.append(("segcal full metric set", t_s, m_s, res["ece"]))
    t_p, m_p, ece_p = measure(lambda: plain_ece(logits, labels, 15, 255), args.repeats, dev)
    rows.append(("plain softmax+bincount ECE", t_p, m_p, ece_p))
    t_t = None
    if not args.skip_torchmetrics:
        from torchmetrics.functional.classification import multiclass_calibration_error

        def run_tm():
            return float(multiclass_calibration_error(logits, labels, num_classes=c, n_bins=15, ignore_index=255))

        t_t, m_t, ece_t = measure(run_tm, max(1, args.repeats - 1), dev)
        rows.append(("torchmetrics multiclass_calibration_error", t_t, m_t, ece_t))
    print(f"{'contender':<44} {'time s':>8} {'Mpx/s':>8} {'peak extra MiB':>15} {'ECE':>10}")
    for name, t, mem, e in rows:
        print(f"{name:<44} {t:>8.3f} {px / t / 1e6:>8.1f} {mem:>15.1f} {e:>10.6f}")
    print(f"ratio segcal / plain ECE        : {t_s / t_p:.2f}x (target <= 1.2)")
    if t_t is not None:
        print(f"speed-up segcal vs torchmetrics : {t_t / t_s:.2f}x (target >= 3)")
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, 1-min load average "
          f"{load0:.2f} before, {os.getloadavg()[0]:.2f} after, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
