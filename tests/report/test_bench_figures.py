"""The bench report's figures: every colour they use is named in a legend (or a labelled colour bar)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segcal.calibrators as sc
from segcal.bench.protocol import ImageData
from segcal.bench.results import FigureData
from segcal.report.html import ERROR_COLOURS, SHARE_LABEL, maps_fig, reliability_fig, slices_figure
from segcal.report.reliability import LABELS

pytest.importorskip("matplotlib")


def legend_texts(fig):
    return [t.get_text().replace("\n", " ") for lg in fig.legends for t in lg.get_texts()]


def run(method, acc, conf, count):
    edges = np.linspace(0, 1, len(acc) + 1).tolist()
    return {"method": method, "seed": 0, "metrics": {"ece": 0.05},
            "reliability": {"edges": edges, "accuracy": acc, "confidence": conf, "count": count}}


def test_bench_reliability_legend_names_every_colour():
    results = {"conditions": {"clean": {"runs": {
        "a": run("uncalibrated", [None, 0.3, 0.6, 0.8], [None, 0.4, 0.7, 0.95], [0, 10, 20, 70]),
        "b": run("ts", [0.2, 0.5, 0.7, 0.9], [0.1, 0.4, 0.75, 0.92], [5, 10, 20, 65]),
    }}}}
    fig = reliability_fig(results, "clean")
    texts = legend_texts(fig)
    for key in ("diag", "bars", "over", "under"):
        assert LABELS[key] in texts, key
    assert SHARE_LABEL in texts
    bars = [[p for p in ax.patches if p.get_gid() == "accuracy"] for ax in fig.axes[:2]]
    assert [len(b) for b in bars] == [3, 4]  # the empty bin is left out
    np.testing.assert_allclose([p.get_height() for p in bars[0]], [0.3, 0.6, 0.8])
    # both gap kinds appear in panel b, with the colours of the legend
    gids = {p.get_gid() for p in fig.axes[1].patches}
    assert {"gap-over", "gap-under"} <= gids


class _Item:
    def __init__(self, img):
        self.img = img

    def load_image(self):
        return self.img


def _fitted_ts(items, ignore):
    z = torch.from_numpy(np.stack([it.logits for it in items]))
    y = torch.from_numpy(np.stack([it.labels for it in items]))
    return sc.create("ts", num_classes=z.shape[1]).fit(z, y, ignore_index=ignore)


def test_maps_legend_names_the_error_colours():
    rng = np.random.default_rng(0)
    items = [ImageData(f"s{i}", (rng.normal(size=(4, 12, 16)) * 3).astype(np.float32),
                       np.where(rng.random((12, 16)) < 0.1, 3, rng.integers(0, 3, (12, 16))),
                       _Item((rng.random((12, 16, 3)) * 255).astype(np.uint8))) for i in range(2)]
    fig = maps_fig(FigureData({("ts", 0): _fitted_ts(items, 3)}, items, ignore=3), ["ts"], 2)
    assert legend_texts(fig) == [t for _, t in ERROR_COLOURS]
    assert any(ax.get_ylabel().startswith("confidence") for ax in fig.axes)  # the colour bar


def test_slices_figure_has_its_legend(monkeypatch):
    import segcal.report.html as h

    rng = np.random.default_rng(1)
    items = [ImageData("case", (rng.normal(size=(3, 8, 8, 6)) * 3).astype(np.float32),
                       rng.integers(0, 3, (8, 8, 6)), _Item(rng.random((8, 8, 6)).astype(np.float32)))]
    seen = {}
    monkeypatch.setattr(h, "_png", lambda fig: seen.setdefault("fig", fig) and "uri")
    assert slices_figure(FigureData({("ts", 0): _fitted_ts(items, None)}, items), ["ts"], 1) == "uri"
    texts = legend_texts(seen["fig"])
    assert {"background", "anterior", "posterior", "error map: wrong"} <= set(texts)
