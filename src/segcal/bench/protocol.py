"""The trial protocol of both benchmarks: image data, row drawing, split halves, one fit loop, one evaluation.

``../shared/methods.md`` §4-§5 ([RPH] and [SEL] protocols):

* :func:`split_halves`: per seed, the calibration images are split at random into a fit half and a
  selection half (the calibrators' ``val=`` early-stopping / best-iterate data).
* :func:`draw_rows`: a seeded, image-stratified subsample of the valid pixels of a half (the same
  number from each image; ``total=None``: every valid pixel).
* :func:`fit_rows`: the one fit loop. Pointwise calibrators are fitted on the drawn rows; whole-
  image calibrators (``cal.spatial``) through a strategy: :class:`WholeImages` (2D images of one
  size stacked into one batch, the loss restricted to the drawn pixels by a mask, the RGB images
  for an image branch) or :class:`WholeVolumes` (3D volumes of different shapes, each its own
  ``(1, C, X, Y, Z)`` batch). A calibrator whose fit raises is skipped with the reason recorded.
* :func:`evaluate`: the one evaluation of the uncalibrated model and every fitted calibrator on a
  set of test images. A *view* says what is scored of each image (:func:`pixel_sample`: a seeded
  fraction of the valid pixels as rows; :func:`whole_volume`: the whole volume) and *regions*
  add region-restricted accumulators (:class:`BandRegion`, :class:`ForegroundRegion`, or the same
  pixels with other bins: :class:`RebinnedRegion`). Each run keeps its per-image ``_stats``
  for the paired bootstrap (:mod:`segcal.bench.bootstrap`).
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from segcal.datasets.folders import normalize_image
from segcal.metrics import CalibrationMetrics
from segcal.metrics.regions import boundary_band, foreground_region_mask


# ---------------------------------------------------------------------------------- data
@dataclass
class ImageData:
    """Logits and labels of one image (or volume) of a bench split."""

    stem: str
    logits: np.ndarray  # (C, *spatial): float16 memory-mapped (CamVid) or float32 (volumes)
    labels: np.ndarray  # (*spatial)
    item: Any = None  # the dataset item: ``load_image()`` gives its raw input image
    transform: Any = None  # the corruption applied to the image before prediction

    def raw_image(self) -> np.ndarray:
        """The raw input image (corrupted like the prediction's input): RGB ``(H, W, 3)`` or a volume."""
        img = self.item.load_image()
        if self.transform is not None:
            img = self.transform(img, self.stem)
        return img

    def image(self) -> np.ndarray:
        """The normalised ``(3, H, W)`` input image of a calibrator's image branch."""
        return normalize_image(self.raw_image())


def stem_seed(seed: int, stem: str) -> int:
    """A seed per (seed, image stem): the same pixels of an image whatever the other images are."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(stem.encode())]).generate_state(1)[0])


def valid_index(labels: np.ndarray, ignore: int | None) -> np.ndarray:
    """Flat indices of the pixels whose label is not ``ignore``."""
    flat = labels.reshape(-1)
    return np.flatnonzero(flat != ignore) if ignore is not None else np.arange(flat.size)


def draw_rows(imgs: Sequence[ImageData], total: int | None, seed: int,
              ignore: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, image-stratified subsample of ``total`` valid pixels: ``(rows (P, C) float32, labels)``.

    ``total=None``: every valid pixel of every image, in order.
    """
    per = None if total is None else max(1, math.ceil(total / max(1, len(imgs))))
    rows, labs = [], []
    for im in imgs:
        idx = valid_index(im.labels, ignore)
        if idx.size == 0:
            continue
        if per is not None:
            rng = np.random.default_rng(stem_seed(seed, im.stem))
            idx = np.sort(rng.choice(idx, size=min(per, idx.size), replace=False))
        c = im.logits.shape[0]
        rows.append(np.asarray(im.logits).reshape(c, -1)[:, idx].T.astype(np.float32))
        labs.append(im.labels.reshape(-1)[idx].astype(np.int64))
    r = np.concatenate(rows)
    y = np.concatenate(labs)
    if total is not None and r.shape[0] > total:
        keep = np.sort(np.random.default_rng(seed).choice(r.shape[0], size=total, replace=False))
        r, y = r[keep], y[keep]
    return torch.from_numpy(r), torch.from_numpy(y)


def split_halves(stems: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of the calibration stems into (fit half, selection half)."""
    stems = sorted(stems)
    perm = np.random.default_rng(seed).permutation(len(stems))
    n_fit = (len(stems) + 1) // 2
    fit = sorted(stems[i] for i in perm[:n_fit])
    sel = sorted(stems[i] for i in perm[n_fit:])
    return fit, sel


# ---------------------------------------------------------------------------------- fitting
class FitStrategy(Protocol):
    """How whole-image calibrators are fitted, and what a fit record says about the data."""

    #: ``fit_info`` entries copied into the fit record (scalars only)
    info_keys: tuple[str, ...]

    def fit(self, cal: Any, fit_imgs: Sequence[ImageData], sel_imgs: Sequence[ImageData],
            total: int | None, seed: int, ignore: int | None) -> None: ...

    def describe(self, cal: Any, x: torch.Tensor, vx: torch.Tensor, fit_stems: list[str],
                 sel_stems: list[str], fit_imgs: Sequence[ImageData], n_selection: int) -> dict[str, Any]: ...


def spatial_record(cal: Any, n_selection: int) -> dict[str, Any]:
    """Step budget and early stopping of a whole-image fit (LTS, or the LTS base of selective scaling)."""
    info = getattr(cal, "fit_info", {}) or {}
    lts = cal.base if getattr(cal, "base", None) is not None else cal
    st = (getattr(lts, "fit_info", {}) or {}).get("stages") or [{}]
    settings = lts.fit_settings
    rec = {"selection_images": n_selection, "steps": st[0].get("steps"), "max_steps": settings["max_steps"],
           "images_per_step": settings["batch_size"], "best_val_nll": st[0].get("best_monitor"),
           "uses_image": bool(getattr(cal, "uses_image", False))}
    if "t_mispred" in info:
        rec["t_mispred"] = info["t_mispred"]
        rec["selector_accuracy"] = info.get("selector_accuracy")
    return rec


@dataclass
class WholeImages:
    """2D images of one size: stacked into one batch, the loss restricted by a mask to the pixels
    :func:`draw_rows` would draw; calibrators with an image branch get the input images too."""

    info_keys: tuple[str, ...] = ("optimizer", "mode")

    def fit(self, cal: Any, fit_imgs: Sequence[ImageData], sel_imgs: Sequence[ImageData],
            total: int | None, seed: int, ignore: int | None) -> None:
        use_image = bool(getattr(cal, "uses_image", False))

        def pack(group: Sequence[ImageData]) -> tuple[torch.Tensor, ...]:
            per = max(1, math.ceil((total or 0) / max(1, len(group)))) if total is not None else None
            xs, ys, ms, ims = [], [], [], []
            for im in group:
                if use_image:
                    ims.append(torch.from_numpy(im.image()))
                idx = valid_index(im.labels, ignore)
                m = np.zeros(im.labels.size, dtype=bool)
                if idx.size:
                    if per is not None:
                        rng = np.random.default_rng(stem_seed(seed, im.stem))
                        idx = rng.choice(idx, size=min(per, idx.size), replace=False)
                    m[idx] = True
                xs.append(torch.from_numpy(np.asarray(im.logits, dtype=np.float32)))
                ys.append(torch.from_numpy(im.labels.astype(np.int64)))
                ms.append(torch.from_numpy(m.reshape(im.labels.shape)))
            return torch.stack(xs), torch.stack(ys), torch.stack(ms), (torch.stack(ims) if ims else None)

        x, y, m, im = pack(fit_imgs)
        vx, vy, vm, vim = pack(sel_imgs)
        cal.fit(x, y, ignore_index=ignore, mask=m, val=(vx, vy, vm), images=im, val_images=vim)

    def describe(self, cal: Any, x: torch.Tensor, vx: torch.Tensor, fit_stems: list[str],
                 sel_stems: list[str], fit_imgs: Sequence[ImageData], n_selection: int) -> dict[str, Any]:
        rec = {"n_fit_pixels": int(x.shape[0]), "n_selection_pixels": int(vx.shape[0]),
               "fit_images": len(fit_stems), "selection_images": len(sel_stems)}
        if getattr(cal, "spatial", False):
            rec.update(spatial_record(cal, n_selection))
        return rec


@dataclass
class WholeVolumes:
    """3D volumes of different shapes: each case its own ``(1, C, X, Y, Z)`` batch (never stacked or padded)."""

    info_keys: tuple[str, ...] = ("optimizer", "mode", "iterations", "best_iteration")

    @staticmethod
    def batches(group: Sequence[ImageData]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.from_numpy(im.logits)[None], torch.from_numpy(im.labels)[None]) for im in group]

    def fit(self, cal: Any, fit_imgs: Sequence[ImageData], sel_imgs: Sequence[ImageData],
            total: int | None, seed: int, ignore: int | None) -> None:
        cal.fit(self.batches(fit_imgs), val=self.batches(sel_imgs))

    def describe(self, cal: Any, x: torch.Tensor, vx: torch.Tensor, fit_stems: list[str],
                 sel_stems: list[str], fit_imgs: Sequence[ImageData], n_selection: int) -> dict[str, Any]:
        n = int(sum(im.labels.size for im in fit_imgs)) if getattr(cal, "spatial", False) else int(x.shape[0])
        return {"fit_cases": fit_stems, "selection_cases": sel_stems, "n_fit_voxels": n}


@dataclass
class FitResult:
    """Fitted calibrators ``{(row, seed): cal}``, one record per fit, and the skipped rows with why."""

    cals: dict[tuple[str, int], Any] = field(default_factory=dict)
    fits: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def fit_rows(data: Sequence[ImageData], rows: Sequence[str], seeds: Sequence[int], *,
             create: Callable[..., Any], strategy: FitStrategy, total: int | None, ignore: int | None,
             log: Callable[[str], None], spatial_max_steps: int | None = None,
             spatial_selection_images: int | None = None) -> FitResult:
    """Fit every row per seed on the fit half, early-stopping on the selection half.

    Parameters
    ----------
    create
        ``create(row, seed=..., **kw)`` -> an unfitted calibrator (:func:`segcal.bench.spec.create_row`).
    strategy
        How whole-image calibrators are fitted (:class:`WholeImages`, :class:`WholeVolumes`).
    total
        Rows drawn per half (:func:`draw_rows`; None: every valid pixel).
    spatial_max_steps, spatial_selection_images
        Whole-image calibrators: Adam step budget (also for the LTS base of ``selective_lts``) and
        a seeded subset of the selection half for their early stopping (None: unchanged).
    """
    by_stem = {im.stem: im for im in data}
    res = FitResult()
    for seed in seeds:
        fit_stems, sel_stems = split_halves(list(by_stem), seed)
        fit_imgs = [by_stem[s] for s in fit_stems]
        sel_imgs = [by_stem[s] for s in sel_stems or fit_stems]
        x, y = draw_rows(fit_imgs, total, seed, ignore)
        vx, vy = draw_rows(sel_imgs, total, seed + 10_000, ignore)
        for row in rows:
            if row in res.skipped:
                continue
            t0 = time.perf_counter()
            sel = sel_imgs
            try:
                cal = create(row, seed=seed)
                if getattr(cal, "spatial", False):
                    if spatial_max_steps is not None:
                        cal = create(row, seed=seed, max_steps=int(spatial_max_steps))
                    if spatial_selection_images is not None and spatial_selection_images < len(sel_imgs):
                        pick = np.random.default_rng(seed + 20_000).choice(
                            len(sel_imgs), int(spatial_selection_images), replace=False)
                        sel = [sel_imgs[i] for i in sorted(pick)]
                    strategy.fit(cal, fit_imgs, sel, total, seed, ignore)
                else:
                    cal.fit(x, y, val=(vx, vy))
                cal.eval()
            except Exception as exc:  # a failing calibrator is skipped, never fatal for the table
                res.skipped[row] = f"fit failed (seed {seed}): {type(exc).__name__}: {exc}"
                log(f"skip {row}: {res.skipped[row]}")
                continue
            dt = time.perf_counter() - t0
            rec: dict[str, Any] = {"method": row, "seed": seed, "seconds": round(dt, 3),
                                   **strategy.describe(cal, x, vx, fit_stems, sel_stems, fit_imgs, len(sel))}
            if hasattr(cal, "temperature"):
                with contextlib.suppress(Exception):  # informative only
                    t = cal.temperature
                    rec["temperature"] = float(t() if callable(t) else t)
            info = getattr(cal, "fit_info", {}) or {}
            for k in strategy.info_keys:
                if k in info and isinstance(info[k], int | float | str):
                    rec[k] = info[k]
            res.fits.append(rec)
            res.cals[(row, seed)] = cal
            log(f"fit {row} seed {seed}: {dt:.1f} s")
    return res


# ---------------------------------------------------------------------------------- evaluation
def argmax_channels(z: torch.Tensor) -> torch.Tensor:
    """``z.argmax(1)`` (first maximum on ties) for ``(N, C, ...)``; several times faster than
    ``torch.argmax`` over the strided class axis of a 5D tensor on the CPU."""
    best = z[:, 0]
    idx = torch.zeros(best.shape, dtype=torch.long)
    for c in range(1, z.shape[1]):
        m = z[:, c] > best
        best = torch.where(m, z[:, c], best)
        idx[m] = c
    return idx


@dataclass
class Scored:
    """What is scored of one image: model scores, labels, and how a calibrator maps the scores."""

    scores: torch.Tensor  # (P, C) rows or (1, C, *spatial)
    labels: torch.Tensor  # (P,) or (1, *spatial)
    calibrate: Callable[[Any], torch.Tensor]
    index: np.ndarray | None = None  # flat pixel indices of the rows (pixel_sample)


def pixel_sample(fraction: float, seed: int, ignore: int | None) -> Callable[[ImageData], Scored]:
    """View: a seeded ``fraction`` of the valid pixels of an image, as ``(P, C)`` rows (the same
    pixels for every method: paired). Whole-image calibrators see the whole image."""

    def view(im: ImageData) -> Scored:
        idx = valid_index(im.labels, ignore)
        if fraction < 1.0 and idx.size:
            rng = np.random.default_rng(stem_seed(seed, im.stem))
            k = max(1, round(fraction * idx.size))
            idx = np.sort(rng.choice(idx, size=k, replace=False))
        c = im.logits.shape[0]
        rows = torch.from_numpy(np.asarray(im.logits).reshape(c, -1)[:, idx].T.astype(np.float32))
        y = torch.from_numpy(im.labels.reshape(-1)[idx].astype(np.int64))
        return Scored(rows, y, lambda cal: calibrate_rows(cal, rows, im, idx), idx)

    return view


def calibrate_rows(cal: Any, rows: torch.Tensor, im: ImageData, pick: np.ndarray) -> torch.Tensor:
    """Calibrated rows of a pixel sample: pointwise on the rows, whole-image calibrators on the
    whole image (with its input image for an image branch), then the sampled pixels taken."""
    with torch.no_grad():
        if getattr(cal, "spatial", False):
            z = torch.from_numpy(np.asarray(im.logits, dtype=np.float32))[None]
            if getattr(cal, "uses_image", False):
                out = cal(z, image=torch.from_numpy(im.image())[None])[0]
            else:
                out = cal(z)[0]
            return out.reshape(out.shape[0], -1)[:, pick].T.contiguous()
        return cal(rows)


def whole_volume(im: ImageData) -> Scored:
    """View: every voxel of a volume, as one ``(1, C, X, Y, Z)`` case."""
    z = torch.from_numpy(im.logits)[None]

    def calibrate(cal: Any) -> torch.Tensor:
        with torch.no_grad():
            return cal(z)

    return Scored(z, torch.from_numpy(im.labels)[None], calibrate)


class Region(Protocol):
    """A region-restricted accumulator: which scored pixels it sees (``start`` once per image,
    ``take`` per run), and what it adds to a run's values, fields and per-image stats."""

    name: str
    n_bins: int | None  # None: the evaluation's bins
    validate: bool

    def start(self, im: ImageData, scored: Scored, pred0: torch.Tensor) -> None: ...

    def take(self, out: torch.Tensor, y: torch.Tensor, pred: torch.Tensor,
             same: bool) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def summarize(self, acc: CalibrationMetrics, n_images: int, seen: list[int], n_bins: int,
                  all_pixels: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]: ...


def image_bins(acc: CalibrationMetrics) -> np.ndarray:
    """Per-image top-label bins ``(n_images, 3, n_bins)``: count, sum of confidence, sum of correct
    (:meth:`segcal.metrics.CalibrationMetrics.image_bins`, as NumPy)."""
    return acc.image_bins().numpy()


@dataclass
class BandRegion:
    """The LTS +-2-pixel boundary band of a 2D label map (:func:`segcal.metrics.regions.boundary_band`)."""

    name: str = "band"
    n_bins: int | None = None
    validate: bool = True
    _band: torch.Tensor | None = field(default=None, init=False, repr=False)

    def start(self, im: ImageData, scored: Scored, pred0: torch.Tensor) -> None:
        band = boundary_band(im.labels).reshape(-1)[scored.index]
        self._band = torch.from_numpy(band) if bool(band.any()) else None

    def take(self, out: torch.Tensor, y: torch.Tensor, pred: torch.Tensor,
             same: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self._band is None else (out[self._band], y[self._band])

    def summarize(self, acc: CalibrationMetrics, n_images: int, seen: list[int], n_bins: int,
                  all_pixels: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
        bins = np.zeros((n_images, 3, n_bins))
        if not seen:
            return {"band_ece": float("nan"), "band_image_ece": float("nan")}, {}, {"band_bins": bins}
        mb = acc.compute()
        bins[seen] = image_bins(acc)
        vals = {"band_ece": mb["ece"], "band_image_ece": mb["image_ece"], "band_pixels": mb["n_pixels"]}
        return vals, {}, {"band_bins": bins}


@dataclass
class ForegroundRegion:
    """The dilated true and predicted foreground of a volume
    (:func:`segcal.metrics.regions.foreground_region_mask`), recomputed when the argmax changes."""

    radius: int
    name: str = "fg"
    n_bins: int | None = None
    validate: bool = False
    _labels: np.ndarray | None = field(default=None, init=False, repr=False)
    _region0: torch.Tensor | None = field(default=None, init=False, repr=False)

    def start(self, im: ImageData, scored: Scored, pred0: torch.Tensor) -> None:
        self._labels = im.labels[None]
        self._region0 = self._mask(pred0)

    def _mask(self, pred: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(foreground_region_mask(self._labels, pred.numpy(), radius=self.radius))[0]

    def take(self, out: torch.Tensor, y: torch.Tensor, pred: torch.Tensor,
             same: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        region = self._region0 if same else self._mask(pred)
        # the region's voxels as one (1, C, n) "case": the same statistics as mask=, a quarter of the work
        return out[:, :, region], y[:, region]

    def summarize(self, acc: CalibrationMetrics, n_images: int, seen: list[int], n_bins: int,
                  all_pixels: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
        mf = acc.compute()
        vals = {"fg_ece": mf["ece"], "fg_nll": mf["nll"], "fg_fraction": mf["n_pixels"] / all_pixels}
        run = {"fg_reliability": {k: np.asarray(v).tolist() for k, v in mf["reliability"].items()}}
        return vals, run, {"fg_bins": image_bins(acc)}


@dataclass
class RebinnedRegion:
    """The same pixels with ``n_bins`` bins: the per-image ECE with that many bins (``image_ece<n>``)."""

    n_bins: int | None
    name: str = "rebinned"
    validate: bool = False

    def start(self, im: ImageData, scored: Scored, pred0: torch.Tensor) -> None:
        return None

    def take(self, out: torch.Tensor, y: torch.Tensor, pred: torch.Tensor,
             same: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        return out, y

    def summarize(self, acc: CalibrationMetrics, n_images: int, seen: list[int], n_bins: int,
                  all_pixels: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
        m = acc.compute()
        key = f"ece{self.n_bins}"
        return ({f"image_{key}": m["image_ece"]}, {},
                {f"img_{key}": np.asarray(m["image_ece_values"], dtype=np.float64)})


Extras = Callable[[Mapping[str, Any]], tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]]


def evaluate(imgs: Sequence[ImageData], cals: Mapping[tuple[str, int], Any], *, num_classes: int,
             n_bins: int, view: Callable[[ImageData], Scored], metrics_kw: Mapping[str, Any],
             regions: Sequence[Region] = (), extras: Extras | None = None) -> dict[str, Any]:
    """Metrics of the uncalibrated model and every fitted calibrator on one set of test images.

    Parameters
    ----------
    view
        What is scored of each image (:func:`pixel_sample`, :func:`whole_volume`).
    metrics_kw
        Arguments of every :class:`~segcal.metrics.CalibrationMetrics` (``ignore_index``,
        ``average_classes``).
    regions
        Region-restricted accumulators (each run gets its own, the region is computed once per image).
    extras
        Dataset columns from the pooled metrics: ``m -> (values, run fields, per-image stats)``.

    Returns
    -------
    dict
        ``n_images``, ``n_eval_pixels``, ``runs``: per ``"<method>@<seed>"`` its ``metrics``,
        ``reliability`` and the per-image ``_stats`` the paired bootstrap resamples.
    """
    keys: list[tuple[str, int]] = [("uncalibrated", 0), *cals]
    acc: dict[tuple[str, int], dict[str, Any]] = {}
    for k in keys:
        acc[k] = {"all": CalibrationMetrics(num_classes, n_bins=n_bins, **metrics_kw),
                  "racc": [CalibrationMetrics(num_classes, n_bins=r.n_bins or n_bins, validate=r.validate, **metrics_kw)
                           for r in regions],
                  "seen": [[] for _ in regions], "flips": []}
    n_eval = 0
    for i, im in enumerate(imgs):
        sc = view(im)
        pred0 = argmax_channels(sc.scores)
        n_eval += int(sc.labels.numel())
        for r in regions:
            r.start(im, sc, pred0)
        for key in keys:
            a = acc[key]
            out = sc.scores if key[0] == "uncalibrated" else sc.calibrate(cals[key])
            pred = argmax_channels(out)
            same = bool(torch.equal(pred, pred0))
            a["all"].update(out, sc.labels)
            for r, racc, seen in zip(regions, a["racc"], a["seen"], strict=True):
                part = r.take(out, sc.labels, pred, same)
                if part is not None:
                    racc.update(*part)
                    seen.append(i)
            a["flips"].append(0 if same else int((pred != pred0).sum()))
    n = len(imgs)
    res: dict[str, Any] = {"n_images": n, "n_eval_pixels": n_eval, "runs": {}}
    for key, a in acc.items():
        m = a["all"].compute()
        st = a["all"].state_dict()
        flips = np.asarray(a["flips"], dtype=np.float64)
        vals: dict[str, Any] = {
            "ece": m["ece"], "image_ece": m["image_ece"], "image_ece_std": m["image_ece_std"],
            "classwise_ece": m["classwise_ece"], "mce": m["mce"], "nll": m["nll"], "brier": m["brier"],
            "accuracy": m["accuracy"], "mean_confidence": m["mean_confidence"],
            "flip_rate": float(flips.sum() / max(m["n_pixels"], 1)), "n_pixels": m["n_pixels"],
        }
        run: dict[str, Any] = {"reliability": {k: np.asarray(v).tolist() for k, v in m["reliability"].items()}}
        stats: dict[str, np.ndarray] = {
            "bins": image_bins(a["all"]), "totals": st["img_totals"].numpy(), "cls": st["img_class"].numpy(),
            "img_ece": np.asarray(m["image_ece_values"], dtype=np.float64), "flips": flips,
            "avg": np.asarray(a["all"].average_classes),
        }
        parts = [r.summarize(racc, n, seen, racc.n_bins, m["n_pixels"])
                 for r, racc, seen in zip(regions, a["racc"], a["seen"], strict=True)]
        if extras is not None:
            parts.append(extras(m))
        for v, r_, s in parts:
            vals.update(v)
            run.update(r_)
            stats.update(s)
        res["runs"][f"{key[0]}@{key[1]}"] = {"method": key[0], "seed": key[1], "metrics": vals, **run,
                                             "_stats": stats}
    return res


__all__ = [
    "BandRegion", "FitResult", "FitStrategy", "ForegroundRegion", "ImageData", "RebinnedRegion", "Region",
    "Scored", "WholeImages", "WholeVolumes", "argmax_channels", "calibrate_rows", "draw_rows", "evaluate",
    "fit_rows", "image_bins", "pixel_sample", "spatial_record", "split_halves", "stem_seed", "valid_index", "whole_volume",
]
