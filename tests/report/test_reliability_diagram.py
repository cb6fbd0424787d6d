"""``segcal.plot.reliability_diagram``: the drawn bars are the measured bins.

The bar heights are read back from the matplotlib artists and compared with an independent float64
NumPy binning of the same pixels (``(lo, hi]`` bins, ``tests/helpers/metric_reference.py``'s
convention), not with segcal's own output.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from metric_reference import softmax
from segcal.errors import InputError, MissingDependencyError
from segcal.io.files import to_jsonable
from segcal.metrics import CalibrationMetrics
from segcal.plot import reliability_diagram
from segcal.report.reliability import LABELS

pytest.importorskip("matplotlib")

N_BINS = 10


def make_data(c=4, n=3, shape=(20, 24), seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c, *shape)) * scale
    y = np.where(rng.random((n, *shape)) < 0.7, z.argmax(1), rng.integers(0, c, (n, *shape)))
    return z, y


def reference_bins(scores, hits, n_bins=N_BINS):
    """Mean of ``hits`` per (lo, hi] bin of ``scores``, and the bin counts (float64, NumPy only)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, scores, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    s = np.bincount(b, weights=hits.astype(float), minlength=n_bins)
    return np.where(count > 0, s / np.maximum(count, 1), np.nan), count


def metrics_of(z, y, ignore_index=None):
    m = CalibrationMetrics(z.shape[1], n_bins=N_BINS, ignore_index=ignore_index)
    m.update(torch.from_numpy(z), torch.from_numpy(y))
    return m


def bars(ax, gid="accuracy"):
    """The bars of ``ax`` marked ``gid``, in drawing order."""
    return [p for p in ax.patches if p.get_gid() == gid]


def centers_heights(patches):
    xs = np.array([p.get_x() + p.get_width() / 2 for p in patches])
    hs = np.array([p.get_height() for p in patches])
    return xs, hs


def legend_texts(fig):
    """The legend entries of ``fig`` (figure and axes legends), unwrapped."""
    legends = [*fig.legends, *(a.get_legend() for a in fig.axes if a.get_legend() is not None)]
    return [t.get_text().replace("\n", " ") for lg in legends for t in lg.get_texts()]


def pooled_reference(z, y):
    q = softmax(z)
    conf = q.max(1).ravel()
    acc = (q.argmax(1) == y).ravel()
    return reference_bins(conf, acc)


def test_bar_heights_are_the_bin_accuracies():
    z, y = make_data()
    m = metrics_of(z, y)
    fig = reliability_diagram(m)
    ax = fig.axes[0]
    xs, hs = centers_heights(bars(ax))
    ref_acc, ref_cnt = pooled_reference(z, y)
    ok = ref_cnt > 0
    centers = (np.arange(N_BINS) + 0.5) / N_BINS
    np.testing.assert_allclose(xs, centers[ok], atol=1e-12)
    np.testing.assert_allclose(hs, ref_acc[ok], atol=1e-9)
    # and equal to what compute() reports
    rel = m.compute()["reliability"]
    np.testing.assert_allclose(hs, rel["accuracy"][rel["count"] > 0], atol=1e-12)
    # the count histogram holds the bin counts
    hist = next(a for a in fig.axes if bars(a, "count"))
    _, counts = centers_heights(bars(hist, "count"))
    np.testing.assert_array_equal(counts, ref_cnt[ok])
    assert hist.get_yscale() == "log"


def test_empty_bins_are_skipped_and_gap_reaches_the_mean_confidence():
    # 3 classes: the top-label confidence is > 1/3, so bins 0-2 (of 10) are empty
    z, y = make_data(c=3, scale=1.0, seed=1)
    m = metrics_of(z, y)
    ref_acc, ref_cnt = pooled_reference(z, y)
    assert (ref_cnt[:3] == 0).all() and (ref_cnt > 0).sum() >= 4
    ax = reliability_diagram(m).axes[0]
    xs, hs = centers_heights(bars(ax))
    assert len(hs) == (ref_cnt > 0).sum()
    assert xs.min() > 0.3
    q = softmax(z)
    conf = q.max(1).ravel()
    ref_conf, _ = reference_bins(conf, conf)
    # each non-empty bin has exactly one gap bar, spanning accuracy .. mean confidence
    gaps = [p for p in ax.patches if str(p.get_gid()).startswith("gap-")]
    spans = {}
    for p in gaps:
        over = p.get_gid() == "gap-over"
        spans[round(p.get_x() + p.get_width() / 2, 9)] = (p.get_y(), p.get_y() + p.get_height(), over)
    assert len(spans) == len(gaps) == (ref_cnt > 0).sum()
    ok = ref_cnt > 0
    for x, a, c in zip(((np.arange(N_BINS) + 0.5) / N_BINS)[ok], ref_acc[ok], ref_conf[ok], strict=True):
        lo, hi, over = spans[round(x, 9)]
        assert lo == pytest.approx(min(a, c), abs=1e-9) and hi == pytest.approx(max(a, c), abs=1e-9)
        assert over == (c > a)
    legend = legend_texts(ax.figure)
    assert LABELS["diag"] in legend and LABELS["bars"] in legend
    assert any("over-confident" in t for t in legend)


def test_json_and_compute_dict_give_the_same_bars(tmp_path):
    z, y = make_data(seed=2)
    m = metrics_of(z, y)
    ref = centers_heights(bars(reliability_diagram(m).axes[0]))
    res = m.compute()
    from_dict = centers_heights(bars(reliability_diagram(res).axes[0]))
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(to_jsonable(res)))  # NaN -> null, as segcal eval --json writes
    from_file = centers_heights(bars(reliability_diagram(path).axes[0]))
    from_loaded = centers_heights(bars(reliability_diagram(json.loads(path.read_text())).axes[0]))
    for got in (from_dict, from_file, from_loaded):
        np.testing.assert_allclose(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1])


def test_given_axes_are_used_and_no_gap_without_show_gap():
    from matplotlib.figure import Figure

    z, y = make_data(seed=3)
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    out = reliability_diagram(metrics_of(z, y), ax, show_gap=False, show_counts=False)
    assert out is fig
    assert not [p for p in ax.patches if str(p.get_gid()).startswith("gap")]
    assert len(bars(ax)) > 0
    ax2 = fig.add_subplot(1, 2, 1)
    reliability_diagram(metrics_of(z, y), ax2)  # the count strip is drawn under the given axes
    strips = [a for a in ax2.child_axes if bars(a, "count")]
    assert len(strips) == 1 and not bars(ax2, "count") and bars(ax2)


def test_per_class_panels_are_the_classwise_bins():
    c = 5
    z, y = make_data(c=c, seed=4)
    y[:, :2] = c - 1  # a void channel (class 4 = ignore_index): left out of the averaged classes
    m = metrics_of(z, y, ignore_index=c - 1)
    fig = reliability_diagram(m, per_class=True, class_names=["a", "b", "c", "d", "void"])
    panels = [ax for ax in fig.axes if str(ax.get_gid()).startswith("class-")]
    assert [ax.get_gid() for ax in panels] == ["class-0", "class-1", "class-2", "class-3"]
    q = softmax(z)
    valid = (y != c - 1).ravel()
    for k, ax in enumerate(panels):
        ref_freq, ref_cnt = reference_bins(q[:, k].ravel()[valid], (y.ravel() == k)[valid])
        _, hs = centers_heights(bars(ax))
        np.testing.assert_allclose(hs, ref_freq[ref_cnt > 0], atol=1e-9)
        assert ax.get_title().startswith(f"{k}: ")
    two = reliability_diagram(m, per_class=True, classes=[0, 4])
    assert [ax.get_gid() for ax in two.axes if str(ax.get_gid()).startswith("class-")] == ["class-0", "class-4"]


@pytest.mark.parametrize("bad,match", [
    ([1, 2, 3], "expected a CalibrationMetrics"),
    ({"ece": 0.1}, "without a 'reliability' entry"),
    ({"reliability": {"edges": [0, 0.5, 1], "count": [1], "confidence": [0.5], "accuracy": [0.5]}}, "shape"),
    ({"reliability": {"edges": [0, 0.5, 1], "count": [1, 2], "confidence": [0.5, 0.7], "accuracy": [0.5, 1.7]}},
     r"outside \[0, 1\]"),
    ({"reliability": {"edges": [0, 1], "count": [1]}}, "lacks"),
    ({"reliability": {"edges": [1, 0], "count": [1], "confidence": [0.5], "accuracy": [0.5]}}, "increasing"),
    ({"reliability": {"edges": "ab", "count": [1], "confidence": [0.5], "accuracy": [0.5]}}, "not a list of numbers"),
])
def test_bad_input_is_refused(bad, match):
    with pytest.raises(InputError, match=match):
        reliability_diagram(bad)


def test_bad_arguments_are_refused(tmp_path):
    z, y = make_data(seed=5)
    m = metrics_of(z, y)
    with pytest.raises(InputError, match="class-wise bins"):
        reliability_diagram(m.compute(), per_class=True)
    with pytest.raises(InputError, match="classes"):
        reliability_diagram(m, per_class=True, classes=[0, 9])
    with pytest.raises(InputError, match="ax: "):
        reliability_diagram(m, object(), per_class=True)
    with pytest.raises(InputError, match="no valid pixel"):
        reliability_diagram(CalibrationMetrics(3))
    with pytest.raises(InputError, match="cannot read"):
        reliability_diagram(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(InputError, match="expected a JSON dict"):
        reliability_diagram(tmp_path / "list.json")


def test_missing_matplotlib_gives_the_install_hint(monkeypatch):
    z, y = make_data(seed=6)
    m = metrics_of(z, y)
    for mod in [k for k in sys.modules if k == "matplotlib" or k.startswith(("matplotlib.", "mpl_toolkits"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'segcal\[plot\]'"):
        reliability_diagram(m)
