"""``segcal adapt``: source-free adaptation guided by estimated calibration (Cal-SFDA) and baselines.

::

    segcal adapt --model espnet-camvid --target camvid:train --estimator est.pt \\
                 --method calsfda|tent|selftrain --out DIR [--rounds R] [--epochs E] [--quick]
                 [--resume DIR/epoch_003.pt] [--corruption NAME --severity S] [--seed N]
                 [--mapping cityscapes-camvid]

The target folder holds unlabeled images only; for ``camvid:train`` only the image folder is
resolved (the labels are never opened). See ``docs/adaptation.md``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

MAPPINGS = ("cityscapes-camvid",)


def add_parser(sub: Any) -> None:
    from segcal.adaptation.loop import METHODS

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
    p.add_argument("--method", default="calsfda", help=f"one of {', '.join(METHODS)} (default calsfda)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, pseudo-labels, adapt_log.json)")
    p.add_argument("--rounds", type=int, default=3, help="pseudo-label rounds (default 3)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per round (default 2)")
    p.add_argument("--lr", type=float, default=5e-5, help="SGD learning rate (default 5e-5, the reference's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eta", type=float, default=0.0, help="weight of the entropy term (default 0: off)")
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
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1..5 (default 3)")
    p.add_argument("--mapping", choices=MAPPINGS, default=None,
                   help="class mapping applied to the logits before the estimator only (the model is adapted "
                   "in its own label space): cityscapes-camvid for espnet-cityscapes with a CamVid-space estimator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="data root (default: SEGCAL_DATA or ../shared/data)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _mapping(name: str | None):
    if name is None:
        return None
    from segcal.models import ClassMapping
    from segcal.models.espnet import CITYSCAPES_TO_CAMVID

    return ClassMapping(CITYSCAPES_TO_CAMVID, 20)


def run(args: argparse.Namespace) -> int:
    from segcal.adaptation.loop import METHODS, adapt, resolve_target_images
    from segcal.cli import CLIError

    if args.method not in METHODS:
        raise CLIError(f"--method: unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.method == "calsfda" and args.estimator is None:
        raise CLIError("--estimator is required for --method calsfda (an estimator file, or maxprob/entropy)")
    paths = resolve_target_images(args.target, args.data_root)  # fails early on an empty folder

    from segcal.estimation import load_estimator
    from segcal.models import create_model, get_spec

    get_spec(args.model)  # unknown model: ValueError listing the known ones
    estimator = load_estimator(args.estimator) if args.estimator is not None else None
    model = create_model(args.model, data_root=args.data_root, device=args.device)
    mapping = _mapping(args.mapping)
    transform = None
    if args.corruption:
        from segcal.shift import make_transform

        transform = make_transform(args.corruption, args.severity, args.seed)
    res = adapt(
        model, paths, estimator, method=args.method, rounds=args.rounds, epochs_per_round=args.epochs,
        lr=args.lr, seed=args.seed, out_dir=args.out, resume=args.resume, quick=args.quick,
        class_mapping=mapping, transform=transform, progress=not args.no_progress,
        batch_size=args.batch_size, eta=args.eta, max_images=args.max_images,
        bn_stats_pass=not args.no_bn_reset, warmup_affine=args.warmup == "stats+affine",
    )
    print(f"{'epoch':>5} {'round':>5} {'phase':>7} {'loss':>9} {'est. ECE':>9} {'coverage':>9}")
    for e in res.epochs:
        est = "-" if e["estimated_ece"] is None else f"{e['estimated_ece']:.4f}"
        cov = "-" if e["coverage"] is None else f"{e['coverage']:.3f}"
        mark = "  <- selected" if e["epoch"] == res.selected_epoch else ""
        loss = "-" if e["loss"] is None else f"{e['loss']:.4f}"
        print(f"{e['epoch']:>5} {e['round']:>5} {e['phase']:>7} {loss:>9} {est:>9} {cov:>9}{mark}")
    print(f"selected ({res.selection_rule}): {res.selected_checkpoint}")
    print(f"log: {res.log_path}  ({res.seconds:.1f} s)", file=sys.stderr)
    return 0
