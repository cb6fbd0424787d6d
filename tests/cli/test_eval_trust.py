"""``segcal eval`` / ``segcal fit`` and :func:`segcal.pipeline.evaluate.evaluate_folder` refuse what
would give a wrong figure (issue 16): probabilities read as logits and the reverse, labels outside
the classes, a channel-last file, an empty folder, an output path that is taken; and both commands
take both spellings of the input type."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metric_reference import reference_metrics, softmax
from segcal.calibrators import TemperatureScaling
from segcal.cli import main
from segcal.errors import InputError
from segcal.pipeline.evaluate import evaluate_folder


def folder(root, kind="logits", n=3, c=4, shape=(6, 5), seed=0, npz_key=None, void=False):
    rng = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir()
    lab.mkdir()
    zs, ys = [], []
    for i in range(n):
        z = 2 * rng.normal(size=(c, *shape))
        y = rng.integers(0, c, size=shape).astype(np.uint8)
        if void:
            y[0, 0] = 255
        arr = softmax(z[None])[0] if kind == "probs" else z
        if npz_key:
            np.savez(pred / f"s{i}.npz", **{npz_key: arr.astype(np.float32)})
        else:
            np.save(pred / f"s{i}.npy", arr.astype(np.float32))
        np.save(lab / f"s{i}.npy", y)
        zs.append(z)
        ys.append(y)
    return pred, lab, np.stack(zs), np.stack(ys)


def run(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("npz_key", [None, "logits"])
def test_eval_refuses_probabilities_read_as_logits(tmp_path, capsys, npz_key):
    pred, lab, _, _ = folder(tmp_path, kind="probs", npz_key=npz_key)
    rc, _, err = run(capsys, "eval", "--pred", str(pred), "--labels", str(lab), "--no-progress")
    assert rc == 2
    assert "s0.np" in err and "probabilities" in err and "--probabilities" in err
    assert "Traceback" not in err


def test_fit_refuses_probabilities_read_as_logits(tmp_path, capsys):
    pred, lab, _, _ = folder(tmp_path, kind="probs")
    out = tmp_path / "c.pt"
    rc, _, err = run(capsys, "fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts",
                     "--out", str(out), "--no-progress")
    assert rc == 2 and "s0.npy" in err and "--probabilities" in err
    assert not out.exists()


def test_logits_given_as_probabilities_are_refused(tmp_path, capsys):
    pred, lab, _, _ = folder(tmp_path, kind="logits")
    rc, _, err = run(capsys, "eval", "--pred", str(pred), "--labels", str(lab), "--probabilities", "--no-progress")
    assert rc == 2 and "s0.npy" in err and "--input-type logits" in err
    rc, _, err = run(capsys, "fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts", "--input-type",
                     "probs", "--out", str(tmp_path / "c.pt"), "--no-progress")
    assert rc == 2 and "s0.npy" in err and "logits" in err


def test_api_refuses_probabilities_read_as_logits(tmp_path):
    pred, lab, _, _ = folder(tmp_path, kind="probs")
    with pytest.raises(InputError, match=r"s0\.npy.*input_type='probs'"):
        evaluate_folder(pred, lab)


@pytest.mark.parametrize("spelling", [["--probabilities"], ["--input-type", "probs"]])
def test_eval_and_fit_take_both_spellings_of_the_input_type(tmp_path, capsys, spelling):
    pred, lab, z, y = folder(tmp_path, kind="probs", void=True)
    out = tmp_path / "m.json"
    rc, _, err = run(capsys, "eval", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255",
                     "--json", str(out), "--no-progress", *spelling)
    assert rc == 0, err
    ref = reference_metrics(softmax(z), y, n_bins=15, ignore_index=255)
    assert json.loads(out.read_text())["ece"] == pytest.approx(ref["ece"], abs=1e-5)
    rc, _, err = run(capsys, "fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts", "--ignore-index",
                     "255", "--out", str(tmp_path / "c.pt"), "--no-progress", *spelling)
    assert rc == 0, err
    rc, _, err = run(capsys, "eval", "--pred", str(pred), "--labels", str(lab), "--probabilities",
                     "--input-type", "logits", "--no-progress")
    assert rc == 2 and "--probabilities" in err


def test_label_outside_classes_names_the_cli_flag(tmp_path, capsys):
    pred, lab, _, _ = folder(tmp_path, void=True)
    rc, _, err = run(capsys, "eval", "--pred", str(pred), "--labels", str(lab), "--no-progress")
    assert rc == 2 and "--ignore-index 255" in err and "ignore_index=" not in err
    assert "s0.npy" in err and "outside [0, 4)" in err
    rc, _, err = run(capsys, "fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts",
                     "--out", str(tmp_path / "c.pt"), "--no-progress")
    assert rc == 2 and "--ignore-index" in err and "ignore_index=" not in err


def test_api_label_message_names_the_keyword(tmp_path):
    pred, lab, _, _ = folder(tmp_path, void=True)
    with pytest.raises(InputError, match=r"ignore_index=255"):
        evaluate_folder(pred, lab)


def test_channel_last_prediction_gets_a_hint(tmp_path, capsys):
    pred, lab, _, _ = folder(tmp_path, n=1)
    np.save(pred / "s0.npy", np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32))
    rc, _, err = run(capsys, "eval", "--pred", str(pred), "--labels", str(lab), "--no-progress")
    assert rc == 2 and "channel-last" in err and "s0.npy" in err


def test_empty_prediction_folder_says_so(tmp_path, capsys):
    pred, lab, _, _ = folder(tmp_path, n=2)
    for p in pred.iterdir():
        p.unlink()
    rc, _, err = run(capsys, "eval", "--pred", str(pred), "--labels", str(lab), "--no-progress")
    assert rc == 2 and f"no .npy/.npz predictions found in {pred}" in err and "stems do not match" not in err


def test_help_shows_defaults(capsys):
    for cmd, flag, default in (("eval", "--bins", "15"), ("fit", "--val-fraction", "0.2"),
                               ("fit", "--memory-budget-mb", "2048"), ("apply", "--device", "cpu")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        after = text.rsplit(flag, 1)[1][:400]
        assert "default" in after and default in after, (cmd, flag, after)


def test_out_paths_that_are_taken_are_refused_before_any_work(tmp_path, capsys):
    pred, lab, _, _ = folder(tmp_path)
    taken_dir = tmp_path / "a_dir"
    taken_dir.mkdir()
    rc, _, err = run(capsys, "eval", "--pred", str(pred), "--labels", str(lab), "--json", str(taken_dir),
                     "--no-progress")
    assert rc == 2 and "--json" in err and "Traceback" not in err
    rc, out, err = run(capsys, "fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts",
                       "--out", str(taken_dir), "--no-progress")
    assert rc == 2 and "--out" in err and "fitting" not in out
    assert list(taken_dir.iterdir()) == []
    rc, out, err = run(capsys, "fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts",
                       "--out", str(tmp_path / "c.pt"), "--json", str(taken_dir), "--no-progress")
    assert rc == 2 and "--json" in err and not (tmp_path / "c.pt").exists()


def test_evaluate_folder_is_the_eval_command(tmp_path, capsys):
    pred, lab, _, _ = folder(tmp_path, void=True)
    res = evaluate_folder(pred, lab, ignore_index=255, n_bins=10)
    out = tmp_path / "m.json"
    assert main(["eval", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "--bins", "10",
                 "--json", str(out), "--no-progress"]) == 0
    cli = json.loads(out.read_text())
    got = res.metrics.compute()
    for key in ("ece", "image_ece", "nll", "miou"):
        assert cli[key] == pytest.approx(got[key], abs=1e-12)
    assert res.calibrated is None and res.input_type == "logits" and res.stems == ["s0", "s1", "s2"]


def test_evaluate_folder_with_a_calibrator_measures_before_and_after(tmp_path):
    pred, lab, z, y = folder(tmp_path, void=True)
    cal = TemperatureScaling(num_classes=4, init_temperature=2.0)
    cal.is_fitted = True
    res = evaluate_folder(pred, lab, calibrator=cal, ignore_index=255, stems=["s0", "s2"])
    assert res.stems == ["s0", "s2"]
    ref_before = reference_metrics(softmax(z[[0, 2]]), y[[0, 2]], n_bins=15, ignore_index=255)
    zt = z[[0, 2]].astype(np.float32).astype(np.float64) / 2.0  # the files hold float32
    ref_after = reference_metrics(softmax(zt), y[[0, 2]], n_bins=15, ignore_index=255)
    b, a = res.metrics.compute(), res.calibrated.compute()
    assert b["nll"] == pytest.approx(ref_before["nll"], abs=1e-5)
    assert a["nll"] == pytest.approx(ref_after["nll"], abs=1e-5)
