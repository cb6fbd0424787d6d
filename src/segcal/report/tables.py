"""Markdown tables of a ``segcal bench`` results dict."""

from __future__ import annotations

import math
from typing import Any

#: (key, header, scale, decimals)
TABLE_COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("ece", "ECE", 1.0, 4),
    ("image_ece", "img-ECE", 1.0, 4),
    ("image_ece_std", "img-ECE sd", 1.0, 3),
    ("classwise_ece", "cw-ECE", 1.0, 4),
    ("mce", "MCE", 1.0, 3),
    ("nll", "NLL", 1.0, 4),
    ("brier", "Brier", 1.0, 4),
    ("miou", "mIoU", 1.0, 4),
    ("flip_rate", "flip %", 100.0, 2),
    ("band_ece", "band ECE", 1.0, 4),
)
CI_COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("ece", "ΔECE", 1.0, 4),
    ("image_ece", "Δimg-ECE", 1.0, 4),
    ("mce", "ΔMCE", 1.0, 3),
    ("nll", "ΔNLL", 1.0, 4),
    ("brier", "ΔBrier", 1.0, 4),
    ("miou", "ΔmIoU", 1.0, 4),
    ("band_ece", "Δband ECE", 1.0, 4),
)


def _num(v: Any, scale: float, dec: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v * scale:.{dec}f}"


def _cell(row: dict[str, Any], key: str, scale: float, dec: int) -> str:
    v = row.get(key)
    s = _num(v, scale, dec)
    sd = row.get(key + "_seed_std")
    if s != "–" and row.get("n_seeds", 1) > 1 and sd is not None and key != "image_ece_std":
        s += f" ± {_num(sd, scale, dec)}"
    return s


def _props(results: dict[str, Any]) -> dict[str, str]:
    try:
        import segcal.calibrators as sc

        out = {}
        for a in sc.available():
            flags = [f for f, k in (("TI", "translation_invariant"), ("AP", "argmax_preserving"),
                                    ("OP", "order_preserving")) if a[k]]
            out[a["name"]] = "/".join(flags) or "–"
        from segcal.pipeline.bench import BENCH_VARIANTS, create_method

        for name in BENCH_VARIANTS:
            p = create_method(name).properties()
            flags = [f for f, k in (("TI", "translation_invariant"), ("AP", "argmax_preserving"),
                                    ("OP", "order_preserving")) if p[k]]
            out[name] = "/".join(flags) or "–"
        return out
    except Exception:  # pragma: no cover
        return {}


def condition_table(results: dict[str, Any], tag: str) -> list[str]:
    cond = results["conditions"][tag]
    props = _props(results)
    head = ["method", "props", *[h for _, h, _, _ in TABLE_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in cond["summary"].items():
        cells = [m, props.get(m, ""), *[_cell(row, k, s, d) for k, _h, s, d in TABLE_COLUMNS]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ci_table(results: dict[str, Any], tag: str) -> list[str]:
    boot = results["conditions"][tag].get("bootstrap_vs_ts") or {}
    if not boot:
        return ["(no TS row: no bootstrap)"]
    head = ["method − TS", *[h for _, h, _, _ in CI_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, cis in boot.items():
        cells = [m]
        for k, _h, s, d in CI_COLUMNS:
            ci = cis.get(k)
            if not ci or ci.get("diff") is None:
                cells.append("–")
                continue
            star = "*" if ci.get("significant") else ""
            cells.append(f"{_num(ci['diff'], s, d)} [{_num(ci['lo'], s, d)}, {_num(ci['hi'], s, d)}]{star}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def corruption_tables(results: dict[str, Any], metric: str = "ece", dec: int = 4) -> list[str]:
    tags = [t for t, c in results["conditions"].items() if c.get("corruption")]
    if not tags:
        return []
    methods = list(results["conditions"][tags[0]]["summary"])
    lines = ["| method | " + " | ".join(tags) + " |", "|" + "---|" * (len(tags) + 1)]
    for m in methods:
        cells = [m]
        for t in tags:
            row = results["conditions"][t]["summary"].get(m, {})
            cells.append(_num(row.get(metric), 1.0, dec))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def describe_condition(results: dict[str, Any], tag: str) -> str:
    c = results["conditions"][tag]
    what = {"clean": "CamVid test, in-domain model", "model-shift": "CamVid test, Cityscapes model (model shift)"}
    return (f"{what.get(tag, tag)}: {c['n_images']} images, {c['n_eval_pixels']:,} evaluated pixels, "
            f"model `{c['model']}`")


def markdown_report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    out = ["# segcal bench: CamVid calibration benchmark", ""]
    out.append(f"- commit: `{results.get('commit')}`; command: `{cfg.get('command') or 'segcal bench'}`")
    t = results.get("timings", {})
    out.append(f"- wall time: {t.get('total_s', float('nan')):.0f} s (predict {t.get('predict_s', 0):.0f} s, fit "
               f"{t.get('fit_s', 0):.0f} s, evaluate {t.get('evaluate_s', 0):.0f} s, report {t.get('report_s', 0):.0f} s); "
               f"threads {results['environment']['threads']}")
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


__all__ = ["ci_table", "condition_table", "corruption_tables", "markdown_report"]
