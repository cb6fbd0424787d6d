"""Fitting helpers shared by the CamVid and MRI parts of ``segcal bench --shift-calibration``.

Perturbed copies of fit-set images carry the stem ``<stem>@<tag>`` (:func:`copies`);
:class:`Anchored` fits the shift-conditioned temperature (``sts``) clean-anchored on the clean
images of each fit half (:meth:`segcal.calibrators.ShiftConditionedTemperature.fit`, ``anchor=``)
and, with an ``l2_grid``, chooses the ridge of its weights by leave-one-family-out within the
families of the fit set (``docs/shift_calibration.md``; ``../shared/methods.md`` §9.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import segcal.calibrators as sc
from segcal.bench.protocol import ImageData


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
    given, e.g. strided; the whole-image statistics are those of these maps)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for im in imgs:
            z = torch.from_numpy(np.asarray(im.logits, dtype=np.float32))[None]
            y = torch.from_numpy(np.asarray(im.labels, dtype=np.int64))
            keep = torch.ones_like(y, dtype=torch.bool) if ignore is None else y != ignore
            if not bool(keep.any()):
                continue
            logp = torch.log_softmax(torch.as_tensor(cal(z)).float()[0].movedim(0, -1)[keep], dim=-1)
            total += float(-logp.gather(1, y[keep][:, None]).double().sum())
            count += int(keep.sum())
    return total / max(count, 1)


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
        Candidate ridge penalties ``l2`` of the ``sts`` weights (``../shared/methods.md`` §9.1). With
        two or more values and perturbed copies of at least two families in the fit set, ``l2`` is
        chosen by **leave-one-family-out within the fit set's families** (:meth:`select_l2`): for
        each family G, an ``sts`` per candidate is fitted (the same anchor, range and settings) on
        the clean images and the copies of the other families, and scored by the pooled NLL on G's
        copies; the candidate with the lowest mean NLL over the G is refitted on the whole set.
        The test sets are never seen (the held-out family of the run is not in the fit set). Fewer
        families, or one value: the first value (no selection). Empty: the calibrator's own ``l2``.
    """

    base: Any
    range_images: Sequence[ImageData] | None = None
    l2_grid: Sequence[float] = ()

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
        if self.l2_grid:
            choice = self.select_l2(cal, fit_imgs, sel_imgs, total, seed, ignore, anchor, extra)
            cal.l2 = float(choice["l2"])
        self.base.fit(_Anchored(cal, anchor, extra), fit_imgs, sel_imgs, total, seed, ignore)
        if choice is not None:
            cal.fit_info["l2_selection"] = choice

    def select_l2(self, cal: Any, fit_imgs: Sequence[ImageData], sel_imgs: Sequence[ImageData],
                  total: int | None, seed: int, ignore: int | None, anchor: Any, extra: Any) -> dict[str, Any]:
        """``{"l2": chosen, "grid", "families", "nll": {l2: {family: NLL}}}`` (class docstring)."""
        grid = [float(v) for v in self.l2_grid]
        fams = sorted({f for im in [*fit_imgs, *sel_imgs] if (f := family_of(im.stem)) is not None})
        if len(grid) < 2 or len(fams) < 2:
            return {"l2": grid[0], "grid": grid, "families": fams,
                    "selected": False, "why": "one candidate" if len(grid) < 2 else "fewer than 2 families"}
        config = {**cal.get_config(), "anchored": False}
        scores: dict[str, dict[str, float]] = {}
        for l2 in grid:
            scores[repr(l2)] = {}
            for g in fams:
                inner = type(cal)(**{**config, "l2": l2})
                keep = [im for im in fit_imgs if family_of(im.stem) != g]
                hold = [im for im in [*fit_imgs, *sel_imgs] if family_of(im.stem) == g]
                self.base.fit(_Anchored(inner, anchor, extra), keep,
                              [im for im in sel_imgs if family_of(im.stem) != g], total, seed, ignore)
                scores[repr(l2)][g] = pooled_nll(inner.eval(), hold, ignore)
        mean = {k: float(np.mean(list(v.values()))) for k, v in scores.items()}
        best = min(grid, key=lambda v: (mean[repr(v)], v))
        return {"l2": best, "grid": grid, "families": fams, "selected": True,
                "mean_nll": mean, "nll": scores}

    def describe(self, cal: Any, *args: Any) -> dict[str, Any]:
        rec = self.base.describe(cal, *args)
        info = getattr(cal, "fit_info", None) or {}
        if "l2_selection" in info:
            rec["l2"] = info["l2_selection"]["l2"]
            rec["l2_selection"] = info["l2_selection"]
        return rec


__all__ = ["Anchored", "copies", "family_of", "is_clean", "pooled_nll"]
