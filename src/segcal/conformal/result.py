"""A fitted conformal threshold: fit it on a loss table, save / load it as JSON, apply it to an image.

:func:`fit_threshold` turns a :class:`~segcal.conformal.tables.LossTable` (rows = images or
volumes, the exchangeable units) into a :class:`ConformalResult` by CRC (``../shared/methods.md``
§9.3) or Learn-then-Test (§9.4) (:mod:`segcal.conformal.bounds`). The result records the
guarantee in words; :func:`apply_sets` gives one image's pixel sets (bit-packed over the class
axis) and set-size map with the same float64 comparison ``p >= 1 - λ`` the table was built with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segcal.conformal.bounds import check_level, crc_index, ltt_index
from segcal.conformal.tables import RISKS, LossTable, check_grid, check_risk
from segcal.errors import InputError
from segcal.io import atomic_write, to_jsonable
from segcal.io.files import read_json
from segcal.version import __version__

FORMAT_NAME = "segcal-conformal"
FORMAT_VERSION = 1
METHODS: tuple[str, ...] = ("crc", "ltt")

_RISK_WORDS = {
    "miscoverage": "the fraction of an image's valid pixels whose label is outside the pixel set {{k : p_k >= {t}}}",
    "fnr": "the fraction of an image's valid class-{k} pixels missed by the mask {{p_{k} >= {t}}} (0 for an "
           "image without class {k})",
    "coverage": "the indicator that an image's pixel-set coverage is below tau={tau} (COSE)",
}


@dataclass
class ConformalResult:
    """A conformal threshold and the guarantee it carries.

    Attributes
    ----------
    lam
        The chosen λ̂ (sets / masks ``{p >= 1 - λ̂}``).
    alpha, delta
        The target risk and (LTT only) the error probability; ``delta`` is ``None`` for CRC.
    risk, class_index, tau, ignore_index
        The loss (:data:`~segcal.conformal.tables.RISKS`) and its settings.
    method
        ``"crc"`` or ``"ltt"``.
    n_images
        Calibration images (or volumes): the exchangeable units.
    grid
        The λ grid searched.
    calibration_risk, mean_size
        Mean calibration loss and mean set size / mask volume fraction at λ̂.
    meta
        Free-form provenance (e.g. the calibrator file, the prediction folder).
    """

    lam: float
    alpha: float
    delta: float | None
    risk: str
    method: str
    n_images: int
    grid: list[float]
    calibration_risk: float
    mean_size: float
    class_index: int | None = None
    tau: float | None = None
    ignore_index: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def guarantee(self) -> str:
        """The guarantee, in words."""
        loss = _RISK_WORDS[self.risk].format(t=f"1 - {self.lam:.6g}", k=self.class_index, tau=self.tau)
        unit = (f"images (or volumes) exchangeable with the {self.n_images} calibration images; pixels are "
                "never treated as exchangeable")
        if self.method == "crc":
            return (f"Conformal risk control: the expected per-image loss, {loss}, is at most alpha={self.alpha} "
                    f"(expectation over the calibration set and a new test image) for test {unit}.")
        return (f"Learn-then-Test (Hoeffding-Bentkus p-values, fixed-sequence testing): with probability at "
                f"least {1 - self.delta:.6g} over the calibration set, the expected per-image loss, {loss}, "  # type: ignore[operator]
                f"is at most alpha={self.alpha} for test {unit}.")

    def to_dict(self) -> dict[str, Any]:
        """The JSON payload (format ``segcal-conformal`` version 1, guarantee in words)."""
        return to_jsonable({
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "segcal_version": __version__,
            "lambda": self.lam, "threshold": 1.0 - self.lam, "alpha": self.alpha, "delta": self.delta,
            "risk": self.risk, "method": self.method, "n_images": self.n_images, "grid": self.grid,
            "calibration_risk": self.calibration_risk, "mean_size": self.mean_size,
            "class_index": self.class_index, "tau": self.tau, "ignore_index": self.ignore_index,
            "exchangeable_unit": "image", "guarantee": self.guarantee, "meta": self.meta,
        })

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (atomically)."""
        with atomic_write(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConformalResult:
        """Read a file written by :meth:`save`.

        Raises
        ------
        InputError
            Not a segcal conformal file, another format version, or invalid values (names the file).
        """
        d = read_json(path, what="conformal result")
        if d.get("format") != FORMAT_NAME or d.get("format_version") != FORMAT_VERSION:
            raise InputError(f"conformal result: {os.fspath(path)} is not a {FORMAT_NAME} file of version "
                             f"{FORMAT_VERSION} (found format {d.get('format')!r}, version {d.get('format_version')!r})")
        try:
            res = cls(float(d["lambda"]), float(d["alpha"]), None if d["delta"] is None else float(d["delta"]),
                      str(d["risk"]), str(d["method"]), int(d["n_images"]), [float(v) for v in d["grid"]],
                      float(d["calibration_risk"]), float(d["mean_size"]),
                      None if d.get("class_index") is None else int(d["class_index"]),
                      None if d.get("tau") is None else float(d["tau"]),
                      None if d.get("ignore_index") is None else int(d["ignore_index"]), dict(d.get("meta") or {}))
            if res.risk not in RISKS or res.method not in METHODS or not 0.0 <= res.lam <= 1.0:
                raise ValueError(f"risk {res.risk!r}, method {res.method!r}, lambda {res.lam}")
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"conformal result: {os.fspath(path)} holds invalid values ({exc})") from exc
        return res


def fit_threshold(
    table: LossTable,
    alpha: float,
    *,
    delta: float | None = None,
    method: str | None = None,
    meta: dict[str, Any] | None = None,
) -> ConformalResult:
    """Choose λ̂ on a per-image loss table.

    Parameters
    ----------
    table
        From :func:`~segcal.conformal.loss_table` / :func:`~segcal.conformal.folder_loss_table`:
        one row per calibration image or volume (the exchangeable unit; pixels never are).
    alpha
        Target risk α in (0, 1).
    delta
        Error probability δ of the high-probability guarantee; needed for ``method="ltt"``.
    method
        ``"crc"``: ``λ̂ = inf{λ : (n/(n+1)) R̂_n(λ) + B/(n+1) ≤ α}`` (§9.3), guarantee
        ``E[L_{n+1}(λ̂)] ≤ α``. ``"ltt"``: Learn-then-Test with Hoeffding–Bentkus p-values and
        fixed-sequence testing (§9.4; for the binary ``"coverage"`` loss the exact binomial
        p-value), guarantee ``P(R(λ̂) ≤ α) ≥ 1 − δ``. Default: ``"ltt"`` when
        ``delta`` is given, else ``"crc"``.
    meta
        Provenance stored with the result.

    Returns
    -------
    ConformalResult
    """
    method = method or ("ltt" if delta is not None else "crc")
    if method not in METHODS:
        raise InputError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    alpha = check_level(alpha, "alpha")
    if method == "ltt":
        if delta is None:
            raise InputError("delta: method 'ltt' needs delta (the probability that the risk exceeds alpha)")
        delta = check_level(delta, "delta")
        j = ltt_index(table.losses, alpha, delta, binary=table.risk == "coverage")
    else:
        if delta is not None:
            raise InputError("delta: method 'crc' controls the risk in expectation and takes no delta; "
                             "use method='ltt' for a guarantee with probability 1 - delta")
        j = crc_index(table.losses, alpha, table.bound)
    return ConformalResult(float(table.grid[j]), alpha, delta, table.risk, method, table.n_images,
                           [float(v) for v in table.grid], float(table.losses[:, j].mean()),
                           float(table.sizes[:, j].mean()), table.class_index, table.tau, table.ignore_index,
                           dict(meta or {}))


@dataclass
class PixelSets:
    """One image's conformal sets.

    Attributes
    ----------
    packed
        ``numpy.packbits`` of the boolean masks along the class axis: ``(ceil(C' / 8), *spatial)``
        uint8, with ``C'`` = the number of classes (``num_masks``; 1 for an ``"fnr"`` mask).
    num_masks
        ``C'``, to unpack exactly.
    sizes
        ``(*spatial)`` uint16: the set size per pixel (0/1 for an ``"fnr"`` mask), the heatmap.
    """

    packed: np.ndarray
    num_masks: int
    sizes: np.ndarray

    def masks(self) -> np.ndarray:
        """The boolean masks ``(C', *spatial)``."""
        return np.unpackbits(self.packed, axis=0, count=self.num_masks).astype(bool)


def apply_sets(result: ConformalResult, probs: Any) -> PixelSets:
    """The pixel sets ``{k : p_k >= 1 - λ̂}`` (or the class mask ``{p_K >= 1 - λ̂}`` for ``"fnr"``) of one image.

    ``probs``: calibrated probabilities ``(C, *spatial)`` of one image or volume (numpy or torch),
    from the same model and calibrator as the calibration table.
    """
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim < 2:
        raise InputError(f"probs: expected (C, *spatial), found shape {p.shape}")
    p = p.astype(np.float64, copy=False)
    check_risk(result.risk, result.class_index, result.tau)
    check_grid([result.lam])
    t = 1.0 - result.lam
    if result.risk == "fnr":
        k = int(result.class_index)  # type: ignore[arg-type]
        if not 0 <= k < p.shape[0]:
            raise InputError(f"probs: class_index {k} is outside [0, {p.shape[0]})")
        mask = p[k : k + 1] >= t
    else:
        mask = p >= t
    return PixelSets(np.packbits(mask, axis=0), int(mask.shape[0]), mask.sum(axis=0).astype(np.uint16))


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "METHODS", "ConformalResult", "PixelSets", "apply_sets",
           "fit_threshold"]
