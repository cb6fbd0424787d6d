"""segcal.bench: one spec per dataset, one protocol (fit loop, evaluation), the report above it."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

import segcal.calibrators as sc
from segcal.bench.bootstrap import boot_stat
from segcal.bench.protocol import (
    BandRegion,
    ImageData,
    WholeImages,
    WholeVolumes,
    draw_rows,
    evaluate,
    fit_rows,
    image_bins,
    pixel_sample,
    split_halves,
)
from segcal.bench.results import BenchRun
from segcal.bench.spec import (
    BENCH_VARIANTS,
    CAMVID,
    HIPPOCAMPUS,
    MEDICAL_ROWS,
    create_row,
    property_label,
    row_properties,
    spec_of,
)
from segcal.cli import main
from segcal.errors import InputError
from segcal.metrics import CalibrationMetrics
from segcal.metrics.regions import boundary_band
from segcal.report.outputs import prepare_outputs, write_outputs
from segcal.report.tables import condition_table, markdown_report


def _images(n: int = 6, C: int = 4, hw=(16, 20), seed: int = 0, ignore: int | None = 3) -> list[ImageData]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lab = np.kron(rng.integers(0, C, (4, 5)), np.ones((hw[0] // 4, hw[1] // 5), dtype=np.int64))
        z = rng.normal(0, 1, (C, *hw)).astype(np.float32)
        z[lab, *np.indices(hw)] += 2.0
        if ignore is not None:
            lab[rng.random(hw) < 0.05] = ignore
        out.append(ImageData(f"im{i}", z.astype(np.float16), lab.astype(np.uint8)))
    return out


# ------------------------------------------------------------------------------ spec
def test_property_flags_come_from_the_calibrators_declarations():
    declared = {a["name"]: a for a in sc.available()}
    for spec in (CAMVID, HIPPOCAMPUS):
        names = list(spec.rows) + ([n for n in declared if n not in spec.rows] if spec is CAMVID else [])
        for name in names:
            p = row_properties(spec, name)
            cal = create_row(spec, name)
            want = cal.properties()
            assert property_label(p) == property_label(want), (spec.name, name)
            if name in declared and not (spec.rows.get(name) and spec.rows[name].kwargs):
                assert property_label(p) == property_label(declared[name]), name
    assert property_label({"translation_invariant": True, "argmax_preserving": True, "order_preserving": True}) == "TI/AP/OP"
    assert property_label({}) == "–"
    # a variant's flags are its own: selective scaling on LTS is not translation invariant
    assert property_label(row_properties(CAMVID, "selective_lts")) == "AP/OP"
    assert property_label(row_properties(HIPPOCAMPUS, "selective")) == "TI/AP/OP"
    assert set(BENCH_VARIANTS) <= set(CAMVID.rows) and set(MEDICAL_ROWS) == set(HIPPOCAMPUS.rows)


def test_create_row_seeds_only_seeded_rows():
    assert create_row(CAMVID, "ts", seed=4).fit_settings["seed"] == 4
    assert create_row(HIPPOCAMPUS, "ts_dice", seed=2).fit_settings["objective"] == "dice"
    default = create_row(HIPPOCAMPUS, "selective").fit_settings["seed"]
    assert create_row(HIPPOCAMPUS, "selective", seed=default + 7).fit_settings["seed"] == default


def test_report_tables_build_no_calibrator(monkeypatch):
    """The report reads the properties the run recorded; it never builds a calibrator."""
    def refuse(*a, **k):
        raise AssertionError("the report built a calibrator")

    res = _results_dict()
    monkeypatch.setattr(sc, "create", refuse)
    lines = condition_table(res, "clean")
    assert lines[2].startswith("| uncalibrated |  |") and lines[3].startswith("| ts | TI/AP/OP |")
    assert "| dc | TI |" in markdown_report(res)
    assert spec_of(res) is CAMVID and spec_of({"format": HIPPOCAMPUS.format}) is HIPPOCAMPUS
    with pytest.raises(ValueError, match="results format"):
        spec_of({"format": "nope"})


def _results_dict() -> dict:
    row = {"n_seeds": 1, "ece": 0.1, "ece_seed_std": 0.0, "miou": 0.5, "band_ece": float("nan")}
    return {
        "format": CAMVID.format, "commit": "x", "config": {"seeds": (0,), "report": False, "command": "c"},
        "environment": {"threads": 1}, "timings": {"total_s": 1.0},
        "protocol": {"val_split": "v", "fit_pixels": "f", "eval_pixels": "e", "bins": 15, "boundary_band": "b",
                     "bootstrap": "bs"},
        "properties": {"ts": row_properties(CAMVID, "ts"), "dc": row_properties(CAMVID, "dc")},
        "conditions": {"clean": {"n_images": 2, "n_eval_pixels": 10, "model": "m", "corruption": None,
                                 "summary": {"uncalibrated": row, "ts": row, "dc": row}, "bootstrap_vs_ts": {}}},
    }


# ------------------------------------------------------------------------------ outputs
def test_write_outputs_writes_every_file_and_cleans_the_json(tmp_path):
    res = _results_dict()
    res["conditions"]["clean"]["_private"] = np.arange(3)
    run = BenchRun(CAMVID, res, tmp_path / "a" / "b", report=False, timings={"predict_s": 1.0}, started=0.0)
    written = write_outputs(run)
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["results.json", "results.md"]
    js = json.loads((tmp_path / "a" / "b" / "results.json").read_text())
    assert "_private" not in js["conditions"]["clean"]
    assert js["conditions"]["clean"]["summary"]["ts"]["band_ece"] is None  # NaN -> null, valid JSON
    assert js["timings"]["predict_s"] == 1.0 and "total_s" in written["timings"]
    assert "seeds (0,)" in (tmp_path / "a" / "b" / "results.md").read_text()


def test_out_that_is_a_file_is_refused_before_the_run(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="existing file"):
        prepare_outputs(f)
    with pytest.raises(InputError, match="not a writable folder"):
        prepare_outputs(f / "sub")
    assert prepare_outputs(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    for cmd in ("bench", "demo"):  # refused before any data is looked for
        rc = main([cmd, "--out", str(f), "--data-root", str(tmp_path), "--quiet", "--no-report"])
        assert rc == 2 and "--out" in capsys.readouterr().err
    cache = tmp_path / "cache"
    rc = main(["bench", "--out", str(cache / "o"), "--cache", str(cache), "--quiet", "--no-report"])
    assert rc == 2 and "inside the --cache folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ protocol
def test_one_fit_loop_for_images_and_volumes():
    imgs = _images()
    create = partial(create_row, CAMVID)
    res = fit_rows(imgs, ["ts", "dc"], (0, 1), create=create, strategy=WholeImages(), total=500, ignore=3,
                   log=lambda m: None)
    assert sorted(res.cals) == [("dc", 0), ("dc", 1), ("ts", 0), ("ts", 1)] and not res.skipped
    # the TS of seed 0 is the TS fitted directly on the drawn rows of the fit half
    fit, sel = split_halves([im.stem for im in imgs], 0)
    by = {im.stem: im for im in imgs}
    x, y = draw_rows([by[s] for s in fit], 500, 0, 3)
    vx, vy = draw_rows([by[s] for s in sel], 500, 10_000, 3)
    direct = create("ts", seed=0)
    direct.fit(x, y, val=(vx, vy))
    assert float(direct.temperature) == pytest.approx(float(res.cals[("ts", 0)].temperature), abs=0)
    rec = next(r for r in res.fits if r["method"] == "ts" and r["seed"] == 0)
    assert rec["n_fit_pixels"] == 500 and rec["fit_images"] == 3 and "temperature" in rec
    # volumes: the same loop, each volume its own batch, case lists recorded
    vols = [ImageData(f"c{i}", np.asarray(im.logits, np.float32)[:, :, :, None].repeat(2, 3),
                      im.labels.astype(np.int64)[:, :, None].repeat(2, 2) % 3) for i, im in enumerate(imgs[:4])]
    for v in vols:
        v.logits = v.logits[:3]
    res3 = fit_rows(vols, ["ts"], (0,), create=partial(create_row, HIPPOCAMPUS), strategy=WholeVolumes(),
                    total=None, ignore=None, log=lambda m: None)
    rec3 = res3.fits[0]
    assert (rec3["fit_cases"], rec3["selection_cases"]) == split_halves([v.stem for v in vols], 0)
    assert rec3["n_fit_voxels"] == 2 * vols[0].labels.size


def test_single_calibration_image_uses_the_fit_half_for_selection():
    res = fit_rows(_images(1), ["ts"], (0,), create=partial(create_row, CAMVID), strategy=WholeImages(),
                   total=200, ignore=3, log=lambda m: None)
    assert not res.skipped and res.fits[0]["selection_images"] == 0


def test_evaluate_pixel_sample_with_band_matches_direct_metrics():
    imgs = _images(5, seed=3)
    cal = create_row(CAMVID, "ts", seed=0)
    x, y = draw_rows(imgs, 800, 0, 3)
    cal.fit(x, y)
    cal.eval()
    res = evaluate(imgs, {("ts", 0): cal}, num_classes=4, n_bins=15, view=pixel_sample(0.5, 0, 3),
                   metrics_kw={"ignore_index": 3}, regions=[BandRegion()])
    view = pixel_sample(0.5, 0, 3)
    for key, f in (("uncalibrated@0", lambda r: r), ("ts@0", cal)):
        m, band = CalibrationMetrics(4, n_bins=15, ignore_index=3), CalibrationMetrics(4, n_bins=15, ignore_index=3)
        for im in imgs:
            s = view(im)
            with torch.no_grad():
                out = f(s.scores)
            m.update(out, s.labels)
            b = torch.from_numpy(boundary_band(im.labels).reshape(-1)[s.index])
            band.update(out[b], s.labels[b])
        got, d = res["runs"][key], m.compute()
        assert got["metrics"]["ece"] == pytest.approx(d["ece"], abs=1e-12)
        assert got["metrics"]["nll"] == pytest.approx(d["nll"], abs=1e-12)
        assert got["metrics"]["band_ece"] == pytest.approx(band.compute()["ece"], abs=1e-12)
        assert got["metrics"]["flip_rate"] == 0.0
        ones = np.ones((1, len(imgs)))
        for metric in ("ece", "band_ece", "nll", "image_ece"):
            assert boot_stat(metric, [got["_stats"]])(ones)[0] == pytest.approx(got["metrics"][metric], abs=1e-12)
        assert got["_stats"]["bins"].shape == (len(imgs), 3, 15)


def test_image_bins_layout():
    m = CalibrationMetrics(3, n_bins=5)
    z = torch.tensor([[[[4.0, 0.0]], [[0.0, 4.0]], [[0.0, 0.0]]]])  # (1, 3, 1, 2)
    m.update(z, torch.tensor([[[0, 0]]]))
    b = image_bins(m)
    assert b.shape == (1, 3, 5)
    assert b[0, 0].sum() == 2 and b[0, 2].sum() == 1  # two pixels, one correct
    assert b[0, 1].sum() == pytest.approx(2 * torch.softmax(torch.tensor([4.0, 0.0, 0.0]), 0)[0].item())
