"""The output files of ``segcal bench --shift-calibration``: ``results.md`` and ``results.json``.

Tables of a :func:`segcal.bench.shift_calibration.run_shift_calibration` results dict: the
leave-one-family-out summary (pooled ECE / NLL per held-out family and severity), the issue's
targets (met or missed, with the number), every condition's table with paired bootstrap CIs
against TS fitted on clean val, the label-free estimator table (MAE, Spearman), and the MRI
leave-one-shift-out rows (``results["mri"]``, :mod:`segcal.bench.shift_mri`) with the same tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from segcal.bench.results import BenchRun
from segcal.bench.spec import SHIFT_CALIBRATION, SHIFT_REFERENCE, Column, property_label
from segcal.report.outputs import write_outputs


def fmt(v: Any, scale: float = 1.0, dec: int = 4) -> str:
    """A number for a table cell (``–`` for None / NaN; no ``-0.0000``)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    s = f"{v * scale:.{dec}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


#: the MRI tables' columns (per-row values; differences to ts_clean)
MRI_TABLE_COLUMNS: tuple[Column, ...] = (
    ("ece", "ECE %", 100.0, 3), ("image_ece", "case-ECE %", 100.0, 3), ("nll", "NLL", 1.0, 4),
    ("brier", "Brier", 1.0, 4), ("dice_ant", "Dice ant", 1.0, 4), ("dice_post", "Dice post", 1.0, 4),
    ("flip_rate", "flip %", 100.0, 2),
)
MRI_CI_COLUMNS: tuple[Column, ...] = (
    ("ece", "ΔECE %", 100.0, 3), ("image_ece", "Δcase-ECE %", 100.0, 3), ("nll", "ΔNLL", 1.0, 4),
    ("dice:1", "ΔDice ant", 1.0, 4), ("dice:2", "ΔDice post", 1.0, 4),
)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells: Sequence[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def lofo_sets(results: Mapping[str, Any]) -> list[str]:
    return [t for t, c in results["conditions"].items() if c.get("held_out")]


def summary_table(results: Mapping[str, Any], metric: str, dec: int = 4, scale: float = 1.0) -> list[str]:
    """Rows: methods; columns: the held-out sets, then the mean over them (``results`` or its ``"mri"``)."""
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
        lines.append(_row([m, *[fmt(v, scale, dec) for v in vals], fmt(mean, scale, dec)]))
    return lines


def condition_table(results: Mapping[str, Any], tag: str,
                    cols: Sequence[Column] = SHIFT_CALIBRATION.table_columns) -> list[str]:
    """One condition: a row per method (mean ± std over seeds)."""
    cond = results["conditions"][tag]
    props = results.get("properties", {})
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


def ci_table(results: Mapping[str, Any], tag: str, cols: Sequence[Column] = SHIFT_CALIBRATION.ci_columns) -> list[str]:
    """Paired bootstrap differences of every row to ``ts_clean`` on one condition."""
    boot = results["conditions"][tag].get("bootstrap_vs_ts_clean") or {}
    if not boot:
        return [f"(no {SHIFT_REFERENCE} row: no bootstrap)"]
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


def mri_targets_table(mri: Mapping[str, Any]) -> list[str]:
    """The issue's targets on the MRI leave-one-shift-out rows: met / missed with the number."""
    loso = mri.get("loso", {})
    rows = loso.get("rows", {})
    if not rows:
        return []
    ref = loso.get("ts_clean_mean_ece")
    lines = _head(["row", f"mean LOSO ECE (≤ ½ × {fmt(ref, 100.0, 3)} %)", "clean ECE − TS (≤ 0.5 %)",
                   "NLL under shift not worse than TS", "Dice exactly kept"])
    for m, r in rows.items():
        if m == SHIFT_REFERENCE:
            continue
        half = f"{fmt(r['mean_ece'], 100.0, 3)} % = {fmt(r['ratio_to_ts_clean'], 1.0, 2)} × TS: " + (
            "met" if r["target_half_ece"] else "missed")
        clean = (f"{fmt(r['clean_ece_minus_ts_clean'], 100.0, 3)} %: "
                 + ("met" if r["target_clean_within_0.005"] else "missed")) if "clean_ece_minus_ts_clean" in r else "–"
        worse = r["nll_significantly_worse_than_ts_clean"]
        nll = f"mean {fmt(r['mean_nll'])} vs TS {fmt(rows[SHIFT_REFERENCE]['mean_nll'])}; " + (
            "met (no set significantly worse)" if not worse else f"missed (significantly worse on {', '.join(worse)})")
        lines.append(_row([m, half, clean, nll, "met (every set, every seed)" if r["dice_kept_everywhere"] else "missed"]))
    return lines


def mri_sections(mri: Mapping[str, Any]) -> list[str]:
    """The MRI part of ``results.md``: summary tables, targets, every condition with its CIs."""
    p = mri["protocol"]
    cfg = mri["config"]
    t = mri.get("timings", {})
    out = ["## MRI: leave-one-shift-out, 3D U-Net on MSD hippocampus", "",
           f"- model `{mri['model']}`; {p['split']}; shifts {', '.join(cfg['shifts'])}; seeds {cfg['seeds']}",
           f"- perturbed calibration copies: {p['perturbed_calibration']}", f"- fit: {p['fit']}",
           f"- test: {p['test']}; CIs: {p['bootstrap']}; * = CI excludes 0",
           f"- time: predict {fmt(t.get('predict_s'), 1.0, 0)} s, fit {fmt(t.get('fit_s'), 1.0, 0)} s, evaluate "
           f"{fmt(t.get('evaluate_s'), 1.0, 0)} s; {mri['cache']['predicted_volumes']} volumes predicted, "
           f"{mri['cache']['reused_volumes']} read from the cache `{mri['cache']['root']}`", ""]
    for grp, sk in (mri.get("skipped") or {}).items():
        for m, why in sk.items():
            out.append(f"- skipped `{m}` ({grp}): {why}")
    if lofo_sets(mri):
        out += ["Pooled ECE (%):", "", *summary_table(mri, "ece", 3, 100.0), ""]
        out += ["NLL:", "", *summary_table(mri, "nll"), ""]
        out += ["### MRI targets (issue 17)", "", *mri_targets_table(mri), ""]
    for tag, c in mri["conditions"].items():
        what = (f"held-out shift `{c['held_out']}` at severity {c['severity']} (fitted with "
                f"{', '.join(c['fitted_with'])})" if c.get("held_out") else "clean test cases (fitted with every shift)")
        out += [f"### MRI {tag}", "", f"{what}: {c['n_images']} cases, {c['n_eval_pixels']:,} voxels", "",
                *condition_table(mri, tag, MRI_TABLE_COLUMNS), "",
                f"Paired bootstrap differences to {SHIFT_REFERENCE}, mean [95 % CI]:", "",
                *ci_table(mri, tag, MRI_CI_COLUMNS), ""]
    return out


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


def sts_selection_table(results: Mapping[str, Any]) -> list[str]:
    """The ridge ``l2`` and feature set chosen for the anchored ``sts`` row of every fit set (once per
    fit set, shared by its seeds), with each candidate's inner leave-one-family-out score (the
    criterion's value; ``–``: no selection, the reason given), and a legend of the feature sets."""
    recs, seen = [], set()
    for grp, fits in (results.get("fits") or {}).items():
        for r in fits:
            sel = r.get("l2_selection")
            if sel is None or (grp, r["method"], _selection_id(sel)) in seen:
                continue
            seen.add((grp, r["method"], _selection_id(sel)))
            recs.append((grp, r, sel))
    if not recs:
        return []
    grid, sets = recs[0][2]["grid"], recs[0][2].get("feature_sets") or [[]]
    names = [(g, k) for k in range(len(sets)) for g in grid]
    lines = _head(["fit set", "row", "seeds", "inner families", "criterion",
                   *[f"l2={g:g} F{k + 1}" for g, k in names], "chosen"])
    for grp, r, sel in recs:
        score = sel.get("score") or sel.get("mean_nll") or {}
        keys = [f"{float(g)!r}|{'+'.join(sets[k])}" if sets[k] else repr(float(g)) for g, k in names]
        cells = [fmt(score.get(key)) for key in keys] if sel["selected"] else ["–"] * len(names)
        k = next((i for i, f in enumerate(sets) if list(f) == list(sel.get("features") or [])), 0)
        chosen = f"l2={sel['l2']:g} F{k + 1}" + ("" if sel["selected"] else f" ({sel['why']})")
        seeds = ", ".join(str(x["seed"]) for x in results["fits"][grp]
                          if x["method"] == r["method"] and _selection_id(x.get("l2_selection")) == _selection_id(sel))
        lines.append(_row([grp, r["method"], seeds, ", ".join(sel["families"]) or "–",
                           sel.get("criterion", "mean"), *cells, chosen]))
    if any(sets):
        lines += ["", "Feature sets: " + "; ".join(f"F{k + 1} = {', '.join(f)}" for k, f in enumerate(sets)) + "."]
    return lines


def _selection_id(sel: Mapping[str, Any] | None) -> str:
    """One selection's identity in ``results.json`` (the seeds of a fit set share it)."""
    if sel is None:
        return ""
    return repr((sel.get("selected_on_seed"), sel.get("l2"), sel.get("features"), sel.get("score"),
                 sel.get("mean_nll"), sel.get("why")))


def adaptation_table(results: Mapping[str, Any]) -> list[str]:
    """PseudoCal's correction factor ``c`` (output ``base / c``) per condition and target row / seed,
    before and after the floor (``min_correction``) where one applies."""
    conds = results["conditions"]
    keys = sorted({k for c in conds.values() for k in (c.get("adaptation") or {})})
    if not keys:
        return []
    lines = _head(["set", *keys])
    for tag, c in conds.items():
        ad = c.get("adaptation") or {}
        cells = []
        for k in keys:
            a = ad.get(k)
            if not a:
                cells.append("–")
            elif "c_unclamped" in a and a["c_unclamped"] != a["correction"]:
                cells.append(f"{fmt(a['c_unclamped'], 1.0, 2)} → {fmt(a['correction'], 1.0, 2)}")
            else:
                cells.append(fmt(a["correction"], 1.0, 2))
        lines.append(_row([tag, *cells]))
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
               f"{fmt(t.get('estimator_s'), 1.0, 0)} s, MRI {fmt(t.get('mri_s'), 1.0, 0)} s); threads {results['environment']['threads']}")
    fams = "; ".join(f"{f}: {', '.join(cs)}" for f, cs in results["families"].items())
    out.append(f"- families: {fams}")
    out.append(f"- fit: {p['fit']}; seeds {cfg['seeds']}")
    out.append(f"- held-out test sets: {len(p['test']['images'])} CamVid test images per set; {p['test']['per_set']}")
    out.append(f"- evaluation: {p['eval_pixels']}; {p['bins']} bins; void (label {p['ignore_label']}) ignored")
    out.append(f"- CIs: {p['bootstrap']}; * = CI excludes 0")
    if p.get("sts"):
        out.append(f"- sts: {p['sts']}")
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
    sel = sts_selection_table(results)
    if sel:
        out += ["## sts: the ridge and feature set chosen by leave-one-family-out within the fit families", "",
                "Per candidate, the inner score on the inner held-out families' perturbed val copies ('worst': the "
                "largest pooled-NLL excess over clean TS; 'mean': the mean pooled NLL); lowest wins:", "", *sel, ""]
    ad = adaptation_table(results)
    if ad:
        out += ["## Target adaptation: PseudoCal's correction factor c (output base / c)", "",
                "`a → b`: PseudoCal's value a, floored to b (`min_correction`, on a clean-anchored base).", "", *ad, ""]
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
    if results.get("mri"):
        out += mri_sections(results["mri"])
    return "\n".join(out) + "\n"


def write_shift_outputs(run: BenchRun) -> dict[str, Any]:
    """Write ``results.md`` and ``results.json`` of a shift-calibration run into ``run.out``."""
    return write_outputs(run, markdown=shift_markdown_report)


__all__ = ["MRI_CI_COLUMNS", "MRI_TABLE_COLUMNS", "adaptation_table", "ci_table", "condition_table",
           "estimator_table", "fmt", "lofo_sets", "mri_sections", "mri_targets_table", "shift_markdown_report",
           "sts_selection_table", "summary_table", "targets_table", "write_shift_outputs"]
