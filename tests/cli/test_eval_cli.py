"""``segcal eval`` end to end on small synthetic prediction folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from metric_reference import reference_metrics, softmax
from segcal.cli import main
from segcal.io import write_prediction


def make_folder(tmp_path, n=4, c=5, shape=(16, 12), seed=0, label_fmt="png", kind="npy"):
    rng = np.random.default_rng(seed)
    pred = tmp_path / "pred"
    lab = tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    all_logits, all_labels = [], []
    for i in range(n):
        z = (rng.normal(size=(c, *shape)) * 3).astype(np.float16)
        y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, c, shape)).astype(np.uint8)
        y[rng.random(shape) < 0.05] = 255
        stem = f"img_{i:03d}"
        if kind == "npy":
            write_prediction(pred / f"{stem}.npy", z)
        else:
            write_prediction(pred / f"{stem}.npz", softmax(z.astype(np.float64)[None])[0], key="probabilities",
                             dtype=np.float64)
        if label_fmt == "png":
            Image.fromarray(y).save(lab / f"{stem}.png")
        else:
            np.save(lab / f"{stem}.npy", y)
        all_logits.append(z.astype(np.float64))
        all_labels.append(y)
    return pred, lab, np.stack(all_logits), np.stack(all_labels)


@pytest.mark.parametrize("label_fmt,kind", [("png", "npy"), ("npy", "npz")])
def test_eval_json_matches_reference(tmp_path, capsys, label_fmt, kind):
    pred, lab, logits, labels = make_folder(tmp_path, label_fmt=label_fmt, kind=kind)
    out = tmp_path / "m.json"
    rc = main(["eval", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "--bins", "10",
               "--json", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ECE (pooled, top-label)" in printed
    data = json.loads(out.read_text())
    for key in ("ece", "image_ece", "mce", "ace_adaptive", "classwise_ece", "nll", "brier", "accuracy", "miou", "mdice"):
        assert key in data
    ref = reference_metrics(softmax(logits), labels, n_bins=10, ignore_index=255)
    tol = 1e-6 if kind == "npy" else 1e-9  # float16 logits are computed in float32
    for key in ("ece", "image_ece", "nll", "brier", "miou", "classwise_ece"):
        assert data[key] == pytest.approx(ref[key], abs=tol), key
    assert data["config"]["input_type"] == ("logits" if kind == "npy" else "probs")


def test_eval_mismatched_stems_are_listed(tmp_path, capsys):
    pred, lab, _, _ = make_folder(tmp_path)
    (lab / "img_001.png").rename(lab / "other.png")
    rc = main(["eval", "--pred", str(pred), "--labels", str(lab), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "img_001" in err and "other" in err and "stems do not match" in err


def test_eval_bad_labels_name_the_file(tmp_path, capsys):
    pred, lab, _, _ = make_folder(tmp_path)
    Image.fromarray(np.full((16, 12), 9, np.uint8)).save(lab / "img_002.png")
    rc = main(["eval", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "img_002" in err and "outside [0, 5)" in err


def test_eval_shape_mismatch(tmp_path, capsys):
    pred, lab, _, _ = make_folder(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(lab / "img_000.png")
    assert main(["eval", "--pred", str(pred), "--labels", str(lab), "--no-progress"]) == 2
    assert "spatial shape" in capsys.readouterr().err


def test_eval_empty_folder(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    assert main(["eval", "--pred", str(tmp_path / "p"), "--labels", str(tmp_path / "l")]) == 2
    assert "no .npy/.npz predictions" in capsys.readouterr().err


def test_eval_nifti_volumes(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    vols, labs = [], []
    for i in range(2):
        z = rng.normal(size=(3, 6, 7, 5)) * 2
        y = rng.integers(0, 3, size=(6, 7, 5)).astype(np.uint8)
        np.save(tmp_path / "p" / f"case_{i}.npy", z)
        nib.save(nib.Nifti1Image(y, np.eye(4)), str(tmp_path / "l" / f"case_{i}.nii.gz"))
        vols.append(z)
        labs.append(y)
    out = tmp_path / "m.json"
    assert main(["eval", "--pred", str(tmp_path / "p"), "--labels", str(tmp_path / "l"), "--json", str(out),
                 "--no-progress"]) == 0
    ref = reference_metrics(softmax(np.stack(vols)), np.stack(labs))
    assert json.loads(out.read_text())["ece"] == pytest.approx(ref["ece"], abs=1e-12)


def test_per_class_iou_of_the_ignore_class_reads_na() -> None:
    """The ignore class (never labelled, outside the mIoU) and a class without any pixel print ``n/a``,
    not an IoU of 0 or nan; the other classes print their IoU."""
    import numpy as np

    from segcal.cli.eval_cmd import format_table

    res = {"n_images": 1, "n_pixels": 10, "iou_per_class": np.array([0.5, np.nan, 0.0, 0.25])}
    text = format_table(res, ignore_index=3)
    line = next(t for t in text.splitlines() if t.startswith("per-class IoU"))
    assert line.split()[2:] == ["0:0.5000", "1:n/a", "2:0.0000", "3:n/a"]
    assert "class 3 is the ignore index" in text
    assert "ignore index" not in format_table(res, ignore_index=255)
