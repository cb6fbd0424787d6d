"""The report of one evaluated prediction folder: the eval JSON summary and a one-page HTML report.

:func:`folder_summary` is what ``segcal eval --json`` writes: every metric of
:meth:`CalibrationMetrics.compute` (``../shared/methods.md`` §4), the class-wise bins of the
per-class reliability diagrams (:func:`segcal.report.reliability.classwise_reliability`), the
image ids and the run's configuration, cleaned for JSON. :func:`folder_report_html` turns it (or a
:class:`~segcal.metrics.CalibrationMetrics`, a :class:`~segcal.pipeline.evaluate.FolderEvaluation`)
into a self-contained HTML page: the headline metrics, the reliability diagram, the per-class
table and diagrams, the distribution of the per-image ECE (PNG figures as base64 data URIs; no
script, no network). :func:`write_folder_report` writes it atomically.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcal.conformal import ConformalResult, LossTable
from segcal.errors import InputError
from segcal.io.files import atomic_write, read_json, to_jsonable
from segcal.metrics import CalibrationMetrics
from segcal.pipeline.evaluate import FolderEvaluation
from segcal.report.page import html_document
from segcal.report.reliability import classwise_reliability, figure_bytes, reliability_diagram

#: (key, label) of the headline metrics, in order (printed by ``segcal eval``, first table of the report)
SUMMARY: list[tuple[str, str]] = [
    ("ece", "ECE (pooled, top-label)"),
    ("image_ece", "ECE (image-wise mean)"),
    ("image_ece_std", "ECE (image-wise std)"),
    ("mce", "MCE (pooled)"),
    ("rmsce", "RMS calibration error"),
    ("ace_adaptive", "ACE adaptive (equal-mass)"),
    ("ace_unweighted", "ACE unweighted (RPH)"),
    ("classwise_ece", "Class-wise ECE"),
    ("smece", "smooth ECE (smECE)"),
    ("ece_correct", "ECE on correct pixels"),
    ("ece_mispredicted", "ECE on mispredicted pixels"),
    ("nll", "NLL"),
    ("brier", "Brier (multiclass sum)"),
    ("accuracy", "Pixel accuracy"),
    ("mean_confidence", "Mean confidence"),
    ("miou", "mIoU"),
    ("mdice", "mean Dice"),
]

#: (key, label) of the failure-detection metrics (confidence ranking errors), shown when present
FAILURE: list[tuple[str, str]] = [
    ("aurc", "AURC (risk-coverage area)"),
    ("eaurc", "E-AURC (excess AURC)"),
    ("augrc", "AUGRC (generalized risk)"),
    ("failure_auroc", "Failure AUROC"),
    ("failure_aupr", "Failure AUPR"),
]


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer):
        return None
    f = float(v)
    return f if np.isfinite(f) else None


def headline(results: Mapping[str, Any], keys: Sequence[tuple[str, str]] = SUMMARY) -> list[tuple[str, float]]:
    """``(label, value)`` of each of ``keys`` that ``results`` holds as a finite number."""
    out = []
    for key, label in keys:
        v = _finite(results.get(key))
        if v is not None:
            out.append((label, v))
    return out


def folder_summary(evaluation: FolderEvaluation | CalibrationMetrics, config: Mapping[str, Any] | None = None,
                   results: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON summary of one evaluation (what ``segcal eval --json`` writes).

    Every entry of ``compute()`` (``results``, when the caller has it already), plus
    ``classwise_reliability`` (the class-wise bins), ``stems`` (the image ids, with a
    FolderEvaluation) and ``config``; NaN is written as ``null``.
    """
    metrics = evaluation.metrics if isinstance(evaluation, FolderEvaluation) else evaluation
    payload = dict(metrics.compute() if results is None else results)
    payload["classwise_reliability"] = classwise_reliability(metrics)
    if isinstance(evaluation, FolderEvaluation):
        payload["stems"] = list(evaluation.stems)
    if config is not None:
        payload["config"] = dict(config)
    return to_jsonable(payload)


def _as_summary(obj: Any) -> dict[str, Any]:
    if isinstance(obj, str | os.PathLike):
        obj = read_json(Path(obj), what="results_or_metrics")
    if isinstance(obj, FolderEvaluation | CalibrationMetrics):
        return folder_summary(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise InputError(f"results_or_metrics: got a {type(obj).__name__}; expected a FolderEvaluation, a "
                     "CalibrationMetrics, the JSON summary of segcal eval --json, or that file's path")


def _values(v: Any) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in (v if v is not None else [])], dtype=np.float64)


def _uri(fig: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(figure_bytes(fig, "png", dpi=100)).decode("ascii")


def _fmt(v: Any, digits: int = 4) -> str:
    f = _finite(v)
    return "–" if f is None else f"{f:.{digits}f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: Sequence[str] | None = None) -> str:
    out = ["<div class='tw'><table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        c = f" class='{cls[i]}'" if cls and cls[i] else ""
        out.append(f"<tr{c}>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>")
    return "\n".join(out) + "</table></div>"


def _class_name(class_names: Sequence[str] | None, k: int) -> str:
    return class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"


def _per_class_section(res: Mapping[str, Any], class_names: Sequence[str] | None) -> list[str]:
    cm = res.get("confusion_matrix")
    if cm is None:
        return []
    cm = np.asarray(cm, dtype=np.float64)
    n_cls = cm.shape[0]
    avg = set((res.get("classwise_reliability") or {}).get("classes", range(n_cls)))
    labelled, predicted = cm.sum(1), cm.sum(0)
    total = max(labelled.sum(), 1.0)
    cols = {key: _values(res.get(key)) for key in ("iou_per_class", "dice_per_class", "classwise_ece_per_class",
                                                  "class_level_ece_per_class")}
    rows, cls = [], []
    for k in range(n_cls):
        def col(key: str, k: int = k) -> str:
            v = cols[key]
            return _fmt(v[k]) if k < v.size else "–"
        rows.append([str(k), _class_name(class_names, k), f"{int(labelled[k])}", f"{100 * labelled[k] / total:.2f}",
                     f"{int(predicted[k])}", col("iou_per_class"), col("dice_per_class"),
                     col("classwise_ece_per_class"), col("class_level_ece_per_class")])
        cls.append("" if k in avg else "void")
    head = ["#", "class", "labelled px", "share %", "predicted px", "IoU", "Dice", "class-wise ECE",
            "class-level ECE"]
    return ["<h2>Per class</h2>",
            "<p>Class-wise ECE: bins of the class probability <i>q<sub>k</sub></i> over every valid pixel (Nixon "
            "et al.); class-level ECE: top-label ECE of the pixels labelled <i>k</i>. Greyed rows are not "
            "averaged (a void channel equal to the ignore index).</p>", _table(head, rows, cls)]


def _image_section(res: Mapping[str, Any], stems: Sequence[str] | None, n_worst: int) -> list[str]:
    vals = _values(res.get("image_ece_values"))
    ok = np.isfinite(vals)
    if not ok.any():
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v = vals[ok]
    fig = Figure(figsize=(6.4, 3.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(v, bins=min(40, max(5, int(np.sqrt(v.size)) * 2)), color="#4c72b0", edgecolor="white",
            label=f"images ({v.size})")
    ax.axvline(float(np.mean(v)), color="#d62728", ls="-", lw=1.2, label=f"mean {np.mean(v):.4f}")
    ax.axvline(float(np.median(v)), color="black", ls="--", lw=1.0, label=f"median {np.median(v):.4f}")
    pooled = _finite(res.get("ece"))
    if pooled is not None:
        ax.axvline(pooled, color="#ff7f0e", ls=":", lw=1.4, label=f"pooled ECE {pooled:.4f}")
    ax.set_xlabel("ECE of the image (its valid pixels, top-label)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    q = np.percentile(v, [0, 10, 25, 50, 75, 90, 100])
    qrow = [[f"{p}", _fmt(x)] for p, x in zip(("min", "p10", "p25", "median", "p75", "p90", "max"), q, strict=True)]
    names = list(stems) if stems is not None and len(stems) == vals.size else [f"#{i}" for i in range(vals.size)]
    order = [int(i) for i in np.argsort(-np.where(ok, vals, -np.inf))[: min(n_worst, int(ok.sum()))]]
    px = _values(res.get("image_pixels"))
    worst = [[names[i], _fmt(vals[i]), f"{int(px[i])}" if i < px.size and np.isfinite(px[i]) else "–"] for i in order]
    return ["<h2>Per-image ECE</h2>",
            "<p>Each image's top-label ECE over its own valid pixels (the mean is the image-wise ECE). The pooled "
            "ECE weighs every pixel of the folder equally, so it can lie far from the image mean.</p>",
            f"<img alt='distribution of the per-image ECE' src='{_uri(fig)}'>",
            "<div class='row'>", _table(["quantile", "image ECE"], qrow),
            _table(["worst images", "image ECE", "valid px"], worst), "</div>"]


def risk_coverage_figure(res: Mapping[str, Any]) -> Any | None:
    """Selective and generalized risk against coverage (``risk_coverage`` of the metrics), with the
    curves of a random ranking and of the optimal one (every error rejected first); None without
    the curve."""
    rc = res.get("risk_coverage")
    acc = _finite(res.get("accuracy"))
    if not isinstance(rc, Mapping) or acc is None or not {"coverage", "risk"} <= set(rc):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cov, risk = _values(rc["coverage"]), _values(rc["risk"])
    gen = _values(rc.get("generalized_risk"))
    if cov.size == 0 or cov.size != risk.size:
        return None
    err = 1.0 - acc
    grid = np.linspace(max(cov.min(), 1e-3), 1.0, 200)
    panels = [("selective risk (errors / accepted)", risk, np.full_like(grid, err),
               np.clip(1 - (1 - err) / grid, 0, None), "AURC", "center left"),
              ("generalized risk (accepted errors / all)", gen, err * grid, np.clip(grid - (1 - err), 0, None),
               "AUGRC", "upper left")]
    panels = [p for p in panels if p[1].size == cov.size]
    fig = Figure(figsize=(4.2 * len(panels), 3.3))
    FigureCanvasAgg(fig)
    for i, (ylabel, y, rand, best, area, loc) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        v = _finite(res.get(area.lower()))
        ax.plot(cov, y, color="#4c72b0", lw=1.8, label=f"model's confidence ranking ({area} {v:.4f})" if v is not None
                else "model's confidence ranking")
        ax.plot(grid, rand, color="#7f7f7f", ls="--", lw=1.0, label="random ranking")
        ax.plot(grid, best, color="#2ca02c", ls=":", lw=1.4, label="optimal ranking (errors rejected first)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, max(float(np.nanmax(y)), err) * 1.08)
        ax.set_xlabel("coverage (fraction of pixels accepted, most confident first)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc=loc)
    fig.tight_layout()
    return fig


def _failure_section(res: Mapping[str, Any]) -> list[str]:
    cover = sorted((int(k.rsplit("_", 1)[1]), k) for k in res if k.startswith("risk_at_coverage_")
                   and k.rsplit("_", 1)[1].isdigit())
    rows = headline(res, [*FAILURE, *((k, f"risk at {p} % coverage") for p, k in cover)])
    if not rows:
        return []
    out = ["<h2>Failure detection</h2>",
           "<p>How well the confidence ranks errors below correct pixels: reject the least confident pixels and "
           "measure the errors among those kept. Lower AURC / E-AURC / AUGRC and risk, higher AUROC / AUPR are "
           "better.</p>", _table(["metric", "value"], [[k, f"{v:.5f}"] for k, v in rows])]
    fig = risk_coverage_figure(res)
    if fig is not None:
        out.append(f"<img alt='risk-coverage curves' src='{_uri(fig)}'>")
    out += _image_failure_rows(res.get("image_failure"))
    return out


def _image_failure_rows(table: Any) -> list[str]:
    """Image-level failure detection (``image_failure``: risk -> score -> values), as a table."""
    if not isinstance(table, Mapping) or not table:
        return []
    keys = [("aurc", "AURC"), ("eaurc", "E-AURC"), ("augrc", "AUGRC"), ("risk_at_coverage_90", "risk @ 90 %")]
    rows = []
    for risk, by_score in table.items():
        if not isinstance(by_score, Mapping):
            continue
        for score, vals in by_score.items():
            if isinstance(vals, Mapping):
                rows.append([str(risk).replace("_", " "), str(score).replace("_", " "), str(vals.get("n", "–")),
                             *(_fmt(vals.get(k)) for k, _ in keys)])
    if not rows:
        return []
    return ["<h3>Image level</h3><p>Images ranked by an image score (most trustworthy first) against an image "
            "risk: which images a confidence-based triage would flag.</p>",
            _table(["risk", "score", "images", *(label for _, label in keys)], rows)]


def conformal_figure(result: ConformalResult, table: LossTable) -> Any:
    """Two panels of a fitted conformal threshold: the mean per-image loss (and, for CRC, the
    finite-sample-corrected risk the threshold is chosen on) and the mean set size / mask volume
    against λ, with α and λ̂ marked; the histogram of the per-image losses at λ̂."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.asarray(table.grid, dtype=np.float64)
    j = int(np.argmin(np.abs(grid - result.lam)))
    n = table.n_images
    mean = table.losses.mean(axis=0)
    size_name = "mean mask volume (fraction)" if result.risk == "fnr" else "mean set size"
    fig = Figure(figsize=(10.0, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(grid, mean, color="#4c72b0", lw=1.8, label="mean per-image loss")
    if result.method == "crc":
        ax.plot(grid, n / (n + 1) * mean + table.bound / (n + 1), color="#4c72b0", ls=":", lw=1.2,
                label="n/(n+1) mean + B/(n+1) (CRC)")
    ax.axhline(result.alpha, color="#c44e52", ls="--", lw=1.0, label=f"alpha = {result.alpha:g}")
    ax.axvline(result.lam, color="#2ca02c", lw=1.2, label=f"lambda-hat = {result.lam:.4g}")
    ax.set_xlabel("lambda (sets {k : p_k >= 1 - lambda})", fontsize=8)
    ax.set_ylabel(f"{result.risk} loss", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(float(mean.max()), result.alpha) * 1.08 or 1.0)
    ax.tick_params(labelsize=7)
    ax2 = ax.twinx()
    ax2.plot(grid, table.sizes.mean(axis=0), color="#8c8c8c", lw=1.0, label=size_name)
    ax2.set_ylabel(size_name, fontsize=8, color="#666")
    ax2.tick_params(labelsize=7)
    lines = ax.get_legend_handles_labels()
    extra = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="center right")
    ax = fig.add_subplot(1, 2, 2)
    at = table.losses[:, j]
    ax.hist(at, bins=min(40, max(5, n // 4)), color="#4c72b0", alpha=0.85)
    ax.axvline(result.alpha, color="#c44e52", ls="--", lw=1.0, label=f"alpha = {result.alpha:g}")
    ax.axvline(float(at.mean()), color="#2ca02c", lw=1.2, label=f"mean = {float(at.mean()):.4f}")
    ax.set_xlabel(f"per-image {result.risk} loss at lambda-hat", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def conformal_section(result: ConformalResult, table: LossTable) -> list[str]:
    """The report's conformal section: the threshold, its guarantee, the set size at λ̂ and the figure."""
    size_name = "mean mask volume (fraction of valid pixels)" if result.risk == "fnr" else "mean set size (classes)"
    rows = [["risk", result.risk + (f" (class {result.class_index})" if result.risk == "fnr" else "")
             + (f" (tau = {result.tau:g})" if result.risk == "coverage" else "")],
            ["method", "CRC (in expectation)" if result.method == "crc" else "Learn-then-Test (with probability)"],
            ["alpha", f"{result.alpha:g}"], ["delta", "–" if result.delta is None else f"{result.delta:g}"],
            ["calibration images", str(result.n_images)], ["lambda-hat", f"{result.lam:.6g}"],
            ["threshold 1 - lambda-hat", f"{1.0 - result.lam:.6g}"],
            ["calibration risk at lambda-hat", f"{result.calibration_risk:.5f}"],
            [size_name + " at lambda-hat", f"{result.mean_size:.5f}"]]
    return ["<h2>Conformal risk control</h2>",
            "<p>The threshold fitted on this folder's images (the exchangeable unit is the image or volume, never "
            "the pixel; <code>docs/conformal.md</code>), from the same pass as the metrics above.</p>",
            _table(["", "value"], rows),
            f"<p class='guarantee'><b>Guarantee.</b> {html.escape(result.guarantee)}</p>",
            f"<img alt='conformal loss against lambda and per-image losses' src='{_uri(conformal_figure(result, table))}'>"]


def folder_report_html(results_or_metrics: Any, *, title: str = "segcal eval report",
                       class_names: Sequence[str] | None = None, n_worst: int = 10,
                       conformal: tuple[ConformalResult, LossTable] | None = None) -> str:
    """The HTML page of one evaluation (see the module docstring); returns the document text.

    Parameters
    ----------
    results_or_metrics
        A :class:`FolderEvaluation`, a :class:`CalibrationMetrics`, the summary of
        :func:`folder_summary` (the JSON of ``segcal eval --json``) or that file's path.
    title
        The page heading.
    class_names
        Names of the classes, by index (default ``class k``).
    n_worst
        Rows of the worst-images table.
    conformal
        Optional ``(result, table)`` of a conformal threshold fitted on the same images (``segcal
        eval --conformal-out``): adds the conformal section (:func:`conformal_section`).
    """
    res = _as_summary(results_or_metrics)
    if "reliability" not in res:
        raise InputError("results_or_metrics: the summary has no 'reliability' entry; expected the JSON of "
                         "segcal eval --json (or a FolderEvaluation / CalibrationMetrics)")
    cfg = res.get("config") or {}
    facts = [("images", res.get("n_images")), ("valid pixels", res.get("n_pixels")), ("bins", res.get("n_bins")),
             *((k, cfg[k]) for k in ("pred", "labels", "ignore_index", "input_type") if k in cfg)]
    body = [f"<h1>{html.escape(title)}</h1>",
            "<p>" + " · ".join(f"<b>{html.escape(str(k))}</b>: <code>{html.escape(str(v))}</code>"
                               for k, v in facts if v is not None) + "</p>",
            "<h2>Headline metrics</h2>",
            _table(["metric", "value"], [[k, f"{v:.5f}"] for k, v in headline(res)])]
    fig = reliability_diagram(res, title="reliability (pooled, top-label)")
    body += ["<h2>Reliability diagram</h2>",
             "<p>Bars: accuracy of the pixels in each confidence bin; dashed diagonal: perfect calibration. A red "
             "gap (bar ending below the diagonal) is over-confidence, a green one under-confidence; the grey strip "
             "is the number of pixels per bin (log scale).</p>",
             f"<img class='rel' alt='reliability diagram' src='{_uri(fig)}'>"]
    body += _per_class_section(res, class_names)
    cw = res.get("classwise_reliability")
    if isinstance(cw, Mapping) and cw.get("classes"):
        fig = reliability_diagram(res, per_class=True, class_names=class_names, ncols=4, title="")
        body += ["<h3>Reliability per class (class-wise bins)</h3>", f"<img alt='per-class reliability' "
                 f"src='{_uri(fig)}'>"]
    body += _image_section(res, res.get("stems"), n_worst)
    body += _failure_section(res)
    if conformal is not None:
        body += conformal_section(*conformal)
    return html_document(body, title, extra_css=EXTRA_CSS)


EXTRA_CSS = (".row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}tr.void td{color:#999}"
             "img.rel{max-width:560px}p.guarantee{background:#f2f7f2;border-left:3px solid #2ca02c;padding:6px 10px}")


def write_folder_report(results_or_metrics: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`folder_report_html` to ``path`` atomically; return the path."""
    doc = folder_report_html(results_or_metrics, **kwargs)
    path = Path(path)
    with atomic_write(path, "w") as fh:
        fh.write(doc)
    return path


__all__ = ["FAILURE", "SUMMARY", "conformal_figure", "conformal_section", "folder_report_html", "folder_summary", "headline", "risk_coverage_figure",
           "write_folder_report"]
