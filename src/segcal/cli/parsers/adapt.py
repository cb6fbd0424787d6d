"""Arguments of ``segcal adapt`` (argparse only; the command runs in :mod:`segcal.cli.adapt_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_device_arg, add_progress_arg

#: the adaptation methods (the same tuple as :data:`segcal.adaptation.loop.METHODS`, which a test checks)
METHODS = ("calsfda", "tent", "selftrain")
MAPPINGS = ("cityscapes-camvid",)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "adapt",
        help="source-free adaptation to unlabeled target images (Cal-SFDA, TENT, self-training)",
        description="Adapt a pretrained model to a folder of unlabeled target images. calsfda: BN warm-up "
        "epoch, then rounds of ECE-weighted class-balanced pseudo-labels and the symmetric-CE + negative "
        "learning loss; the checkpoint with the lowest estimated ECE is selected. tent / selftrain: "
        "baselines (last epoch selected). One checkpoint per epoch and adapt_log.json are written to --out.",
    )
    p.add_argument("--model", required=True, help="registered model name (segcal predict --list-models)")
    p.add_argument("--target", required=True, help="folder of unlabeled target images, or an alias (camvid:train)")
    p.add_argument("--estimator", default=None,
                   help="ECE estimator file (.pt, segcal estimate --train) or a baseline: maxprob, entropy "
                   "(required for calsfda; logged only for the baselines)")
    p.add_argument("--method", default="calsfda", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="output folder (checkpoints, pseudo-labels, adapt_log.json); "
                   "not the target folder nor inside it")
    p.add_argument("--rounds", type=int, default=3, help="pseudo-label rounds")
    p.add_argument("--epochs", type=int, default=2, help="epochs per round")
    p.add_argument("--lr", type=float, default=5e-5, help="SGD learning rate (the reference's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--eta", type=float, default=0.0, help="weight of the entropy term (0: off)")
    p.add_argument("--no-bn-reset", action="store_true",
                   help="calsfda warm-up without the BN statistics pass (no reset/re-estimation of the running "
                   "statistics before the BN-affine epoch; the reference code's literal behaviour, methods.md §3.15(f))")
    p.add_argument("--warmup", choices=["stats", "stats+affine"], default="stats",
                   help="calsfda epoch 0: only re-estimate the BN statistics on the target (AdaBN, default), or "
                   "also train the BN affine parameters for one epoch (the reference's warm-up; it collapsed ESPNet "
                   "at lr 1e-3 in the protocol runs, docs/adaptation.md)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many target images")
    p.add_argument("--quick", action="store_true", help="4 images, one round of 2 epochs (smoke test)")
    p.add_argument("--resume", default=None, help="continue from this epoch checkpoint (same --out)")
    p.add_argument("--corruption", default=None, help="corrupt the target images on load (synthetic shift)")
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1..5")
    p.add_argument("--mapping", choices=MAPPINGS, default=None,
                   help="class mapping applied to the logits before the estimator only (the model is adapted "
                   "in its own label space): cityscapes-camvid for espnet-cityscapes with a CamVid-space estimator")
    p.add_argument("--seed", type=int, default=0, help="seed of the image order and of the corruption")
    p.add_argument("--data-root", default=None, help="data root (default: SEGCAL_DATA or ../shared/data)")
    add_device_arg(p, "cpu")
    add_progress_arg(p)
    return p
