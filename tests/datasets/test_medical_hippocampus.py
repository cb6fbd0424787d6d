"""The fixed split, preprocessing, padding and the volume prediction path (small, synthetic model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from segcal.data import data_root  # noqa: E402
from segcal.datasets.hippocampus import (  # noqa: E402
    SPLIT_SIZES,
    case_ids,
    crop_back,
    load_nifti,
    load_split,
    make_split,
    normalise,
    pad_amounts,
    pad_to_divisible,
)
from segcal.io.nnunet import read_aligned  # noqa: E402
from segcal.io.predictions import read_folder_meta  # noqa: E402
from segcal.models.unet3d import build_unet  # noqa: E402
from segcal.pipeline.predict import predict_logits, predict_volumes  # noqa: E402


def test_committed_split_is_disjoint_and_sized():
    s = load_split()
    parts = [set(s[k]) for k in SPLIT_SIZES]
    assert [len(p) for p in parts] == list(SPLIT_SIZES.values())
    assert len(set.union(*parts)) == 260
    assert s["seed"] == 0
    # rebuilding from the same ids gives the committed file
    assert make_split(sorted(set.union(*parts)), seed=0) == s


@pytest.mark.realdata
def test_split_matches_the_data():
    root = data_root(required=False)
    d = None if root is None else root / "msd_task04_hippocampus"
    if d is None or not (d / "imagesTr").is_dir():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    assert make_split(case_ids(d), seed=0) == load_split()


def test_make_split_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="do not add up"):
        make_split([f"c{i}" for i in range(10)])


@pytest.mark.parametrize("shape", [(35, 51, 35), (31, 40, 24), (43, 59, 47), (8, 16, 8)])
def test_pad_and_crop_back(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    p, pads = pad_to_divisible(x)
    assert all(s % 8 == 0 for s in p.shape)
    assert pads == pad_amounts(shape)
    np.testing.assert_array_equal(crop_back(p[None], pads)[0], x)


def test_normalise_is_per_case_zscore():
    x = np.random.default_rng(1).gamma(2.0, 1e5, size=(6, 7, 8)).astype(np.float32)
    z = normalise(x)
    assert z.dtype == np.float32
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-4
    np.testing.assert_allclose(normalise(x * 1000.0), z, atol=1e-5)


def _nifti(path, arr, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


def test_predict_volumes_writes_aligned_folder(tmp_path):
    import torch

    torch.manual_seed(0)
    model = build_unet(channels=(4, 8, 8, 8)).eval()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = (3, -2, 5)
    rng = np.random.default_rng(0)
    _nifti(imgs / "a_0000.nii.gz", rng.normal(size=(9, 12, 9)).astype(np.float32), aff)
    _nifti(imgs / "b.nii.gz", rng.integers(0, 255, size=(10, 7, 11)).astype(np.uint8))
    out = tmp_path / "pred"
    written = predict_volumes(model, imgs, out)
    assert [p.name for p in written] == ["a.npy", "b.npy"]
    a = np.load(out / "a.npy")
    assert a.dtype == np.float16 and a.shape == (3, 9, 12, 9)
    img, _ = load_nifti(imgs / "a_0000.nii.gz")
    np.testing.assert_allclose(a, predict_logits(model, img), atol=2e-2, rtol=2e-3)
    meta = read_folder_meta(out)
    assert meta["input_type"] == "logits" and meta["num_classes"] == 3
    assert meta["class_names"] == ["background", "anterior", "posterior"]
    assert meta["axis_order"] == "xyz (nibabel)"
    assert meta["cases"]["a"]["shape"] == [9, 12, 9]
    np.testing.assert_allclose(meta["cases"]["a"]["affine"], aff)
    json.dumps(meta)

    # labels: aligned one reads back; a moved or reshaped one is refused with a clear message
    lab = tmp_path / "lab"
    lab.mkdir()
    _nifti(lab / "a.nii.gz", np.zeros((9, 12, 9), np.uint8), aff)
    pred, label = read_aligned(out / "a.npy", lab / "a.nii.gz", num_classes=3, folder_meta=meta)
    assert pred.shape == (3, 9, 12, 9) and label.shape == (9, 12, 9)
    _nifti(lab / "moved.nii.gz", np.zeros((9, 12, 9), np.uint8))
    with pytest.raises(ValueError, match="prediction affine"):
        read_aligned(out / "a.npy", lab / "moved.nii.gz", folder_meta={"cases": {"a": meta["cases"]["a"]}})
    _nifti(lab / "wrong.nii.gz", np.zeros((12, 9, 9), np.uint8), aff)
    with pytest.raises(ValueError, match="differs from label"):
        read_aligned(out / "a.npy", lab / "wrong.nii.gz", folder_meta=meta)
    with pytest.raises(ValueError, match="3 classes in the prediction, expected 2"):
        read_aligned(out / "a.npy", lab / "a.nii.gz", num_classes=2)


def test_predict_volumes_rejects_4d_and_missing(tmp_path):
    import torch

    torch.manual_seed(0)
    model = build_unet(channels=(4, 8, 8, 8)).eval()
    _nifti(tmp_path / "four.nii.gz", np.zeros((8, 8, 8, 2), np.float32))
    with pytest.raises(ValueError, match="4D with shape"):
        predict_volumes(model, tmp_path / "four.nii.gz", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict_volumes(model, [tmp_path / "nope.nii.gz"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.nii"):
        predict_volumes(model, tmp_path / "empty", tmp_path / "out")


def test_register_with_the_model_registry():
    """The registry knows ``unet3d-hippocampus`` without any call (2D loop not used for it)."""
    from segcal.models import available_models, create_model, get_spec

    assert "unet3d-hippocampus" in available_models()
    spec = get_spec("unet3d-hippocampus")
    assert spec.num_classes == 3
    assert spec.class_names == ("background", "anterior", "posterior")
    loaded = create_model("unet3d-hippocampus", device="cpu")
    assert not loaded.module.training
    x = spec.preprocess(np.ones((9, 12, 9), np.float32) * 5)
    assert tuple(x.shape) == (1, 1, 16, 16, 16)
    assert tuple(loaded.module(x).shape) == (1, 3, 16, 16, 16)
