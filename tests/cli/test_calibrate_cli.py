"""End-to-end tests of ``segcal fit``, ``segcal apply`` and ``segcal calibrators``."""

from __future__ import annotations

import json

import numpy as np
import torch

import segcal
import segcal.io.predictions as iop
from segcal.cli import main
from segcal.cli.fit_cmd import split_stems

torch.set_num_threads(1)


def make_folder(root, n=6, c=3, h=12, w=10, scale=3.0, seed=0):
    g = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir()
    lab.mkdir()
    for i in range(n):
        z = 1.5 * g.standard_normal((c, h, w))
        y = (z + g.gumbel(size=z.shape)).argmax(0).astype(np.uint8)
        y[0, 0] = 255
        np.save(pred / f"im{i}.npy", (scale * z).astype(np.float16))
        np.save(lab / f"im{i}.npy", y)
    return pred, lab


def test_fit_then_apply_end_to_end(tmp_path, capsys):
    pred, lab = make_folder(tmp_path)
    cal_path = tmp_path / "cal.pt"
    rc = main(["fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts", "--out", str(cal_path),
               "--ignore-index", "255", "--seed", "1", "--no-progress", "--json", str(tmp_path / "s.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "validating on 1" in out and "NLL" in out and "before" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["metrics"]["nll"]["after"] < summary["metrics"]["nll"]["before"]
    cal = segcal.load(cal_path)
    assert 2.0 < cal.temperature < 4.5
    assert cal.fit_info["split"]["seed"] == 1 and len(cal.fit_info["split"]["val"]) == 1

    out_dir = tmp_path / "cal_pred"
    assert main(["apply", "--calibrator", str(cal_path), "--pred", str(pred), "--out", str(out_dir),
                 "--output", "probs", "--no-progress"]) == 0
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == [*(f"im{i}.npy" for i in range(6)), "segcal.json"]
    meta = json.loads((out_dir / "segcal.json").read_text())
    assert meta["input_type"] == "probs" and meta["calibrator"] == "ts" and meta["num_classes"] == 3
    p = np.load(out_dir / "im0.npy").astype(np.float32)
    assert p.shape == (3, 12, 10)
    np.testing.assert_allclose(p.sum(0), 1, atol=3e-3)
    ref = cal.predict_proba(np.load(pred / "im0.npy").astype(np.float32)[None])[0]
    np.testing.assert_allclose(p, ref, atol=2e-3)
    # the written folder is a prediction folder again: segcal eval/fit read it
    assert main(["apply", "--calibrator", str(cal_path), "--pred", str(pred), "--out", str(tmp_path / "lg"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "lg" / "segcal.json").read_text())["input_type"] == "logits"


def test_fit_split_is_seeded_and_reproducible(tmp_path):
    stems = [f"s{i}" for i in range(10)]
    a = split_stems(stems, 0.3, 0)
    assert a == split_stems(stems, 0.3, 0) and len(a[1]) == 3
    assert set(a[0]) | set(a[1]) == set(stems) and not set(a[0]) & set(a[1])
    assert split_stems(stems, 0.3, 1) != a


def test_apply_failure_midway_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    pred, lab = make_folder(tmp_path)
    cal_path = tmp_path / "cal.pt"
    assert main(["fit", "--pred", str(pred), "--labels", str(lab), "--method", "dc", "--out", str(cal_path),
                 "--ignore-index", "255", "--no-progress"]) == 0
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(fh, arr, allow_pickle=False):
        calls["n"] += 1
        if calls["n"] == 3:  # third file: write half of it, then fail
            fh.write(b"\x93NUMPY partial")
            raise OSError("disk full (simulated)")
        return real_save(fh, arr, allow_pickle=allow_pickle)

    monkeypatch.setattr(iop.np, "save", flaky_save)
    out_dir = tmp_path / "out"
    # a full disk is refused input (exit code 2, one line naming the cause), not a traceback
    assert main(["apply", "--calibrator", str(cal_path), "--pred", str(pred), "--out", str(out_dir),
                 "--no-progress"]) == 2
    assert "disk full" in capsys.readouterr().err
    names = sorted(p.name for p in out_dir.iterdir())
    # complete files only: no temp, no partial im2; the manifest (written first) says "incomplete"
    assert names == ["im0.npy", "im1.npy", "segcal.json"], names
    assert json.loads((out_dir / "segcal.json").read_text())["complete"] is False
    for n in names[:2]:
        assert np.load(out_dir / n).shape == (3, 12, 10)


def test_apply_rejects_wrong_class_count_and_same_folder(tmp_path, capsys):
    pred, lab = make_folder(tmp_path)
    cal_path = tmp_path / "cal.pt"
    main(["fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts", "--out", str(cal_path),
          "--ignore-index", "255", "--no-progress"])
    np.save(pred / "zz.npy", np.zeros((4, 12, 10), np.float16))
    assert main(["apply", "--calibrator", str(cal_path), "--pred", str(pred), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "expected 3 classes" in capsys.readouterr().err
    assert main(["apply", "--calibrator", str(cal_path), "--pred", str(pred), "--out", str(pred)]) == 2


def test_fit_unknown_method_is_a_clear_error(tmp_path, capsys):
    pred, lab = make_folder(tmp_path, n=2)
    assert main(["fit", "--pred", str(pred), "--labels", str(lab), "--method", "nope",
                 "--out", str(tmp_path / "c.pt"), "--no-progress"]) == 2
    assert "unknown calibrator 'nope'" in capsys.readouterr().err


def test_calibrators_command_lists_every_calibrator(capsys):
    assert main(["calibrators"]) == 0
    out = capsys.readouterr().out
    for name in ("ts", "vs", "ms", "msc", "dc", "ets", "cdc", "cmsap", "cmsop", "vs_ti", "ms_ti"):
        assert f"\n{name} " in "\n" + out
    assert "TI" in out and "AP" in out and "OP" in out


def test_fit_chunk_size_bounds_the_chunks_and_keeps_the_fit(tmp_path, capsys):
    """--chunk-size reaches the calibrator (the saved config holds it) and gives the same
    temperature up to summation order; a non-positive value exits 2 naming the flag."""
    pred, lab = make_folder(tmp_path, n=6, h=40, w=30)
    temps = {}
    for chunk in (None, 97):
        out = tmp_path / f"ts_{chunk}.pt"
        extra = [] if chunk is None else ["--chunk-size", str(chunk)]
        assert main(["fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts", "--ignore-index", "255",
                     "--optimizer", "lbfgs", "--out", str(out), "-q", *extra]) == 0
        cal = segcal.load(out)
        temps[chunk] = float(cal.temperature)
        assert cal.get_config()["chunk_size"] == (2**20 if chunk is None else 97)
    assert abs(temps[None] - temps[97]) < 1e-6 * temps[None]
    capsys.readouterr()
    assert main(["fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts", "--chunk-size", "0",
                 "--out", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert "--chunk-size" in err and "got 0" in err and not (tmp_path / "bad.pt").exists()
