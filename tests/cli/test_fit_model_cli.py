"""``segcal fit --model NAME --images ... [--perturb SPEC]`` and ``--extra-pred DIR`` (issues 17, 19).

A tiny registered model (random weights, no data) for the command-line behaviour and the errors
(exit code 2, one line naming the argument: the style of ``tests/cli/test_fuzz_cli.py``), and the
real ESPNet on four CamVid validation images: ``fit --model --perturb`` equals ``segcal predict``
(clean and corrupted) + ``fit --pred --extra-pred``.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import segcal
from segcal.cli import main
from segcal.data import data_root
from segcal.models import register_model, unregister_model

C, H, W = 3, 8, 10
MODEL = "tiny-fit-cli"
ROOT = data_root(required=False)
HAVE_REAL = (ROOT is not None and (ROOT / "camvid" / "val").is_dir()
             and (ROOT / "espnet" / "espnet_p_2_q_8_camvid.pth").is_file())


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, C, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * 4


@pytest.fixture(autouse=True)
def tiny_model():
    register_model(MODEL, Tiny, num_classes=C, overwrite=True)
    yield
    unregister_model(MODEL)


def make_images(root: Path, n: int = 4, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    img, lab = root / "img", root / "lab"
    img.mkdir()
    lab.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img / f"im{i}.png")
        Image.fromarray(rng.integers(0, C, (H, W), dtype=np.uint8)).save(lab / f"im{i}.png")
    return {"root": root, "img": img, "lab": lab}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse: usage + error, exit code 2
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def assert_clear_error(rc: int, err: str, needle: str) -> None:
    assert rc == 2, f"exit {rc}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err}"
    assert lines[0].startswith("segcal fit: error: "), lines[0]
    assert needle in lines[0], f"{needle!r} not named in: {lines[0]}"
    assert "Traceback" not in err


def model_argv(s: dict[str, Path], *extra: str) -> list[str]:
    return ["fit", "--model", MODEL, "--images", str(s["img"]), "--labels", str(s["lab"]), "--method", "ts",
            "--out", str(s["root"] / "cal.pt"), "--no-progress", "--val-fraction", "0.25", *extra]


def test_fit_model_equals_predict_then_fit_pred(tmp_path):
    s = make_images(tmp_path)
    for out, extra in (("P", []), ("PN", ["--corruption", "contrast", "--severity", "2"])):
        rc, _, err = run_cli(["predict", "--model", MODEL, "--images", str(s["img"]), "--labels", str(s["lab"]),
                              "--out", str(tmp_path / out), "--dtype", "float32", "--no-progress", *extra])
        assert rc == 0, err
    rc, out_pred, err = run_cli(["fit", "--pred", str(tmp_path / "P"), "--labels", str(s["lab"]), "--extra-pred",
                                 str(tmp_path / "PN"), "--method", "ts", "--out", str(tmp_path / "a.pt"),
                                 "--no-progress", "--val-fraction", "0.25"])
    assert rc == 0, err
    rc, out_model, err = run_cli(model_argv(s, "--perturb", "contrast:2", "--json", str(tmp_path / "b.json")))
    assert rc == 0, err
    a, b = segcal.load(tmp_path / "a.pt"), segcal.load(tmp_path / "cal.pt")
    assert abs(a.temperature - b.temperature) < 1e-6
    assert a.fit_info["n_pixels"] == b.fit_info["n_pixels"] == 2 * 3 * H * W
    assert b.fit_info["fit_from_model"]["perturb"]["perturbations"] == ["contrast:2"]
    assert b.fit_info["model"]["name"] == MODEL and a.fit_info["extra_pred"] == [str(tmp_path / "PN")]
    table = lambda text: text.split("metrics on the", 1)[1]  # noqa: E731
    assert table(out_pred) == table(out_model)  # the same clean validation image, the same numbers
    # without --perturb: the clean fit, as fit --pred alone
    rc, _, err = run_cli(["fit", "--pred", str(tmp_path / "P"), "--labels", str(s["lab"]), "--method", "ts",
                          "--out", str(tmp_path / "c.pt"), "--no-progress", "--val-fraction", "0.25"])
    assert rc == 0, err
    rc, _, err = run_cli(model_argv(s))
    assert rc == 0, err
    assert abs(segcal.load(tmp_path / "c.pt").temperature - segcal.load(tmp_path / "cal.pt").temperature) < 1e-6


def test_perturb_sample_and_seed(tmp_path):
    s = make_images(tmp_path)
    rc, out, err = run_cli(model_argv(s, "--perturb", "contrast:1-3,brightness:2", "--perturb-sample", "2",
                                      "--perturb-seed", "3"))
    assert rc == 0, err
    cal = segcal.load(tmp_path / "cal.pt")
    assert cal.fit_info["n_pixels"] == 3 * 3 * H * W  # 3 fit images, each clean + 2 perturbed
    assert cal.fit_info["fit_from_model"]["perturb"]["sampling"] == "2 per image"
    assert "under 2 perturbation(s)" in out


@pytest.mark.parametrize("extra, needle", [
    (["--pred", "P"], "--pred and --model"),
    (["--perturb", "fog_machine:3"], "--perturb: unknown corruption 'fog_machine'"),
    (["--perturb", "contrast:9"], "--perturb"),
    (["--perturb", "contrast:3", "--perturb-sample", "2"], "--perturb: the sample size"),
    (["--perturb-sample", "1"], "--perturb"),
    (["--extra-pred", "P"], "--extra-pred: goes with --pred"),
    (["--batch-size", "0"], "--batch-size"),
    (["--perturb-seed", "-1", "--perturb", "contrast:1"], "--perturb: the seed"),
])
def test_model_mode_errors(tmp_path, extra, needle):
    s = make_images(tmp_path)
    rc, _, err = run_cli(model_argv(s, *extra))
    assert_clear_error(rc, err, needle)
    assert not (tmp_path / "cal.pt").exists()


def test_other_errors(tmp_path):
    s = make_images(tmp_path)
    out = str(tmp_path / "cal.pt")
    cases = [
        (["fit", "--method", "ts", "--out", out], "--pred (a prediction folder) or --model"),
        (["fit", "--model", MODEL, "--labels", str(s["lab"]), "--method", "ts", "--out", out], "--images"),
        (["fit", "--model", MODEL, "--images", str(s["img"]), "--method", "ts", "--out", out], "--labels"),
        (["fit", "--model", "no-such-model", "--images", str(s["img"]), "--labels", str(s["lab"]), "--method", "ts",
          "--out", out], "unknown model 'no-such-model'"),
        (["fit", "--model", "unet3d-hippocampus", "--images", str(s["img"]), "--method", "ts", "--out", out],
         "segcal fit --pred"),
        ([*model_argv(s), "--out", str(s["img"] / "x.pt")], "--out"),
        (["fit", "--pred", str(s["img"]), "--method", "ts", "--out", out], "--labels"),
        (["fit", "--pred", str(s["img"]), "--labels", str(s["lab"]), "--perturb", "contrast:3", "--method", "ts",
          "--out", out], "--perturb: goes with --model"),
    ]
    for argv, needle in cases:
        rc, _, err = run_cli(argv)
        assert_clear_error(rc, err, needle)
    # labels outside the model's classes: the file and --ignore-index are named
    bad = np.zeros((H, W), np.uint8)
    bad[:2] = 7
    Image.fromarray(bad).save(s["lab"] / "im2.png")
    rc, _, err = run_cli(model_argv(s))
    assert_clear_error(rc, err, "im2.png")
    assert "--ignore-index" in err
    rc, _, err = run_cli(model_argv(s, "--ignore-index", "7"))
    assert rc == 0, err


def test_extra_pred_errors(tmp_path):
    s = make_images(tmp_path)
    rc, _, err = run_cli(["predict", "--model", MODEL, "--images", str(s["img"]), "--out", str(tmp_path / "P"),
                          "--no-progress"])
    assert rc == 0, err
    extra = tmp_path / "PX"
    extra.mkdir()
    np.save(extra / "im0.npy", np.zeros((C, H, W), np.float32))  # im1..im3 missing
    base = ["fit", "--pred", str(tmp_path / "P"), "--labels", str(s["lab"]), "--method", "ts", "--out",
            str(tmp_path / "cal.pt"), "--no-progress"]
    rc, _, err = run_cli([*base, "--extra-pred", str(extra)])
    assert_clear_error(rc, err, f"--extra-pred {extra}")
    assert "im1" in err
    rc, _, err = run_cli([*base, "--extra-pred", str(tmp_path / "P"), "--out", str(tmp_path / "P" / "x.pt")])
    assert_clear_error(rc, err, "--out")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(st.sampled_from([
    "--perturb", "contrast:2", "gaussian_noise:0", "all:9", ",", "--perturb-sample", "1", "0", "--perturb-seed",
    "-3", "--extra-pred", "--checkpoint", "--batch-size", "--pred", "--model", MODEL, "--labels",
]), max_size=5))
def test_random_flag_combinations(flags):
    with tempfile.TemporaryDirectory() as d:
        s = make_images(Path(d), n=2)
        rc, _, err = run_cli(model_argv(s, "--max-iter", "3") + flags)
        assert rc in (0, 2), f"exit {rc}: {err}"
        assert "Traceback" not in err
        if rc == 2 and not err.startswith("usage:"):
            assert err.strip().count("\n") == 0 and err.startswith("segcal fit: error: "), err


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL, reason="needs CamVid and the ESPNet weights under the data root")
def test_espnet_camvid_four_val_images(tmp_path):
    """fit --model espnet-camvid --perturb == predict (clean, gaussian noise 3) + fit --pred --extra-pred."""
    img, lab = tmp_path / "img", tmp_path / "lab"
    img.mkdir()
    lab.mkdir()
    for f in sorted((ROOT / "camvid" / "val").iterdir())[:4]:
        (img / f.name).symlink_to(f)
        (lab / f.name).symlink_to(ROOT / "camvid" / "valannot" / f.name)
    for out, extra in (("P", []), ("PN", ["--corruption", "gaussian_noise", "--severity", "3"])):
        rc, _, err = run_cli(["predict", "--model", "espnet-camvid", "--images", str(img), "--labels", str(lab),
                              "--out", str(tmp_path / out), "--dtype", "float32", "--no-progress", *extra])
        assert rc == 0, err
    common = ["--method", "ts", "--ignore-index", "11", "--val-fraction", "0.25", "--no-progress"]
    rc, out_pred, err = run_cli(["fit", "--pred", str(tmp_path / "P"), "--labels", str(lab), "--extra-pred",
                                 str(tmp_path / "PN"), "--out", str(tmp_path / "a.pt"), *common])
    assert rc == 0, err
    rc, out_model, err = run_cli(["fit", "--model", "espnet-camvid", "--images", str(img), "--labels", str(lab),
                                  "--perturb", "gaussian_noise:3", "--out", str(tmp_path / "b.pt"), *common])
    assert rc == 0, err
    a, b = segcal.load(tmp_path / "a.pt"), segcal.load(tmp_path / "b.pt")
    assert abs(a.temperature - b.temperature) < 1e-6
    assert a.fit_info["n_pixels"] == b.fit_info["n_pixels"]
    assert out_pred.split("metrics on the", 1)[1] == out_model.split("metrics on the", 1)[1]
