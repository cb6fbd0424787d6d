"""CLI round trips of ``segcal estimate`` and ``segcal pseudolabel`` on synthetic folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segcal.cli import main
from segcal.io import read_label, write_prediction


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(0)
    pred, lab, feat = tmp_path / "pred", tmp_path / "lab", tmp_path / "feat"
    lab.mkdir()
    feat.mkdir()
    for i in range(8):
        y = rng.integers(0, 3, (12, 16))
        logits = rng.normal(size=(3, 12, 16)) + (1 + i / 4) * np.eye(3)[y].transpose(2, 0, 1) * 3
        write_prediction(pred / f"im{i}.npy", logits)
        np.save(lab / f"im{i}.npy", y)
        np.save(feat / f"im{i}.npy", rng.normal(size=(5, 3, 4)).astype(np.float16))
    return pred, lab, feat


def test_train_then_estimate_logits_and_features(folders, tmp_path, capsys):
    pred, lab, feat = folders
    est = tmp_path / "est.pt"
    assert main(["estimate", "--train", "--pred", str(pred), "--labels", str(lab), "--out", str(est),
                 "--epochs", "5"]) == 0
    out = tmp_path / "e.json"
    assert main(["estimate", "--pred", str(pred), "--estimator", str(est), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 8 and len(res["per_image"]) == 8 and 0 < res["mean"] < 1
    assert "overall" in capsys.readouterr().out
    # features estimator needs --features
    fest = tmp_path / "fest.pt"
    assert main(["estimate", "--train", "--pred", str(pred), "--labels", str(lab), "--features", str(feat),
                 "--out", str(fest), "--epochs", "3", "--target", "class_level"]) == 0
    assert main(["estimate", "--pred", str(pred), "--estimator", str(fest)]) == 2
    assert "--features" in capsys.readouterr().err
    assert main(["estimate", "--pred", str(pred), "--estimator", str(fest), "--features", str(feat)]) == 0
    # missing feature file
    (feat / "im3.npy").unlink()
    assert main(["estimate", "--pred", str(pred), "--estimator", str(fest), "--features", str(feat)]) == 2
    assert "no feature map" in capsys.readouterr().err


def test_estimate_errors_and_baseline(folders, tmp_path, capsys):
    pred, lab, _ = folders
    assert main(["estimate", "--pred", str(pred), "--baseline", "entropy"]) == 0
    assert main(["estimate", "--pred", str(pred)]) == 2
    assert "--estimator" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["estimate", "--pred", str(empty), "--baseline", "maxprob"]) == 2
    assert "no .npy/.npz" in capsys.readouterr().err
    # class count mismatch between estimator and predictions
    est = tmp_path / "est.pt"
    assert main(["estimate", "--train", "--pred", str(pred), "--labels", str(lab), "--out", str(est),
                 "--epochs", "2"]) == 0
    other = tmp_path / "pred4"
    write_prediction(other / "a.npy", np.zeros((4, 12, 16)))
    assert main(["estimate", "--pred", str(other), "--estimator", str(est)]) == 2
    assert "4 classes" in capsys.readouterr().err


def test_pseudolabel_round_trip(folders, tmp_path, capsys):
    pred, lab, _ = folders
    out = tmp_path / "pl"
    rep = tmp_path / "pl.json"
    assert main(["pseudolabel", "--pred", str(pred), "--out", str(out), "--estimator", "maxprob", "--round", "1",
                 "--labels", str(lab), "--json", str(rep), "--ignore-value", "200"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"im{i}.png" for i in range(8)]
    r = json.loads(rep.read_text())
    assert r["prop"] == pytest.approx(0.2) and r["local_prop"] == pytest.approx(0.15) and r["ece_weighted"]
    m = read_label(out / "im0.png")
    assert m.shape == (12, 16) and set(np.unique(m)) <= {0, 1, 2, 200}
    cov = np.mean([(read_label(out / f) != 200).mean() for f in files])
    assert cov == pytest.approx(r["coverage"]) and 0.15 <= r["coverage"] <= 1
    assert 0 <= r["maxprob_precision"] <= 1 and "precision" in capsys.readouterr().out
    assert main(["pseudolabel", "--pred", str(pred), "--out", str(tmp_path / "pl2"), "--format", "npy"]) == 0
    assert np.load(tmp_path / "pl2" / "im0.npy").dtype == np.uint8


def test_pseudolabel_features_estimator_reads_probabilities_as_probabilities(folders, tmp_path):
    """A feature-trained estimator over a folder of probabilities: the maps are those of the same
    scores given as logits (a probabilities folder used to be re-read as logits, silently)."""
    pred, lab, feat = folders
    fest = tmp_path / "fest.pt"
    assert main(["estimate", "--train", "--pred", str(pred), "--labels", str(lab), "--features", str(feat),
                 "--out", str(fest), "--epochs", "2", "--target", "class_level"]) == 0
    probs = tmp_path / "probs"
    for f in sorted(pred.iterdir()):
        z = np.load(f).astype(np.float64)
        p = np.exp(z - z.max(axis=0, keepdims=True))
        write_prediction(probs / f"{f.stem}.npz", p / p.sum(axis=0, keepdims=True), key="probabilities",
                         dtype=np.float32)
    outs = {}
    for name, folder in (("logits", pred), ("probs", probs)):
        rep = tmp_path / f"{name}.json"
        assert main(["pseudolabel", "--pred", str(folder), "--out", str(tmp_path / f"pl_{name}"), "--estimator",
                     str(fest), "--features", str(feat), "--json", str(rep), "-q"]) == 0
        outs[name] = json.loads(rep.read_text())
    assert outs["probs"]["thresholds"] == pytest.approx(outs["logits"]["thresholds"], abs=1e-3)
    for i in range(8):
        a = read_label(tmp_path / "pl_logits" / f"im{i}.png")
        b = read_label(tmp_path / "pl_probs" / f"im{i}.png")
        assert (a != b).mean() < 0.02
