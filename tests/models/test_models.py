"""ESPNet port, class mapping and model registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.data import data_root
from segcal.models import (
    ClassMapping,
    ESPNet,
    available_models,
    create_model,
    get_spec,
    preprocess_bgr,
    register_model,
    unregister_model,
    use_channels_last,
)
from segcal.models.espnet import (
    CAMVID_MEAN_BGR,
    CAMVID_STD_BGR,
    CITYSCAPES_TO_CAMVID,
    load_espnet,
)

ROOT = data_root(required=False)
HAVE_ESPNET = ROOT is not None and (ROOT / "espnet" / "espnet_p_2_q_8.pth").is_file()
HAVE_CAMVID = ROOT is not None and (ROOT / "camvid" / "test").is_dir()
needs_weights = pytest.mark.skipif(
    not HAVE_ESPNET, reason="ESPNet weights not found (set SEGCAL_DATA to the shared data root)"
)
needs_camvid = pytest.mark.skipif(
    not (HAVE_ESPNET and HAVE_CAMVID),
    reason="CamVid / ESPNet weights not found (set SEGCAL_DATA to the shared data root)",
)

# --- the port fingerprint of <data root>/espnet/README.md, image camvid/test/0001TP_008550.png
FINGERPRINT = {
    "espnet-camvid": {
        "input_sum": -1377.1775,
        "mean": [0.61596, 1.67444, 0.60292, -0.69967, -0.8884, 0.8845, 0.11509, -0.96303,
                 -0.46407, -1.02202, -0.69685, 1.55826],
        "pixels": {
            (0, 0): [0.08475, 5.56682, 0.20759, -1.15613, -0.68298, 0.44672, 0.08142, -0.64995,
                     0.68866, -1.89387, -2.18948, 0.94157],
            (100, 200): [7.79244, -0.35366, 1.00628, -1.80313, -1.3748, 0.76933, 0.88209,
                         -1.6566, -1.75713, -3.14411, -1.071, 0.35022],
            (180, 240): [8.96726, -0.37949, 0.57146, -2.0211, -1.63147, 1.04823, 1.02454,
                         -2.05754, -1.10638, -3.70299, -0.88099, -0.29292],
            (300, 50): [-2.10043, -1.40667, 1.17789, 2.4859, 9.97987, -3.45491, -6.84599,
                        1.4948, -0.31374, 0.41106, -1.75442, -0.26016],
            (359, 479): [-1.09705, 1.45012, 0.56888, 1.15838, -1.33468, 1.34271, 0.03638,
                         0.22498, -0.72457, -1.97176, -3.29337, 4.55155],
        },
        "hist": [34637, 49539, 961, 35908, 4761, 19430, 2216, 0, 9341, 2623, 1764, 11620],
    },
    "espnet-cityscapes": {
        "input_sum": -743.8775,
        "mean": [-1.63434, -1.19218, 6.05093, 0.0388, -0.54614, 0.07511, -0.63417, 0.39537,
                 -0.38731, -4.08597, -0.83552, 1.55755, -0.70416, 1.26389, 0.55721, -0.85256,
                 0.37271, -1.45644, -1.7893, 2.78289],
        "pixels": {
            (0, 0): [2.77427, 1.69766, 2.84879, 1.18499, -1.18201, 0.84934, -2.42139, -0.06789,
                     2.33085, 0.25892, 1.08509, -1.81265, -4.39946, -0.63051, -1.86514,
                     -2.35443, -0.5876, -2.90906, -4.33806, 8.69522],
            (100, 200): [-4.27259, -0.81542, 8.99014, 0.65423, 0.90755, 0.74859, -0.28933,
                         2.12335, -0.01841, -5.01948, -0.50209, 1.2093, -0.08605, -1.41085,
                         0.21401, -1.96976, -0.96169, -2.07318, -1.37652, 2.98842],
            (180, 240): [-3.98654, -0.51248, 8.49111, 1.09297, -0.37091, 0.3471, -0.41484,
                         0.94011, 1.94615, -3.65802, 2.2071, -1.14348, -0.97914, -0.37988,
                         0.39459, -2.10805, -0.82943, -1.41462, -2.71498, 2.49047],
            (300, 50): [2.09375, 1.66075, 5.86714, 0.35814, -2.28603, -1.41906, -2.71103,
                        -0.69288, -2.08713, -4.30192, -0.08731, 1.98145, -0.48725, 2.31243,
                        0.73396, -1.96111, 0.64361, -0.9889, -2.04203, 2.17155],
            (359, 479): [2.87485, 1.85163, 2.68048, 0.42688, -1.30536, 0.7206, -2.26433,
                         -0.01181, 1.46891, 0.04973, 0.91787, -1.84617, -3.87141, -0.5623,
                         -1.21058, -2.42935, -1.13063, -2.32843, -3.59648, 8.93972],
        },
        "hist": [22428, 98, 126180, 0, 0, 208, 402, 55, 0, 0, 96, 7596, 0, 6668, 43, 0, 98, 0,
                 0, 8928],
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def first_test_image() -> np.ndarray:
    from segcal.datasets import load_image

    return load_image(ROOT / "camvid" / "test" / "0001TP_008550.png")


# ------------------------------------------------------------------------------- no data needed
@pytest.mark.parametrize(("k", "skip", "conv_in"), [(12, "out0_cat", 31), (20, "out0", 36)])
def test_espnet_structure_matches_published_keys(k, skip, conv_in):
    m = ESPNet(k, decoder_skip=skip).eval()
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == 189  # the published files predate BatchNorm's num_batches_tracked
    assert tuple(sd["conv.conv.weight"].shape) == (k, conv_in, 3, 3)
    assert "encoder.level3.7.d16.conv.weight" in sd and "up_l3.0.weight" in sd
    assert all(mod.eps == 1e-3 for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, k, 64, 96)


def test_espnet_rejects_sizes_not_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        ESPNet(12)(torch.zeros(1, 3, 60, 80 + 4))
    with pytest.raises(ValueError, match="divisible by 8"):
        preprocess_bgr(np.zeros((361, 480, 3), np.uint8), CAMVID_MEAN_BGR, CAMVID_STD_BGR)
    with pytest.raises(ValueError, match="decoder_skip"):
        ESPNet(12, decoder_skip="nope")  # type: ignore[arg-type]


def test_channels_last_same_outputs_contiguous_and_state_dict_portable():
    torch.manual_seed(0)
    ref = ESPNet(12).eval()
    fast = ESPNet(12).eval()
    fast.load_state_dict(ref.state_dict())
    assert use_channels_last(fast)
    assert fast.conv.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert b.is_contiguous() and b.shape == a.shape
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    b.view(-1)  # the usual layout: .view works on the output
    # trains in the new layout (gradients reach the weights) and its state dict loads back
    fast.train()
    fast(x).logsumexp(1).mean().backward()
    assert fast.conv.conv.weight.grad is not None
    back = ESPNet(12)
    back.load_state_dict(fast.state_dict())
    assert back.conv.conv.weight.is_contiguous()
    torch.testing.assert_close(back.conv.conv.weight, fast.conv.conv.weight)


def test_channels_last_leaves_3d_and_convless_modules_alone():
    net3d = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Conv2d(2, 2, 1))
    assert not use_channels_last(net3d)
    assert net3d[1].weight.is_contiguous()
    assert not use_channels_last(torch.nn.Linear(3, 2))


def test_preprocess_is_bgr_standardise_then_div255():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    x = preprocess_bgr(img, CAMVID_MEAN_BGR, CAMVID_STD_BGR)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 24)
    bgr = img[..., ::-1].astype(np.float64)
    ref = ((bgr - CAMVID_MEAN_BGR) / CAMVID_STD_BGR).transpose(2, 0, 1)[None] / 255.0
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="H x W x 3"):
        preprocess_bgr(np.zeros((16, 24), np.uint8), CAMVID_MEAN_BGR, CAMVID_STD_BGR)


def test_class_mapping_sums_probabilities_within_groups():
    torch.manual_seed(0)
    mapping = ClassMapping(CITYSCAPES_TO_CAMVID, num_source=20)
    x = torch.randn(2, 20, 5, 7, dtype=torch.float64) * 3
    y = mapping(x)
    assert y.shape == (2, 11, 5, 7)
    p = x.softmax(1)
    q = y.softmax(1)
    covered = sum(p[:, list(g)].sum(1) for g in CITYSCAPES_TO_CAMVID)  # all but class 19
    for c, g in enumerate(CITYSCAPES_TO_CAMVID):
        torch.testing.assert_close(q[:, c], p[:, list(g)].sum(1) / covered)
    torch.testing.assert_close(q.sum(1), torch.ones(2, 5, 7, dtype=torch.float64))
    # logits form: logsumexp of the group
    torch.testing.assert_close(y[:, 8], torch.logsumexp(x[:, [13, 14, 15, 16]], 1))


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ([(0, 1), (1, 2)], "disjoint"),
        ([(0,), (5,)], r"outside \[0, 4\)"),
        ([(0,), ()], "group 1 is empty"),
        ([], "groups is empty"),
    ],
)
def test_class_mapping_validates_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        ClassMapping(groups, num_source=4)


def test_class_mapping_checks_input_channels():
    with pytest.raises(ValueError, match="expected 4 source classes"):
        ClassMapping([(0, 1), (2, 3)], num_source=4)(torch.zeros(1, 5, 2, 2))


def test_registry_lists_builtins_and_unknown_name_lists_them():
    names = available_models()
    assert {"espnet-camvid", "espnet-cityscapes", "espnet-cityscapes-camvid"} <= set(names)
    assert get_spec("espnet-camvid").num_classes == 12
    assert get_spec("espnet-camvid").ignore_index == 11
    assert get_spec("espnet-cityscapes").num_classes == 20
    assert get_spec("espnet-cityscapes-camvid").num_classes == 11
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*espnet-camvid"):
        create_model("nope")


def test_register_custom_model_roundtrip():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x)

    register_model("tiny-test", Tiny, num_classes=3, class_names=["a", "b", "c"])
    try:
        lm = create_model("tiny-test", device="cpu")
        assert not lm.module.training
        assert lm.class_names == ("a", "b", "c") and lm.ignore_index is None
        out = lm.logits([np.zeros((4, 6, 3), np.uint8)] * 2)
        assert out.shape == (2, 3, 4, 6)
        with pytest.raises(ValueError, match="already registered"):
            register_model("tiny-test", Tiny, num_classes=3)
        with pytest.raises(ValueError, match="2 class names"):
            register_model("tiny-x", Tiny, num_classes=3, class_names=["a", "b"])
        register_model("tiny-bad", lambda: "not a module", num_classes=3)
        with pytest.raises(TypeError, match=r"expected nn\.Module"):
            create_model("tiny-bad")
        register_model("tiny-wrong-c", Tiny, num_classes=4)
        with pytest.raises(ValueError, match="expected output"):
            create_model("tiny-wrong-c").logits([np.zeros((4, 6, 3), np.uint8)])
    finally:
        for n in ("tiny-test", "tiny-bad", "tiny-wrong-c"):
            unregister_model(n)


def test_builtin_model_with_missing_data_root_says_what_to_provide(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root"):
        create_model("espnet-camvid", data_root=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"espnet_p_2_q_8_camvid\.pth"):
        create_model("espnet-camvid", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="weights not found"):
        load_espnet(tmp_path / "x.pth", 12, "out0_cat")


# ------------------------------------------------------------------------------- real weights
@needs_weights
@pytest.mark.realdata
@pytest.mark.parametrize(
    ("fname", "k", "skip"),
    [("espnet_p_2_q_8_camvid.pth", 12, "out0_cat"), ("espnet_p_2_q_8.pth", 20, "out0")],
)
def test_published_state_dicts_load_strict(fname, k, skip):
    sd = torch.load(ROOT / "espnet" / fname, map_location="cpu", weights_only=True)
    m = ESPNet(k, decoder_skip=skip)
    m.load_state_dict(sd, strict=True)
    # the other decoder variant does not fit this file
    other = ESPNet(k, decoder_skip="out0" if skip == "out0_cat" else "out0_cat")
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(sd, strict=True)


@needs_camvid
@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", ["espnet-camvid", "espnet-cityscapes"])
def test_readme_port_fingerprint(name, first_test_image):
    fp = FINGERPRINT[name]
    lm = create_model(name, device="cpu")
    x = lm.preprocess(first_test_image)
    assert abs(float(x.double().sum()) - fp["input_sum"]) < 1e-2
    out = lm.logits([first_test_image])[0].double().numpy()
    k = len(fp["mean"])
    assert out.shape == (k, 360, 480)
    np.testing.assert_allclose(out.mean((1, 2)), fp["mean"], atol=1e-3)
    for (r, c), v in fp["pixels"].items():
        np.testing.assert_allclose(out[:, r, c], v, atol=1e-3, err_msg=f"pixel {(r, c)}")
    hist = np.bincount(out.argmax(0).ravel(), minlength=k)
    assert np.abs(hist - np.asarray(fp["hist"])).sum() <= 10, hist.tolist()


@needs_camvid
@pytest.mark.realdata
def test_cityscapes_camvid_is_raw_model_plus_mapping(first_test_image):
    mapped = create_model("espnet-cityscapes-camvid", device="cpu")
    out = mapped.logits([first_test_image])[0].double()
    assert out.shape == (11, 360, 480)
    raw = torch.as_tensor(
        [FINGERPRINT["espnet-cityscapes"]["pixels"][(100, 200)]], dtype=torch.float64
    )
    expect = ClassMapping(CITYSCAPES_TO_CAMVID, 20)(raw)[0]
    torch.testing.assert_close(out[:, 100, 200], expect, atol=2e-3, rtol=0)


@needs_camvid
@pytest.mark.realdata
@pytest.mark.parametrize("name", ["espnet-camvid", "espnet-cityscapes"])
def test_espnet_flush_denormal_is_bitwise_and_restored(name, first_test_image):
    """ESPNet.forward flushes denormals on the CPU (3.5-7x faster): the logits are bitwise those
    of the plain forward, and the process flag is off again afterwards (a denormal survives)."""
    lm = create_model(name, device="cpu")
    x = lm.preprocess(first_test_image)
    net = lm.module
    with torch.inference_mode():
        fast = net(x)
        torch.set_flush_denormal(False)
        plain = net._forward(x)
    assert torch.equal(fast, plain)
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert float((tiny * 1.0)[0]) != 0.0  # flush-to-zero is not left on
