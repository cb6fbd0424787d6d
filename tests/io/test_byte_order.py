"""Big-endian arrays (``>f4`` logits, ``>i2`` labels: a ``.npy`` written for another platform or
by a tool that writes big-endian) are read as the numbers they hold.

Before (trust audit, session 26): ``segcal eval`` / ``fit`` exited 2 with torch's "given numpy
array has byte order different from the native byte order ... not supported", without naming the
file, and the API raised the same. Now every reader (``load_npy``, ``load_npz``, ``load_nifti``)
and :func:`segcal.validation.as_tensor` return the machine's byte order
(:func:`segcal.validation.native_byte_order`), and the figures equal those of the native files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcal.cli import main
from segcal.io import read_label, read_prediction
from segcal.metrics import calibration_metrics
from segcal.validation import as_tensor, native_byte_order


def _folder(root, float_dtype, label_dtype, seed=0):
    rng = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True)
    lab.mkdir(parents=True)
    for i in range(3):
        z = (2 * rng.normal(size=(4, 5, 6))).astype(float_dtype)
        y = rng.integers(0, 4, size=(5, 6)).astype(label_dtype)
        y[0, 0] = 255 if np.dtype(label_dtype).itemsize > 1 else y[0, 0]
        np.save(pred / f"s{i}.npy", z)
        np.save(lab / f"s{i}.npy", y)
    return pred, lab


def test_native_byte_order_converts_only_what_needs_it():
    a = np.arange(6, dtype=np.float32)
    assert native_byte_order(a) is a
    b = a.astype(">f4")
    c = native_byte_order(b)
    assert c.dtype.isnative and np.array_equal(c, a)
    assert native_byte_order(np.arange(3, dtype=np.uint8)).dtype == np.uint8  # no byte order


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fd=st.sampled_from([">f2", ">f4", ">f8"]), ld=st.sampled_from([">i2", ">i4", ">u2", ">i8"]))
def test_api_and_readers_take_big_endian_arrays(tmp_path_factory, fd, ld):
    rng = np.random.default_rng(1)
    z = (2 * rng.normal(size=(2, 3, 4, 5))).astype(fd)
    y = rng.integers(0, 3, size=(2, 4, 5)).astype(ld)
    t = as_tensor(z, "preds")
    assert torch.equal(t, torch.from_numpy(z.astype(z.dtype.newbyteorder("="))))
    got = calibration_metrics(z, y, num_classes=3)
    ref = calibration_metrics(z.astype(z.dtype.newbyteorder("=")), y.astype(y.dtype.newbyteorder("=")), num_classes=3)
    assert got["ece"] == ref["ece"] and got["nll"] == ref["nll"] and got["miou"] == ref["miou"]
    root = tmp_path_factory.mktemp("be")
    np.save(root / "p.npy", z[0])
    np.save(root / "y.npy", y[0])
    np.savez(root / "p.npz", logits=z[0])
    for arr in (read_prediction(root / "p.npy")[0], read_prediction(root / "p.npz")[0], read_label(root / "y.npy")):
        assert arr.dtype.isnative
    assert np.array_equal(read_prediction(root / "p.npy")[0], z[0]) and np.array_equal(read_label(root / "y.npy"), y[0])


@pytest.mark.parametrize("fd, ld", [(">f4", ">i2"), (">f2", ">u2")])
def test_eval_fit_apply_on_a_big_endian_folder_equal_the_native_folder(tmp_path, capsys, fd, ld):
    native = {"f": fd.replace(">", "<"), "l": ld.replace(">", "<")}
    runs = {}
    for name, (f, lab_dtype) in {"big": (fd, ld), "native": (native["f"], native["l"])}.items():
        pred, lab = _folder(tmp_path / name, f, lab_dtype)
        js, cal = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
        assert main(["eval", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "-q",
                     "--json", str(js)]) == 0, capsys.readouterr().err
        assert main(["fit", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "-q",
                     "--method", "ts", "--val-fraction", "0", "--out", str(cal)]) == 0, capsys.readouterr().err
        assert main(["apply", "--calibrator", str(cal), "--pred", str(pred), "--out", str(tmp_path / f"{name}_out"),
                     "-q"]) == 0, capsys.readouterr().err
        runs[name] = json.loads(js.read_text())
    for key in ("ece", "nll", "brier", "miou", "n_pixels"):
        assert runs["big"][key] == runs["native"][key], key
    for i in range(3):
        a = np.load(tmp_path / "big_out" / f"s{i}.npy")
        b = np.load(tmp_path / "native_out" / f"s{i}.npy")
        assert a.dtype.isnative and np.array_equal(a, b)
