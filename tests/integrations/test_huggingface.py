"""segcal.integrations.huggingface: transformers segmentation outputs -> per-pixel scores (issue 19).

Tiny models built from configs with random weights (no download, ``HF_HUB_OFFLINE=1``). Scores are
checked against ``transformers``' own ``post_process_semantic_segmentation`` (its scores and its
semantic map), and the calibrated model / fit against the same computation done here by hand.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segcal
from segcal.calibrators import create
from segcal.errors import InputError
from segcal.integrations.huggingface import (
    HFSegmentationModel,
    hf_scores,
    mask_classification_scores,
)
from segcal.pipeline.fit_model import fit_from_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="pip install 'segcal[huggingface]'")

C = 4


def segformer() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=C, hidden_sizes=[8, 16, 16, 16], decoder_hidden_size=16,
                                       depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1])
    return transformers.SegformerForSemanticSegmentation(cfg).eval()


def upernet() -> nn.Module:
    torch.manual_seed(0)
    bb = transformers.ConvNextConfig(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.UperNetConfig(backbone_config=bb, hidden_size=16, num_labels=C, use_auxiliary_head=False)
    return transformers.UperNetForSemanticSegmentation(cfg).eval()


def swin():
    return transformers.SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_features=["stage1", "stage2", "stage3", "stage4"])


def mask2former() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Mask2FormerConfig(
        backbone_config=swin(), num_labels=C, num_queries=5, hidden_dim=32, mask_feature_size=32, feature_size=32,
        encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=32, dim_feedforward=32, num_attention_heads=2,
        common_stride=4, use_pretrained_backbone=False)
    return transformers.Mask2FormerForUniversalSegmentation(cfg).eval()


def maskformer() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.MaskFormerConfig(
        backbone_config=swin(), num_labels=C, num_queries=5, fpn_feature_size=32, mask_feature_size=32,
        decoder_config={"model_type": "detr", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                        "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
                        "decoder_ffn_dim": 32, "num_queries": 5})
    return transformers.MaskFormerForInstanceSegmentation(cfg).eval()


def processor(kind: str):
    if kind == "segformer":
        from transformers.models.segformer.image_processing_pil_segformer import (
            SegformerImageProcessorPil as P,
        )
    elif kind == "mask2former":
        from transformers.models.mask2former.image_processing_pil_mask2former import (
            Mask2FormerImageProcessorPil as P,
        )
    else:
        from transformers.models.maskformer.image_processing_pil_maskformer import (
            MaskFormerImageProcessorPil as P,
        )
    return P()


def labels_from(scores: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Labels: the argmax with 30 % replaced at random (so no fit degenerates)."""
    g = torch.Generator().manual_seed(seed)
    y = scores.argmax(1)
    flip = torch.rand(y.shape, generator=g) < 0.3
    y[flip] = torch.randint(0, scores.shape[1], (int(flip.sum()),), generator=g)
    return y


def test_segformer_quarter_resolution_logits():
    net = segformer()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(pixel_values=x)
        assert out.logits.shape == (2, C, 8, 8)  # 1/4 resolution
        ref = processor("segformer").post_process_semantic_segmentation(out, target_sizes=[(32, 32)] * 2,
                                                                        return_segmentation_scores=True)
        got = hf_scores(out, (32, 32))
    for i in range(2):
        assert torch.allclose(got[i], ref[i]["segmentation_scores"], atol=1e-6)
        assert torch.equal(got[i].argmax(0), ref[i]["segmentation"])
    # fit_from_model on the unwrapped model (its .logits are found and resized) == fit on these scores
    y = labels_from(got)
    cal = fit_from_model(net, [(x, y)], "ts")
    ref_cal = create("ts").fit([(got[i : i + 1], y[i : i + 1]) for i in range(2)])
    assert abs(cal.temperature - ref_cal.temperature) < 1e-6
    # CalibratedModel: wrapped and unwrapped give softmax(got / T)
    want = F.softmax(got / cal.temperature, 1)
    for model in (segcal.CalibratedModel(HFSegmentationModel(net), cal), segcal.CalibratedModel(net, cal)):
        assert torch.allclose(model(x), want, atol=1e-6)


def test_upernet_logits():
    net = upernet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = net(pixel_values=x).logits
    assert logits.shape == (2, C, 32, 32)
    wrapped = HFSegmentationModel(net)
    with torch.no_grad():
        assert torch.equal(wrapped(x), logits)
    cal = fit_from_model(wrapped, [(x, labels_from(logits))], "vs")
    assert torch.allclose(segcal.CalibratedModel(net, cal)(x), cal.predict_proba(logits), atol=1e-6)


@pytest.mark.parametrize("kind", ["mask2former", "maskformer"])
def test_mask_classification_scores_follow_transformers(kind):
    net = mask2former() if kind == "mask2former" else maskformer()
    x = torch.randn(2, 3, 64, 64)
    size = (48, 40)
    with torch.no_grad():
        out = net(pixel_values=x)
        ref = processor(kind).post_process_semantic_segmentation(out, target_sizes=[size] * 2,
                                                                 return_segmentation_scores=True)
        got = hf_scores(out, size)
    assert got.shape == (2, C, *size)
    assert torch.allclose(got.exp().sum(1), torch.ones(2, *size), atol=1e-5)  # log-probabilities
    for i in range(2):
        s = ref[i]["segmentation_scores"].double()
        assert torch.allclose(got[i].double(), torch.log(s / s.sum(0, keepdim=True)), atol=1e-5)
        assert torch.equal(got[i].argmax(0), ref[i]["segmentation"])
    # the independent formula, at the masks' own size (MaskFormer: no 384 x 384 step)
    if kind == "maskformer":
        p = out.class_queries_logits.softmax(-1)[..., :-1].double()
        s = torch.einsum("nqc,nqhw->nchw", p, out.masks_queries_logits.double().sigmoid())
        assert torch.allclose(mask_classification_scores(out.class_queries_logits, out.masks_queries_logits).double(),
                              torch.log(s / s.sum(1, keepdim=True)), atol=1e-5)
    # fit through the wrapper; CalibratedModel applies the same
    wrapped = HFSegmentationModel(net)
    with torch.no_grad():
        z = wrapped(x)
    y = labels_from(z)
    cal = fit_from_model(wrapped, [(x[:1], y[:1]), (x[1:], y[1:])], "ts")
    ref_cal = create("ts").fit([(z[:1], y[:1]), (z[1:], y[1:])])
    assert abs(cal.temperature - ref_cal.temperature) < 1e-6
    assert torch.allclose(segcal.CalibratedModel(wrapped, cal)(x), F.softmax(z / cal.temperature, 1), atol=1e-6)


def test_smp_shaped_model_through_calibrated_model():
    """NOT segmentation_models_pytorch itself (it does not import here: timm needs torchvision, which
    does not import beside this torch); a plain module with smp's interface: x (N, 3, H, W) ->
    logits (N, C, H, W), as smp.Unet(...) returns."""

    class SmpShaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
            self.decoder = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.segmentation_head = nn.Conv2d(8, C, 1)

        def forward(self, x):
            return self.segmentation_head(self.decoder(self.encoder(x)))

    net = SmpShaped().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        z = net(x)
    y = labels_from(z)
    cal = fit_from_model(net, [(x, y)], "ts")
    assert torch.allclose(segcal.CalibratedModel(net, cal)(x), F.softmax(z / cal.temperature, 1), atol=1e-6)


def test_bad_outputs_are_refused():
    with pytest.raises(InputError, match="class_queries_logits"):
        hf_scores({"hidden_states": torch.zeros(1)})
    with pytest.raises(InputError, match="logits of shape"):
        hf_scores({"logits": torch.zeros(2, 3)})
    with pytest.raises(InputError, match="same N and Q"):
        mask_classification_scores(torch.zeros(1, 5, 4), torch.zeros(1, 4, 8, 8))
    with pytest.raises(InputError, match="pixel_values"):
        HFSegmentationModel(nn.Identity())(torch.zeros(3, 8, 8))


def test_the_example_of_docs_integrations_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    heading = "\n## Hugging Face and segmentation_models_pytorch"
    assert text.count(heading) == 1
    code = text.split(heading, 1)[1].split("\n## ", 1)[0].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/integrations.md", "exec"), {})
