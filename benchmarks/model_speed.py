"""ESPNet forward / training-step speed: channels-last layout (``create_model``'s default) vs the
default NCHW layout, in one process.

For each model, the same weights are run in both layouts on the same input, alternating the two in
every repetition (so drifts in machine load hit both alike); the median time per call is reported
with the ratio (default / channels-last) and the largest absolute logit difference between the
two layouts (float rounding only). Workloads: inference on one 360 x 480 image (``no_grad``,
``eval()``: what ``segcal predict`` and the adaptation evaluation run) and one training step
(forward + backward, ``train()``, batch 4: what ``segcal adapt`` runs). No shared data needed
(random weights unless ``--weights`` finds the ESPNet files under the data root).

Usage::

    python benchmarks/model_speed.py                 # 1 thread, 15 repetitions
    python benchmarks/model_speed.py --threads 2 --reps 25 --weights
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from segcal.models import ESPNet, create_model, use_channels_last


def build(name: str, weights: bool) -> torch.nn.Module:
    if weights:
        return create_model(name, device="cpu", channels_last=False).module
    return ESPNet(12 if name == "espnet-camvid" else 20).eval()


def timed(fn, module: torch.nn.Module) -> float:
    t = time.perf_counter()
    fn(module)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--weights", action="store_true", help="use the pretrained ESPNet weights (data root)")
    ap.add_argument("--models", default="espnet-camvid,espnet-cityscapes")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x1 = torch.randn(1, 3, 360, 480)
    x4 = torch.randn(4, 3, 360, 480)
    print(f"torch {torch.__version__}, {a.threads} thread(s), median of {a.reps} alternating repetitions")
    print(f"{'model':18s} {'workload':22s} {'NCHW s':>8s} {'chan-last s':>11s} {'ratio':>6s} {'max|diff|':>10s}")
    for name in a.models.split(","):
        ref = build(name, a.weights)
        fast = copy.deepcopy(ref)
        use_channels_last(fast)
        with torch.no_grad():
            diff = float((ref(x1) - fast(x1)).abs().max())

        def infer(m):
            m.eval()
            with torch.no_grad():
                m(x1)

        def train_step(m):
            m.train()
            m.zero_grad(set_to_none=True)
            m(x4).logsumexp(1).mean().backward()

        for label, fn in (("inference, 1 image", infer), ("train step, batch 4", train_step)):
            fn(ref), fn(fast)  # warm-up
            ta, tb = [], []
            for _ in range(a.reps):
                ta.append(timed(fn, ref))
                tb.append(timed(fn, fast))
            ma, mb = statistics.median(ta), statistics.median(tb)
            print(f"{name:18s} {label:22s} {ma:8.4f} {mb:11.4f} {ma / mb:6.2f} {diff:10.2e}", flush=True)


if __name__ == "__main__":
    main()
