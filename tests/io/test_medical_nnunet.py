"""nnU-Net v2 interop: probabilities written in SimpleITK's array order line up with nibabel labels.

The nnU-Net side is reproduced with SimpleITK itself (``ReadImage`` + ``GetArrayFromImage``, as
nnU-Net's default ``SimpleITKIO`` does), not with segcal's writer, so the test checks the real
axis convention. Volumes include crops with two equal axis lengths, where a shape check alone
cannot tell (x, y, z) from (z, y, x), and non-identity directions (permuted, flipped axes).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from segcal.data import data_root
from segcal.io.nnunet import (
    NnUNetFormatError,
    geometry_from_properties,
    read_aligned,
    read_label_volume,
    read_nnunet_prediction,
    read_properties,
    write_calibrated,
)

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")

# a permuted + flipped, anisotropic, offset affine (RAS)
SKEW_AFFINE = np.array(
    [[0.0, 0.0, -1.5, 10.0], [1.2, 0.0, 0.0, -4.0], [0.0, 0.8, 0.0, 7.0], [0, 0, 0, 1.0]]
)


def _write_nifti(path, arr, affine):
    img = nib.Nifti1Image(np.asarray(arr), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _nnunet_export(label_path, out_dir, stem, num_classes=3, probs_fn=None):
    """What nnU-Net v2 (SimpleITKIO, --save_probabilities) writes for a case, built with SimpleITK.

    Probabilities are a smoothed one-hot of the label as SimpleITK reads it (array order [k, j, i]).
    """
    im = sitk.ReadImage(str(label_path))
    arr = sitk.GetArrayFromImage(im).astype(np.int64)
    onehot = np.stack([(arr == k) for k in range(num_classes)]).astype(np.float32)
    probs = 0.9 * onehot + 0.1 / num_classes if probs_fn is None else probs_fn(onehot)
    props = {
        "sitk_stuff": {
            "spacing": im.GetSpacing(), "origin": im.GetOrigin(), "direction": im.GetDirection(),
        },
        "spacing": [abs(float(s)) for s in im.GetSpacing()[::-1]],
        "shape_before_cropping": arr.shape,
        "bbox_used_for_cropping": [[0, int(s)] for s in arr.shape],
        "shape_after_cropping_and_before_resampling": tuple(np.int64(s) for s in arr.shape),
    }
    npz = out_dir / f"{stem}.npz"
    np.savez_compressed(npz, probabilities=probs)
    with open(out_dir / f"{stem}.pkl", "wb") as fh:
        pickle.dump(props, fh)
    return npz, arr, props


def _label(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, size=shape).astype(np.uint8)


@pytest.mark.parametrize(
    "shape,affine",
    [
        ((5, 7, 5), np.diag([1.0, 1, 1, 1])),  # x == z: shapes cannot tell the orders apart
        ((4, 6, 8), np.diag([1.0, 1, 1, 1])),
        ((6, 6, 9), SKEW_AFFINE),  # x == y, permuted/flipped direction
        ((7, 5, 7), SKEW_AFFINE),
    ],
)
def test_sitk_written_probabilities_line_up_with_nibabel_label(tmp_path, shape, affine):
    lab = _label(shape)
    lp = _write_nifti(tmp_path / "case.nii.gz", lab, affine)
    npz, sitk_arr, _ = _nnunet_export(lp, tmp_path, "case")
    assert sitk_arr.shape == shape[::-1]
    pred, label = read_aligned(npz, lp, num_classes=3)
    assert pred.shape == (3, *shape)
    np.testing.assert_array_equal(label, lab)
    np.testing.assert_array_equal(pred.argmax(0), lab)
    geom = geometry_from_properties(read_properties(tmp_path / "case.pkl"))
    assert geom.reader == "SimpleITKIO"
    np.testing.assert_allclose(geom.affine, affine, atol=1e-5)
    if shape[0] == shape[2]:
        # the raw nnU-Net array has the label's shape but is NOT aligned with it
        raw = np.load(npz)["probabilities"]
        assert raw.shape[1:] == shape
        assert not np.array_equal(raw.argmax(0), lab)


@pytest.mark.realdata
def test_real_hippocampus_crop_with_equal_axes(tmp_path):
    root = data_root(required=False)
    src = None if root is None else root / "msd_task04_hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"
    if src is None or not src.is_file():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    full, aff = read_label_volume(src)
    n = min(full.shape[0], full.shape[2])
    crop = full[:n, :, :n]  # two equal axis lengths
    assert crop.shape[0] == crop.shape[2]
    # also with a non-identity direction: same voxels, permuted/flipped world axes
    for i, a in enumerate((aff, SKEW_AFFINE)):
        lp = _write_nifti(tmp_path / f"h{i}.nii.gz", crop.astype(np.uint8), a)
        npz, _, _ = _nnunet_export(lp, tmp_path, f"h{i}")
        pred, label = read_aligned(npz, lp, num_classes=3)
        np.testing.assert_array_equal(pred.argmax(0), crop)
        np.testing.assert_array_equal(label, crop)
    # and straight on the real file (identity direction, real origin)
    npz, _, _ = _nnunet_export(src, tmp_path, "real")
    pred, label = read_aligned(npz, src, num_classes=3)
    np.testing.assert_array_equal(pred.argmax(0), full)


def test_write_calibrated_roundtrip_keeps_nnunet_format(tmp_path):
    shape = (5, 7, 5)
    lp = _write_nifti(tmp_path / "c.nii.gz", _label(shape, 1), SKEW_AFFINE)
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    npz, sitk_arr, _ = _nnunet_export(lp, src_dir, "c")
    pred, _ = read_aligned(npz, lp, num_classes=3)
    cal = pred ** 2
    cal = cal / cal.sum(0, keepdims=True)  # a stand-in calibrator
    out = write_calibrated(out_dir, "c", cal, npz)
    assert out == out_dir / "c.npz"
    assert (out_dir / "c.pkl").read_bytes() == (src_dir / "c.pkl").read_bytes()
    with np.load(out) as z:
        assert z.files == ["probabilities"]
        raw = z["probabilities"]
    assert raw.dtype == np.float32 and raw.shape == (3, *sitk_arr.shape)  # nnU-Net (SimpleITK) order
    np.testing.assert_array_equal(raw.argmax(0), sitk_arr)
    back, _ = read_aligned(out, lp, num_classes=3)
    np.testing.assert_allclose(back, cal, atol=1e-6)


def test_bad_inputs_give_clear_errors(tmp_path):
    shape = (4, 6, 8)
    lp = _write_nifti(tmp_path / "c.nii.gz", _label(shape), np.eye(4))
    npz, _, props = _nnunet_export(lp, tmp_path, "c")

    # class count
    with pytest.raises(ValueError, match="3 classes in the probabilities, expected 4"):
        read_aligned(npz, lp, num_classes=4)
    # label affine disagrees with the properties
    moved = np.eye(4)
    moved[:3, 3] = (2.0, 0, 0)
    lp2 = _write_nifti(tmp_path / "moved.nii.gz", _label(shape), moved)
    with pytest.raises(NnUNetFormatError, match="label affine does not match"):
        read_aligned(npz, lp2)
    # label shape disagrees
    lp3 = _write_nifti(tmp_path / "other.nii.gz", _label((4, 6, 9)), np.eye(4))
    with pytest.raises(NnUNetFormatError, match=r"label volume has shape \(4, 6, 9\)"):
        read_aligned(npz, lp3)
    # 4D label
    lp4 = _write_nifti(tmp_path / "four.nii.gz", np.zeros((4, 6, 8, 2), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="4D with shape"):
        read_aligned(npz, lp4)
    # properties that do not say which reader wrote the array: refuse, never guess
    bad = {k: v for k, v in props.items() if k != "sitk_stuff"}
    with open(tmp_path / "c.pkl", "wb") as fh:
        pickle.dump(bad, fh)
    with pytest.raises(NnUNetFormatError, match="neither 'sitk_stuff' nor 'nibabel_stuff'"):
        read_aligned(npz, lp)
    # reoriented grid
    reo = dict(props, sitk_stuff=dict(props["sitk_stuff"], original_orientation="LPS"))
    with open(tmp_path / "c.pkl", "wb") as fh:
        pickle.dump(reo, fh)
    with pytest.raises(NnUNetFormatError, match="SimpleITKIOWithReorient"):
        read_aligned(npz, lp)
    # probabilities whose shape is not shape_before_cropping
    with open(tmp_path / "c.pkl", "wb") as fh:
        pickle.dump(props, fh)
    np.savez_compressed(npz, probabilities=np.zeros((3, 8, 6, 5), np.float32))
    with pytest.raises(NnUNetFormatError, match="differs from shape_before_cropping"):
        read_nnunet_prediction(npz)
    # a pickle that would run code is refused
    with open(tmp_path / "c.pkl", "wb") as fh:
        pickle.dump({"x": print}, fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        read_properties(tmp_path / "c.pkl")


def test_nibabel_reader_properties(tmp_path):
    shape = (5, 7, 5)
    lab = _label(shape, 3)
    lp = _write_nifti(tmp_path / "n.nii.gz", lab, SKEW_AFFINE)
    # what nnU-Net's NibabelIO stores: get_fdata().transpose(2, 1, 0), original_affine
    arr = np.asarray(nib.load(str(lp)).dataobj).transpose(2, 1, 0)
    probs = np.stack([(arr == k) for k in range(3)]).astype(np.float32)
    np.savez_compressed(tmp_path / "n.npz", probabilities=probs)
    props = {"nibabel_stuff": {"original_affine": nib.load(str(lp)).affine},
             "spacing": [0.8, 1.2, 1.5], "shape_before_cropping": arr.shape}
    with open(tmp_path / "n.pkl", "wb") as fh:
        pickle.dump(props, fh)
    pred, _ = read_aligned(tmp_path / "n.npz", lp, num_classes=3)
    np.testing.assert_array_equal(pred.argmax(0), lab)


def test_fit_and_apply_through_nnunet_aware_folder(tmp_path):
    """eval/fit/apply path: nnU-Net folder -> calibrator fit -> calibrated nnU-Net folder."""
    import torch

    from segcal.calibrators import FolderBatches, create
    from segcal.io.nnunet import write_nnunet_prediction
    from segcal.io.predictions import PredictionFolder
    from segcal.metrics import CalibrationMetrics

    pred_dir, lab_dir, out_dir = tmp_path / "pred", tmp_path / "lab", tmp_path / "out"
    pred_dir.mkdir()
    lab_dir.mkdir()
    rng = np.random.default_rng(5)

    def overconfident(onehot):
        noisy = np.where(rng.random(onehot.shape[1:]) < 0.2, np.roll(onehot, 1, axis=0), onehot)
        return (0.97 * noisy + 0.01).astype(np.float32)

    for i, shape in enumerate([(5, 7, 5), (6, 6, 4), (7, 5, 7)]):
        lp = _write_nifti(lab_dir / f"c{i}.nii.gz", _label(shape, i), SKEW_AFFINE if i % 2 else np.eye(4))
        _nnunet_export(lp, pred_dir, f"c{i}", probs_fn=overconfident)
    folder = PredictionFolder(pred_dir, lab_dir)
    scores, labels, itype = folder.read(folder.items[0])
    assert itype == "probs" and scores.shape == (3, 5, 7, 5) and labels.shape == (5, 7, 5)
    cal = create("ts", input_type="probs", seed=0)
    cal.fit(FolderBatches(folder))
    m0 = CalibrationMetrics(3, n_bins=15, input_type="probs")
    m1 = CalibrationMetrics(3, n_bins=15, input_type="probs")
    for it in folder.items:
        s, y, _ = folder.read(it)
        with torch.no_grad():
            q = torch.softmax(cal(torch.from_numpy(s)[None]), 1)[0].numpy()
        m0.update(torch.from_numpy(s)[None], torch.from_numpy(y.astype(np.int64))[None])
        m1.update(torch.from_numpy(q)[None], torch.from_numpy(y.astype(np.int64))[None])
        write_nnunet_prediction(out_dir / it.path.name, q, it.path)
    assert float(m1.compute()["nll"]) < float(m0.compute()["nll"])
    # the calibrated folder is again an nnU-Net folder that lines up with the labels
    back = PredictionFolder(out_dir, lab_dir)
    for it in back.items:
        s, y, _ = back.read(it)
        np.testing.assert_array_equal(s.argmax(0), folder.read(folder.items[back.stems.index(it.stem)])[0].argmax(0))
        assert (out_dir / f"{it.stem}.pkl").exists()


def test_segcal_eval_and_apply_on_an_nnunet_folder(tmp_path):
    """``segcal eval`` on an nnU-Net folder of equal-axis crops lines the raw (z, y, x) arrays up
    with the labels (accuracy 1: the probabilities are a smoothed one-hot of the label), and
    ``segcal apply`` writes the calibrated probabilities back in nnU-Net's format."""
    import json

    from segcal.cli import main

    pred_dir, lab_dir = tmp_path / "pred", tmp_path / "lab"
    pred_dir.mkdir()
    lab_dir.mkdir()
    for i, shape in enumerate([(5, 7, 5), (6, 4, 6)]):
        lp = _write_nifti(lab_dir / f"c{i}.nii.gz", _label(shape, 10 + i), np.eye(4))
        _nnunet_export(lp, pred_dir, f"c{i}")
    out = tmp_path / "m.json"
    assert main(["eval", "--pred", str(pred_dir), "--labels", str(lab_dir), "--no-progress",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["accuracy"] == pytest.approx(1.0)
    assert res["config"]["input_type"] == "probs"
    assert main(["fit", "--pred", str(pred_dir), "--labels", str(lab_dir), "--method", "ts",
                 "--val-fraction", "0", "--out", str(tmp_path / "ts.pt"), "--no-progress"]) == 0
    assert main(["apply", "--calibrator", str(tmp_path / "ts.pt"), "--pred", str(pred_dir),
                 "--out", str(tmp_path / "cal"), "--no-progress"]) == 0
    for stem in ("c0", "c1"):
        assert (tmp_path / "cal" / f"{stem}.pkl").read_bytes() == (pred_dir / f"{stem}.pkl").read_bytes()
    out2 = tmp_path / "m2.json"
    assert main(["eval", "--pred", str(tmp_path / "cal"), "--labels", str(lab_dir), "--no-progress",
                 "--json", str(out2)]) == 0
    assert json.loads(out2.read_text())["accuracy"] == pytest.approx(1.0)


def test_write_like_source(tmp_path):
    from segcal.io.nnunet import write_like_source

    shape = (5, 7, 5)
    lp = _write_nifti(tmp_path / "c.nii.gz", _label(shape, 2), SKEW_AFFINE)
    src = tmp_path / "src"
    src.mkdir()
    npz, sitk_arr, _ = _nnunet_export(lp, src, "c")
    probs, _ = read_aligned(npz, lp)
    out = write_like_source(tmp_path / "out" / "c.npz", probs, npz, key="probabilities")
    assert (tmp_path / "out" / "c.pkl").exists()
    with np.load(out) as z:
        np.testing.assert_array_equal(z["probabilities"].argmax(0), sitk_arr)
    with pytest.raises(ValueError, match="probabilities only"):
        write_like_source(tmp_path / "out" / "c.npz", probs, npz, key="logits")
    # a plain segcal file is written as before
    plain = write_like_source(tmp_path / "out" / "p.npy", probs, tmp_path / "x.npy")
    assert np.load(plain).dtype == np.float16
