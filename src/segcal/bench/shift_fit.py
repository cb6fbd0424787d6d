"""Fitting and checking helpers shared by the CamVid and MRI parts of ``segcal bench --shift-calibration``.

Perturbed copies of fit-set images carry the stem ``<stem>@<tag>`` (:func:`copies`);
:class:`Anchored` fits the shift-conditioned temperature (``sts``) clean-anchored on the clean
images of each fit half (:meth:`segcal.calibrators.ShiftConditionedTemperature.fit`, ``anchor=``)
and, with an ``l2_grid``, chooses the ridge of its weights by leave-one-family-out within the
families of the fit set (``docs/shift_calibration.md``; ``../shared/methods.md`` §9.1);
:func:`argmax_check` asserts that every argmax-preserving row kept the segmentation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import segcal.calibrators as sc
from segcal.bench.protocol import ImageData
from segcal.bench.spec import SHIFT_CALIBRATION, row_properties
from segcal.metrics import CalibrationMetrics


def copies(imgs: Sequence[ImageData], tag: str) -> list[ImageData]:
    """Perturbed val copies under unique stems ``<stem>@<tag>`` (one fit set holds several copies)."""
    return [ImageData(f"{im.stem}@{tag}", im.logits, im.labels, im.item, im.transform) for im in imgs]


def is_clean(stem: str) -> bool:
    """Whether a fit-set image is a clean one (perturbed copies are ``<stem>@<tag>``, :func:`copies`)."""
    return "@" not in stem


def family_of(stem: str) -> str | None:
    """The tag of a perturbed copy ``<stem>@<tag>`` (its family), ``None`` for a clean image."""
    return stem.split("@", 1)[1] if "@" in stem else None


def pooled_nll(cal: Any, imgs: Sequence[ImageData], ignore: int | None) -> float:
    """Pooled NLL of a fitted calibrator over every valid pixel of ``imgs`` (their logit maps as
    given, e.g. strided; the whole-image statistics are those of these maps), by the metric engine
    (:class:`segcal.metrics.CalibrationMetrics`, the NLL of every table)."""
    num_classes = int(np.asarray(imgs[0].logits).shape[0])
    engine = CalibrationMetrics(num_classes, ignore_index=ignore, per_image=False)
    with torch.no_grad():
        for im in imgs:
            z = torch.from_numpy(np.asarray(im.logits, dtype=np.float32))[None]
            engine.update(torch.as_tensor(cal(z)).float(), torch.from_numpy(np.asarray(im.labels, dtype=np.int64))[None])
    return float(engine.compute()["nll"])


def argmax_check(res: Mapping[str, Any], methods: Sequence[str], metrics: Sequence[str] = ("miou",)) -> dict[str, Any]:
    """For every argmax-preserving row of one evaluated condition: no flipped pixel (voxel) and each
    of ``metrics`` (CamVid: ``miou``; MRI: ``dice_ant``, ``dice_post``) exactly the uncalibrated
    value, in every seed; raises ``AssertionError`` otherwise. ``{row: {"argmax_kept", <metric>:
    [per seed], "uncalibrated": {metric: value}}}``."""
    base = next(r for r in res["runs"].values() if r["method"] == "uncalibrated")["metrics"]
    out: dict[str, Any] = {}
    for m in methods:
        if not row_properties(SHIFT_CALIBRATION, m)["argmax_preserving"]:
            continue
        runs = [r["metrics"] for r in res["runs"].values() if r["method"] == m]
        ok = all(r["flip_rate"] == 0.0 and all(r[k] == base[k] for k in metrics) for r in runs)
        out[m] = {"argmax_kept": ok, **{k: [r[k] for r in runs] for k in metrics},
                  "uncalibrated": {k: base[k] for k in metrics}}
        if not ok:
            raise AssertionError(f"{m} declares argmax preservation but changed the argmax or {'/'.join(metrics)}: "
                                 f"{out[m]}")
    return out


class _Anchored:
    """A calibrator whose ``fit`` gets ``anchor=`` (the clean images), everything else passed through."""

    def __init__(self, cal: Any, anchor: Any, anchor_range: Any = None) -> None:
        self._cal = cal
        self._anchor = anchor
        self._range = anchor_range

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cal, name)

    def fit(self, *args: Any, **kw: Any) -> Any:
        if self._range is not None:
            kw["anchor_range"] = self._range
        return self._cal.fit(*args, anchor=self._anchor, **kw)


#: the inner selection's criteria (:class:`Anchored`), each with what it scores
SELECTION_RULES: dict[str, str] = {
    "mean": "the mean pooled NLL over the inner held-out families' copies",
    "worst": "the largest pooled-NLL excess over clean TS over the inner held-out families' copies",
}


@dataclass
class Anchored:
    """A fit strategy for clean-anchored ``sts``: the base strategy's fit, with the clean images of
    the fit half (stems without ``@``, every valid pixel, one batch each) as the calibrator's
    ``anchor`` (:meth:`~segcal.calibrators.ShiftConditionedTemperature.fit`); calibrators that take
    no anchor, or fit halves without a clean image, are fitted by the base strategy unchanged.

    Parameters
    ----------
    base
        The base fit strategy (:class:`~segcal.bench.protocol.WholeImages` / ``WholeVolumes``).
    range_images
        More clean in-domain images whose statistics (never their labels) widen the clean range
        (``anchor_range=``; e.g. the training images). ``None``: the anchor images only.
    l2_grid
        Candidate ridge penalties ``l2`` of the ``sts`` weights (``../shared/methods.md`` §9.1).
        Empty: the calibrator's own ``l2``.
    feature_sets
        Candidate feature sets of ``sts`` (names of
        :data:`~segcal.calibrators.shift_aware.FEATURES`). Empty: the calibrator's own.
    criterion
        How a candidate is scored over the inner held-out families G: ``"mean"`` (default;
        sessions 25 and 27) the mean ``NLL(G)``; ``"worst"`` (session 26) the largest
        ``NLL(G) − NLL_0(G)``, ``NLL_0`` that of clean TS (the anchor temperature ``T_0``, the same
        for every candidate), i.e. the candidate that is least worse than clean TS on any family.

    With two or more candidates (``l2_grid`` × ``feature_sets``) and perturbed copies of at least
    two families in the fit set, the candidate is chosen by **leave-one-family-out within the fit
    set's families** (:meth:`select`): for each family G, an ``sts`` per candidate is fitted (the
    same anchor, range and settings) on the clean images and the copies of the other families of
    the fit half, early-stopped on the selection half without G, and scored on G's copies (both
    halves) by the pooled NLL; the choice is made **once per fit set**, on the split of the first
    seed the strategy fits, and used for every seed. The test sets are never seen (the run's
    held-out family is not in the fit set). Fewer families or one candidate: the first of each
    grid (no selection).
    """

    base: Any
    range_images: Sequence[ImageData] | None = None
    l2_grid: Sequence[float] = ()
    feature_sets: Sequence[Sequence[str]] = ()
    criterion: str = "mean"
    _choice: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.criterion not in SELECTION_RULES:
            raise ValueError(f"criterion: expected one of {sorted(SELECTION_RULES)}, got {self.criterion!r}")

    @property
    def info_keys(self) -> tuple[str, ...]:
        return tuple(self.base.info_keys)

    def fit(self, cal: Any, fit_imgs: Sequence[ImageData], sel_imgs: Sequence[ImageData],
            total: int | None, seed: int, ignore: int | None) -> None:
        clean = [im for im in fit_imgs if is_clean(im.stem)]
        if not isinstance(cal, sc.ShiftConditionedTemperature) or not clean:
            self.base.fit(cal, fit_imgs, sel_imgs, total, seed, ignore)
            return
        anchor = [(torch.from_numpy(np.asarray(im.logits, dtype=np.float32))[None],
                   torch.from_numpy(np.asarray(im.labels, dtype=np.int64))[None]) for im in clean]
        extra = None if not self.range_images else [
            torch.from_numpy(np.asarray(im.logits, dtype=np.float32))[None] for im in self.range_images]
        choice = None
        if self.l2_grid or self.feature_sets:  # once per fit set and row (its config but the seed)
            row = repr(sorted((k, v) for k, v in cal.get_config().items() if k != "seed"))
            if row not in self._choice:
                self._choice[row] = {**self.select(cal, fit_imgs, sel_imgs, total, seed, ignore, anchor, extra),
                                     "selected_on_seed": seed}
            choice = self._choice[row]
            cal.l2 = float(choice["l2"])
            cal.features = tuple(choice["features"])
        self.base.fit(_Anchored(cal, anchor, extra), fit_imgs, sel_imgs, total, seed, ignore)
        if choice is not None:
            cal.fit_info["l2_selection"] = choice

    def select(self, cal: Any, fit_imgs: Sequence[ImageData], sel_imgs: Sequence[ImageData],
               total: int | None, seed: int, ignore: int | None, anchor: Any, extra: Any) -> dict[str, Any]:
        """``{"l2", "features", "grid", "feature_sets", "families", "criterion", "nll": {candidate:
        {family: NLL}}, "reference_nll": {family: NLL_0}, "score": {candidate: score}}`` (class
        docstring); a candidate is named ``"<l2>|<feature>+<feature>..."``."""
        grid = [float(v) for v in self.l2_grid] or [float(cal.l2)]
        sets = [tuple(f) for f in self.feature_sets] or [tuple(cal.features)]
        fams = sorted({f for im in [*fit_imgs, *sel_imgs] if (f := family_of(im.stem)) is not None})
        out: dict[str, Any] = {"grid": grid, "feature_sets": [list(f) for f in sets], "families": fams,
                               "criterion": self.criterion}
        if len(grid) * len(sets) < 2 or len(fams) < 2:
            why = "one candidate" if len(grid) * len(sets) < 2 else "fewer than 2 families"
            return {**out, "l2": grid[0], "features": list(sets[0]), "selected": False, "why": why}
        config = {**cal.get_config(), "anchored": False}
        nll: dict[str, dict[str, float]] = {}
        ref: dict[str, float] = {}
        cands = {f"{l2!r}|{'+'.join(feats)}": (l2, feats) for feats in sets for l2 in grid}
        for g in fams:
            keep = [im for im in fit_imgs if family_of(im.stem) != g]
            keep_sel = [im for im in sel_imgs if family_of(im.stem) != g]
            hold = [im for im in [*fit_imgs, *sel_imgs] if family_of(im.stem) == g]
            for name, (l2, feats) in cands.items():
                inner = type(cal)(**{**config, "l2": l2, "features": list(feats)})
                self.base.fit(_Anchored(inner, anchor, extra), keep, keep_sel, total, seed, ignore)
                nll.setdefault(name, {})[g] = pooled_nll(inner.eval(), hold, ignore)
                if g not in ref:  # clean TS: the anchor temperature (stage 1, the same for every candidate)
                    ref[g] = pooled_nll(_Temperature(inner.fit_info["anchor_temperature"]), hold, ignore)
        mean = {k: float(np.mean(list(v.values()))) for k, v in nll.items()}
        worst = {k: max(v[g] - ref[g] for g in fams) for k, v in nll.items()}
        key = worst if self.criterion == "worst" else mean
        best = min(cands, key=lambda k: (key[k], mean[k], list(cands).index(k)))
        return {**out, "l2": cands[best][0], "features": list(cands[best][1]), "selected": True,
                "chosen": best, "score": key, "mean_nll": mean, "worst_vs_ts": worst, "nll": nll,
                "reference_nll": ref}

    def describe(self, cal: Any, *args: Any) -> dict[str, Any]:
        rec = self.base.describe(cal, *args)
        info = getattr(cal, "fit_info", None) or {}
        if "l2_selection" in info:
            rec["l2"] = info["l2_selection"]["l2"]
            rec["features"] = info["l2_selection"]["features"]
            rec["l2_selection"] = info["l2_selection"]
        return rec


class _Temperature:
    """``z / t``: clean TS at a given temperature, scored like a calibrator."""

    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.t


__all__ = ["SELECTION_RULES", "Anchored", "argmax_check", "copies", "family_of", "is_clean", "pooled_nll"]
