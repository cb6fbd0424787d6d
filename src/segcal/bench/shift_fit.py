"""Fitting helpers shared by the CamVid and MRI parts of ``segcal bench --shift-calibration``.

Perturbed copies of fit-set images carry the stem ``<stem>@<tag>`` (:func:`copies`);
:class:`Anchored` fits the shift-conditioned temperature (``sts``) clean-anchored on the clean
images of each fit half (:meth:`segcal.calibrators.ShiftConditionedTemperature.fit`, ``anchor=``).
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
    ``range_images``: more clean in-domain images whose statistics (never their labels) widen the
    clean range (``anchor_range=``; e.g. the training images), ``None``: the anchor images only."""

    base: Any
    range_images: Sequence[ImageData] | None = None

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
        self.base.fit(_Anchored(cal, anchor, extra), fit_imgs, sel_imgs, total, seed, ignore)

    def describe(self, *args: Any) -> dict[str, Any]:
        return self.base.describe(*args)


__all__ = ["Anchored", "copies", "is_clean"]
