"""The output files of ``segcal bench --shift-calibration``: ``results.md`` and ``results.json``.

Tables of a :func:`segcal.bench.shift_calibration.run_shift_calibration` results dict: the
leave-one-family-out summary (pooled ECE / NLL per held-out family and severity), the issue's
targets (met or missed, with the number), every condition's table with paired bootstrap CIs
against TS fitted on clean val, and the label-free estimator table (MAE, Spearman).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from segcal.bench.results import BenchRun
from segcal.bench.spec import SHIFT_CALIBRATION, SHIFT_REFERENCE, property_label
from segcal.report.outputs import write_outputs


def fmt(v: Any, scale: float = 1.0, dec: int = 4) -> str:
    """A number for a table cell (``–`` for None / NaN; no ``-0.0000``)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    s = f"{v * scale:.{dec}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells: Sequence[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def lofo_sets(results: Mapping[str, Any]) -> list[str]:
    return [t for t, c in results["conditions"].items() if c.get("held_out")]


def summary_table(results: Mapping[str, Any], metric: str, dec: int = 4) -> list[str]:
    """Rows: methods; columns: the held-out sets, then the mean over them."""
    sets = lofo_sets(results)
    if not sets:
        return []
    conds = results["conditions"]
    methods = list(conds[sets[0]]["summary"])
    lines = _head(["method", *[f"{t} (held out)" for t in sets], "mean"])
    for m in methods:
        vals = [conds[t]["summary"].get(m, {}).get(metric) for t in sets]
        ok = [v for v in vals if v is not None]
        mean = sum(ok) / len(ok) if len(ok) == len(vals) else None
        lines.append(_row([m, *[fmt(v, 1.0, dec) for v in vals], fmt(mean, 1.0, dec)]))
    return lines


def condition_table(results: Mapping[str, Any], tag: str) -> list[str]:
    """One condition: a row per method (mean ± std over seeds)."""
    cond = results["conditions"][tag]
    props = results.get("properties", {})
    cols = SHIFT_CALIBRATION.table_columns
    lines = _head(["method", "fitted on", "props", *[h for _, h, _, _ in cols]])
    for m, row in cond["summary"].items():
        p = props.get(m, {})
        cells = [m, p.get("data", "–"), property_label(p) if p else ""]
        for k, _h, s, d in cols:
            c = fmt(row.get(k), s, d)
            if row.get("n_seeds", 1) > 1 and c != "–":
                c += f" ± {fmt(row.get(k + '_seed_std'), s, d)}"
            cells.append(c)
        lines.append(_row(cells))
    return lines


def ci_table(results: Mapping[str, Any], tag: str) -> list[str]:
    boot = results["conditions"][tag].get("bootstrap_vs_ts_clean") or {}
    if not boot:
        return [f"(no {SHIFT_REFERENCE} row: no bootstrap)"]
    cols = SHIFT_CALIBRATION.ci_columns
    lines = _head([f"method − {SHIFT_REFERENCE}", *[h for _, h, _, _ in cols]])
    for m, cis in boot.items():
        cells = [m]
        for k, _h, s, d in cols:
            ci = cis.get(k)
            if not ci:
                cells.append("–")
                continue
            star = "*" if ci.get("significant") else ""
            cells.append(f"{fmt(ci['diff'], s, d)} [{fmt(ci['lo'], s, d)}, {fmt(ci['hi'], s, d)}]{star}")
        lines.append(_row(cells))
    return lines


def targets_table(results: Mapping[str, Any]) -> list[str]:
    """The issue's four targets per row: met / missed with the number."""
    lofo = results.get("lofo", {})
    rows = lofo.get("rows", {})
    if not rows:
        return []
    ref = lofo.get("ts_clean_mean_ece")
    lines = _head(["row", f"mean LOFO ECE (≤ ½ × {fmt(ref)})", "clean ECE − TS (≤ 0.005)",
                   "NLL under shift not worse than TS", "mIoU exactly kept"])
    for m, r in rows.items():
        if m == SHIFT_REFERENCE:
            continue
        half = f"{fmt(r['mean_ece'])} = {fmt(r['ratio_to_ts_clean'], 1.0, 2)} × TS: " + (
            "met" if r["target_half_ece"] else "missed")
        if "clean_ece_minus_ts_clean" in r:
            clean = f"{fmt(r['clean_ece_minus_ts_clean'])}: " + ("met" if r["target_clean_within_0.005"] else "missed")
        else:
            clean = "– (no clean run)"
        worse = r["nll_significantly_worse_than_ts_clean"]
        nll = f"mean {fmt(r['mean_nll'])} vs TS {fmt(rows[SHIFT_REFERENCE]['mean_nll'])}; " + (
            "met (no set significantly worse)" if not worse else f"missed (significantly worse on {', '.join(worse)})")
        kept = ("– (not argmax preserving)" if r["miou_kept_everywhere"] is None
                else "met (every set, every seed)" if r["miou_kept_everywhere"] else "missed")
        lines.append(_row([m, half, clean, nll, kept]))
    return lines


def estimator_table(results: Mapping[str, Any]) -> list[str]:
    """Rows: estimators; columns: MAE / Spearman on every held-out set (and clean)."""
    conds = (results.get("estimator") or {}).get("conditions") or {}
    if not conds:
        return []
    tags = list(conds)
    names: list[str] = []
    for t in tags:
        names += [n for n in conds[t] if n not in names]
    lines = _head(["estimator", *[f"{t} MAE / ρ" for t in tags], "mean MAE (held out)", "mean ρ (held out)"])
    held = [t for t in tags if t != "clean"]
    for n in names:
        cells = [n]
        for t in tags:
            a = conds[t].get(n)
            cells.append("–" if a is None else f"{fmt(a['mae'], 1.0, 3)} / {fmt(a['spearman'], 1.0, 2)}")
        mae = [conds[t][n]["mae"] for t in held if n in conds[t]]
        rho = [conds[t][n]["spearman"] for t in held if n in conds[t] and math.isfinite(conds[t][n]["spearman"])]
        cells.append(fmt(sum(mae) / len(mae), 1.0, 3) if mae else "–")
        cells.append(fmt(sum(rho) / len(rho), 1.0, 2) if rho else "–")
        lines.append(_row(cells))
    truth = [f"{t} {fmt(next(iter(conds[t].values()))['mean_true'], 1.0, 3)}" for t in tags]
    lines += ["", "Mean true per-image ECE of the uncalibrated model: " + ", ".join(truth) + "."]
    return lines


def shift_markdown_report(results: Mapping[str, Any]) -> str:
    """``results.md`` of ``segcal bench --shift-calibration``."""
    cfg = results["config"]
    p = results["protocol"]
    t = results.get("timings", {})
    out = ["# segcal bench --shift-calibration: leave-one-family-out calibration under shift", ""]
    out.append(f"- commit: `{results.get('commit')}`; command: `{cfg.get('command') or 'segcal bench --shift-calibration'}`")
    out.append(f"- wall time: {fmt(t.get('total_s'), 1.0, 0)} s (predict {fmt(t.get('predict_s'), 1.0, 0)} s, fit "
               f"{fmt(t.get('fit_s'), 1.0, 0)} s, evaluate {fmt(t.get('evaluate_s'), 1.0, 0)} s, estimator "
               f"{fmt(t.get('estimator_s'), 1.0, 0)} s); threads {results['environment']['threads']}")
    fams = "; ".join(f"{f}: {', '.join(cs)}" for f, cs in results["families"].items())
    out.append(f"- families: {fams}")
    out.append(f"- fit: {p['fit']}; seeds {cfg['seeds']}")
    out.append(f"- held-out test sets: {len(p['test']['images'])} CamVid test images per set; {p['test']['per_set']}")
    out.append(f"- evaluation: {p['eval_pixels']}; {p['bins']} bins; void (label {p['ignore_label']}) ignored")
    out.append(f"- CIs: {p['bootstrap']}; * = CI excludes 0")
    cache = results.get("cache", {})
    out.append(f"- predictions: {cache.get('predicted_images')} images predicted, {cache.get('reused_images')} read "
               f"from the cache `{cache.get('root')}`")
    for grp, sk in (results.get("skipped") or {}).items():
        for m, why in sk.items():
            out.append(f"- skipped `{m}` ({grp}): {why}")
    out.append("")
    if lofo_sets(results):
        out += ["## Leave-one-family-out: pooled ECE", "", *summary_table(results, "ece"), ""]
        out += ["Image-wise ECE:", "", *summary_table(results, "image_ece"), ""]
        out += ["NLL:", "", *summary_table(results, "nll"), ""]
        out += ["mIoU:", "", *summary_table(results, "miou"), ""]
        out += ["## Targets (issue 17)", "", *targets_table(results), ""]
    est = estimator_table(results)
    if est:
        out += ["## Label-free ECE estimator under held-out families", "",
                "Estimated vs true per-image ECE of the uncalibrated model (" + p["estimator_truth"] + "): "
                "MAE / Spearman ρ.", "", *est, ""]
    for tag, c in results["conditions"].items():
        what = (f"held-out family `{c['held_out']}` at severity {c['severity']} (fitted with "
                f"{', '.join(c['fitted_with']) or 'clean only'}; corruptions drawn: "
                f"{', '.join(f'{k} {v}' for k, v in c.get('assignment', {}).items())})" if c.get("held_out")
                else "CamVid test, clean" if tag == "clean" else "CamVid test, Cityscapes ESPNet (model shift)")
        out += [f"## {tag}", "", f"{what}: {c['n_images']} images, {c['n_eval_pixels']:,} evaluated pixels, "
                f"model `{c['model']}`", "", *condition_table(results, tag), "",
                f"Paired bootstrap differences to {SHIFT_REFERENCE}, mean [95 % CI]:", "", *ci_table(results, tag), ""]
    return "\n".join(out) + "\n"


def write_shift_outputs(run: BenchRun) -> dict[str, Any]:
    """Write ``results.md`` and ``results.json`` of a shift-calibration run into ``run.out``."""
    return write_outputs(run, markdown=shift_markdown_report)


__all__ = ["ci_table", "condition_table", "estimator_table", "fmt", "lofo_sets", "shift_markdown_report",
           "summary_table", "targets_table", "write_shift_outputs"]
