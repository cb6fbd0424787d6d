"""``segcal predict`` and ``segcal.pipeline.predict.predict_folder``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segcal.cli import main
from segcal.data import data_root
from segcal.io import PredictionFolder, read_prediction
from segcal.models import create_model, register_model, unregister_model
from segcal.pipeline.predict import predict_folder

ROOT = data_root(required=False)
HAVE_REAL = (
    ROOT is not None
    and (ROOT / "camvid" / "test").is_dir()
    and (ROOT / "espnet" / "espnet_p_2_q_8_camvid.pth").is_file()
)


class Tiny(torch.nn.Module):
    """3 classes: logits = fixed 1x1 conv of the [0, 1] image (deterministic)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 4)
            self.conv.bias.copy_(torch.tensor([-2.0, -1.0, 0.0]))

    def forward(self, x):
        return self.conv(x)


@pytest.fixture
def tiny_model():
    register_model(
        "tiny-predict", Tiny, num_classes=3, class_names=["r", "g", "b"], ignore_index=255,
        description="test model",
    )  # fmt: skip
    yield "tiny-predict"
    unregister_model("tiny-predict")


@pytest.fixture
def synth(tmp_path):
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    imgs.mkdir()
    labs.mkdir()
    rng = np.random.default_rng(0)
    shapes = {"a": (8, 12), "b": (8, 12), "c": (6, 10), "d": (8, 12), "e": (8, 12)}
    for stem, (h, w) in shapes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / f"{stem}.png")
        lab = rng.integers(0, 3, (h, w)).astype(np.uint8)
        lab[0, 0] = 255
        Image.fromarray(lab, mode="L").save(labs / f"{stem}.png")
    return imgs, labs, shapes


def test_predict_cli_custom_model(tiny_model, synth, tmp_path, capsys):
    imgs, labs, shapes = synth
    out = tmp_path / "pred"
    rc = main(["predict", "--model", tiny_model, "--images", str(imgs), "--labels", str(labs),
               "--out", str(out), "--batch-size", "2", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "wrote 5 predictions" in capsys.readouterr().err
    meta = json.loads((out / "segcal.json").read_text())
    assert meta["input_type"] == "logits" and meta["num_classes"] == 3
    assert meta["class_names"] == ["r", "g", "b"] and meta["ignore_index"] == 255
    assert meta["model"] == tiny_model and meta["n_images"] == 5
    for stem, (h, w) in shapes.items():
        arr, _ = read_prediction(out / f"{stem}.npy")
        assert arr.dtype == np.float16 and arr.shape == (3, h, w)
        img = np.asarray(Image.open(imgs / f"{stem}.png").convert("RGB"), np.float32) / 255
        expect = img.transpose(2, 0, 1) * 4 + np.array([-2, -1, 0], np.float32)[:, None, None]
        np.testing.assert_allclose(arr.astype(np.float32), expect, atol=1e-2)
    # the folder reads back with the io layer, paired with its labels
    pf = PredictionFolder(out, labs)
    assert pf.stems == sorted(shapes) and pf.input_type_of(None) == "logits"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_predict_folder_transform_hook_and_limit(tiny_model, synth, tmp_path):
    imgs, _, _ = synth
    seen = []

    def invert(image, stem):
        seen.append(stem)
        return 255 - image

    res = predict_folder(tiny_model, imgs, tmp_path / "p", transform=invert, limit=3,
                         progress=False, dtype="float32")  # fmt: skip
    assert res.stems == ["a", "b", "c"] == seen and res.images_per_s > 0
    arr = np.load(tmp_path / "p" / "a.npy")
    assert arr.dtype == np.float32
    img = 255 - np.asarray(Image.open(imgs / "a.png").convert("RGB"), np.float32)
    np.testing.assert_allclose(arr[0], img[..., 0] / 255 * 4 - 2, atol=1e-5)
    assert json.loads((tmp_path / "p" / "segcal.json").read_text())["transform"] == "invert"

    with pytest.raises(ValueError, match="transform: for 'a' it returned float64"):
        predict_folder(tiny_model, imgs, tmp_path / "q", transform=lambda im, s: im / 2.0,
                       progress=False)  # fmt: skip


def test_predict_rejects_labels_outside_model_classes(tiny_model, synth, tmp_path, capsys):
    imgs, labs, _ = synth
    bad = np.full((8, 12), 7, np.uint8)
    Image.fromarray(bad, mode="L").save(labs / "b.png")
    rc = main(["predict", "--model", tiny_model, "--images", str(imgs), "--labels", str(labs),
               "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "values [7] are outside the model's 3 classes" in err and "b.png" in err


def test_predict_errors(tiny_model, synth, tmp_path, capsys):
    imgs, labs, _ = synth
    assert (
        main(["predict", "--model", "nope", "--images", str(imgs), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "available models:" in capsys.readouterr().err
    assert main(["predict", "--model", tiny_model]) == 2
    assert "missing required argument(s): --images, --out" in capsys.readouterr().err
    (labs / "a.png").unlink()
    assert main(["predict", "--model", tiny_model, "--images", str(imgs), "--labels", str(labs),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "1 image(s) without a label: a" in capsys.readouterr().err
    # a folder holding another model's predictions is not silently mixed
    out = tmp_path / "mixed"
    predict_folder(tiny_model, imgs, out, limit=1, progress=False)
    register_model("tiny-other", Tiny, num_classes=3)
    try:
        with pytest.raises(ValueError, match="already holds predictions of model 'tiny-predict'"):
            predict_folder("tiny-other", imgs, out, limit=1, progress=False)
        predict_folder("tiny-other", imgs, out, limit=1, progress=False, overwrite=True)
    finally:
        unregister_model("tiny-other")
    assert main(["predict", "--list-models"]) == 0
    assert "espnet-camvid\t12 classes" in capsys.readouterr().out


def _adapt_checkpoint(path, state_dict, model_name):
    """A minimal ``segcal adapt`` epoch checkpoint (the fields ``load_adapted`` reads)."""
    from segcal.adaptation import CHECKPOINT_FORMAT

    torch.save({"format": CHECKPOINT_FORMAT, "method": "tent", "epoch": 2, "round": 0, "phase": "tent",
                "estimated_ece": 0.1, "config": {}, "state_dict": state_dict,
                "log": json.dumps({"model": model_name})}, path)  # fmt: skip
    return path


def test_predict_with_adaptation_checkpoint(tiny_model, synth, tmp_path, capsys):
    from segcal.models import ClassMapping, MappedModel

    imgs, _, _ = synth
    adapted = Tiny()
    with torch.no_grad():
        adapted.conv.bias.copy_(torch.tensor([3.0, 0.5, -1.0]))
    ck = _adapt_checkpoint(tmp_path / "epoch_002.pt", adapted.state_dict(), tiny_model)
    out = tmp_path / "pred"
    rc = main(["predict", "--model", tiny_model, "--images", str(imgs), "--out", str(out), "--checkpoint",
               str(ck), "--device", "cpu", "--no-progress", "--dtype", "float32"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"loaded tent checkpoint (epoch 2) of adapted {tiny_model}" in err
    img = np.asarray(Image.open(imgs / "a.png").convert("RGB"), np.float32) / 255
    expect = img.transpose(2, 0, 1) * 4 + np.array([3.0, 0.5, -1.0], np.float32)[:, None, None]
    np.testing.assert_allclose(np.load(out / "a.npy"), expect, atol=1e-5)

    # a mapped model receives the adapted weights of the model it maps (module.model)
    register_model("tiny-mapped", lambda: MappedModel(Tiny(), ClassMapping(((0,), (1, 2)), 3)), num_classes=2)
    try:
        rc = main(["predict", "--model", "tiny-mapped", "--images", str(imgs), "--out", str(tmp_path / "m"),
                   "--checkpoint", str(ck), "--device", "cpu", "--no-progress", "--dtype", "float32"])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        m = np.load(tmp_path / "m" / "a.npy")
        np.testing.assert_allclose(m[0], expect[0], atol=1e-5)
        np.testing.assert_allclose(m[1], np.logaddexp(expect[1], expect[2]), atol=1e-5)
    finally:
        unregister_model("tiny-mapped")

    # weights of another architecture, and a file that is not an adaptation checkpoint: clear errors
    bad = _adapt_checkpoint(tmp_path / "bad.pt", {"conv.weight": torch.zeros(5, 3, 1, 1)}, "other-model")
    rc = main(["predict", "--model", tiny_model, "--images", str(imgs), "--out", str(tmp_path / "b"),
               "--checkpoint", str(bad), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "adapted 'other-model' does not fit model 'tiny-predict'" in err
    torch.save({"state_dict": adapted.state_dict()}, tmp_path / "plain.pt")
    rc = main(["predict", "--model", tiny_model, "--images", str(imgs), "--out", str(tmp_path / "c"),
               "--checkpoint", str(tmp_path / "plain.pt"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "not a segcal adaptation checkpoint" in capsys.readouterr().err


def test_predict_corruption_hook(tiny_model, synth, tmp_path, capsys):
    from segcal.shift import make_transform

    imgs, _, _ = synth
    rc = main(["predict", "--model", tiny_model, "--images", str(imgs), "--out", str(tmp_path / "p"),
               "--corruption", "gaussian_noise", "--severity", "5", "--seed", "3", "--no-progress",
               "--dtype", "float32"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    img = np.asarray(Image.open(imgs / "a.png").convert("RGB"))
    noisy = make_transform("gaussian_noise", 5, 3)(img, "a").astype(np.float32) / 255
    np.testing.assert_allclose(np.load(tmp_path / "p" / "a.npy")[0], noisy[..., 0] * 4 - 2, atol=1e-5)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL, reason="CamVid / ESPNet weights not found (set SEGCAL_DATA)")
def test_predict_real_camvid(tmp_path, capsys):
    out = tmp_path / "camvid"
    rc = main(["predict", "--model", "espnet-camvid", "--images", "camvid:test", "--limit", "2",
               "--out", str(out), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    files = sorted(p.name for p in out.glob("*.npy"))
    assert files == ["0001TP_008550.npy", "0001TP_008580.npy"]
    meta = json.loads((out / "segcal.json").read_text())
    assert meta["num_classes"] == 12 and meta["ignore_index"] == 11
    assert meta["class_names"][0] == "Sky" and meta["labels"].endswith("testannot")
    arr = np.load(out / files[0])
    assert arr.dtype == np.float16 and arr.shape == (12, 360, 480)
    # float16 storage of the float32 logits (README fingerprint pixel)
    np.testing.assert_allclose(
        arr[:, 100, 200].astype(np.float32)[:3], [7.79244, -0.35366, 1.00628], atol=1e-2
    )
    # the mapped Cityscapes model: 11 CamVid logits
    lm = create_model("espnet-cityscapes-camvid", device="cpu")
    res = predict_folder(lm, "camvid:val", tmp_path / "cs", limit=1, progress=False)
    assert res.num_classes == 11
    assert np.load(tmp_path / "cs" / f"{res.stems[0]}.npy").shape == (11, 360, 480)
