"""What a calibration benchmark is made of, per dataset: models, rows, properties, CI metrics, columns.

A *row* of a bench table is a calibrator of the registry (:func:`segcal.calibrators.create`) built
with fixed constructor arguments: the CamVid bench adds the image-branch and selective-on-LTS
variants, the hippocampus bench the soft-Dice objective variants. :func:`create_row` is the one
place a row becomes a calibrator, :func:`row_properties` / :func:`property_label` the one place
its declared properties (TI translation invariant, AP argmax preserving, OP order preserving,
``../shared/methods.md`` §2-§3) become the ``props`` flag of the tables.

:data:`CAMVID` and :data:`HIPPOCAMPUS` are the two :class:`DatasetSpec`; the report
(:mod:`segcal.report`) reads only these and the results dict of a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import segcal.calibrators as sc


@dataclass(frozen=True)
class Row:
    """One row of a bench table: a registered calibrator with fixed constructor arguments.

    Parameters
    ----------
    registry
        Name (or alias) in :func:`segcal.calibrators.available`.
    kwargs
        Constructor arguments of the row (e.g. ``{"use_image": True}``).
    seeded
        Whether the row gets the split seed as its ``seed=`` (selective scaling on TS in the
        hippocampus bench does not: its base keeps its default seed).
    """

    registry: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    seeded: bool = True


#: table column: (result key, header, scale, decimals)
Column = tuple[str, str, float, int]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything a report needs to know about one benchmark (besides its results dict).

    Parameters
    ----------
    name
        Dataset name (``camvid``, ``hippocampus``).
    format
        The ``format`` field of its ``results.json``.
    models
        The models the bench evaluates (the first is the in-domain one).
    rows
        Named rows beyond the plain registry names (the bench variants).
    spatial_rows
        Rows that take whole images / volumes and are left out of the default run for time.
    ci_metrics
        Metrics with a paired bootstrap CI (:func:`segcal.bench.protocol.bootstrap_condition`).
    table_columns, ci_columns
        The columns of the Markdown tables: per-row values and differences to TS.
    cache_name
        Folder name of its default prediction cache (:func:`segcal.bench.cache.default_cache_dir`).
    """

    name: str
    format: str
    models: tuple[str, ...]
    rows: Mapping[str, Row]
    spatial_rows: tuple[str, ...]
    ci_metrics: tuple[str, ...]
    table_columns: tuple[Column, ...]
    ci_columns: tuple[Column, ...]
    cache_name: str


def create_row(spec: DatasetSpec, name: str, seed: int | None = None, **kw: Any) -> Any:
    """The calibrator of row ``name`` (a row of ``spec.rows`` or a plain registry name).

    ``seed`` is passed as ``seed=`` when the row is seeded; ``kw`` override the row's arguments
    (e.g. ``max_steps``).
    """
    row = spec.rows.get(name) or Row(name)
    args = {**row.kwargs, **kw}
    if seed is not None and row.seeded:
        args["seed"] = seed
    return sc.create(row.registry, **args)


def row_properties(spec: DatasetSpec, name: str) -> dict[str, Any]:
    """Declared properties of a row, read from the calibrator it builds (recorded in ``results.json``)."""
    row = spec.rows.get(name) or Row(name)
    cal = create_row(spec, name)
    p = cal.properties()
    return {"registry": type(cal).name, "kwargs": dict(row.kwargs),
            "translation_invariant": bool(p["translation_invariant"]),
            "argmax_preserving": bool(p["argmax_preserving"]),
            "order_preserving": bool(p["order_preserving"]),
            "spatial": bool(p.get("spatial", False)), "objective": row.kwargs.get("objective", "nll")}


def property_label(props: Mapping[str, Any]) -> str:
    """``"TI/AP/OP"``-style flag of a properties dict (``"–"`` when none holds)."""
    flags = [f for f, k in (("TI", "translation_invariant"), ("AP", "argmax_preserving"),
                            ("OP", "order_preserving")) if props.get(k)]
    return "/".join(flags) or "–"


# ---------------------------------------------------------------------------------- CamVid
IN_DOMAIN = "espnet-camvid"
SHIFT_MODEL = "espnet-cityscapes-camvid"
#: the CamVid void label (also the void output channel of espnet-camvid)
CAMVID_IGNORE = 11
#: README reference temperatures (``../shared/data/espnet/README.md``), fitted on all val pixels
README_T = {IN_DOMAIN: 1.3279, SHIFT_MODEL: 1.4245}
#: one noise, one blur, one photometric, one digital corruption; cheap to generate (fog, snow,
#: elastic and zoom blur cost 1-2 s per image here and are left to ``--full`` / ``--corruptions``)
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression")
#: bench-only rows of the CamVid bench: LTS / IBTS with the image branch, selective scaling on LTS
BENCH_VARIANTS: dict[str, Row] = {
    "lts_image": Row("lts", {"use_image": True}),
    "ibts_image": Row("ibts", {"use_image": True}),
    "selective_lts": Row("selective", {"base": "lts"}),
}
#: the variants ``--spatial`` adds to the default method list
SPATIAL_VARIANTS = ("lts_image", "selective_lts")
#: metrics with a paired bootstrap CI (class-wise ECE is not decomposable over images: no CI)
CI_METRICS = ("ece", "image_ece", "mce", "nll", "brier", "miou", "band_ece", "flip_rate")

CAMVID = DatasetSpec(
    name="camvid", format="segcal-bench", models=(IN_DOMAIN, SHIFT_MODEL), rows=BENCH_VARIANTS,
    spatial_rows=SPATIAL_VARIANTS, ci_metrics=CI_METRICS,
    table_columns=(
        ("ece", "ECE", 1.0, 4), ("image_ece", "img-ECE", 1.0, 4), ("image_ece_std", "img-ECE sd", 1.0, 3),
        ("classwise_ece", "cw-ECE", 1.0, 4), ("mce", "MCE", 1.0, 3), ("nll", "NLL", 1.0, 4),
        ("brier", "Brier", 1.0, 4), ("miou", "mIoU", 1.0, 4), ("flip_rate", "flip %", 100.0, 2),
        ("band_ece", "band ECE", 1.0, 4),
    ),
    ci_columns=(
        ("ece", "ΔECE", 1.0, 4), ("image_ece", "Δimg-ECE", 1.0, 4), ("mce", "ΔMCE", 1.0, 3),
        ("nll", "ΔNLL", 1.0, 4), ("brier", "ΔBrier", 1.0, 4), ("miou", "ΔmIoU", 1.0, 4),
        ("band_ece", "Δband ECE", 1.0, 4),
    ),
    cache_name="bench",
)

# ---------------------------------------------------------------------------------- hippocampus
MODEL = "unet3d-hippocampus"
NUM_CLASSES = 3
FG_CLASSES = (1, 2)
FG_NAMES = ("ant", "post")
#: row name -> row (the registered pointwise calibrators, the soft-Dice variants, LTS in 3D)
MEDICAL_ROWS: dict[str, Row] = {
    **{n: Row(n) for n in ("ts", "vs", "ms", "msc", "dc", "ets", "cdc", "cmsap", "cmsop", "vs_ti", "ms_ti")},
    # Dice-objective rows are scored on the selection half by their own objective (validation
    # soft Dice); scored by NLL their best iterate is the identity (docs/results.md)
    "ts_dice": Row("ts", {"objective": "dice", "monitor": "objective"}),
    "dc_dice": Row("dc", {"objective": "dice", "monitor": "objective"}),
    "selective": Row("selective", {"base": "ts"}, seeded=False),
    "lts": Row("lts", {"spatial_dims": 3}),
    "lts_ti": Row("lts_ti", {"spatial_dims": 3}),
}
#: rows that take whole volumes (minutes per fit): only with ``spatial=True`` or named in ``methods``
SPATIAL_ROWS = ("lts", "lts_ti")
MRI_SHIFTS = ("bias_field", "rician_noise", "gaussian_blur", "gamma", "ghosting", "low_resolution")
#: metrics with a paired bootstrap CI over test cases (class-wise ECE is not decomposable: none)
MEDICAL_CI_METRICS = ("ece", "image_ece", "image_ece50", "nll", "brier", "dice:1", "dice:2",
                      "case_dice:1", "case_dice:2", "fg_ece", "flip_rate")
#: the medical table: CamVid's columns with Dice for mIoU, a 50-bin case-wise ECE, and the
#: foreground-region ECE in place of the boundary-band ECE
MEDICAL_TABLE_COLUMNS: tuple[Column, ...] = (
    ("ece", "ECE %", 100.0, 3), ("image_ece", "case-ECE %", 100.0, 3), ("image_ece_std", "case-ECE sd", 100.0, 2),
    ("image_ece50", "case-ECE50 %", 100.0, 3), ("classwise_ece", "cw-ECE %", 100.0, 3), ("mce", "MCE", 1.0, 3),
    ("nll", "NLL", 1.0, 4), ("brier", "Brier", 1.0, 4), ("dice_ant", "Dice ant", 1.0, 4),
    ("dice_post", "Dice post", 1.0, 4), ("case_dice_ant", "case Dice ant", 1.0, 4),
    ("case_dice_post", "case Dice post", 1.0, 4), ("flip_rate", "flip %", 100.0, 3), ("fg_ece", "fg-ECE %", 100.0, 2),
)

HIPPOCAMPUS = DatasetSpec(
    name="hippocampus", format="segcal-bench-medical", models=(MODEL,), rows=MEDICAL_ROWS,
    spatial_rows=SPATIAL_ROWS, ci_metrics=MEDICAL_CI_METRICS, table_columns=MEDICAL_TABLE_COLUMNS,
    ci_columns=(
        ("ece", "ΔECE %", 100.0, 3), ("image_ece", "Δcase-ECE %", 100.0, 3), ("nll", "ΔNLL", 1.0, 4),
        ("dice:1", "ΔDice ant", 1.0, 4), ("dice:2", "ΔDice post", 1.0, 4), ("case_dice:1", "Δcase Dice ant", 1.0, 4),
        ("case_dice:2", "Δcase Dice post", 1.0, 4), ("fg_ece", "Δfg-ECE %", 100.0, 2),
    ),
    cache_name="bench-hippocampus",
)


# ---------------------------------------------------------------------------------- shift-aware calibration
#: the ImageNet-C families (Hendrycks & Dietterich, ICLR 2019, Fig. 1) of :mod:`segcal.shift`'s
#: corruptions; ImageNet-C's extra corruptions go to the family of their kind (speckle noise: noise,
#: Gaussian blur: blur, saturate: digital). ImageNet-C has frost and glass blur too; segcal.shift does not.
SHIFT_FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
#: the data a shift-calibration row is fitted on: ``clean`` (CamVid val) or ``augmented`` (CamVid val
#: plus perturbed copies from the families not held out; :mod:`segcal.bench.shift_calibration`)
#: (``target:<row>``: ``<row>`` corrected on the unlabelled test set itself by
#: :func:`segcal.estimation.target_adaptive.adapt_to_target`, PseudoCal with input mixup through the model)
SHIFT_ROWS: dict[str, Row] = {
    "ts_clean": Row("ts"),
    "ts_aug": Row("ts"),
    "cmsop_aug": Row("cmsop"),
    "sts_aug": Row("sts"),
    "ts_aug_pc": Row("target_corrected", {"base": "ts"}),
    "sts_aug_pc": Row("target_corrected", {"base": "sts"}),
}
SHIFT_ROW_DATA: dict[str, str] = {"ts_clean": "clean", "ts_aug": "augmented", "cmsop_aug": "augmented",
                                  "sts_aug": "augmented", "ts_aug_pc": "target:ts_aug", "sts_aug_pc": "target:sts_aug"}
#: the reference row of every paired CI of the shift-calibration bench
SHIFT_REFERENCE = "ts_clean"
SHIFT_CI_METRICS = ("ece", "image_ece", "nll", "brier", "miou", "flip_rate")
SHIFT_CALIBRATION = DatasetSpec(
    name="camvid-shift", format="segcal-shift-calibration", models=(IN_DOMAIN, SHIFT_MODEL), rows=SHIFT_ROWS,
    spatial_rows=(), ci_metrics=SHIFT_CI_METRICS,
    table_columns=(
        ("ece", "ECE", 1.0, 4), ("image_ece", "img-ECE", 1.0, 4), ("nll", "NLL", 1.0, 4),
        ("brier", "Brier", 1.0, 4), ("miou", "mIoU", 1.0, 4), ("flip_rate", "flip %", 100.0, 2),
    ),
    ci_columns=(
        ("ece", "ΔECE", 1.0, 4), ("image_ece", "Δimg-ECE", 1.0, 4), ("nll", "ΔNLL", 1.0, 4),
        ("miou", "ΔmIoU", 1.0, 4),
    ),
    cache_name="bench",
)

SPECS: dict[str, DatasetSpec] = {s.format: s for s in (CAMVID, HIPPOCAMPUS)}


def spec_of(results: Mapping[str, Any]) -> DatasetSpec:
    """The spec of a results dict (by its ``format``)."""
    fmt = results.get("format", CAMVID.format)
    if fmt not in SPECS:
        raise ValueError(f"results format {fmt!r}: expected one of {sorted(SPECS)}")
    return SPECS[fmt]


__all__ = [
    "BENCH_VARIANTS", "CAMVID", "CAMVID_IGNORE", "CI_METRICS", "DEFAULT_CORRUPTIONS", "FG_CLASSES", "FG_NAMES",
    "HIPPOCAMPUS", "IN_DOMAIN", "MEDICAL_CI_METRICS", "MEDICAL_ROWS", "MEDICAL_TABLE_COLUMNS", "MODEL",
    "MRI_SHIFTS", "NUM_CLASSES", "README_T", "SHIFT_CALIBRATION", "SHIFT_CI_METRICS", "SHIFT_FAMILIES",
    "SHIFT_MODEL", "SHIFT_REFERENCE", "SHIFT_ROWS", "SHIFT_ROW_DATA", "SPATIAL_ROWS", "SPATIAL_VARIANTS", "SPECS",
    "Column", "DatasetSpec", "Row", "create_row", "property_label", "row_properties", "spec_of",
]
