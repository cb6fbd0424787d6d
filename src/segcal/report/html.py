"""Self-contained HTML report of a ``segcal bench`` run (matplotlib PNGs as base64 data URIs).

Drawn from the results dict and the :class:`~segcal.bench.results.FigureData` of the run (fitted
calibrators and clean test images); nothing is read from disk here.
"""

from __future__ import annotations

import base64
import html
import io
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.bench.results import FigureData
from segcal.bench.spec import IN_DOMAIN, SHIFT_MODEL
from segcal.io.files import atomic_write
from segcal.report.page import CSS, html_document
from segcal.report.reliability import LABELS, draw_bins, legend_entries
from segcal.report.tables import markdown_report


def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ImportError("the HTML report needs matplotlib: pip install 'segcal[plot]' (or pass --no-report)") from exc
    return plt


#: the pixel-share line of the bench's reliability diagrams
SHARE_COLOR = "#333333"
SHARE_LABEL = "share of pixels per bin (dots, same 0-1 axis)"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _mpl().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def reliability_fig(results: dict[str, Any], tag: str, seed: int | None = None, key: str = "reliability",
                    metric: str = "ece") -> Any | None:
    """The figure of :func:`reliability_figure` (a matplotlib Figure; None without the condition)."""
    plt = _mpl()
    cond = results["conditions"].get(tag)
    if not cond:
        return None
    runs: dict[str, dict[str, Any]] = {}
    for r in cond["runs"].values():
        if r["method"] not in runs or (seed is not None and r["seed"] == seed):
            runs[r["method"]] = r
    n = len(runs)
    ncol = min(6, n)
    nrow = (n + ncol - 1) // ncol
    legend_in = 1.0 if ncol >= 5 else (1.2 if ncol >= 3 else 2.6)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.3 * ncol, 2.5 * nrow + legend_in), squeeze=False)
    for ax, (m, r) in zip(axes.ravel(), runs.items(), strict=False):
        rel = r[key]
        edges = np.asarray(rel["edges"], dtype=float)
        acc = np.array([np.nan if v is None else v for v in rel["accuracy"]], dtype=float)
        conf = np.array([np.nan if v is None else v for v in rel["confidence"]], dtype=float)
        cnt = np.asarray(rel["count"], dtype=float)
        draw_bins(ax, edges, cnt, conf, acc, show_gap=True, bar_label=LABELS["bars"], hist_ax=None)
        centers = (edges[:-1] + edges[1:]) / 2
        ok = cnt > 0
        ax.plot(centers[ok], (cnt / max(cnt.sum(), 1))[ok], "o-", ms=2, lw=0.9, color=SHARE_COLOR, zorder=5)
        ece = r["metrics"].get(metric)
        label = "fg-ECE" if metric == "fg_ece" else "ECE"
        ax.set_title(f"{m}\n{label} {ece:.4f}" if ece is not None else m, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    handles, labels = legend_entries("", True, False)
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], marker="o", ms=3, lw=0.9, color=SHARE_COLOR))
    labels.append(SHARE_LABEL)
    fig.legend(handles, [textwrap.fill(t, 60 if ncol >= 3 else 44) for t in labels], loc="lower center",
               ncol=3 if ncol >= 5 else (2 if ncol >= 3 else 1), fontsize=7, frameon=False)
    for i, ax in enumerate(axes.ravel()[:n]):
        if i + ncol >= n:  # the lowest panel of its column
            ax.set_xlabel("confidence", fontsize=8)
        if i % ncol == 0:
            ax.set_ylabel("accuracy", fontsize=8)
    fig.tight_layout(rect=(0, legend_in / (2.5 * nrow + legend_in), 1, 1))
    return fig


def reliability_figure(results: dict[str, Any], tag: str, seed: int | None = None, key: str = "reliability",
                       metric: str = "ece") -> str | None:
    """Small-multiple reliability diagrams (one per method, first seed) of one condition, as a PNG
    data URI; the legend names every colour (:data:`segcal.report.reliability.LABELS`).

    ``key``: the run's reliability data (``"fg_reliability"``: the medical foreground region);
    ``metric``: the ECE printed in each title.
    """
    fig = reliability_fig(results, tag, seed, key, metric)
    return None if fig is None else _png(fig)


def _patch_legend(fig: Any, entries: list[tuple[str, str]], title: str) -> None:
    """A figure legend of colour swatches ``(colour, meaning)`` at the bottom left."""
    from matplotlib.patches import Patch

    fig.legend([Patch(facecolor=c, edgecolor="#444", lw=0.5) for c, _ in entries], [t for _, t in entries],
               title=title, loc="lower left", ncol=len(entries), fontsize=7, title_fontsize=7, frameon=False,
               bbox_to_anchor=(0.0, 0.0))


#: the error maps' colours (``gray_r`` on 0 / 0.5 / 1)
ERROR_COLOURS = [("white", "correct"), ("#7f7f7f", "void (ignored)"), ("black", "wrong")]


def maps_fig(fig_data: FigureData, methods: list[str], n_images: int) -> Any | None:
    """The figure of :func:`maps_figure`; its legend names the error map's colours."""
    plt = _mpl()
    items = fig_data.images
    if not items or n_images < 1:
        return None
    pos = np.linspace(0, len(items) - 1, min(n_images, len(items))).round().astype(int)
    cals = fig_data.cals
    methods = [m for m in methods if any(k[0] == m for k in cals)]
    cols = 2 + 1 + len(methods)
    fig, axes = plt.subplots(len(pos), cols, figsize=(2.6 * cols, 2.1 * len(pos)), squeeze=False)
    im_conf = None
    for r, i in enumerate(pos):
        it = items[i]
        z = torch.from_numpy(np.asarray(it.logits, dtype=np.float32))[None]
        lab = it.labels
        pred = z[0].argmax(0).numpy()
        err = np.where(lab == fig_data.ignore, 0.5, (pred != lab).astype(float))
        panels = [("image", it.raw_image(), None), ("error (uncal.)", err, "gray_r")]
        panels.append(("conf. uncalibrated", torch.softmax(z, 1)[0].amax(0).numpy(), "viridis"))
        for m in methods:
            key = min(k for k in cals if k[0] == m)
            with torch.no_grad():
                if getattr(cals[key], "uses_image", False):
                    img = torch.from_numpy(it.image())[None]
                    q = torch.softmax(cals[key](z, image=img), 1)[0].amax(0).numpy()
                else:
                    q = torch.softmax(cals[key](z), 1)[0].amax(0).numpy()
            panels.append((f"conf. {m}", q, "viridis"))
        for c, (title, arr, cmap) in enumerate(panels):
            ax = axes[r, c]
            if cmap is None:
                ax.imshow(arr)
            elif cmap == "viridis":
                im_conf = ax.imshow(arr, cmap=cmap, vmin=0, vmax=1)
            else:
                ax.imshow(arr, cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(it.stem, fontsize=7)
    fig.set_size_inches(fig.get_size_inches()[0], fig.get_size_inches()[1] + 0.45)
    fig.tight_layout(rect=(0, 0.45 / fig.get_size_inches()[1], 1, 1))
    if im_conf is not None:
        fig.colorbar(im_conf, ax=axes.ravel().tolist(), fraction=0.012, pad=0.01,
                     label="confidence (top-label probability)")
    _patch_legend(fig, ERROR_COLOURS if fig_data.ignore is not None else ERROR_COLOURS[::2], "error map")
    return fig


def maps_figure(fig_data: FigureData, methods: list[str], n_images: int) -> str | None:
    """Per-image RGB, error map and confidence maps (uncalibrated and each of ``methods``, seed 0)."""
    fig = maps_fig(fig_data, methods, n_images)
    return None if fig is None else _png(fig)


def slices_figure(fig_data: FigureData, methods: list[str], n_cases: int) -> str | None:
    """Axial slices of a few test cases: image, label, prediction, error map, confidence maps.

    ``fig_data.images``: the clean test cases (``(3, X, Y, Z)`` logits, labels, and the MRI volume
    through ``raw_image()``). Cases are spread over the list; the slice is the axial (last-axis)
    slice with the most foreground voxels. Calibrators are applied to the whole volume (the
    spatial ones need it), first seed.
    """
    plt = _mpl()
    cases = fig_data.images
    if not cases or n_cases < 1:
        return None
    pos = np.linspace(0, len(cases) - 1, min(n_cases, len(cases))).round().astype(int)
    cals = fig_data.cals
    methods = [m for m in methods if any(k[0] == m for k in cals)]
    cols = 4 + 1 + len(methods)
    fig, axes = plt.subplots(len(pos), cols, figsize=(1.9 * cols, 2.2 * len(pos)), squeeze=False)
    lab_cmap = plt.matplotlib.colors.ListedColormap(["black", "#e6550d", "#3182bd"])
    im_conf = None
    for r, i in enumerate(pos):
        case = cases[i]
        z = torch.from_numpy(np.asarray(case.logits, dtype=np.float32))[None]
        lab = case.labels
        k = int(np.argmax((lab > 0).sum(axis=(0, 1))))
        image = np.asarray(case.raw_image(), dtype=np.float32)
        pred = z[0].argmax(0).numpy()
        err = (pred != lab).astype(float)
        panels: list[tuple[str, np.ndarray, Any]] = [
            ("image", image[:, :, k], "gray"), ("label", lab[:, :, k], lab_cmap),
            ("prediction", pred[:, :, k], lab_cmap), ("error (uncal.)", err[:, :, k], "gray_r"),
            ("conf. uncalibrated", torch.softmax(z, 1)[0].amax(0).numpy()[:, :, k], "viridis"),
        ]
        for m in methods:
            key = min(kk for kk in cals if kk[0] == m)
            with torch.no_grad():
                q = torch.softmax(cals[key](z), 1)[0].amax(0).numpy()
            panels.append((f"conf. {m}", q[:, :, k], "viridis"))
        for c, (title, arr, cmap) in enumerate(panels):
            ax = axes[r, c]
            kw: dict[str, Any] = {"origin": "lower", "interpolation": "nearest"}
            if cmap is lab_cmap:
                ax.imshow(arr.T, cmap=cmap, vmin=0, vmax=2, **kw)
            elif cmap == "gray":
                lo, hi = np.percentile(arr, [1, 99])
                ax.imshow(arr.T, cmap=cmap, vmin=lo, vmax=hi, **kw)
            elif cmap == "viridis":
                im_conf = ax.imshow(arr.T, cmap=cmap, vmin=0.5, vmax=1, **kw)
            else:
                ax.imshow(arr.T, cmap=cmap, vmin=0, vmax=1, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{case.stem}\nz={k}", fontsize=7)
    fig.set_size_inches(fig.get_size_inches()[0], fig.get_size_inches()[1] + 0.45)
    fig.tight_layout(rect=(0, 0.45 / fig.get_size_inches()[1], 1, 1))
    if im_conf is not None:
        fig.colorbar(im_conf, ax=axes.ravel().tolist(), fraction=0.012, pad=0.01,
                     label="confidence (top-label probability)")
    _patch_legend(fig, [("black", "background"), ("#e6550d", "anterior"), ("#3182bd", "posterior"),
                        ("white", "error map: correct"), ("black", "error map: wrong")], "label / prediction")
    return _png(fig)


def _medical_body(results: dict[str, Any], figures: Mapping[str, FigureData], n_images: int) -> list[str]:
    body = [md_to_html(markdown_report(results))]
    body.append("<h2>Reliability diagrams</h2><p>First seed of each row; bars: accuracy per confidence bin, "
                "red / green hatched: over- / under-confident gap to the mean confidence, dark dots: share of voxels per "
                "bin, dashed: perfect calibration. "
                "All voxels are dominated by easy background at confidence near 1; the foreground region "
                "(dilated true and predicted foreground) shows the structure itself.</p>")
    shifted = [t for t, c in results["conditions"].items() if c.get("corruption")]
    worst = max(shifted, key=lambda t: results["conditions"][t]["summary"]["uncalibrated"]["fg_ece"]) if shifted else None
    for tag in ("clean", worst):
        if not tag:
            continue
        for key, metric, what in (("reliability", "ece", "all voxels"), ("fg_reliability", "fg_ece", "foreground region")):
            uri = reliability_figure(results, tag, key=key, metric=metric)
            if uri:
                body.append(f"<h3>{html.escape(tag)}: {what}</h3><img alt='reliability {html.escape(tag)} {what}' src='{uri}'>")
    summ = results["conditions"]["clean"]["summary"]
    others = sorted((m for m in summ if m not in ("uncalibrated", "ts")),
                    key=lambda m: summ[m].get("fg_ece") if summ[m].get("fg_ece") is not None else 9)
    shown = (["ts"] if "ts" in summ else []) + others[:2]
    uri = slices_figure(next(iter(figures.values())), shown, n_images) if figures else None
    if uri:
        body.append("<h2>Axial slices (clean test cases)</h2><p>Slice with the most foreground voxels of each case. "
                    "Label / prediction: black background, orange anterior, blue posterior. Error: black = wrong. "
                    "Confidence = top-label probability (colour scale 0.5-1). Rows: TS and the two lowest fg-ECE "
                    f"others ({', '.join(others[:2]) or 'none'}), first seed.</p><img alt='slices' src='{uri}'>")
    return body


def md_to_html(md: str) -> str:
    """The tiny Markdown subset the bench writes: headings, bullets, tables, paragraphs, `code`."""

    def inline(s: str) -> str:
        s = html.escape(s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    def cell(s: str) -> str:
        # compact cells: the seed std and the CI go on a second, smaller line
        s = inline(s)
        s = re.sub(r"^(\S+) ± (\S+)$", r"\1<br><small>± \2</small>", s)
        return re.sub(r"^(\S+) (\[[^\]]*\]\*?)$", r"\1<br><small>\2</small>", s)

    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            t = ["<table>", "<tr>" + "".join(f"<th>{inline(c)}</th>" for c in rows[0]) + "</tr>"]
            for row in rows[2:]:
                t.append("<tr>" + "".join(
                    f"<td class='{'sig' if c.endswith('*') else ''}'>{cell(c)}</td>" for c in row) + "</tr>")
            out.append("<div class='tw'>" + "\n".join(t) + "</table></div>")
            continue
        if ln.startswith("#"):
            lvl = len(ln) - len(ln.lstrip("#"))
            out.append(f"<h{lvl}>{inline(ln[lvl:].strip())}</h{lvl}>")
        elif ln.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif ln.strip():
            out.append(f"<p>{inline(ln)}</p>")
        i += 1
    return "\n".join(out)




def write_report(results: dict[str, Any], figures: Mapping[str, FigureData], path: str | Path,
                 n_images: int = 3) -> Path:
    """Write ``report.html``: the Markdown tables, reliability diagrams and the figures of ``figures``
    (per model; CamVid: confidence and error maps, hippocampus: axial slices)."""
    if results.get("format") == "segcal-bench-medical":
        return _write_doc(_medical_body(results, figures, n_images), path, "segcal bench report (hippocampus)")
    body = [md_to_html(markdown_report(results))]
    body.append("<h2>Reliability diagrams</h2><p>First seed of each method; bars: accuracy per confidence bin, "
                "red / green hatched: over- / under-confident gap to the mean confidence, dark dots: share of pixels per "
                "bin, dashed: perfect calibration.</p>")
    shift_tag = "model-shift" if "model-shift" in results["conditions"] else next(
        (t for t, c in results["conditions"].items() if c.get("corruption")), None)
    for tag in ("clean", shift_tag):
        if tag and tag in results["conditions"]:
            uri = reliability_figure(results, tag)
            if uri:
                body.append(f"<h3>{html.escape(tag)}</h3><img alt='reliability {html.escape(tag)}' src='{uri}'>")
    model = IN_DOMAIN if IN_DOMAIN in figures else (SHIFT_MODEL if SHIFT_MODEL in figures else next(iter(figures), None))
    if model is not None:
        clean = results["conditions"].get("clean") or {}
        summ = clean.get("summary", {})
        others = sorted((m for m in summ if m not in ("uncalibrated", "ts")),
                        key=lambda m: summ[m].get("ece") if summ[m].get("ece") is not None else 9)
        shown = (["ts"] if "ts" in summ else []) + others[:2]
        uri = maps_figure(figures[model], shown, n_images)
        if uri:
            body.append(f"<h2>Confidence and error maps ({html.escape(model)}, clean test)</h2>"
                        "<p>Error: white = correct, black = wrong, grey = void (ignored). Confidence = top-label "
                        f"probability. Methods: TS and the two lowest pooled-ECE others ({', '.join(others[:2])}), "
                        "first seed.</p>"
                        f"<img alt='maps' src='{uri}'>")
    return _write_doc(body, path, "segcal bench report")


def _write_doc(body: list[str], path: str | Path, title: str) -> Path:
    doc = html_document(body, title)
    path = Path(path)
    with atomic_write(path, "w") as fh:
        fh.write(doc)
    return path


__all__ = ["CSS", "ERROR_COLOURS", "html_document", "maps_fig", "maps_figure", "md_to_html", "reliability_fig",
           "reliability_figure", "slices_figure", "write_report"]
