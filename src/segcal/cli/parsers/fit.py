"""Arguments of ``segcal fit`` (argparse only; the command runs in :mod:`segcal.cli.fit_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.options import add_device_arg, add_input_type_args, add_progress_arg


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("fit", help="fit a calibrator on a prediction folder or a model's outputs",
                       description="Fit a calibrator on held-out predictions and labels (--pred), or "
                       "on the outputs of a registered model run over images (--model, no logits "
                       "written); save it for `segcal apply` / segcal.load.")
    p.add_argument("--pred", default=None,
                   help="prediction folder (.npy/.npz, (C, *spatial)); or pass --model")
    p.add_argument("--labels", default=None,
                   help="label folder (same stems); with --model and a dataset alias, its labels")
    p.add_argument("--method", required=True, help="calibrator name or alias (see `segcal calibrators`)")
    p.add_argument("--out", required=True, help="where to save the fitted calibrator (.pt)")
    p.add_argument("--ignore-index", type=int, default=None, help="label value to ignore (e.g. 255)")
    add_input_type_args(p)
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of fitting")
    p.add_argument("--base", default=None,
                   help="base calibrator of a composed method (e.g. --method selective --base ts)")
    p.add_argument("--images", default=None,
                   help="with --pred: folder of input images (stems matching --pred) that fits the image "
                        "branch of LTS/IBTS (use_image=True; also as the base of selective scaling); "
                        "with --model: the images to run the model on (a folder or a dataset alias "
                        "such as camvid:val, as `segcal predict --images`)")
    p.add_argument("--objective", choices=("nll", "brier", "dice", "dece"), default="nll")
    p.add_argument("--optimizer", choices=("auto", "lbfgs", "adam"), default="auto",
                   help="auto: the calibrator's default (L-BFGS in memory, else Adam; Adam for LTS/IBTS)")
    p.add_argument("--max-iter", type=int, default=None, help="L-BFGS iteration budget")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (evaluations)")
    p.add_argument("--memory-budget-mb", type=float, default=2048, help="above it, data are streamed")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="pixels per chunk of a full-batch evaluation (default 2^20); smaller bounds the "
                        "fit's memory on many-class, full-resolution maps (docs/scaling.md)")
    p.add_argument("--subsample", type=float, default=None, help="fraction of valid pixels kept (seeded)")
    add_device_arg(p, "cpu")
    p.add_argument("--json", default=None, help="also write the summary as JSON")
    m = p.add_argument_group("fitting from a model (instead of --pred)")
    m.add_argument("--model", default=None, help="registered model to run over --images (see "
                   "`segcal predict --list-models`); its logits go to the fit without being written")
    m.add_argument("--checkpoint", default=None, help="weights of a segcal adapt checkpoint for --model")
    m.add_argument("--data-root", default=None, help="folder holding camvid/ and espnet/ (default: "
                   "SEGCAL_DATA or ../shared/data)")
    m.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    m.add_argument("--perturb", default=None, metavar="SPEC",
                   help="perturbation-augmented fitting: also fit on each image under segcal.shift "
                        "corruptions, e.g. gaussian_noise:1-5,contrast:3 (NAME, NAME:S or NAME:A-B; "
                        "all = every corruption); the validation images are perturbed alike")
    m.add_argument("--perturb-sample", type=int, default=None, metavar="K",
                   help="draw K of the --perturb perturbations per image (seeded by the image's "
                        "stem) instead of all of them")
    m.add_argument("--perturb-seed", type=int, default=0,
                   help="seed of the corruptions (per image: from seed and stem, as `segcal predict "
                        "--corruption --seed`) and of --perturb-sample")
    p.add_argument("--extra-pred", action="append", default=None, metavar="DIR",
                   help="with --pred: another prediction folder fitted together with it, e.g. "
                        "predictions of perturbed copies of the images made by yourself (the same stems "
                        "and --labels as --pred; they follow --pred's fit/validation split); repeatable")
    t = p.add_argument_group("target-adaptive recalibration (unlabelled target domain; issue 17)")
    t.add_argument("--target-pred", default=None, metavar="DIR",
                   help="unlabelled prediction folder of the target domain: after the fit, the "
                        "calibrator is corrected on it by one temperature factor c (saved as "
                        "'target_corrected': calibrated = cal(z) / c; its labels are never read)")
    t.add_argument("--target-images", default=None, metavar="DIR",
                   help="with --model: unlabelled target images; PseudoCal mixes pairs of them and "
                        "runs the model on the mixtures (the paper's recipe)")
    t.add_argument("--target-method", choices=("pseudocal", "ece-estimate"), default="pseudocal",
                   help="pseudocal: mixup pseudo-target set, anchored on the fit's own predictions "
                        "(or images); ece-estimate: minimise --target-estimator's label-free ECE")
    t.add_argument("--target-estimator", default=None, metavar="FILE",
                   help="ECE estimator trained on logits (segcal estimate --train) for "
                        "--target-method ece-estimate")
    t.add_argument("--target-max-images", type=int, default=64, metavar="N",
                   help="seeded subset of target (and source) images used by the correction")
    add_progress_arg(p)
    return p
