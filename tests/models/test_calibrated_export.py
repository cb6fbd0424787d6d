"""segcal.CalibratedModel: network + calibrator as one module, torch.export and ONNX (issue 19).

A tiny conv network (random weights, built from a config; no download) and every registered
calibrator fitted briefly on its outputs (labels: argmax with 30 % noise, so no fit degenerates).
The exported program, loaded back with ``torch.export.load``, must equal the eager module at two
batch sizes and two image sizes; the ONNX file run by onnxruntime too.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segcal
from segcal.calibrators import NotFittedError, available, create
from segcal.errors import InputError
from segcal.models import NOT_EXPORTABLE, NOT_ONNX_EXPORTABLE, CalibratedModel

C = 3
SIZES = [(2, 16, 16), (3, 24, 20)]  # (batch, H, W): two batch sizes, two image sizes
ATOL = 1e-5  # on probabilities
HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(
    not HAVE_ONNX, reason="onnx / onnxscript / onnxruntime not installed (pip install 'segcal[export]')"
)
#: brief fits (the numbers only need to be non-trivial, not good)
FIT_KW: dict[str, dict] = {
    "lts": {"max_steps": 3}, "ibts": {"max_steps": 3}, "lts_ti": {"max_steps": 3},
    "selective": {"selector_epochs": 1, "pixels_per_epoch": 1024, "t_grid": (0.5, 2.0)},
}


class TinyNet(nn.Module):
    """conv3x3 -> ReLU -> conv; ``stride`` 4 predicts at 1/4 resolution (SegFormer-style)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        conv = nn.Conv2d if config.get("dims", 2) == 2 else nn.Conv3d
        s = config.get("stride", 1)
        self.body = nn.Sequential(
            conv(config["in_channels"], config["width"], 3, padding=1), nn.ReLU(),
            conv(config["width"], config["num_classes"], s, stride=s),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * self.body(x)


def tiny(stride: int = 1, dims: int = 2, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet({"in_channels": 3, "width": 8, "num_classes": C, "stride": stride, "dims": dims})


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 16, 16, generator=g)
    with torch.no_grad():
        logits = tiny()(x)
    y = logits.argmax(1)
    noise = torch.rand(y.shape, generator=g) < 0.3
    y[noise] = torch.randint(0, C, y.shape, generator=g)[noise]
    return x, logits, y


@pytest.fixture(scope="module")
def fitted(data):
    x, logits, y = data
    cache: dict[str, object] = {}

    def get(name: str, **kw):
        key = f"{name}{sorted(kw.items())}"
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cal = create(name, **FIT_KW.get(name, {}), **kw)
                cal.fit(logits, y, images=x if kw.get("use_image") else None)
            cache[key] = cal
        return cache[key]

    return get


NAMES = [a["name"] for a in available()]


def test_the_export_tables_are_as_documented():
    """Every registered calibrator exports with torch.export; all but cmsop to ONNX (the table of
    docs/integrations.md). Changing either list must change this test and the table."""
    assert NOT_EXPORTABLE == {}
    assert sorted(NOT_ONNX_EXPORTABLE) == ["cmsop"]
    assert set(NOT_ONNX_EXPORTABLE) <= set(NAMES)
    assert segcal.CalibratedModel is CalibratedModel


@pytest.mark.parametrize("name", NAMES)
def test_exported_program_equals_eager(name, fitted, tmp_path):
    model = CalibratedModel(tiny(), fitted(name))
    path = tmp_path / f"{name}.pt2"
    model.export(path, torch.randn(2, 3, 16, 16))
    loaded = torch.export.load(path).module()
    g = torch.Generator().manual_seed(2)
    for n, h, w in SIZES:
        x = torch.randn(n, 3, h, w, generator=g)
        with torch.no_grad():
            ref = model(x)
            out = loaded(x)
        assert out.shape == (n, C, h, w)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        # and the module equals the calibrator applied to the network's logits
        with torch.no_grad():
            direct = fitted(name).predict_proba(model.model(x))
        torch.testing.assert_close(ref, direct, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_the_calibrator_itself_exports(name, fitted):
    """``torch.export.export(cal, ...)`` (issue 19: data-dependent guards for ts, cmsop, lts,
    selective): under torch.export ``Calibrator.forward`` runs the map without validation."""
    cal = fitted(name).eval()
    dyn = torch.export.Dim.DYNAMIC
    program = torch.export.export(cal, (torch.randn(2, C, 16, 16),),
                                  dynamic_shapes=({0: dyn, 2: dyn, 3: dyn},)).module()
    for n, h, w in SIZES:
        z = 3 * torch.randn(n, C, h, w)
        with torch.no_grad():
            torch.testing.assert_close(program(z), cal(z), atol=1e-5, rtol=1e-5)


@needs_onnx
@pytest.mark.parametrize("name", [n for n in NAMES if n not in NOT_ONNX_EXPORTABLE])
def test_onnxruntime_equals_eager(name, fitted, tmp_path):
    import onnxruntime

    model = CalibratedModel(tiny(), fitted(name))
    path = tmp_path / f"{name}.onnx"
    model.to_onnx(path, torch.randn(2, 3, 16, 16))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    for n, h, w in SIZES:
        x = torch.randn(n, 3, h, w, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {"x": x.numpy()})[0]
        assert out.shape == ref.shape
        assert abs(out - ref).max() < ATOL


def test_onnx_refuses_cmsop_with_the_reason(fitted, tmp_path):
    with pytest.raises(InputError, match="stable sort"):
        CalibratedModel(tiny(), fitted("cmsop")).to_onnx(tmp_path / "x.onnx", torch.randn(2, 3, 8, 8))


def test_eval_mode_and_no_grad(fitted, data):
    cal = fitted("selective")  # BatchNorm in its selector: eval mode matters
    cal.train()
    model = CalibratedModel(tiny(), cal)
    assert not model.training and not model.model.training and not cal.training
    assert not any(p.requires_grad for p in model.parameters())
    out = model(data[0][:2])
    assert not out.requires_grad
    torch.testing.assert_close(out.sum(1), torch.ones(2, 16, 16))


def test_logits_output_is_the_calibrators_output(fitted, data):
    x = data[0][:2]
    for name in ("ts", "histogram_binning"):
        cal = fitted(name)
        out = CalibratedModel(tiny(), cal, output="logits")(x)
        with torch.no_grad():
            torch.testing.assert_close(out, cal(tiny()(x)))


def test_quarter_resolution_logits_are_resized_bilinear(fitted, tmp_path):
    net = tiny(stride=4)
    cal = fitted("ts")
    model = CalibratedModel(net, cal)
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        low = net(x)
        assert low.shape[2:] == (4, 6)
        ref = cal.predict_proba(F.interpolate(low, size=(16, 24), mode="bilinear", align_corners=False))
        out = model(x)
    assert out.shape == (2, C, 16, 24)
    torch.testing.assert_close(out, ref)
    model.export(tmp_path / "q.pt2", x)
    loaded = torch.export.load(tmp_path / "q.pt2").module()
    for n, h, w in SIZES:
        x2 = torch.randn(n, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x2), model(x2), atol=ATOL, rtol=0)


class HFStyle(nn.Module):
    """Returns a mapping with quarter-resolution ``logits``, as transformers' SegFormer does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny(stride=4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def test_hugging_face_style_output_mapping_exports(fitted, tmp_path):
    hf = HFStyle()
    model = CalibratedModel(hf, fitted("dc"))
    model.export(tmp_path / "hf.pt2", torch.randn(2, 3, 16, 16))
    loaded = torch.export.load(tmp_path / "hf.pt2").module()
    x = torch.randn(3, 3, 24, 20)
    with torch.no_grad():
        ref = fitted("dc").predict_proba(F.interpolate(hf.net(x), size=(24, 20), mode="bilinear",
                                                       align_corners=False))
        torch.testing.assert_close(loaded(x), ref, atol=ATOL, rtol=0)


def test_3d_model_is_resized_trilinear(fitted):
    net = tiny(stride=2, dims=3)
    cal = fitted("vs")
    x = torch.randn(2, 3, 8, 8, 6)
    with torch.no_grad():
        ref = cal.predict_proba(F.interpolate(net(x), size=(8, 8, 6), mode="trilinear", align_corners=False))
        out = CalibratedModel(net, cal)(x)
    torch.testing.assert_close(out, ref)


def test_image_branch_gets_the_input_image(fitted, data, tmp_path):
    cal = fitted("lts", use_image=True)
    model = CalibratedModel(tiny(), cal)
    x = data[0][:2]
    with torch.no_grad():
        ref = cal.predict_proba(tiny()(x), image=x)
        torch.testing.assert_close(model(x), ref)
    model.export(tmp_path / "i.pt2", x)
    loaded = torch.export.load(tmp_path / "i.pt2").module()
    x2 = torch.randn(3, 3, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x2), model(x2), atol=ATOL, rtol=0)


def test_refused_inputs(fitted, data):
    with pytest.raises(NotFittedError):
        CalibratedModel(tiny(), create("ts"))
    with pytest.raises(InputError, match="output"):
        CalibratedModel(tiny(), fitted("ts"), output="labels")
    model = CalibratedModel(tiny(), fitted("ts"))
    with pytest.raises(InputError, match="batch size"):
        model.export_program(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="classes"):
        CalibratedModel(nn.Conv2d(3, 5, 1), fitted("ts"))(data[0][:2])


def test_the_example_of_docs_integrations_runs(tmp_path, monkeypatch):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    section = text.split("## Export", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/integrations.md", "exec"), {})
    assert (tmp_path / "model.pt2").is_file()
