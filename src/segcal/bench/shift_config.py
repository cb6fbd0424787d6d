"""What defines a shift-calibration run (``segcal bench --shift-calibration``, issue 17):
:class:`ShiftCalConfig` and its checks, and :class:`FamilyMix`, the per-image perturbation of a
shift family. The runner is :mod:`segcal.bench.shift_calibration`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcal.bench.shift_fit import SELECTION_RULES
from segcal.bench.shift_mri import MRI_ROWS, MriShiftConfig, check_mri_config
from segcal.bench.spec import MRI_SHIFTS, SHIFT_FAMILIES, SHIFT_REFERENCE, SHIFT_ROW_DATA
from segcal.calibrators.shift_aware import DEFAULT_FEATURES, FEATURES, SPATIAL_FEATURES
from segcal.errors import InputError
from segcal.shift import corrupt, derive_seed

__all__ = ["DEFAULT_ROWS", "FamilyMix", "ShiftCalConfig", "check_config", "mri_config"]

#: rows of the default run (spec.SHIFT_ROW_DATA: what each is fitted on)
DEFAULT_ROWS = ("ts_clean", "ts_aug", "cmsop_aug", "sts_aug", "ts_aug_pc", "sts_aug_pc")


@dataclass(frozen=True)
class FamilyMix:
    """Per-image hook ``(image, stem) -> image``: one corruption of a family per image.

    The corruption (and, with ``severity=None``, a severity in 1-5) is drawn per image from
    ``SeedSequence([seed, crc32(stem)])``, so an image gets the same perturbation whatever the
    subset or order; the corruption's own noise uses :func:`segcal.shift.derive_seed` ``(seed + 1,
    stem)``. A stem ``"<stem>@<tag>"`` (a perturbed copy in a fit set) is perturbed as ``<stem>``.
    """

    family: str
    corruptions: tuple[str, ...]
    severity: int | None = None
    seed: int = 0

    def assign(self, stem: str) -> tuple[str, int]:
        """``(corruption, severity)`` of the image ``stem``."""
        rng = np.random.default_rng(derive_seed(self.seed, stem.split("@", 1)[0]))
        name = self.corruptions[int(rng.integers(len(self.corruptions)))]
        sev = int(rng.integers(1, 6)) if self.severity is None else int(self.severity)
        return name, sev

    def __call__(self, image: np.ndarray, stem: str) -> np.ndarray:
        base = stem.split("@", 1)[0]
        name, sev = self.assign(base)
        return corrupt(image, name, sev, seed=derive_seed(self.seed + 1, base))

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "corruptions": list(self.corruptions),
                "severity": "uniform 1-5 per image" if self.severity is None else self.severity,
                "seed": self.seed, "per_image": "corruption (and severity) from SeedSequence([seed, crc32(stem)])"}


@dataclass
class ShiftCalConfig:
    """Everything that defines a shift-calibration run (recorded in ``results.json``)."""

    out: str = "segcal-out/shift-calibration"
    cache: str | None = None
    data_root: str | None = None
    families: tuple[str, ...] = tuple(SHIFT_FAMILIES)
    severities: tuple[int, ...] = (3, 5)
    methods: tuple[str, ...] = DEFAULT_ROWS
    seeds: tuple[int, ...] = (0, 1)
    fit_pixels: int = 60_000
    eval_fraction: float = 0.0625
    eval_seed: int = 0
    test_images: int | None = 96  # per held-out set (seeded subset of the test split; None: all)
    test_seed: int = 0
    val_seed: int = 1
    val_limit: int | None = None
    test_limit: int | None = None
    model_shift: bool = True
    estimator: bool = True
    #: the clean range of the anchored ``sts`` rows: ``"val+train"`` (default: the clean val images of
    #: the fit half and the statistics of the model's CamVid train images, labels unused) or ``"val"``
    #: (the clean val images only; the setting of the first cold run, docs/shift_calibration.md)
    sts_anchor_range: str = "val+train"
    #: the ridge ``l2`` of the anchored ``sts`` rows' weights: chosen once per fit set from this grid
    #: by leave-one-family-out within the fit set's families (segcal.bench.shift_fit.Anchored); one
    #: value: that value; empty: the calibrator's default (0). Session 27 dropped session 25's ``1``
    #: (the worst candidate in all 12 of session 25's inner selections, fit-set data only) for run time
    sts_l2_grid: tuple[float, ...] = (0.0, 0.01, 0.1)
    #: candidate feature sets of the anchored ``sts`` rows, chosen with ``l2`` by the same inner
    #: selection (default: the whole-image statistics, and those plus the spatial ones); empty: the
    #: calibrator's default
    sts_feature_sets: tuple[tuple[str, ...], ...] = (DEFAULT_FEATURES, DEFAULT_FEATURES + SPATIAL_FEATURES)
    #: how the inner selection scores a candidate over the inner held-out families: ``"mean"`` (the
    #: mean NLL; session 25's rule, the default again since session 27, docs/shift_calibration.md) or
    #: ``"worst"`` (the largest NLL excess over clean TS; session 26's default)
    sts_selection: str = "mean"
    #: the MRI leave-one-shift-out rows (segcal.bench.shift_mri); their cache: ``<cache>/hippocampus``
    #: (default: the hippocampus bench's cache)
    mri: bool = True
    mri_shifts: tuple[str, ...] = MRI_SHIFTS
    mri_calib_limit: int | None = None
    mri_test_limit: int | None = None
    mri_fit_voxels: int | None = 250_000
    mri_seeds: tuple[int, ...] = (0, 1)
    #: whole-image rows (sts) are fitted on every ``spatial_stride``-th pixel along each axis of the
    #: logit maps (memory: 400 full 480x360 maps are 3 GB per half); evaluated on full images
    spatial_stride: int = 4
    #: target-adaptive rows: unlabelled test images (and clean val images, the anchor) per condition
    adapt_images: int = 8
    #: the floor on PseudoCal's correction factor ``c`` of a clean-anchored ``sts`` base (``sts_aug_pc``;
    #: output ``base / c``): 1 = never sharper than the base; ``None``: unclamped (the earlier runs)
    pc_min_correction: float | None = 1.0
    n_bins: int = 15
    n_boot: int = 1000
    boot_seed: int = 0
    threads: int = 1
    quick: bool = False
    progress: bool = False
    command: str | None = None

    @classmethod
    def quick_config(cls, **kw: Any) -> ShiftCalConfig:
        """CI size: 2 families, severity 3, 6 val / 4 test images, one seed, no model shift, ``sts``'s ridge
        from ``(0, 0.1)`` (both feature sets); MRI: 2 shifts, 4 calibration / 3 test cases."""
        base = dict(families=("noise", "blur"), severities=(3,), seeds=(0,), fit_pixels=4_000, eval_fraction=0.25,
                    test_images=4, test_limit=4, val_limit=6, model_shift=False, n_boot=100, adapt_images=2,
                    methods=("ts_clean", "ts_aug", "cmsop_aug", "sts_aug", "ts_aug_pc"), quick=True,
                    mri_shifts=("gamma", "rician_noise"), mri_calib_limit=4, mri_test_limit=3, mri_fit_voxels=20_000,
                    mri_seeds=(0,), sts_l2_grid=(0.0, 0.1))
        base.update(kw)
        return cls(**base)


def check_config(cfg: ShiftCalConfig) -> None:
    """Refuse unknown families, rows, severities before any work."""
    bad = [f for f in cfg.families if f not in SHIFT_FAMILIES]
    if bad or not cfg.families:
        raise InputError(f"families: {bad or 'none given'}; expected some of {', '.join(SHIFT_FAMILIES)}")
    rows = [m for m in cfg.methods if m not in SHIFT_ROW_DATA]
    if rows:
        raise InputError(f"methods: {rows} are not shift-calibration rows; expected some of {', '.join(SHIFT_ROW_DATA)}")
    need = [m for m in cfg.methods if SHIFT_ROW_DATA[m].startswith("target:")
            and SHIFT_ROW_DATA[m].split(":", 1)[1] not in cfg.methods]
    if need:
        raise InputError(f"methods: {need} correct another row on the target; add their base rows "
                         f"({', '.join(SHIFT_ROW_DATA[m].split(':', 1)[1] for m in need)})")
    if SHIFT_REFERENCE not in cfg.methods:
        raise InputError(f"methods: the reference row {SHIFT_REFERENCE} is required (every CI is against it)")
    if any(s not in (1, 2, 3, 4, 5) for s in cfg.severities) or not cfg.severities:
        raise InputError(f"severities: expected values in 1-5, got {list(cfg.severities)}")
    if cfg.sts_anchor_range not in ("val", "val+train"):
        raise InputError(f"sts_anchor_range: expected 'val' or 'val+train', got {cfg.sts_anchor_range!r}")
    if not all(isinstance(v, int | float) and np.isfinite(v) and v >= 0 for v in cfg.sts_l2_grid):
        raise InputError(f"sts_l2_grid: expected finite values >= 0, got {list(cfg.sts_l2_grid)}")
    bad = [f for fs in cfg.sts_feature_sets for f in fs if f not in FEATURES]
    if bad or any(not fs for fs in cfg.sts_feature_sets):
        raise InputError(f"sts_feature_sets: expected non-empty sets of {', '.join(FEATURES)}, got "
                         f"{[list(fs) for fs in cfg.sts_feature_sets]}")
    if cfg.sts_selection not in SELECTION_RULES:
        raise InputError(f"sts_selection: expected one of {sorted(SELECTION_RULES)}, got {cfg.sts_selection!r}")
    if cfg.mri:
        check_mri_config(mri_config(cfg))


def mri_config(cfg: ShiftCalConfig) -> MriShiftConfig:
    """The MRI part's settings of a run: its rows (those of ``cfg.methods`` it has), seeds, severities."""
    rows = tuple(m for m in cfg.methods if m in MRI_ROWS)
    cache = None if cfg.cache is None else str(Path(cfg.cache) / "hippocampus")
    return MriShiftConfig(cache=cache, data_root=cfg.data_root, shifts=tuple(cfg.mri_shifts),
                          severities=tuple(cfg.severities), methods=rows, seeds=tuple(cfg.mri_seeds),
                          fit_voxels=cfg.mri_fit_voxels, val_seed=cfg.val_seed, shift_seed=cfg.test_seed,
                          calib_limit=cfg.mri_calib_limit, test_limit=cfg.mri_test_limit, n_bins=cfg.n_bins,
                          n_boot=cfg.n_boot, boot_seed=cfg.boot_seed)
