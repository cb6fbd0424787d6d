"""``segcal apply`` writes what the calibrator guarantees (issue 16): declared properties kept on
disk, no value outside the stored dtype's range, the input's float dtype kept, no torch warning,
an interrupted folder never read as a complete one, ``--out`` checked before anything is written."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import segcal.io.predictions as iop
from segcal.calibrators import TemperatureScaling
from segcal.cli import main
from segcal.errors import InputError
from segcal.pipeline.calibrate import storable

torch.set_num_threads(1)


def save_ts(path, num_classes, temperature):
    """A 'fitted' temperature scaling with a fixed T (argmax- and order-preserving)."""
    cal = TemperatureScaling(num_classes=num_classes, init_temperature=float(temperature))
    cal.is_fitted = True
    cal.save(path)
    return path


def tiny_gap_folder(root, n=3, shape=(6, 5), dtype=np.float16):
    """Two classes whose logits differ by one float16 step at 3.0: class 1 wins everywhere."""
    pred = root / "pred"
    pred.mkdir()
    z0 = np.float16(3.0)
    z1 = np.nextafter(z0, np.float16(4.0))  # 3.00195
    for i in range(n):
        z = np.stack([np.full(shape, z0), np.full(shape, z1)]).astype(dtype)
        np.save(pred / f"im{i}.npy", z)
    return pred


def labels_for(root, pred, value=1):
    lab = root / "labels"
    lab.mkdir()
    for p in sorted(pred.glob("*.npy")):
        np.save(lab / p.name, np.full(np.load(p).shape[1:], value, np.uint8))
    return lab


@pytest.mark.parametrize("input_dtype,extra", [(np.float16, []), (np.float32, ["--dtype", "float16"])])
def test_apply_keeps_argmax_of_argmax_preserving_calibrator_on_disk(tmp_path, capsys, input_dtype, extra):
    # T = 100 leaves a top-two log-probability gap of ~2e-5: float16 rounds it to a tie and the
    # tie goes to class 0; the written folder must keep class 1 (what TS guarantees)
    pred = tiny_gap_folder(tmp_path, dtype=input_dtype)
    cal = save_ts(tmp_path / "ts.pt", 2, 100.0)
    out = tmp_path / "out"
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(out), "--no-progress",
                 *extra]) == 0
    err = capsys.readouterr().err
    for p in sorted(out.glob("*.npy")):
        stored = np.load(p)
        assert (stored.argmax(0) == 1).all(), p.name
        assert stored.dtype == np.float32  # float16 cannot keep the guarantee here
    assert "float32" in err and ("argmax" in err or "order" in err)
    assert len(err.strip().splitlines()) == 1  # said once, not per file


def test_apply_keeps_class_order_of_order_preserving_calibrator(tmp_path, capsys):
    # three classes, the top two one float16 step apart, the third far below: order preserved
    pred = tmp_path / "pred"
    pred.mkdir()
    z = np.stack([np.full((4, 4), 3.0), np.full((4, 4), 3.00195), np.full((4, 4), -2.0)]).astype(np.float16)
    np.save(pred / "a.npy", z)
    cal = save_ts(tmp_path / "ts.pt", 3, 100.0)
    out = tmp_path / "out"
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(out), "--no-progress",
                 "--output", "probs"]) == 0
    p = np.load(out / "a.npy")
    order = np.argsort(-p.reshape(3, -1), axis=0, kind="stable")
    assert (order == np.array([[1], [0], [2]])).all()
    assert p[1].min() > p[0].max() > p[2].max()


def test_apply_float16_never_writes_inf(tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(2):  # log-probability of class 1: -131008, below float16's -65504
        np.save(pred / f"v{i}.npy", np.stack([np.full((3, 3), 65504.0), np.full((3, 3), -65504.0)]).astype(np.float16))
    cal = save_ts(tmp_path / "ts.pt", 2, 1.0)
    out = tmp_path / "out"
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(out), "--no-progress"]) == 0
    for p in sorted(out.glob("*.npy")):
        a = np.load(p)
        assert a.dtype == np.float16 and np.isfinite(a).all(), p.name
        assert a[1].min() == np.finfo(np.float16).min
        assert (a.argmax(0) == 0).all()
    labels = labels_for(tmp_path, pred, value=0)
    capsys.readouterr()
    assert main(["eval", "--pred", str(out), "--labels", str(labels), "--no-progress"]) == 0
    assert "Pixel accuracy" in capsys.readouterr().out


def test_apply_keeps_float32_input_dtype_and_warns_nothing(tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(pred / f"x{i}.npy", rng.normal(size=(3, 5, 4)).astype(np.float32))
    cal = save_ts(tmp_path / "ts.pt", 3, 1.7)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(out),
                     "--no-progress"]) == 0
    assert not [w for w in caught if "not writable" in str(w.message)], [str(w.message) for w in caught]
    assert "not writable" not in capsys.readouterr().err
    for i in range(2):
        a = np.load(out / f"x{i}.npy")
        assert a.dtype == np.float32
        ref = torch.log_softmax(torch.from_numpy(np.load(pred / f"x{i}.npy")) / 1.7, 0).numpy()
        np.testing.assert_allclose(a, ref, atol=1e-5)
    # float16 input stays float16 by default
    pred16 = tmp_path / "p16"
    pred16.mkdir()
    np.save(pred16 / "y.npy", rng.normal(size=(3, 5, 4)).astype(np.float16))
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred16), "--out", str(tmp_path / "o16"),
                 "--no-progress"]) == 0
    assert np.load(tmp_path / "o16" / "y.npy").dtype == np.float16


def test_apply_help_documents_the_dtype_default(capsys):
    with pytest.raises(SystemExit):
        main(["apply", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--dtype" in out and "input" in out.rsplit("--dtype", 1)[1][:300]


def test_apply_out_that_is_an_existing_file_is_refused_before_writing(tmp_path, capsys):
    pred = tiny_gap_folder(tmp_path)
    cal = save_ts(tmp_path / "ts.pt", 2, 1.0)
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(target),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "existing file" in err and "Traceback" not in err
    assert target.read_text() == "keep me"


def test_apply_probabilities_folder_read_as_logits_is_refused(tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 4, 4))
    np.save(pred / "p.npy", (np.exp(z) / np.exp(z).sum(0)).astype(np.float32))  # no segcal.json
    cal = save_ts(tmp_path / "ts.pt", 3, 1.0)
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "p.npy" in err and "probabilities" in err and "--probabilities" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.npy"))


def test_apply_channel_last_file_gets_a_hint(tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    np.save(pred / "hwc.npy", np.random.default_rng(0).normal(size=(6, 5, 3)).astype(np.float32))
    cal = save_ts(tmp_path / "ts.pt", 3, 1.0)
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "channel-last" in capsys.readouterr().err


def test_apply_writes_meta_that_records_float32_fallback(tmp_path, capsys):
    pred = tiny_gap_folder(tmp_path, n=2)
    cal = save_ts(tmp_path / "ts.pt", 2, 100.0)
    out = tmp_path / "out"
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "segcal.json").read_text())
    assert meta["float32_files"] == ["im0.npy", "im1.npy"]


def test_interrupted_apply_output_probs_is_never_read_as_logits(tmp_path, monkeypatch, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        np.save(pred / f"f{i}.npy", (3 * rng.normal(size=(3, 5, 4))).astype(np.float32))
    lab = labels_for(tmp_path, pred, value=2)
    cal = save_ts(tmp_path / "ts.pt", 3, 1.5)
    real_save = np.save
    calls = {"n": 0}

    def dies_on_third(fh, arr, allow_pickle=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) part-way through the folder
        return real_save(fh, arr, allow_pickle=allow_pickle)

    monkeypatch.setattr(iop.np, "save", dies_on_third)
    out = tmp_path / "out"
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(out), "--output", "probs",
                 "--no-progress"]) == 130  # interrupted
    monkeypatch.setattr(iop.np, "save", real_save)
    assert sorted(p.name for p in out.glob("*.npy")) == ["f0.npy", "f1.npy"]
    capsys.readouterr()
    # without the manifest these two files of probabilities would be read as logits (ECE wrong)
    assert main(["eval", "--pred", str(out), "--labels", str(lab), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and str(out) in err
    # running apply again finishes the folder; eval then reads it as probabilities
    assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(out), "--output", "probs",
                 "--no-progress"]) == 0
    assert json.loads((out / "segcal.json").read_text())["complete"] is True
    assert main(["eval", "--pred", str(out), "--labels", str(lab), "--json", str(tmp_path / "m.json"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["config"]["input_type"] == "probs"


def test_storable_checks_only_the_declared_property():
    # class 1 beats class 0 by 2e-5 (a float16 tie), class 2 and 3 tie in float16 only far below
    v = np.array([[-0.69316], [-0.69314], [-70000.0], [-70001.0]], dtype=np.float32)
    plain, why = storable(v, np.float16)  # no property declared: float16, clamped to its range
    assert why is None and plain.dtype == np.float16 and np.isfinite(plain).all()
    assert plain.min() == np.finfo(np.float16).min
    ap, why = storable(v, np.float16, argmax_preserving=True)  # the argmax (class 1) needs float32
    assert ap.dtype == np.float32 and "argmax-preserving" in why and ap.argmax(0)[0] == 1
    v2 = v.copy()
    v2[1] = -0.5  # a clear argmax: AP holds in float16 although classes 2 and 3 tie there
    ap2, why = storable(v2, np.float16, argmax_preserving=True)
    assert why is None and ap2.dtype == np.float16
    op2, why = storable(v2, np.float16, order_preserving=True)  # the order of 2 and 3 needs float32
    assert op2.dtype == np.float32 and "order-preserving" in why
    with pytest.raises(InputError, match="NaN"):
        storable(np.array([[np.nan], [0.0]], np.float32), np.float16)
