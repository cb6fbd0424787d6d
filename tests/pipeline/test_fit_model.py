"""fit_from_model: the model in the loop of Calibrator.fit (issues 17 and 19).

Every fit is compared with an independent path: the same network's logits computed here (or
written by ``predict_folder``) and fitted with ``Calibrator.fit`` directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segcal.calibrators import FolderBatches, create
from segcal.errors import InputError
from segcal.io import PredictionFolder
from segcal.models import create_model, register_model, unregister_model
from segcal.pipeline.fit_model import (
    PerturbSpec,
    batch_preprocess,
    evaluate_model,
    fit_from_model,
    folder_items,
    folder_loader,
    model_batches,
    parse_perturb,
)
from segcal.pipeline.predict import predict_folder
from segcal.shift import CorruptionTransform

C, H, W = 4, 16, 20


class Net(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv (``stride`` 4: 1/4 resolution); ``mapping``: HF-style output."""

    def __init__(self, stride: int = 1, mapping: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, C, stride, stride=stride) if stride > 1 else nn.Conv2d(8, C, 1)
        self.mapping = mapping
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.b.weight.mul_(3)

    def forward(self, x):
        z = self.b(torch.relu(self.bn(self.a(x))))
        return {"logits": z, "hidden": None} if self.mapping else z


def data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] and labels: the network's argmax with 30 % replaced at random (so that no
    fit degenerates)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, H, W, generator=g)
    y = reference_logits(Net(), x).argmax(1)
    flip = torch.rand(n, H, W, generator=g) < 0.3
    y[flip] = torch.randint(0, C, (int(flip.sum()),), generator=g)
    return x, y


def loader(x, y, bs=2):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def reference_logits(net, x):
    net.eval()
    with torch.no_grad():
        out = net(x)
    z = out["logits"] if isinstance(out, dict) else out
    return F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False) if z.shape[-1] != W else z


def per_image(z, y, mask=None):
    """The same logits as fit receives them from a prediction folder: one batch per image."""
    if mask is None:
        return [(z[i : i + 1], y[i : i + 1]) for i in range(len(z))]
    return [(z[i : i + 1], y[i : i + 1], mask[i : i + 1]) for i in range(len(z))]


def params(cal):
    return torch.cat([p.detach().flatten() for p in cal.parameters()])


@pytest.mark.parametrize("method", ["ts", "vs"])
def test_equals_fit_on_the_same_logits(method):
    net = Net()
    net.train()  # fit_from_model must run it in eval mode (BatchNorm statistics) and restore train
    x, y = data()
    cal = fit_from_model(net, loader(x, y), method)
    assert net.training
    z = reference_logits(net, x)
    ref = create(method).fit(per_image(z, y))
    assert torch.allclose(params(cal), params(ref), atol=1e-6, rtol=1e-6)
    if method == "ts":  # one batch: other sums, the same optimum to L-BFGS's tolerance
        assert abs(cal.temperature - create("ts").fit(z, y).temperature) < 1e-4
    assert cal.fit_info["n_pixels"] == 6 * H * W
    assert cal.fit_info["fit_from_model"]["copies_per_image"] == 1


def test_ignore_index_and_mask():
    net = Net()
    x, y = data()
    y[:, :3] = 255
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[:, :, :2] = False
    batches = [{"pixel_values": x[i : i + 3], "labels": y[i : i + 3], "mask": mask[i : i + 3]} for i in (0, 3)]
    cal = fit_from_model(net, batches, "ts", ignore_index=255)
    ref = create("ts").fit(per_image(reference_logits(net, x), y, mask), ignore_index=255)
    assert abs(cal.temperature - ref.temperature) < 1e-6
    assert cal.fit_info["n_pixels"] == int(((y != 255) & mask).sum())
    with pytest.raises(ValueError, match="labels"):
        fit_from_model(net, batches, "ts")  # 255 is outside the 4 classes without ignore_index


def test_mapping_output_at_quarter_resolution():
    net = Net(stride=4, mapping=True)
    x, y = data()
    cal = fit_from_model(net, loader(x, y, 3), "vs")
    ref = create("vs").fit(per_image(reference_logits(net, x), y))
    assert torch.allclose(params(cal), params(ref), atol=1e-6, rtol=1e-6)
    first = next(model_batches(net, loader(x, y, 3)))
    assert first["scores"].shape == (1, C, H, W)


def test_streaming_over_the_memory_budget_runs_the_model_again():
    net = Net()
    x, y = data()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    cal = fit_from_model(net, loader(x, y), "ts", memory_budget=1000, optimizer="lbfgs", max_iter=10)
    assert cal.fit_info["mode"] == "streaming"
    assert len(calls) > 2 * 3  # more than the first read and one pass over 3 batches
    ref = create("ts", optimizer="lbfgs", max_iter=10).fit(per_image(reference_logits(net, x), y))
    assert ref.fit_info["mode"] == "in-memory"
    assert abs(cal.temperature - ref.temperature) < 1e-6
    with pytest.raises(ValueError, match="read once"):
        fit_from_model(net, iter(loader(x, y)), "ts", memory_budget=1000)


def test_val_loader_and_evaluate_model():
    net = Net()
    x, y = data(8)
    cal = fit_from_model(net, loader(x[:6], y[:6]), "ts", val_loader=loader(x[6:], y[6:]))
    ref = create("ts").fit(per_image(reference_logits(net, x[:6]), y[:6]),
                           val=per_image(reference_logits(net, x[6:]), y[6:]))
    assert abs(cal.temperature - ref.temperature) < 1e-6
    before, after = evaluate_model(net, loader(x[6:], y[6:]), cal)
    z = reference_logits(net, x[6:]).double()
    nll = F.cross_entropy(z, y[6:]).item()
    nll_after = F.cross_entropy(z / cal.temperature, y[6:]).item()
    assert before.compute()["nll"] == pytest.approx(nll, rel=1e-5)
    assert after.compute()["nll"] == pytest.approx(nll_after, rel=1e-5)


def test_perturb_doubles_the_data_with_the_predict_corruption():
    net = Net()
    x, y = data()
    stems = [f"im{i}" for i in range(6)]
    batches = [{"image": x[i : i + 2], "labels": y[i : i + 2], "stem": stems[i : i + 2]} for i in (0, 2, 4)]
    clean = fit_from_model(net, batches, "ts")
    cal = fit_from_model(net, batches, "ts", perturb="gaussian_noise:3")
    assert cal.fit_info["n_pixels"] == 2 * clean.fit_info["n_pixels"]
    info = cal.fit_info["fit_from_model"]["perturb"]
    assert info["perturbations"] == ["gaussian_noise:3"] and info["copies_per_image"] == 2
    # the perturbed copy is segcal predict's corruption of the 8-bit image, seeded by its stem
    q = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    noisy = np.stack([CorruptionTransform("gaussian_noise", 3, 0)(q[i], stems[i]) for i in range(6)])
    xn = torch.from_numpy(noisy).permute(0, 3, 1, 2).float() / 255
    zc, zn = reference_logits(net, x), reference_logits(net, xn)
    order = [(z[i : i + 1], y[i : i + 1]) for b in (0, 2, 4) for z in (zc, zn) for i in (b, b + 1)]
    ref = create("ts").fit(order)
    assert abs(cal.temperature - ref.temperature) < 1e-6
    assert abs(cal.temperature - clean.temperature) > 1e-3  # the noise changed the fit
    got = list(model_batches(net, batches, perturb=parse_perturb("gaussian_noise:3")))
    assert len(got) == 12 and torch.allclose(got[2]["scores"], zn[:1], atol=1e-6)


def test_perturb_sampling_is_seeded_per_image():
    spec = parse_perturb("gaussian_noise:1-5,contrast:3", sample=2, seed=7)
    assert spec.perturbations == (*(("gaussian_noise", s) for s in range(1, 6)), ("contrast", 3))
    assert spec.copies == 3
    picks = {s: spec.for_image(s) for s in ("a", "b", "c", "d", "e")}
    assert all(len(p) == 2 and len(set(p)) == 2 for p in picks.values())
    assert picks == {s: spec.for_image(s) for s in picks}  # deterministic
    assert len({tuple(p) for p in picks.values()}) > 1  # differs between images
    assert parse_perturb([("contrast", 3), "brightness:2"]).perturbations == (("contrast", 3), ("brightness", 2))
    assert parse_perturb("contrast").perturbations == tuple(("contrast", s) for s in range(1, 6))
    assert isinstance(parse_perturb(spec), PerturbSpec) and parse_perturb(None) is None
    net = Net()
    x, y = data(4)
    cal = fit_from_model(net, loader(x, y), "ts", perturb="contrast:1-3", perturb_sample=1)
    assert cal.fit_info["n_pixels"] == 2 * 4 * H * W


@pytest.mark.parametrize("spec, sample, match", [
    ("fog_machine:3", None, "unknown corruption 'fog_machine'"),
    ("gaussian_noise:7", None, "severity 1..5"),
    ("gaussian_noise:4-2", None, "severity 1..5"),
    ("gaussian_noise:x", None, "severity 1..5"),
    ("", None, "empty item"),
    ("contrast:3,contrast:3", None, "listed twice"),
    ("contrast:3", 2, "sample size"),
    ([("contrast", 9)], None, "severity 1..5"),
    ([3], None, "name:severity"),
])
def test_bad_perturb_spec_names_the_argument(spec, sample, match):
    with pytest.raises(InputError, match=match) as exc:
        parse_perturb(spec, sample=sample)
    assert str(exc.value).startswith("perturb:")
    with pytest.raises(InputError, match=r"^--perturb:"):
        parse_perturb(spec, sample=sample, name="--perturb")


def test_perturb_refuses_normalised_images():
    x, y = data(2)
    with pytest.raises(InputError, match=r"perturb: float images must be in \[0, 1\]"):
        fit_from_model(Net(), [(x * 4 - 2, y)], "ts", perturb="contrast:3")
    with pytest.raises(InputError, match="batch mapping needs the labels"):
        fit_from_model(Net(), [{"image": x}], "ts")


def test_equals_fit_on_the_folder_written_by_predict(tmp_path):
    """predict_folder (float32) + fit on the folder == fit_from_model over the same image files."""
    rng = np.random.default_rng(0)
    img_dir, lab_dir = tmp_path / "img", tmp_path / "lab"
    img_dir.mkdir()
    lab_dir.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img_dir / f"s{i}.png")
        Image.fromarray(rng.integers(0, C, (H, W), dtype=np.uint8)).save(lab_dir / f"s{i}.png")
    register_model("tiny-fit-model", lambda: Net(), num_classes=C, overwrite=True)
    try:
        lm = create_model("tiny-fit-model", device="cpu")
        predict_folder(lm, img_dir, tmp_path / "pred", labels=lab_dir, dtype="float32", progress=False)
        for method in ("ts", "ms"):
            ref = create(method).fit(FolderBatches(PredictionFolder(tmp_path / "pred", lab_dir)))
            items = folder_items(img_dir, lab_dir)
            cal = fit_from_model(lm.module, folder_loader(items, lm.preprocess, batch_size=4), method,
                                 preprocess=batch_preprocess(lm.preprocess))
            assert torch.allclose(params(cal), params(ref), atol=1e-6, rtol=1e-6), method
    finally:
        unregister_model("tiny-fit-model")
    with pytest.raises(InputError, match="--labels"):
        folder_items(img_dir)


def doc_example(heading: str) -> str:
    """The first Python block of a section of docs/integrations.md."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    assert text.count(f"\n{heading}") == 1, heading
    section = text.split(f"\n{heading}", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_example_of_docs_integrations_runs(capsys):
    exec(compile(doc_example("## Fitting from a model: `fit_from_model` and `segcal fit --model`"),
                 "docs/integrations.md", "exec"), {})
    assert "T perturbation-augmented" in capsys.readouterr().out
