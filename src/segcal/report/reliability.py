"""Reliability diagrams of one evaluation: pooled top-label and per-class (class-wise bins).

:func:`reliability_diagram` draws what :class:`~segcal.metrics.CalibrationMetrics` measured
(``../shared/methods.md`` §4): per equal-width confidence bin the accuracy (bars), the mean
confidence (where the shaded gap ends), the number of pixels (the histogram under the diagram)
and the diagonal of perfect calibration. A bar whose top lies *below* the diagonal is a bin where
the model is over-confident (accuracy < confidence); above it, under-confident.

The per-class panels use the class-wise bins (Nixon et al. static calibration error, the
``classwise`` state of the metrics): for class ``k``, every valid pixel binned by its class-``k``
probability ``q_k``; the bar is the fraction of the bin's pixels labelled ``k``.

:func:`reliability_data` turns every accepted input (a :class:`CalibrationMetrics`, its
``compute()`` dict, a :class:`~segcal.pipeline.evaluate.FolderEvaluation`, the JSON that
``segcal eval --json`` writes, or that file's path) into one :class:`ReliabilityData`.
Figures are :class:`matplotlib.figure.Figure` objects on the Agg canvas: nothing touches
``pyplot``'s global state, so it works headless and in notebooks alike.
"""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcal.errors import InputError, missing_dependency
from segcal.io.files import read_json
from segcal.metrics import CalibrationMetrics
from segcal.metrics.scores import bin_errors
from segcal.pipeline.evaluate import FolderEvaluation

ARG = "results_or_metrics"
ACC_COLOR = "#4c72b0"
OVER_COLOR = "#f4a09c"
UNDER_COLOR = "#9fd89a"
EDGE = {"over": "#b2182b", "under": "#1b7837"}
COUNT_COLOR = "#7f7f7f"
#: legend labels (also the ``label`` / ``gid`` of the artists, which tests read back)
LABELS = {
    "bars": "accuracy of the pixels in the bin",
    "freq": "fraction of the bin's pixels labelled with the class",
    "over": "over-confident gap (red): accuracy < confidence, from the bar's top up to the bin's mean "
            "confidence; the bar ends below the diagonal",
    "under": "under-confident gap (green): accuracy > confidence, from the bin's mean confidence up to "
             "the bar's top; the bar ends above the diagonal",
    "diag": "perfect calibration (accuracy = confidence)",
    "diag_k": "perfect calibration (fraction labelled k = mean q_k)",
    "count": "pixels per bin (log scale)",
    "over_k": "over-confident gap (red): fraction labelled k < mean q_k, from the bar's top up to the mean "
              "q_k; the bar ends below the diagonal",
    "under_k": "under-confident gap (green): fraction labelled k > mean q_k, from the mean q_k up to the "
               "bar's top; the bar ends above the diagonal",
}


@dataclass
class ReliabilityData:
    """Bins of one evaluation, as the diagrams draw them.

    Attributes
    ----------
    edges
        ``(M + 1,)`` bin edges in [0, 1].
    count, confidence, accuracy
        ``(M,)`` pixels, mean confidence and accuracy per bin (NaN in empty bins).
    ece
        Pooled top-label ECE (``None`` when the input did not say).
    classwise
        ``None``, or ``{"count", "confidence", "frequency"}``: ``(C, M)`` arrays of the class-wise
        bins (NaN in empty bins), see :func:`classwise_reliability`.
    classes
        The classes shown by default (the averaged classes: without a void channel).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    ece: float | None = None
    classwise: dict[str, np.ndarray] | None = None
    classes: list[int] | None = None


def classwise_reliability(metrics: CalibrationMetrics) -> dict[str, Any]:
    """The class-wise bins of ``metrics``: ``edges`` (M+1), ``count``, ``confidence``, ``frequency``
    (``(C, M)``: pixels, mean ``q_k``, fraction labelled ``k``; NaN in empty bins) and ``classes``
    (the averaged classes). JSON-ready after :func:`segcal.io.files.to_jsonable`.
    """
    state = metrics.state_dict()
    cw = np.asarray(state["classwise"].numpy(), dtype=np.float64)  # (C, M, [count, sum q_k, sum 1[y=k]])
    cnt = cw[:, :, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(cnt > 0, cw[:, :, 1] / np.maximum(cnt, 1), np.nan)
        freq = np.where(cnt > 0, cw[:, :, 2] / np.maximum(cnt, 1), np.nan)
    return {
        "edges": np.linspace(0.0, 1.0, metrics.n_bins + 1),
        "count": cnt.astype(np.int64),
        "confidence": conf,
        "frequency": freq,
        "classes": [int(k) for k in state["config"]["average_classes"]],
    }


def _array(value: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A float64 array of a JSON list (``None`` -> NaN) or an array."""
    try:
        if isinstance(value, np.ndarray):
            arr = value.astype(np.float64)
        else:
            arr = np.array([np.nan if v is None else v for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{ARG}: {name} is a {type(value).__name__} that is not a list of numbers; "
                         "expected a list of numbers (None for an empty bin)") from exc
    if shape is not None and arr.shape != shape:
        raise InputError(f"{ARG}: {name} has shape {arr.shape}; expected {shape}")
    return arr


def _nan_rows(value: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    rows = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(rows, list) or any(not isinstance(r, list | tuple) for r in rows):
        raise InputError(f"{ARG}: {name} is a {type(value).__name__}; expected a (classes, bins) nested list")
    arr = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)
    if arr.shape != shape:
        raise InputError(f"{ARG}: {name} has shape {arr.shape}; expected {shape} (classes, bins)")
    return arr


def _from_mapping(res: Mapping[str, Any], classwise: Mapping[str, Any] | None) -> ReliabilityData:
    rel = res.get("reliability")
    if not isinstance(rel, Mapping):
        keys = ", ".join(sorted(map(str, res))[:8]) or "none"
        raise InputError(f"{ARG}: a mapping without a 'reliability' entry (keys: {keys}); expected "
                         "CalibrationMetrics.compute() or the JSON that segcal eval --json writes")
    missing = [k for k in ("edges", "count", "confidence", "accuracy") if k not in rel]
    if missing:
        raise InputError(f"{ARG}: 'reliability' lacks {missing}; expected edges, count, confidence, accuracy")
    edges = _array(rel["edges"], "reliability.edges")
    if edges.ndim != 1 or edges.size < 2:
        raise InputError(f"{ARG}: reliability.edges has shape {edges.shape}; expected (n_bins + 1,) with n_bins >= 1")
    m = edges.size - 1
    if not (np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0) and edges[0] >= 0 and edges[-1] <= 1):
        raise InputError(f"{ARG}: reliability.edges {edges.tolist()[:4]}...: expected increasing values in [0, 1]")
    count = _array(rel["count"], "reliability.count", (m,))
    conf = _array(rel["confidence"], "reliability.confidence", (m,))
    acc = _array(rel["accuracy"], "reliability.accuracy", (m,))
    if np.any(~np.isfinite(count)) or np.any(count < 0):
        raise InputError(f"{ARG}: reliability.count holds negative or missing values; expected pixel counts >= 0")
    full = count > 0
    for name, arr in (("accuracy", acc), ("confidence", conf)):
        vals = arr[full]
        if np.any(~np.isfinite(vals)) or np.any((vals < 0) | (vals > 1)):
            raise InputError(f"{ARG}: reliability.{name} of a non-empty bin is missing or outside [0, 1]; "
                             "expected values in [0, 1]")
    ece = res.get("ece")
    data = ReliabilityData(edges, count, conf, acc, float(ece) if isinstance(ece, int | float) else None)
    cw = classwise if classwise is not None else res.get("classwise_reliability")
    if isinstance(cw, Mapping) and "count" in cw:
        cnt = np.asarray(cw["count"], dtype=np.float64)
        if cnt.ndim != 2 or cnt.shape[1] != m:
            raise InputError(f"{ARG}: classwise_reliability.count has shape {cnt.shape}; expected (classes, {m})")
        data.classwise = {
            "count": cnt,
            "confidence": _nan_rows(cw["confidence"], "classwise_reliability.confidence", cnt.shape),
            "frequency": _nan_rows(cw["frequency"], "classwise_reliability.frequency", cnt.shape),
        }
        data.classes = [int(k) for k in cw.get("classes", range(cnt.shape[0]))]
    return data


def reliability_data(results_or_metrics: Any) -> ReliabilityData:
    """The bins of a :class:`CalibrationMetrics`, its ``compute()`` dict, a
    :class:`FolderEvaluation` (its ``metrics``: the predictions as they are), the JSON dict that
    ``segcal eval --json`` writes, or the path of that JSON file.

    Raises
    ------
    InputError
        For any other object, or bins that are not a reliability curve (the message says which
        entry and what was expected).
    """
    obj = results_or_metrics
    if isinstance(obj, str | os.PathLike):
        obj = read_json(Path(obj), what=ARG)
    if isinstance(obj, FolderEvaluation):
        obj = obj.metrics
    if isinstance(obj, CalibrationMetrics):
        try:
            res = obj.compute()
        except ValueError as exc:
            raise InputError(f"{ARG}: the CalibrationMetrics holds no valid pixel ({exc}); update it first") from exc
        return _from_mapping(res, classwise_reliability(obj))
    if isinstance(obj, Mapping):
        return _from_mapping(obj, None)
    raise InputError(f"{ARG}: got a {type(obj).__name__}; expected a CalibrationMetrics, its compute() dict, a "
                     "FolderEvaluation, the JSON dict of segcal eval --json, or that file's path")


def _mpl() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise missing_dependency("matplotlib", "plot", "the reliability diagram") from exc
    return Figure, FigureCanvasAgg


def _tag(container: Any, gid: str) -> None:
    """Mark every bar of ``container`` (read back by tests; an SVG element id)."""
    for patch in container.patches:
        patch.set_gid(gid)


def draw_bins(ax: Any, edges: np.ndarray, count: np.ndarray, conf: np.ndarray, acc: np.ndarray, *,
           show_gap: bool, bar_label: str, hist_ax: Any | None, suffix: str = "") -> None:
    """Draw one set of bins on ``ax``: accuracy bars (empty bins left out), the gap to each bin's
    mean confidence (red: over-confident, green: under-confident), the diagonal, and the pixel
    counts on ``hist_ax`` (log scale) when given. ``suffix="_k"`` labels a class-wise panel."""
    ok = count > 0
    centers = (edges[:-1] + edges[1:]) / 2
    width = np.diff(edges)
    bars = ax.bar(centers[ok], acc[ok], width=width[ok], color=ACC_COLOR, edgecolor="white", lw=0.6,
                  label=bar_label, zorder=2)
    _tag(bars, "accuracy")
    if show_gap:
        diff = conf - acc
        for key, sel, color in (("over", ok & (diff > 0), OVER_COLOR), ("under", ok & (diff < 0), UNDER_COLOR)):
            if not sel.any():
                continue
            lo = np.minimum(acc, conf)[sel]
            gap = ax.bar(centers[sel], np.abs(diff[sel]), bottom=lo, width=width[sel], color=color,
                         edgecolor=EDGE[key], hatch="///", lw=0.6, label=LABELS[key + suffix], zorder=3)
            _tag(gap, f"gap-{key}")
    ax.plot([0, 1], [0, 1], ls="--", color="black", lw=1.0, label=LABELS["diag" + suffix], zorder=4)
    ax.set_xlim(float(edges[0]), float(edges[-1]))
    ax.set_ylim(0, 1)
    ax.set_aspect("auto")
    if hist_ax is not None:
        h = hist_ax.bar(centers[ok], count[ok], width=width[ok], color=COUNT_COLOR, edgecolor="white", lw=0.5,
                        label=LABELS["count"])
        _tag(h, "count")
        if ok.any():
            hist_ax.set_yscale("log")
        hist_ax.set_xlim(float(edges[0]), float(edges[-1]))


def legend_entries(suffix: str, show_gap: bool, counts: bool) -> tuple[list[Any], list[str]]:
    """Handles and labels of every colour a diagram uses, in a fixed order (both gap kinds are
    explained even where a diagram has bins of one kind only)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    entries: list[tuple[Any, str]] = [
        (Line2D([], [], ls="--", color="black", lw=1.0), LABELS["diag" + suffix]),
        (Patch(facecolor=ACC_COLOR, edgecolor="white"), LABELS["freq" if suffix else "bars"]),
    ]
    if show_gap:
        entries += [(Patch(facecolor=OVER_COLOR, edgecolor=EDGE["over"], hatch="///"), LABELS["over" + suffix]),
                    (Patch(facecolor=UNDER_COLOR, edgecolor=EDGE["under"], hatch="///"), LABELS["under" + suffix])]
    if counts:
        entries.append((Patch(facecolor=COUNT_COLOR, edgecolor="white"), LABELS["count"]))
    return [h for h, _ in entries], [t for _, t in entries]


def _title(base: str | None, ece: float | None, what: str) -> str:
    parts = [base] if base else []
    if ece is not None and np.isfinite(ece):
        parts.append(f"{what} {ece:.4f}")
    return "\n".join(parts)


def reliability_diagram(
    results_or_metrics: Any,
    ax: Any = None,
    *,
    per_class: bool = False,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    show_gap: bool = True,
    show_counts: bool = True,
    title: str | None = None,
    ncols: int = 4,
) -> Any:
    """Draw a reliability diagram; return the :class:`matplotlib.figure.Figure`.

    Parameters
    ----------
    results_or_metrics
        A :class:`~segcal.metrics.CalibrationMetrics`, its ``compute()`` dict, a
        :class:`~segcal.pipeline.evaluate.FolderEvaluation`, the JSON dict of
        ``segcal eval --json`` or that file's path (see :func:`reliability_data`).
    ax
        Axes to draw the pooled diagram on (the count histogram is appended below it); default: a
        new figure. Not with ``per_class``, which lays out its own grid.
    per_class
        Small multiples, one panel per class, from the class-wise bins (x: mean class probability
        ``q_k`` of the bin, bar: fraction of its pixels labelled ``k``). Needs those bins: a
        CalibrationMetrics, a FolderEvaluation or the eval JSON (not a bare ``compute()`` dict).
    classes
        Classes to show with ``per_class`` (default: the averaged classes, i.e. without a void
        channel equal to ``ignore_index``).
    class_names
        Names for the panel titles (a sequence indexed by class, or a mapping).
    show_gap
        Shade the gap between each bar and the bin's mean confidence: red where over-confident
        (bar top below the diagonal), green where under-confident.
    show_counts
        Draw the pixels-per-bin histogram (log scale) under the pooled diagram.
    title
        Figure title (the pooled ECE is added to it; ``""`` with ``per_class``: no figure title).
    ncols
        Panels per row with ``per_class``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InputError
        Input that is not one of the above, ``per_class`` without class-wise bins, unknown
        ``classes``, or ``ax`` with ``per_class``.
    MissingDependencyError
        matplotlib is not installed (``pip install 'segcal[plot]'``).
    """
    data = reliability_data(results_or_metrics)
    Figure, FigureCanvasAgg = _mpl()
    if per_class:
        if ax is not None:
            raise InputError("ax: per_class=True lays out one panel per class in its own figure; pass ax=None")
        return _per_class(data, classes, class_names, show_gap, title, ncols, Figure, FigureCanvasAgg)
    if classes is not None:
        raise InputError("classes: only used with per_class=True")
    hist_ax = None
    if ax is None:
        fig = Figure(figsize=(5.6, 6.4) if show_counts else (5.6, 5.0))
        FigureCanvasAgg(fig)
        if show_counts:
            ax, hist_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3.2, 1], "hspace": 0.06})
        else:
            ax = fig.add_subplot(1, 1, 1)
        own = True
    else:
        fig, own = ax.figure, False
        if show_counts:  # a strip under the given axes, in its coordinates
            hist_ax = ax.inset_axes((0.0, -0.42, 1.0, 0.28), sharex=ax)
    if show_counts:
        ax.tick_params(labelbottom=False)
        hist_ax.set_xlabel("confidence (top-label probability)")
        hist_ax.set_ylabel("pixels")
    else:
        ax.set_xlabel("confidence (top-label probability)")
    draw_bins(ax, data.edges, data.count, data.confidence, data.accuracy, show_gap=show_gap,
           bar_label=LABELS["bars"], hist_ax=hist_ax)
    ax.set_ylabel("accuracy")
    ax.set_title(_title(title or "reliability (pooled, top-label)", data.ece, "ECE"), fontsize=10)
    handles, labels = legend_entries("", show_gap, hist_ax is not None)
    if own:  # below the diagram, where it hides no bar
        texts = [textwrap.fill(t, 78) for t in labels]
        legend_in = 0.125 * sum(t.count("\n") + 1 for t in texts) + 0.05 * len(texts) + 0.1
        height = fig.get_size_inches()[1] + legend_in
        fig.set_size_inches(5.6, height)
        fig.legend(handles, texts, loc="lower left", fontsize=7, frameon=False, bbox_to_anchor=(0.02, 0.0))
        fig.subplots_adjust(left=0.13, right=0.97, top=1 - 0.45 / height, bottom=(legend_in + 0.55) / height)
    else:
        ax.legend(handles, [textwrap.fill(t, 60) for t in labels], loc="upper left", fontsize=6, framealpha=0.9)
    return fig


def _name(class_names: Sequence[str] | Mapping[int, str] | None, k: int) -> str:
    if class_names is None:
        return f"class {k}"
    try:
        return f"{k}: {class_names[k]}"
    except (IndexError, KeyError):
        return f"class {k}"


def _per_class(data: ReliabilityData, classes: Sequence[int] | None, class_names: Any, show_gap: bool,
               title: str | None, ncols: int, Figure: Any, FigureCanvasAgg: Any) -> Any:
    cw = data.classwise
    if cw is None:
        raise InputError(f"{ARG}: per_class=True needs the class-wise bins, which a compute() dict does not hold; "
                         "pass the CalibrationMetrics, the FolderEvaluation or the JSON of segcal eval --json")
    n_cls = cw["count"].shape[0]
    chosen = list(data.classes if classes is None and data.classes is not None else
                  (range(n_cls) if classes is None else classes))
    bad = [k for k in chosen if not isinstance(k, int | np.integer) or not 0 <= int(k) < n_cls]
    if bad or not chosen:
        raise InputError(f"classes: {bad or chosen} ; expected a non-empty list of class indices in [0, {n_cls})")
    ncols = max(1, min(int(ncols), len(chosen)))
    nrows = (len(chosen) + ncols - 1) // ncols
    fig = Figure(figsize=(2.7 * ncols, 2.7 * nrows + 0.9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for ax, k in zip(axes.ravel(), chosen, strict=False):
        k = int(k)
        cnt, conf, freq = cw["count"][k], cw["confidence"][k], cw["frequency"][k]
        draw_bins(ax, data.edges, cnt, conf, freq, show_gap=show_gap, bar_label=LABELS["freq"], hist_ax=None,
               suffix="_k")
        ax.set_gid(f"class-{k}")
        sconf, sfreq = np.nan_to_num(conf * cnt), np.nan_to_num(freq * cnt)
        ece_k = float(bin_errors(cnt, sconf, sfreq)["ece"]) if cnt.sum() > 0 else None
        ax.set_title(_title(_name(class_names, k), ece_k, "ECE$_k$"), fontsize=8)
        ax.tick_params(labelsize=7)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(chosen):
            ax.axis("off")
        elif i + ncols >= len(chosen):  # the lowest panel of its column
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("mean $q_k$ of the bin", fontsize=8)
    for row in axes:
        row[0].set_ylabel("fraction labelled $k$", fontsize=8)
    handles, labels = legend_entries("_k", show_gap, False)
    top = 0.3 if title != "" else 0.05
    if title != "":
        fig.suptitle(title or "reliability per class (class-wise bins)", fontsize=10)
    texts = [textwrap.fill(t, 70) for t in labels]
    fig.legend(handles, texts, loc="lower center", ncol=2 if ncols > 1 else 1, fontsize=7,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    lines = [t.count("\n") + 1 for t in texts]
    col_lines = max(sum(lines[0::2]), sum(lines[1::2])) if ncols > 1 else sum(lines)
    legend_in = 0.13 * col_lines + 0.25
    height = fig.get_size_inches()[1] + legend_in
    fig.set_size_inches(fig.get_size_inches()[0], height)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1 - top / height))
    return fig


def figure_bytes(fig: Any, fmt: str, dpi: int = 110) -> bytes:
    """``fig`` rendered as ``"png"`` or ``"svg"`` bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


__all__ = ["LABELS", "ReliabilityData", "classwise_reliability", "draw_bins", "figure_bytes", "legend_entries",
           "reliability_data", "reliability_diagram"]
