"""Dataset readers: image/label folders, CamVid splits, NIfTI volumes, dataset aliases."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from segcal.data import data_root
from segcal.datasets import (
    CAMVID_CLASSES,
    camvid_dir,
    camvid_split,
    check_item_sizes,
    check_label_values,
    image_folder,
    is_alias,
    load_image,
    load_label,
    load_nifti,
    load_nifti_label,
    load_nifti_pair,
    msd_hippocampus,
    nifti_pairs,
    resolve_images,
)

ROOT = data_root(required=False)
HAVE_CAMVID = ROOT is not None and (ROOT / "camvid" / "test").is_dir()
HAVE_MSD = ROOT is not None and (ROOT / "msd_task04_hippocampus" / "imagesTr").is_dir()


def _img(path, h=8, w=16, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _lab(path, h=8, w=16, k=3):
    arr = (np.arange(h * w).reshape(h, w) % k).astype(np.uint8)
    if str(path).endswith(".npy"):
        np.save(path, arr)
    else:
        Image.fromarray(arr, mode="L").save(path)
    return arr


@pytest.fixture
def folder(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    a = _img(imgs / "a.png")
    _img(imgs / "b.jpg", seed=1)
    la = _lab(labs / "a.png")
    lb = _lab(labs / "b.npy")
    (imgs / "notes.txt").write_text("ignored")
    return imgs, labs, a, la, lb


def test_image_folder_roundtrip(folder):
    imgs, labs, a, la, lb = folder
    items = image_folder(imgs, labs)
    assert [it.stem for it in items] == ["a", "b"]
    np.testing.assert_array_equal(items[0].load_image(), a)  # PNG is lossless
    jpg = items[1].load_image()
    assert jpg.dtype == np.uint8 and jpg.shape == (8, 16, 3)
    np.testing.assert_array_equal(items[0].load_label(), la)
    np.testing.assert_array_equal(items[1].load_label(), lb)
    assert [it.stem for it in image_folder(imgs)] == ["a", "b"]
    for it in items:
        check_item_sizes(it)


def test_grey_and_rgba_images_become_rgb(tmp_path):
    Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L").save(tmp_path / "g.png")
    Image.fromarray(np.full((8, 8, 4), 9, np.uint8), mode="RGBA").save(tmp_path / "r.png")
    assert load_image(tmp_path / "g.png").shape == (8, 8, 3)
    assert load_image(tmp_path / "r.png")[0, 0].tolist() == [9, 9, 9]


def test_mismatched_stems_are_listed(folder):
    imgs, labs, *_ = folder
    _img(imgs / "c.png")
    _lab(labs / "z.png")
    with pytest.raises(
        ValueError, match=r"1 image\(s\) without a label: c.*1 label\(s\) without an image: z"
    ):
        image_folder(imgs, labs)
    assert [it.stem for it in image_folder(imgs, labs, strict=False)] == ["a", "b"]


def test_duplicate_stems_and_empty_folder(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="share the stem 'a'"):
        image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.png/\.jpg/\.jpeg images"):
        image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "missing")


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match=r"image not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")


def test_label_size_mismatch_is_reported(folder):
    imgs, labs, *_ = folder
    _lab(labs / "a.png", h=8, w=12)
    it = image_folder(imgs, labs)[0]
    with pytest.raises(
        ValueError, match=r"label map .*a\.png is 8 x 12 .* image .*a\.png is 8 x 16"
    ):
        check_item_sizes(it)
    with pytest.raises(ValueError, match=r"is 8 x 12 \(H x W\) but its image is 8 x 16"):
        it.load_label()
    np.save(labs / "b.npy", np.zeros((2, 8, 16), np.uint8))
    with pytest.raises(ValueError, match="expected a 2D"):
        load_label(labs / "b.npy")


def test_label_values_vs_model_classes(folder):
    _, labs, *_ = folder
    lab = load_label(labs / "a.png", num_classes=3)
    with pytest.raises(ValueError, match=r"values \[2\] are outside the model's 2 classes"):
        check_label_values(lab, 2, None, "a.png")
    check_label_values(lab, 2, 2, "a.png")  # 2 is the ignore label: fine
    with pytest.raises(ValueError, match="outside the model's 2 classes"):
        load_label(labs / "a.png", num_classes=2, ignore_index=255)


def test_aliases(tmp_path):
    assert is_alias("camvid:test") and not is_alias("other:test") and not is_alias(tmp_path)
    p, lab = resolve_images(tmp_path)
    assert p == tmp_path and lab is None
    with pytest.raises(FileNotFoundError, match="nor is it a dataset alias: camvid:train"):
        resolve_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        resolve_images("camvid:dev", tmp_path)
    with pytest.raises(FileNotFoundError, match="CamVid not found under"):
        resolve_images("camvid:test", tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        resolve_images("camvid:test", tmp_path / "missing")


def test_missing_data_root_says_what_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCAL_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="SEGCAL_DATA"):
        camvid_split(None, "test")


@pytest.mark.realdata
@pytest.mark.skipif(
    not HAVE_CAMVID, reason="CamVid not found (set SEGCAL_DATA to the shared data root)"
)
def test_camvid_splits():
    assert len(CAMVID_CLASSES) == 11
    test = camvid_split(ROOT, "test")
    assert len(test) == 233 and test[0].stem == "0001TP_008550"
    assert camvid_dir(ROOT / "camvid") == camvid_dir(ROOT)
    val = camvid_split(ROOT / "camvid", "val", check_sizes=False)
    assert len(val) == 101
    img, lab = val[0].load_image(), val[0].load_label()
    assert img.shape == (360, 480, 3) and lab.shape == (360, 480) and lab.max() <= 11
    with pytest.raises(ValueError, match="split must be one of"):
        camvid_split(ROOT, "trainval")


# ------------------------------------------------------------------------------------- NIfTI
try:
    import nibabel as nib
except ImportError:  # pragma: no cover - nibabel is in the test extras
    nib = None
needs_nibabel = pytest.mark.skipif(nib is None, reason="nibabel not installed (segcal[nifti])")


def _nii(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


@needs_nibabel
def test_nifti_roundtrip_and_pairs(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [5, 6, 7]
    img = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    lab = (np.arange(120).reshape(4, 5, 6) % 3).astype(np.float32)  # float labels, exact ints
    _nii(tmp_path / "im" / "c1.nii.gz", img, aff)
    _nii(tmp_path / "lb" / "c1.nii.gz", lab, aff)
    arr, a = load_nifti(tmp_path / "im" / "c1.nii.gz")
    np.testing.assert_array_equal(arr, img)
    np.testing.assert_allclose(a, aff)
    items = nifti_pairs(tmp_path / "im", tmp_path / "lb")
    assert [it.stem for it in items] == ["c1"]
    i2, l2, a2 = items[0].load()
    np.testing.assert_allclose(a2, aff)
    assert l2.dtype == np.int64 and l2.max() == 2 and i2.shape == (4, 5, 6)
    _nii(tmp_path / "im" / "c2.nii", img, aff)
    with pytest.raises(ValueError, match=r"1 image\(s\) without a label: c2"):
        nifti_pairs(tmp_path / "im", tmp_path / "lb")


@needs_nibabel
def test_nifti_errors(tmp_path):
    _nii(tmp_path / "v4.nii.gz", np.zeros((3, 4, 5, 2), np.float32))
    with pytest.raises(ValueError, match=r"shape \(3, 4, 5, 2\) \(4D\); expected a 3D volume"):
        load_nifti(tmp_path / "v4.nii.gz")
    assert load_nifti(tmp_path / "v4.nii.gz", ndim=None)[0].ndim == 4
    _nii(tmp_path / "img.nii.gz", np.zeros((3, 4, 5), np.float32))
    _nii(tmp_path / "lab_shape.nii.gz", np.zeros((3, 4, 6), np.uint8))
    shifted = np.eye(4)
    shifted[0, 3] = 10
    _nii(tmp_path / "lab_aff.nii.gz", np.zeros((3, 4, 5), np.uint8), shifted)
    with pytest.raises(ValueError, match=r"lab_shape\.nii\.gz has shape \(3, 4, 6\) but image"):
        load_nifti_pair(tmp_path / "img.nii.gz", tmp_path / "lab_shape.nii.gz")
    with pytest.raises(ValueError, match="different affines"):
        load_nifti_pair(tmp_path / "img.nii.gz", tmp_path / "lab_aff.nii.gz")
    _nii(tmp_path / "frac.nii.gz", np.full((3, 4, 5), 0.5, np.float32))
    with pytest.raises(ValueError, match="non-integer"):
        load_nifti_label(tmp_path / "frac.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cannot read NIfTI file .*junk\.nii\.gz"):
        load_nifti(tmp_path / "junk.nii.gz")
    with pytest.raises(ValueError, match="not a NIfTI file"):
        load_nifti(tmp_path / "x.png")


@needs_nibabel
def test_nifti_without_nibabel_gives_install_hint(tmp_path, monkeypatch):
    _nii(tmp_path / "v.nii.gz", np.zeros((2, 2, 2), np.float32))
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match=r"pip install 'segcal\[nifti\]'"):
        load_nifti(tmp_path / "v.nii.gz")


@needs_nibabel
@pytest.mark.realdata
@pytest.mark.skipif(not HAVE_MSD, reason="MSD hippocampus not found (set SEGCAL_DATA)")
def test_msd_hippocampus():
    items = msd_hippocampus(ROOT)
    assert len(items) == 260
    img, lab, aff = items[0].load()
    assert img.ndim == 3 and lab.shape == img.shape and set(np.unique(lab)) == {0, 1, 2}
    assert aff.shape == (4, 4)
