"""``segcal eval --plot FILE.png|.svg`` and ``--html FILE``: the figure and the one-folder report.

Checked against the JSON the same run writes and against an independent float64 NumPy binning;
refused outputs exit with code 2 naming the flag, before any file is written.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from metric_reference import softmax
from segcal.cli import main
from segcal.io import write_prediction

pytest.importorskip("matplotlib")

C, N_BINS = 4, 10


def make_folder(tmp_path, n=5, shape=(18, 14), seed=0):
    rng = np.random.default_rng(seed)
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    zs, ys = [], []
    for i in range(n):
        z = (rng.normal(size=(C, *shape)) * (1 + i)).astype(np.float32)
        y = np.where(rng.random(shape) < 0.65, z.argmax(0), rng.integers(0, C, shape)).astype(np.uint8)
        y[:2] = 255
        write_prediction(pred / f"im{i}.npy", z, dtype=np.float32)
        Image.fromarray(y).save(lab / f"im{i}.png")
        zs.append(z.astype(np.float64))
        ys.append(y)
    return pred, lab, zs, ys


def run_eval(pred, lab, *extra):
    return main(["eval", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "--bins", str(N_BINS),
                 "--no-progress", *extra])


def image_ece(z, y):
    """Top-label ECE of one image, (lo, hi] bins, float64 NumPy."""
    q = softmax(z[None])[0]
    ok = y != 255
    conf, acc = q.max(0)[ok], (q.argmax(0) == y)[ok]
    edges = np.linspace(0, 1, N_BINS + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, N_BINS - 1)
    return sum(abs(acc[b == k].mean() - conf[b == k].mean()) * (b == k).sum() for k in range(N_BINS)
               if (b == k).any()) / ok.sum()


def test_plot_png_svg_and_html_report(tmp_path, capsys):
    pred, lab, zs, ys = make_folder(tmp_path)
    out = tmp_path / "out"
    rc = run_eval(pred, lab, "--json", str(out / "m.json"), "--plot", str(out / "rel.svg"),
                  "--html", str(out / "report.html"), "--class-names", "a,b,c,d")
    assert rc == 0
    data = json.loads((out / "m.json").read_text())
    assert data["stems"] == [f"im{i}" for i in range(5)]
    assert np.asarray(data["classwise_reliability"]["count"]).shape == (C, N_BINS)
    # the SVG carries the bars' ids: one accuracy bar per non-empty bin of the JSON
    svg = (out / "rel.svg").read_text()
    assert "<svg" in svg
    nonempty = sum(1 for c in data["reliability"]["count"] if c > 0)
    assert svg.count('id="accuracy') == nonempty
    doc = (out / "report.html").read_text()
    # self-contained: no script, no URL that would fetch anything
    assert "<script" not in doc.lower()
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", doc)
    assert "http://" not in doc and "https://" not in doc
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", doc)
    # pooled diagram, per-class diagrams, per-image ECE histogram (+ risk-coverage curves, when measured)
    assert len(imgs) == 3 + ("risk_coverage" in data)
    for b64 in imgs:
        png = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert png.format == "PNG" and min(png.size) > 250
    assert f"<td>ECE (pooled, top-label)</td><td>{data['ece']:.5f}</td>" in doc
    for k, name in enumerate("abcd"):
        assert f"<td>{k}</td><td>{name}</td>" in doc
    # the worst image is the one with the largest independent per-image ECE
    ref = [image_ece(z, y) for z, y in zip(zs, ys, strict=True)]
    worst = int(np.argmax(ref))
    assert f"<tr><td>im{worst}</td><td>{ref[worst]:.4f}</td>" in doc
    np.testing.assert_allclose(data["image_ece_values"], ref, atol=1e-6)
    assert "ECE (pooled, top-label)" in capsys.readouterr().out


@pytest.mark.parametrize("flag,name,match", [
    ("--plot", "rel.jpg", "expected .png or .svg"),
    ("--plot", "rel", "expected .png or .svg"),
    ("--html", "report.pdf", "expected .html or .htm"),
])
def test_wrong_extension_exits_2_before_writing(tmp_path, capsys, flag, name, match):
    pred, lab, _, _ = make_folder(tmp_path)
    rc = run_eval(pred, lab, "--json", str(tmp_path / "m.json"), flag, str(tmp_path / name))
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and match in err
    assert not (tmp_path / name).exists() and not (tmp_path / "m.json").exists()


def test_unwritable_outputs_exit_2_naming_the_flag(tmp_path, capsys):
    pred, lab, _, _ = make_folder(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    cases = [("--html", str(tmp_path / "afile" / "r.html"), "is a file"),
             ("--plot", "/sys/segcal-test/rel.png", "not writable"),
             ("--plot", str(tmp_path / "adir.png"), "existing folder"),
             ("--html", str(pred / "r.html"), "inside the --pred folder")]
    for flag, path, match in cases:
        assert run_eval(pred, lab, "--json", str(tmp_path / "m.json"), flag, path) == 2
        err = capsys.readouterr().err
        assert flag in err and match in err, err
    assert not (tmp_path / "m.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "afile", "labels", "pred"]
    assert list((tmp_path / "adir.png").iterdir()) == []


def test_plot_png(tmp_path):
    pred, lab, _, _ = make_folder(tmp_path, n=2)
    assert run_eval(pred, lab, "--plot", str(tmp_path / "rel.PNG")) == 0
    png = Image.open(tmp_path / "rel.PNG")
    assert png.format == "PNG" and min(png.size) > 300
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_html_takes_class_names_from_the_manifest(tmp_path):
    """Without --class-names, the report labels classes with the names `segcal predict` recorded in
    segcal.json; --class-names wins over them."""
    pred, lab, _, _ = make_folder(tmp_path, n=2)
    (pred / "segcal.json").write_text(json.dumps({"format": "segcal-predictions", "version": 1, "complete": True,
                                                  "class_names": ["road", "sky", "car", "tree"]}))
    assert run_eval(pred, lab, "--html", str(tmp_path / "a.html")) == 0
    page = (tmp_path / "a.html").read_text()
    assert ">road<" in page and ">tree<" in page and "class 0" not in page
    assert run_eval(pred, lab, "--html", str(tmp_path / "b.html"), "--class-names", "a,b,c,d") == 0
    page = (tmp_path / "b.html").read_text()
    assert ">road<" not in page and ">d<" in page


def test_fine_bins_shrinks_the_tie_bounds(tmp_path, capsys):
    """--fine-bins sets the fine histogram's resolution: more bins, tie bounds no larger, the
    fixed-bin metrics unchanged; out-of-range values exit 2 naming the flag, nothing written."""
    pred, lab, _, _ = make_folder(tmp_path, n=3)
    out = {}
    for fb in (1024, 1 << 16):
        assert run_eval(pred, lab, "--fine-bins", str(fb), "--json", str(tmp_path / f"{fb}.json")) == 0
        out[fb] = json.loads((tmp_path / f"{fb}.json").read_text())
    lo, hi = out[1024], out[1 << 16]
    assert hi["ece"] == lo["ece"] and hi["nll"] == lo["nll"]
    assert hi["aurc_tie_bound"] <= lo["aurc_tie_bound"] and hi["failure_auroc_tie_bound"] < lo["failure_auroc_tie_bound"]
    for bad in ("5", str((1 << 24) + 1)):
        assert run_eval(pred, lab, "--fine-bins", bad, "--json", str(tmp_path / "bad.json")) == 2
        assert "--fine-bins" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
