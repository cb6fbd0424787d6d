"""Seeded training of the reference 3D U-Net on the fixed MSD hippocampus split (CPU).

Run: ``python scripts/train_unet3d_hippocampus.py --out src/segcal/models/weights/unet3d_hippocampus.pt``
(or ``python -m segcal.pipeline.train_unet3d``)

Recipe: per-case z-score, random crops of ``--crop`` voxels (volumes zero-padded up to the crop
size first), batch ``--batch``, MONAI ``DiceCELoss`` (softmax, one-hot targets, background
included), Adam (lr ``--lr``) with linear warm-up over the first 5 % of iterations and cosine decay to
zero, ``--iters`` iterations. Deterministic: ``torch.manual_seed``, ``monai.utils.set_determinism``
and a numpy ``default_rng(seed)`` for batch sampling and crop offsets. At the end it evaluates
foreground Dice on the 50 test cases with the prediction path (whole volumes padded to a multiple
of 8) and writes weights + a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from segcal.datasets.hippocampus import CLASS_NAMES, dataset_dir, load_case, load_split, normalise
from segcal.errors import missing_dependency
from segcal.models.unet3d import UNET_CONFIG, WEIGHTS_FILE, build_unet
from segcal.pipeline.predict import predict_logits


def dice_stats(pred: np.ndarray, label: np.ndarray, num_classes: int = 3) -> np.ndarray:
    """Per class [intersection, |pred|, |label|] (shape (C, 3))."""
    out = np.zeros((num_classes, 3), dtype=np.int64)
    for k in range(num_classes):
        p, t = pred == k, label == k
        out[k] = (np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t))
    return out


def summarise_dice(stats: list[np.ndarray], class_names: Sequence[str]) -> dict:
    """Case-wise mean/std and pooled Dice per class, and the foreground means."""
    s = np.stack(stats)  # (N, C, 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_case = 2 * s[:, :, 0] / (s[:, :, 1] + s[:, :, 2])
    pooled = 2 * s[:, :, 0].sum(0) / (s[:, :, 1].sum(0) + s[:, :, 2].sum(0))
    res = {"n_cases": len(stats), "casewise_mean": {}, "casewise_std": {}, "pooled": {}}
    for k, name in enumerate(class_names):
        res["casewise_mean"][name] = float(np.nanmean(per_case[:, k]))
        res["casewise_std"][name] = float(np.nanstd(per_case[:, k]))
        res["pooled"][name] = float(pooled[k])
    fg = list(class_names[1:])
    res["casewise_mean"]["foreground_mean"] = float(np.mean([res["casewise_mean"][c] for c in fg]))
    res["pooled"]["foreground_mean"] = float(np.mean([res["pooled"][c] for c in fg]))
    return res


def evaluate(model: torch.nn.Module, cases: list[dict], class_names: Sequence[str]) -> dict:
    """Foreground Dice of ``model`` on ``cases`` through the prediction path (whole volumes)."""
    stats = []
    for c in cases:
        pred = predict_logits(model, c["image"]).argmax(0)
        stats.append(dice_stats(pred, c["label"], len(class_names)))
    return summarise_dice(stats, class_names)


def _random_crop(
    img: np.ndarray, lab: np.ndarray, crop: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    pads = [(0, max(0, c - s)) for s, c in zip(img.shape, crop, strict=True)]
    if any(b for _, b in pads):
        # place the volume at a random offset inside the padded box
        pads = []
        for s, c in zip(img.shape, crop, strict=True):
            extra = max(0, c - s)
            a = int(rng.integers(0, extra + 1))
            pads.append((a, extra - a))
        img = np.pad(img, pads)
        lab = np.pad(lab, pads)
    starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(img.shape, crop, strict=True)]
    sl = tuple(slice(a, a + c) for a, c in zip(starts, crop, strict=True))
    return img[sl], lab[sl]


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on the test cases, write the weights and a JSON summary (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None, help="weights file (default: the committed path)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, nargs=3, default=(32, 48, 32))
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--limit-train", type=int, default=None, help="(smoke tests) use N train cases")
    ap.add_argument("--limit-test", type=int, default=None, help="(smoke tests) use N test cases")
    args = ap.parse_args(argv)

    try:
        import monai
        from monai.losses import DiceCELoss
        from monai.utils import set_determinism
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise missing_dependency("monai", "medical", "training the 3D U-Net") from exc

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    set_determinism(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    t_wall, t_cpu = time.perf_counter(), time.process_time()

    folder = dataset_dir(args.data_root)
    split = load_split()
    train_ids = split["train"][: args.limit_train]
    test_ids = split["test"][: args.limit_test]
    train = [load_case(folder, i) for i in train_ids]
    for c in train:
        c["norm"] = normalise(c["image"])
    test = [load_case(folder, i) for i in test_ids]
    print(f"loaded {len(train)} train / {len(test)} test cases from {folder}", flush=True)

    model = build_unet()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warm = max(1, args.iters // 20)

    def lr_at(it: int) -> float:
        if it < warm:
            return args.lr * (it + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, args.iters - warm)))

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    log = []
    model.train()
    run_loss = 0.0
    for it in range(args.iters):
        idx = rng.integers(0, len(train), size=args.batch)
        xs, ys = [], []
        for i in idx:
            x, y = _random_crop(train[i]["norm"], train[i]["label"], tuple(args.crop), rng)
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.stack(xs)[:, None]).float()
        y = torch.from_numpy(np.stack(ys)[:, None])
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        run_loss += loss.item()
        if (it + 1) % args.log_every == 0 or it + 1 == args.iters:
            n = (it % args.log_every) + 1
            rec = {"iter": it + 1, "loss": round(run_loss / n, 5), "lr": round(lr_at(it), 6),
                   "wall_s": round(time.perf_counter() - t_wall, 1),
                   "cpu_s": round(time.process_time() - t_cpu, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            run_loss = 0.0

    model.eval()
    train_wall, train_cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
    dice = evaluate(model, test, CLASS_NAMES)
    print("test dice:", json.dumps(dice), flush=True)

    out = Path(args.out) if args.out else WEIGHTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()}
    torch.save({"state_dict": state, "config": config}, out)
    summary = {
        "command": "python " + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "config": config,
        "n_train": len(train), "n_test": len(test),
        "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
        "total_wall_s": round(time.perf_counter() - t_wall, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "python": platform.python_version(),
        "log": log, "test_dice": dice, "weights": str(out), "weights_bytes": out.stat().st_size,
    }
    summary["monai"] = monai.__version__
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes) and {out.with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
