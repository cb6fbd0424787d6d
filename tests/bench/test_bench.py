"""segcal bench / demo: boundary band, paired bootstrap, protocol pieces, a real --quick run, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcal.bench import spec as bench_mod
from segcal.bench.bootstrap import paired_ci, resample_weights
from segcal.bench.cache import BenchDataError
from segcal.bench.camvid import BenchConfig, read_split, run_bench
from segcal.bench.protocol import split_halves
from segcal.cli import main
from segcal.data import data_root
from segcal.metrics.regions import boundary_band
from segcal.metrics.scores import ece_from_bins

ROOT = data_root(required=False)
HAVE_REAL = (
    ROOT is not None
    and (ROOT / "camvid" / "test").is_dir()
    and (ROOT / "espnet" / "espnet_p_2_q_8_camvid.pth").is_file()
    and (ROOT / "espnet" / "espnet_p_2_q_8.pth").is_file()
)


# ------------------------------------------------------------------------------ boundary band
def _band_direct(lab: np.ndarray) -> np.ndarray:
    """Pixel-by-pixel LTS definition: label differs from any label at +-1/+-2 along x or y."""
    H, W = lab.shape
    out = np.zeros((H, W), dtype=bool)
    for i in range(H):
        for j in range(W):
            for d in (-2, -1, 1, 2):
                for di, dj in ((d, 0), (0, d)):
                    ii, jj = i + di, j + dj
                    if 0 <= ii < H and 0 <= jj < W and lab[ii, jj] != lab[i, j]:
                        out[i, j] = True
    out[:3, :] = out[-3:, :] = False
    out[:, :3] = out[:, -3:] = False
    return out


def test_boundary_band_matches_direct_definition():
    rng = np.random.default_rng(0)
    # blocky random labels (regions) plus scattered noise pixels
    lab = np.kron(rng.integers(0, 4, (5, 7)), np.ones((6, 5), dtype=np.int64))
    lab[rng.random(lab.shape) < 0.03] = 11
    np.testing.assert_array_equal(boundary_band(lab), _band_direct(lab))
    # a vertical edge: columns 3..6 hold the band (x-2 .. x+1 around the edge at x=5), rows 3..H-4
    lab2 = np.zeros((12, 10), dtype=np.int64)
    lab2[:, 5:] = 1
    band = boundary_band(lab2)
    assert band[3:-3].any(1).all() and not band[:3].any() and not band[-3:].any()
    np.testing.assert_array_equal(np.flatnonzero(band[6]), [3, 4, 5, 6])
    assert not boundary_band(np.full((9, 9), 2)).any()
    with pytest.raises(ValueError, match="label map"):
        boundary_band(np.zeros((2, 3, 4)))


# ------------------------------------------------------------------------------ bootstrap
def test_paired_bootstrap_known_difference():
    rng = np.random.default_rng(1)
    n = 200
    base = rng.normal(0.10, 0.03, n)
    delta = 0.02 + rng.normal(0, 0.005, n)  # method = reference + 0.02 per image (paired)
    w = resample_weights(n, 2000, seed=0)
    assert w.shape == (2000, n) and np.all(w.sum(1) == n)

    def mean_of(v):
        return lambda ww: (ww @ v) / ww.sum(1)

    ci = paired_ci(mean_of(base + delta), mean_of(base), w)
    assert ci["lo"] < 0.02 < ci["hi"] and ci["significant"]
    assert abs(ci["diff"] - delta.mean()) < 1e-12
    # pairing: the CI width reflects the difference's spread (0.005), not the metric's (0.03)
    assert ci["hi"] - ci["lo"] < 0.004
    # no difference -> CI contains 0, not significant
    ci0 = paired_ci(mean_of(base + rng.normal(0, 0.005, n)), mean_of(base), w)
    assert ci0["lo"] < 0 < ci0["hi"] and not ci0["significant"]
    # seeded: identical replicates
    np.testing.assert_array_equal(resample_weights(n, 10, 3), resample_weights(n, 10, 3))


def test_bootstrap_pooled_ece_from_bins_equals_direct():
    # pooled ECE recomputed from per-image bins equals the ECE of all pixels pooled
    rng = np.random.default_rng(2)
    M, n = 15, 6
    bins = np.zeros((n, M, 3))
    confs, accs = [], []
    for i in range(n):
        c = rng.uniform(0.3, 1.0, 500)
        a = (rng.random(500) < c - 0.05).astype(float)
        b = np.minimum((np.ceil(c * M) - 1).astype(int), M - 1)
        np.add.at(bins[i], (b, 0), 1)
        np.add.at(bins[i], (b, 1), c)
        np.add.at(bins[i], (b, 2), a)
        confs.append(c)
        accs.append(a)
    c, a = np.concatenate(confs), np.concatenate(accs)
    b = np.minimum((np.ceil(c * M) - 1).astype(int), M - 1)
    direct = sum(abs(a[b == k].sum() - c[b == k].sum()) for k in range(M)) / c.size
    s = bins.sum(0)
    assert abs(ece_from_bins(s[:, 0], s[:, 1], s[:, 2]) - direct) < 1e-12


def test_split_halves_seeded_disjoint():
    stems = [f"im{i:03d}" for i in range(101)]
    f0, s0 = split_halves(stems, 0)
    assert len(f0) == 51 and len(s0) == 50 and not set(f0) & set(s0) and set(f0) | set(s0) == set(stems)
    assert split_halves(stems, 0) == (f0, s0)
    assert split_halves(stems, 1)[0] != f0


# ------------------------------------------------------------------------------ errors
def test_missing_data_root_error(tmp_path):
    with pytest.raises(BenchDataError, match=r"--data-root: .* is not a folder.*camvid/"):
        run_bench(BenchConfig(data_root=str(tmp_path / "nope"), out=str(tmp_path / "o"), report=False))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchDataError, match=r"CamVid not found under .*espnet_p_2_q_8_camvid\.pth"):
        run_bench(BenchConfig(data_root=str(empty), out=str(tmp_path / "o"), report=False))
    (empty / "camvid" / "test").mkdir(parents=True)
    (empty / "camvid" / "testannot").mkdir()
    with pytest.raises(BenchDataError, match="has no val/"):
        run_bench(BenchConfig(data_root=str(empty), out=str(tmp_path / "o"), report=False))
    # through the CLI: one line, exit 2 (refused input, issue 16), no traceback
    assert main(["bench", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2


def test_demo_missing_data_message(tmp_path, capsys):
    rc = main(["demo", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "the demo needs CamVid and the ESPNet weights" in err
    assert "camvid/ with val/, valannot/, test/, testannot/" in err and "espnet/" in err and "SEGCAL_DATA" in err


def _fake_split(tmp_path: Path, *, label_hw=(8, 8), classes=12, bad_image=False):
    from segcal.datasets import SegItem

    img_dir, lab_dir, pred_dir = tmp_path / "img", tmp_path / "lab", tmp_path / "pred"
    for d in (img_dir, lab_dir, pred_dir):
        d.mkdir(parents=True, exist_ok=True)
    ip = img_dir / "a.png"
    if bad_image:
        ip.write_bytes(b"not a png")
    else:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ip)
    Image.fromarray(np.zeros(label_hw, np.uint8)).save(lab_dir / "a.png")
    np.save(pred_dir / "a.npy", np.zeros((classes, 8, 8), np.float16))
    return pred_dir, [SegItem("a", ip, lab_dir / "a.png")]


def test_reader_errors_are_clear(tmp_path):
    pred, items = _fake_split(tmp_path / "ok")
    assert read_split(pred, items, 12, 11)[0].labels.shape == (8, 8)
    pred, items = _fake_split(tmp_path / "size", label_hw=(6, 8))
    with pytest.raises(ValueError, match=r"is 6 x 8 \(H x W\) but its image is 8 x 8"):
        read_split(pred, items, 12, 11)
    pred, items = _fake_split(tmp_path / "cls", classes=5)
    with pytest.raises(ValueError, match="5 classes, but the model has 12"):
        read_split(pred, items, 12, 11)
    pred, items = _fake_split(tmp_path / "img", bad_image=True)
    with pytest.raises(ValueError, match="cannot read"):
        read_split(pred, items, 12, 11)
    pred, items = _fake_split(tmp_path / "lab")
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(items[0].label_path)
    with pytest.raises(ValueError, match=r"values \[40\] are outside the model's 12 classes"):
        read_split(pred, items, 12, 11)


def test_report_needs_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"segcal\[plot\].*--no-report"):
        run_bench(BenchConfig(data_root=str(tmp_path), out=str(tmp_path / "o"), report=True))


# ------------------------------------------------------------------------------ real data
@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL, reason="CamVid / ESPNet weights not found (set SEGCAL_DATA)")
def test_bench_quick_real(tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = main(["bench", "--quick", "--out", str(out), "--cache", str(cache), "--test-limit", "4",
               "--val-limit", "6", "--corruption-images", "2", "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    for key in ("commit", "config", "protocol", "fits", "conditions", "cache", "timings", "ts_check", "skipped"):
        assert key in res
    assert set(res["conditions"]) == {"clean", "model-shift", "gaussian_noise-3"}
    assert res["cache"]["predicted_images"] == 2 * (4 + 6) + 2
    for tag, cond in res["conditions"].items():
        summ = cond["summary"]
        assert set(summ) == {"uncalibrated", "ts", "dc", "cmsap", "cmsop"}, tag
        for m in ("ts", "cmsap", "cmsop"):  # argmax-preserving: no flip, the same mIoU exactly
            assert summ[m]["flip_rate"] == 0.0, (tag, m)
            assert summ[m]["miou"] == summ["uncalibrated"]["miou"], (tag, m)
        for col in ("ece", "image_ece", "classwise_ece", "mce", "nll", "brier", "miou", "band_ece"):
            assert summ["ts"][col] is not None and summ["ts"][col + "_seed_std"] is not None
        ci = cond["bootstrap_vs_ts"]["dc"]["ece"]
        assert ci["lo"] <= ci["diff"] <= ci["hi"]
    assert len(res["fits"]["espnet-camvid"]) == 4 * 2
    assert all("temperature" in f for f in res["fits"]["espnet-camvid"] if f["method"] == "ts")
    md = (out / "results.md").read_text()
    assert "| ts | TI/AP/OP |" in md and "Paired bootstrap" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<script" not in html and "http" not in html.split("<body>")[1]

    # rerun with the same cache: no model is built, no logits are recomputed
    def no_model(*a, **k):
        raise AssertionError("the model was called although the predictions are cached")

    monkeypatch.setattr("segcal.models.create_model", no_model)
    out2 = tmp_path / "out2"
    rc = main(["bench", "--quick", "--out", str(out2), "--cache", str(cache), "--test-limit", "4",
               "--val-limit", "6", "--corruption-images", "2", "--quiet", "--no-report",
               "--methods", "ts", "--seeds", "0"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["cache"]["predicted_images"] == 0 and res2["cache"]["reused_images"] == 22
    manifest = json.loads((cache / "manifest.json").read_text())
    assert "espnet-camvid/test/gaussian_noise-s3-seed0" in manifest
    # uncalibrated numbers are identical between the runs (same cached logits, same pixels)
    a = res["conditions"]["clean"]["summary"]["uncalibrated"]
    b = res2["conditions"]["clean"]["summary"]["uncalibrated"]
    assert a["ece"] == b["ece"] and a["miou"] == b["miou"]
    assert bench_mod.README_T["espnet-camvid"] == 1.3279


def test_spatial_variants_fit_with_images_and_record_their_budget():
    """lts_image gets the RGB image of every logit map (the corrupted one under a corruption);
    selective_lts is selective scaling on an LTS base; the step / selection budgets are recorded."""
    from functools import partial

    import torch

    from segcal.bench.protocol import ImageData, WholeImages, calibrate_rows, fit_rows
    from segcal.bench.spec import BENCH_VARIANTS, CAMVID, create_row

    class Item:
        def __init__(self, seed):
            self.seed = seed

        def load_image(self):
            return np.random.default_rng(self.seed).integers(0, 255, (16, 20, 3), dtype=np.uint8)

    rng = np.random.default_rng(0)
    val = []
    for i in range(6):
        z = rng.normal(size=(4, 16, 20)).astype(np.float16) * 3
        lab = rng.integers(0, 4, (16, 20)).astype(np.uint8)
        val.append(ImageData(f"im{i}", z, lab, Item(i)))
    assert set(BENCH_VARIANTS) >= {"lts_image", "selective_lts"}
    assert create_row(CAMVID, "lts_image").uses_image and create_row(CAMVID, "selective_lts").base.name == "lts"
    res = fit_rows(val, ["lts_image", "selective_lts"], (0,), create=partial(create_row, CAMVID),
                   strategy=WholeImages(), total=600, ignore=3, log=lambda m: None,
                   spatial_max_steps=3, spatial_selection_images=2)
    assert not res.skipped, res.skipped
    recs = {r["method"]: r for r in res.fits}
    assert recs["lts_image"]["uses_image"] and recs["lts_image"]["max_steps"] == 3
    assert recs["lts_image"]["steps"] == 3 and recs["lts_image"]["selection_images"] == 2
    assert recs["selective_lts"]["max_steps"] == 3 and "t_mispred" in recs["selective_lts"]
    cal = res.cals[("lts_image", 0)]
    im = val[0]
    pick = np.arange(10)
    rows = torch.from_numpy(np.asarray(im.logits, np.float32).reshape(4, -1)[:, pick].T.copy())
    a = calibrate_rows(cal, rows, im, pick)
    im.transform = lambda rgb, stem: 255 - rgb  # another (corrupted) input image
    b = calibrate_rows(cal, rows, im, pick)
    assert a.shape == (10, 4) and not torch.equal(a, b)
    import argparse

    from segcal.cli.bench_cmd import config_from_args
    from segcal.cli.parsers.bench import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    args = p.parse_args(["bench", "--spatial", "--spatial-max-steps", "7", "--spatial-selection-images", "5"])
    cfg = config_from_args(args)
    assert cfg.spatial and cfg.spatial_max_steps == 7 and cfg.spatial_selection_images == 5


def test_wall_time_line_before_and_after_the_report():
    from segcal.report.tables import wall_time_line

    res = {"environment": {"threads": 2},
           "timings": {"predict_s": 10.2, "fit_s": 5.0, "evaluate_s": 3.0, "total_s": 19.0}}
    line = wall_time_line(res)
    assert "19 s before the report" in line and "report 0 s" not in line and "threads 2" in line
    res["timings"].update(report_s=4.4, total_s=23.4)
    line = wall_time_line(res)
    assert "- wall time: 23 s (predict 10 s, fit 5 s, evaluate 3 s, report 4 s)" in line
