"""``segcal export``: a registered model + a calibrator file -> .pt2 / .onnx (issue 19)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from segcal.calibrators import create
from segcal.cli import main
from segcal.models import CalibratedModel, create_model, register_model, unregister_model

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


class Quarter(nn.Module):
    """Predicts 3 classes at 1/4 resolution (SegFormer-style)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 4, stride=4)

    def forward(self, x):
        return self.conv(x)


class FixedSize(Quarter):
    """Code that fixes the image size (like ESPNet): a Python int taken from the input's shape."""

    def forward(self, x):
        return self.conv(x).reshape(x.shape[0], 3, int(x.shape[2]) // 4, int(x.shape[3]) // 4)


@pytest.fixture
def models():
    register_model("tiny-quarter", Quarter, num_classes=3)
    register_model("tiny-fixed", FixedSize, num_classes=3)
    yield
    unregister_model("tiny-quarter")
    unregister_model("tiny-fixed")


@pytest.fixture
def cal_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, generator=g) * 2
    labels = torch.randint(0, 3, (4, 8, 8), generator=g)
    path = tmp_path / "cal.pt"
    create("ts").fit(logits, labels).save(path)
    return path


def _eager(name, cal_file, output="probs"):
    from segcal import load

    return CalibratedModel(create_model(name, device="cpu", channels_last=False).module,
                           load(cal_file), output=output)


def test_export_pt2_equals_eager(models, cal_file, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    assert main(["export", "--model", "tiny-quarter", "--calibrator", str(cal_file), "--out", str(out),
                 "--example-shape", "2,3,16,16"]) == 0
    assert "dynamic batch and spatial sizes" in capsys.readouterr().err
    loaded = torch.export.load(out).module()
    eager = _eager("tiny-quarter", cal_file)
    for shape in [(2, 3, 16, 16), (3, 3, 24, 20)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), eager(x), atol=1e-6, rtol=0)


def test_export_falls_back_to_a_dynamic_batch_when_the_model_fixes_the_size(models, cal_file, tmp_path,
                                                                            capsys):
    out = tmp_path / "model.pt2"
    assert main(["export", "--model", "tiny-fixed", "--calibrator", str(cal_file), "--out", str(out),
                 "--example-shape", "2,3,16,16", "--output", "logits"]) == 0
    assert "fixes the image size" in capsys.readouterr().err
    loaded = torch.export.load(out).module()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _eager("tiny-fixed", cal_file, "logits")(x), atol=1e-6, rtol=0)
    # --dynamic all refuses with the way out
    assert main(["export", "--model", "tiny-fixed", "--calibrator", str(cal_file), "--out", str(out),
                 "--example-shape", "2,3,16,16", "--dynamic", "all"]) == 2
    assert "--dynamic batch" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_ONNX, reason="onnx / onnxscript / onnxruntime not installed "
                    "(pip install 'segcal[export]')")
def test_export_onnx_runs_in_onnxruntime(models, cal_file, tmp_path):
    import onnxruntime

    out = tmp_path / "model.onnx"
    assert main(["export", "--model", "tiny-quarter", "--calibrator", str(cal_file), "--out", str(out),
                 "--example-shape", "2,3,16,16"]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 24, 20)
    with torch.no_grad():
        ref = _eager("tiny-quarter", cal_file)(x).numpy()
    assert abs(session.run(None, {"x": x.numpy()})[0] - ref).max() < 1e-5


def test_export_refuses_bad_input(models, cal_file, tmp_path, capsys):
    base = ["export", "--model", "tiny-quarter", "--calibrator", str(cal_file)]
    cases = [
        (["--out", str(tmp_path / "m.zip")], "expected .pt2"),
        (["--out", str(tmp_path / "m.pt2"), "--example-shape", "2,3"], "--example-shape"),
        (["--out", str(tmp_path / "m.pt2"), "--example-shape", "1,3,16,16"], "batch size"),
        (["--out", str(cal_file.with_suffix(".pt2")), "--model", "nope"], "unknown model"),
        (["--out", str(tmp_path / "folder.pt2")], "folder"),
    ]
    (tmp_path / "folder.pt2").mkdir()
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        assert msg in capsys.readouterr().err
    four = tmp_path / "cal4.pt"
    create("ts").fit(torch.randn(2, 4, 4, 4), torch.randint(0, 4, (2, 4, 4))).save(four)
    assert main(["export", "--model", "tiny-quarter", "--calibrator", str(four),
                 "--out", str(tmp_path / "m.pt2")]) == 2
    assert "4 classes" in capsys.readouterr().err
    assert main(["export", "--model", "tiny-quarter", "--out", str(tmp_path / "m.pt2")]) == 2
    assert "--calibrator" in capsys.readouterr().err
