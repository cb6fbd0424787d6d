"""Markdown tables of a ``segcal bench`` results dict.

The columns are the dataset's (:class:`segcal.bench.spec.DatasetSpec`, found by the results'
``format``); the ``props`` flags come from the properties the run recorded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from segcal.bench.spec import HIPPOCAMPUS, property_label, spec_of


def _is_medical(results: dict[str, Any]) -> bool:
    return spec_of(results) is HIPPOCAMPUS


def _num(v: Any, scale: float, dec: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    s = f"{v * scale:.{dec}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.0000" from float noise


def _cell(row: dict[str, Any], key: str, scale: float, dec: int) -> str:
    v = row.get(key)
    s = _num(v, scale, dec)
    sd = row.get(key + "_seed_std")
    if s != "–" and row.get("n_seeds", 1) > 1 and sd is not None and key != "image_ece_std":
        s += f" ± {_num(sd, scale, dec)}"
    return s


def props(results: dict[str, Any]) -> dict[str, str]:
    """``row -> "TI/AP/OP"`` flags of the rows of a run, from the properties it recorded."""
    return {r: property_label(p) for r, p in (results.get("properties") or {}).items()}


def condition_table(results: dict[str, Any], tag: str) -> list[str]:
    cond = results["conditions"][tag]
    flags = props(results)
    cols = spec_of(results).table_columns
    head = ["method", "props", *[h for _, h, _, _ in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in cond["summary"].items():
        cells = [m, flags.get(m, ""), *[_cell(row, k, s, d) for k, _h, s, d in cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ci_table(results: dict[str, Any], tag: str) -> list[str]:
    boot = results["conditions"][tag].get("bootstrap_vs_ts") or {}
    if not boot:
        return ["(no TS row: no bootstrap)"]
    cols = spec_of(results).ci_columns
    head = ["method − TS", *[h for _, h, _, _ in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, cis in boot.items():
        cells = [m]
        for k, _h, s, d in cols:
            ci = cis.get(k)
            if not ci or ci.get("diff") is None:
                cells.append("–")
                continue
            star = "*" if ci.get("significant") else ""
            cells.append(f"{_num(ci['diff'], s, d)} [{_num(ci['lo'], s, d)}, {_num(ci['hi'], s, d)}]{star}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def corruption_tables(results: dict[str, Any], metric: str = "ece", dec: int = 4, scale: float = 1.0,
                      first: tuple[str, ...] = ()) -> list[str]:
    """One row per method, one column per corrupted condition (``first``: extra leading columns)."""
    tags = [t for t, c in results["conditions"].items() if c.get("corruption")]
    if not tags:
        return []
    tags = [t for t in first if t in results["conditions"]] + tags
    methods = list(results["conditions"][tags[-1]]["summary"])
    lines = ["| method | " + " | ".join(tags) + " |", "|" + "---|" * (len(tags) + 1)]
    for m in methods:
        cells = [m]
        for t in tags:
            row = results["conditions"][t]["summary"].get(m, {})
            cells.append(_num(row.get(metric), scale, dec))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def describe_condition(results: dict[str, Any], tag: str) -> str:
    c = results["conditions"][tag]
    if _is_medical(results):
        what = "hippocampus test cases, clean" if tag == "clean" else f"hippocampus test cases, MRI shift {tag}"
        return f"{what}: {c['n_images']} cases, {c['n_eval_pixels']:,} voxels, model `{c['model']}`"
    what = {"clean": "CamVid test, in-domain model", "model-shift": "CamVid test, Cityscapes model (model shift)"}
    return (f"{what.get(tag, tag)}: {c['n_images']} images, {c['n_eval_pixels']:,} evaluated pixels, "
            f"model `{c['model']}`")


def wall_time_line(results: dict[str, Any]) -> str:
    """The timing line of a bench summary; the HTML report is written before its own time is known."""
    t = results.get("timings", {})
    parts = f"predict {t.get('predict_s', 0):.0f} s, fit {t.get('fit_s', 0):.0f} s, evaluate {t.get('evaluate_s', 0):.0f} s"
    if "report_s" in t:
        parts += f", report {t['report_s']:.0f} s"
        total = f"{t.get('total_s', float('nan')):.0f} s"
    else:
        total = f"{t.get('total_s', float('nan')):.0f} s before the report"
    return f"- wall time: {total} ({parts}); threads {results['environment']['threads']}"


def medical_markdown_report(results: dict[str, Any]) -> str:
    """``results.md`` of ``segcal bench --dataset hippocampus``."""
    cfg = results["config"]
    p = results["protocol"]
    out = ["# segcal bench: MSD hippocampus calibration benchmark", ""]
    out.append(f"- commit: `{results.get('commit')}`; command: `{cfg.get('command') or 'segcal bench --dataset hippocampus'}`")
    out.append(wall_time_line(results))
    out.append(f"- model `{results['model']}`; {p['split']}")
    out.append(f"- calibration: {p['calib_split']}; seeds {cfg['seeds']}; {p['fit_voxels']}")
    out.append(f"- evaluation: every voxel of every test case; {p['bins']} equal-width bins "
               f"(case-ECE50: {p['bins_case']} bins, per case); fg-ECE: ECE in the {p['fg_region']}")
    shifts = [f"{s}@{v}" for s in cfg["shifts"] for v in cfg["severities"]]
    out.append(f"- shifts: {', '.join(shifts) or 'none'} ({'all test cases' if p['shift_cases'] == 'all test cases' else str(len(p['shift_cases'])) + ' test cases'}); {p['shift_seed']}")
    out.append(f"- CIs: {p['bootstrap']}; * = CI excludes 0")
    cache = results.get("cache", {})
    out.append(f"- predictions: {cache.get('predicted_volumes')} volumes predicted, {cache.get('reused_volumes')} read "
               f"from the cache `{cache.get('root')}`")
    out.append("- cells: mean ± std over the seeds; `case-ECE sd` is the std of the per-case ECE over test cases "
               "(mean over seeds); Dice pooled over the test voxels, case Dice = mean over cases; flip % = voxels "
               "whose argmax differs from the uncalibrated one; props: TI translation invariant, AP argmax "
               "preserving, OP order preserving")
    fits: dict[str, list[float]] = {}
    for f in results.get("fits", []):
        fits.setdefault(f["method"], []).append(f["seconds"])
    if fits:
        out.append("- fit seconds (mean over seeds): " + ", ".join(f"{m} {np.mean(v):.1f}" for m, v in fits.items()))
    for m, why in (results.get("skipped") or {}).items():
        out.append(f"- skipped `{m}`: {why}")
    out.append("")
    out += ["## clean", "", describe_condition(results, "clean"), ""]
    out += condition_table(results, "clean")
    out += ["", "Paired bootstrap differences to TS over test cases, mean [95 % CI]:", ""]
    out += ci_table(results, "clean")
    out.append("")
    tags = [t for t, c in results["conditions"].items() if c.get("corruption")]
    if tags:
        n = results["conditions"][tags[0]]["n_images"]
        out += ["## MRI shifts", "", f"{n} test cases per shift-severity; calibrators fitted on clean calibration "
                "cases. Mean over seeds.", ""]
        for key, title, scale, dec in (("ece", "Pooled ECE %", 100.0, 3), ("fg_ece", "Foreground-region ECE %", 100.0, 2),
                                       ("image_ece", "Case-wise ECE %", 100.0, 3), ("nll", "NLL", 1.0, 4),
                                       ("case_dice_fg", "Case-wise Dice (mean of anterior, posterior)", 1.0, 4),
                                       ("flip_rate", "Flip %", 100.0, 3)):
            out += [f"{title}:", "", *corruption_tables(results, key, dec, scale, first=("clean",)), ""]
        for tag in tags:
            out += [f"### {tag}", "", describe_condition(results, tag), ""]
            out += condition_table(results, tag)
            out += ["", "Paired bootstrap differences to TS:", "", *ci_table(results, tag), ""]
    return "\n".join(out) + "\n"


def markdown_report(results: dict[str, Any]) -> str:
    if _is_medical(results):
        return medical_markdown_report(results)
    cfg = results["config"]
    out = ["# segcal bench: CamVid calibration benchmark", ""]
    out.append(f"- commit: `{results.get('commit')}`; command: `{cfg.get('command') or 'segcal bench'}`")
    out.append(wall_time_line(results))
    p = results["protocol"]
    out.append(f"- calibration: {p['val_split']}; seeds {cfg['seeds']}; {p['fit_pixels']}")
    out.append(f"- evaluation: {p['eval_pixels']}; {p['bins']} equal-width bins; void (label 11) ignored")
    out.append(f"- boundary band: {p['boundary_band']}")
    out.append(f"- CIs: {p['bootstrap']}; * = CI excludes 0")
    cache = results.get("cache", {})
    out.append(f"- predictions: {cache.get('predicted_images')} images predicted, {cache.get('reused_images')} read "
               f"from the cache `{cache.get('root')}`")
    out.append("- cells: mean ± std over the seeds; `img-ECE sd` is the std of the per-image ECE over "
               "test images (mean over seeds); flip % = valid pixels whose argmax differs from the uncalibrated one")
    for model, chk in (results.get("ts_check") or {}).items():
        out.append(f"- TS check `{model}`: fitted T = {', '.join(f'{x:.4f}' for x in chk['fitted_T'])} "
                   f"(mean {chk['mean_T']:.4f}) vs README T = {chk['readme_T']} (fitted on all val pixels): "
                   f"|diff| {chk['abs_diff']:.4f} {'<=' if chk['agrees'] else '>'} {chk['tolerance']}")
    for model, sk in (results.get("skipped") or {}).items():
        for m, why in sk.items():
            out.append(f"- skipped `{m}` on `{model}`: {why}")
    out.append("")
    for tag in results["conditions"]:
        if results["conditions"][tag].get("corruption"):
            continue
        out += [f"## {tag}", "", describe_condition(results, tag), ""]
        out += condition_table(results, tag)
        out += ["", "Paired bootstrap differences to TS, mean [95 % CI]:", ""]
        out += ci_table(results, tag)
        out.append("")
    ctab = corruption_tables(results, "ece")
    if ctab:
        tags = [t for t, c in results["conditions"].items() if c.get("corruption")]
        n = results["conditions"][tags[0]]["n_images"]
        out += ["## corruptions (in-domain model)", "",
                f"{n} test images per corruption-severity (subset listed in results.json). Pooled ECE:", ""]
        out += ctab
        out += ["", "NLL:", "", *corruption_tables(results, "nll")]
        out += ["", "mIoU:", "", *corruption_tables(results, "miou")]
        out += ["", "Full tables and CIs for every corruption are in results.json.", ""]
    return "\n".join(out) + "\n"


__all__ = [
    "ci_table", "condition_table", "corruption_tables", "describe_condition", "markdown_report",
    "medical_markdown_report", "props", "wall_time_line",
]
