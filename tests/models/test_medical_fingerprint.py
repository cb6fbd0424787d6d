"""Fingerprint of the committed 3D U-Net weights: every later figure must come from this model.

Expected values were computed once with the committed weights (``python`` + torch 2.13 CPU, MONAI
1.6.1, 2 threads) through ``predict_logits`` (normalise, pad to a multiple of 8, run, crop back).
Tolerance about 1e-4 per logit; across 1 vs 2 threads the values differ by < 2e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("monai")
pytest.importorskip("nibabel")

from segcal.data import data_root
from segcal.datasets.hippocampus import load_nifti, load_split
from segcal.models.unet3d import WEIGHTS_FILE, load_unet3d_hippocampus
from segcal.pipeline.predict import logits_fingerprint, predict_logits, weights_sha256

WEIGHTS_SHA256 = "aa06d43f93bbbb3c2bbad6ecc792065f2b19345079fd0778432341aa95c3c8b8"
EXPECTED = {
    "hippocampus_014": {
        "shape": [
            3,
            39,
            50,
            40
        ],
        "sum": -193808.77230287716,
        "class_mean": [
            4.551674397685828,
            -3.7538186233629447,
            -3.2825836243597695
        ],
        "voxels": {
            "0,0,0": [
                3.6744236946105957,
                -2.194737195968628,
                -2.460756778717041
            ],
            "10,20,10": [
                5.3895344734191895,
                -4.685233116149902,
                -3.8080434799194336
            ],
            "17,25,17": [
                -1.3989894390106201,
                -4.582643032073975,
                9.014388084411621
            ]
        },
        "argmax_hist": [
            73966,
            2141,
            1893
        ]
    },
    "hippocampus_023": {
        "shape": [
            3,
            35,
            51,
            35
        ],
        "sum": -156666.6099927444,
        "class_mean": [
            4.6221450095035195,
            -3.8520776567374075,
            -3.277736180180989
        ],
        "voxels": {
            "0,0,0": [
                4.265590667724609,
                -4.7725090980529785,
                -1.5987690687179565
            ],
            "10,20,10": [
                5.430737018585205,
                -4.8162031173706055,
                -4.547301292419434
            ],
            "17,25,17": [
                2.247694492340088,
                -6.354113578796387,
                3.210651397705078
            ]
        },
        "argmax_hist": [
            58549,
            1981,
            1945
        ]
    },
    "synthetic": {
        "shape": [
            3,
            35,
            51,
            35
        ],
        "sum": -158862.89929697756,
        "class_mean": [
            4.781507953454424,
            -4.121717770705704,
            -3.202613700907625
        ],
        "voxels": {
            "0,0,0": [
                3.081603765487671,
                -4.805319786071777,
                0.29506245255470276
            ],
            "10,20,10": [
                6.42116641998291,
                -7.676100730895996,
                -3.069807767868042
            ],
            "17,25,17": [
                5.391778945922852,
                -6.8019328117370605,
                -3.4704787731170654
            ]
        },
        "argmax_hist": [
            60959,
            871,
            645
        ]
    }
}


@pytest.fixture(scope="module")
def model():
    return load_unet3d_hippocampus()


def _check(fp, exp):
    assert fp["shape"] == exp["shape"]
    n = int(np.prod(exp["shape"]))
    assert fp["sum"] == pytest.approx(exp["sum"], abs=1e-4 * n / 10)
    np.testing.assert_allclose(fp["class_mean"], exp["class_mean"], atol=1e-4)
    for v, vals in exp["voxels"].items():
        np.testing.assert_allclose(fp["voxels"][v], vals, atol=1e-4, err_msg=f"voxel {v}")
    # argmax may flip only at exact near-ties: allow a couple of voxels
    np.testing.assert_allclose(fp["argmax_hist"], exp["argmax_hist"], atol=3)


def test_committed_weights_are_the_fingerprinted_ones():
    assert weights_sha256(WEIGHTS_FILE) == WEIGHTS_SHA256
    assert WEIGHTS_FILE.stat().st_size < 10 * 2**20


def test_fingerprint_synthetic_volume(model):
    rng = np.random.default_rng(0)
    vol = (rng.normal(size=(35, 51, 35)) * 100 + 500).astype(np.float32)
    _check(logits_fingerprint(predict_logits(model, vol)), EXPECTED["synthetic"])


@pytest.mark.realdata
@pytest.mark.parametrize("case", ["hippocampus_014", "hippocampus_023"])
def test_fingerprint_real_test_cases(model, case):
    assert case in load_split()["test"]
    root = data_root(required=False)
    p = None if root is None else root / "msd_task04_hippocampus" / "imagesTr" / f"{case}.nii.gz"
    if p is None or not p.is_file():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    img, _ = load_nifti(p)
    _check(logits_fingerprint(predict_logits(model, img)), EXPECTED[case])


@pytest.mark.realdata
@pytest.mark.slow
def test_segcal_predict_cli_on_hippocampus_volumes(tmp_path, model):
    """``segcal predict --model unet3d-hippocampus`` writes NIfTI-aligned logits that match the
    fingerprinted model output and evaluate against the labels with ``segcal eval``."""
    import json
    import shutil

    from segcal.cli import main
    from segcal.io import read_prediction

    root = data_root(required=False)
    base = None if root is None else root / "msd_task04_hippocampus"
    if base is None or not base.is_dir():
        pytest.skip("MSD hippocampus not found: set SEGCAL_DATA or provide ../shared/data")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for case in ("hippocampus_014", "hippocampus_023"):
        shutil.copy(base / "imagesTr" / f"{case}.nii.gz", images)
        shutil.copy(base / "labelsTr" / f"{case}.nii.gz", labels)
    out = tmp_path / "pred"
    assert main(["predict", "--model", "unet3d-hippocampus", "--images", str(images), "--out", str(out),
                 "--no-progress", "--dtype", "float32"]) == 0
    arr, _ = read_prediction(out / "hippocampus_014.npy")
    img, _ = load_nifti(images / "hippocampus_014.nii.gz")
    assert arr.shape == (3, *img.shape)
    _check(logits_fingerprint(np.asarray(arr)), EXPECTED["hippocampus_014"])
    js = tmp_path / "m.json"
    assert main(["eval", "--pred", str(out), "--labels", str(labels), "--no-progress", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["accuracy"] > 0.97
