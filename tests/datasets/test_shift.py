"""Tests of segcal.shift: ImageNet-C corruptions, determinism, severity ordering, errors."""

from __future__ import annotations

import itertools
import pickle
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from segcal.data import data_root
from segcal.shift import (
    CORRUPTIONS,
    PARAMETERS,
    STOCHASTIC,
    available_corruptions,
    corrupt,
    derive_seed,
    make_transform,
)
from segcal.shift.filters import (
    clipped_zoom,
    disk_kernel,
    hsv_to_rgb,
    motion_kernel_offsets,
    plasma_fractal,
    rgb_to_hsv,
)

NAMES = available_corruptions()
SEVS = (1, 2, 3, 4, 5)
ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- fixtures


@cache
def synthetic() -> np.ndarray:
    """48 x 64 image: random colour blocks plus a horizontal sine (edges and texture)."""
    rng = np.random.default_rng(123)
    h, w = 48, 64
    blocks = rng.integers(20, 236, size=(h // 8 + 1, w // 8 + 1, 3))
    img = np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:h, :w].astype(np.float64)
    xx = np.arange(w)[None, :, None]
    img = img * 0.7 + 30.0 * np.sin(xx / 3.0) + 20.0
    return np.clip(img, 0, 255).astype(np.uint8)


def _real_path() -> Path | None:
    root = data_root(required=False)
    if root is None:
        return None
    p = root / "camvid" / "test" / "0001TP_008550.png"
    return p if p.is_file() else None


@cache
def real() -> np.ndarray:
    p = _real_path()
    if p is None:
        pytest.skip("CamVid not found: set SEGCAL_DATA or provide ../shared/data/camvid")
    return np.asarray(Image.open(p).convert("RGB"))


IMAGES = {"synthetic": synthetic, "real": real}


@cache
def out(kind: str, name: str, severity: int, seed: int = 0) -> np.ndarray:
    return corrupt(IMAGES[kind](), name, severity, seed=seed)


KINDS = [
    pytest.param("synthetic", id="synthetic"),
    pytest.param("real", id="real", marks=pytest.mark.realdata),
]


def _hf(y: np.ndarray) -> float:
    """High-frequency energy: mean squared finite difference along both axes."""
    y = y.astype(np.float64)
    return float((np.diff(y, axis=0) ** 2).mean() + (np.diff(y, axis=1) ** 2).mean())


def _resid_std(kind: str, name: str, s: int) -> float:
    return float(np.std(out(kind, name, s).astype(np.float64) - IMAGES[kind]()))


def _mean_hsv(y: np.ndarray, channel: int) -> float:
    return float(rgb_to_hsv(y / 255.0)[..., channel].mean())


def _increasing(v: list[float]) -> bool:
    return all(b > a for a, b in itertools.pairwise(v))


def _decreasing(v: list[float]) -> bool:
    return all(b < a for a, b in itertools.pairwise(v))


# ----------------------------------------------------------------------------- registry


def test_registry_lists_required_corruptions():
    required = {
        "gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "defocus_blur",
        "motion_blur", "contrast", "brightness", "fog", "jpeg_compression",
    }  # fmt: skip
    assert required <= set(NAMES)
    assert list(CORRUPTIONS) == NAMES
    assert set(PARAMETERS) == set(NAMES)
    assert all(len(PARAMETERS[n]) == 5 for n in NAMES)
    assert STOCHASTIC <= set(NAMES)


def test_imagenet_c_parameter_tables():
    # spot checks against make_imagenet_c.py (hendrycks/robustness)
    assert PARAMETERS["gaussian_noise"] == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert PARAMETERS["shot_noise"] == (60, 25, 12, 5, 3)
    assert PARAMETERS["impulse_noise"] == (0.03, 0.06, 0.09, 0.17, 0.27)
    assert PARAMETERS["defocus_blur"][4] == (10, 0.5)
    assert PARAMETERS["motion_blur"] == ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))
    assert PARAMETERS["contrast"] == (0.4, 0.3, 0.2, 0.1, 0.05)
    assert PARAMETERS["brightness"] == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert PARAMETERS["fog"][0] == (1.5, 2.0)
    assert PARAMETERS["jpeg_compression"] == (25, 18, 15, 10, 7)
    from segcal.shift.corruptions import zoom_factors

    # np.arange float quirk, same in the reference: severity 1 includes 1.11 (12 factors)
    assert [len(zoom_factors(s)) for s in SEVS] == [12, 16, 11, 13, 11]


# ----------------------------------------------------------------------------- every corruption x severity


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_determinism(kind, name):
    img = IMAGES[kind]()
    before = img.copy()
    for s in SEVS:
        y = out(kind, name, s)
        assert y.shape == img.shape and y.dtype == np.uint8, (name, s)
        assert y.flags.c_contiguous
        assert not np.shares_memory(y, img)
    np.testing.assert_array_equal(img, before)  # input untouched
    # same seed -> bit-identical (recomputed, not cached)
    np.testing.assert_array_equal(corrupt(img, name, 3, seed=0), out(kind, name, 3))
    other = corrupt(img, name, 3, seed=1)
    if name in STOCHASTIC:
        assert not np.array_equal(other, out(kind, name, 3)), f"{name}: seed had no effect"
    else:
        np.testing.assert_array_equal(other, out(kind, name, 3))
    # every severity changes the image
    for s in SEVS:
        assert not np.array_equal(out(kind, name, s), img), (name, s)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "elastic_transform"]
)
def test_residual_grows_with_severity(kind, name):
    assert _increasing([_resid_std(kind, name, s) for s in SEVS])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "motion_blur"])
def test_blur_removes_more_high_frequencies_with_severity(kind, name):
    hf = [_hf(out(kind, name, s)) for s in SEVS]
    assert hf[0] < _hf(IMAGES[kind]())
    assert _decreasing(hf)


@pytest.mark.parametrize("kind", KINDS)
def test_zoom_blur_ordering(kind):
    # zoom blur: the deviation from the clean image grows; high frequencies drop overall
    assert _increasing([_resid_std(kind, "zoom_blur", s) for s in SEVS])
    assert _hf(out(kind, "zoom_blur", 5)) < _hf(out(kind, "zoom_blur", 1)) < _hf(IMAGES[kind]())


@pytest.mark.realdata
def test_pixelate_and_jpeg_ordering_on_real_image():
    assert _decreasing([_hf(out("real", "pixelate", s)) for s in SEVS])
    assert _increasing([_resid_std("real", "jpeg_compression", s) for s in SEVS])
    assert _increasing([_resid_std("real", "fog", s) for s in SEVS])


@pytest.mark.parametrize("kind", KINDS)
def test_contrast_and_brightness_ordering(kind):
    img = IMAGES[kind]()
    stds = [float(out(kind, "contrast", s).std()) for s in SEVS]
    assert stds[0] < float(img.std()) and _decreasing(stds)
    v = [_mean_hsv(out(kind, "brightness", s), 2) for s in SEVS]
    assert v[0] > _mean_hsv(img, 2) and _increasing(v)


@pytest.mark.parametrize("kind", KINDS)
def test_saturate_desaturates_then_oversaturates(kind):
    s0 = _mean_hsv(IMAGES[kind](), 1)
    s = [_mean_hsv(out(kind, "saturate", k), 1) for k in SEVS]
    assert s[1] < s[0] < s0 < s[2] < s[3] <= s[4]


@pytest.mark.parametrize("kind", KINDS)
def test_weather_brightens(kind):
    v0 = _mean_hsv(IMAGES[kind](), 2)
    assert _mean_hsv(out(kind, "snow", 5), 2) > _mean_hsv(out(kind, "snow", 1), 2) > v0
    # fog lowers contrast of the underlying image: the residual grows with severity
    assert _resid_std(kind, "fog", 5) > _resid_std(kind, "fog", 1)


# ----------------------------------------------------------------------------- statistics vs the formulas


def _grey(v=128, h=64, w=64):
    return np.full((h, w, 3), v, dtype=np.uint8)


@pytest.mark.parametrize("s", [1, 2])
def test_gaussian_noise_std_matches_table(s):
    y = corrupt(_grey(), "gaussian_noise", s, seed=5).astype(np.float64)
    want = PARAMETERS["gaussian_noise"][s - 1] * 255
    assert abs((y - 128).std() / want - 1) < 0.05
    assert abs((y - 128).mean()) < 1.5


@pytest.mark.parametrize("s", [1, 3])
def test_shot_noise_std_matches_poisson(s):
    c = PARAMETERS["shot_noise"][s - 1]
    y = corrupt(_grey(), "shot_noise", s, seed=5).astype(np.float64)
    want = np.sqrt((128 / 255) / c) * 255
    assert abs((y - 128).std() / want - 1) < 0.08


@pytest.mark.parametrize("s", SEVS)
def test_impulse_noise_fraction(s):
    y = corrupt(_grey(), "impulse_noise", s, seed=5)
    c = PARAMETERS["impulse_noise"][s - 1]
    hit = (y == 0) | (y == 255)
    assert abs(hit.mean() - c) < 0.02
    assert abs((y == 0).mean() - (y == 255).mean()) < 0.02
    assert np.all(y[~hit] == 128)


def test_contrast_scales_deviation_exactly():
    img = synthetic()
    for s in SEVS:
        c = PARAMETERS["contrast"][s - 1]
        x = img / 255.0
        m = x.mean(axis=(0, 1), keepdims=True)
        want = np.rint(np.clip(((x - m) * c + m) * 255, 0, 255))
        np.testing.assert_array_equal(corrupt(img, "contrast", s), want)


def test_brightness_on_grey_adds_to_value():
    for s in SEVS:
        y = corrupt(_grey(100), "brightness", s)
        assert np.all(y == np.rint((100 / 255 + PARAMETERS["brightness"][s - 1]) * 255))


def test_jpeg_equals_pillow_roundtrip():
    import io

    img = synthetic()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=PARAMETERS["jpeg_compression"][2])
    want = np.asarray(Image.open(buf).convert("RGB"))
    np.testing.assert_array_equal(corrupt(img, "jpeg_compression", 3), want)


def test_motion_blur_is_directional():
    # a single bright dot becomes a straight streak of 2*radius+1 taps
    img = np.zeros((81, 81, 3), dtype=np.uint8)
    img[40, 40] = 255
    y = corrupt(img, "motion_blur", 1, seed=0)[..., 0]
    ys, xs = np.nonzero(y)
    assert len(ys) >= 5
    # collinear: rank-1 spread of the coordinates
    pts = np.stack([ys, xs], 1).astype(float)
    sv = np.linalg.svd(pts - pts.mean(0), compute_uv=False)
    assert sv[1] < 0.15 * sv[0]


def test_motion_kernel_and_disk_kernel():
    dy, dx, w = motion_kernel_offsets(10, 3, 0.0)
    assert len(w) == 21 and np.isclose(w.sum(), 1) and np.all(np.diff(w) < 0)
    np.testing.assert_array_equal(dy, 0)
    np.testing.assert_array_equal(dx, np.arange(21))
    dy, dx, _ = motion_kernel_offsets(5, 2, 90.0)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dy, np.arange(11))
    for r, a in PARAMETERS["defocus_blur"]:
        k = disk_kernel(r, a)
        assert np.isclose(k.sum(), 1) and np.allclose(k, k[::-1, ::-1]) and np.allclose(k, k.T)


def test_plasma_and_zoom_helpers():
    p = plasma_fractal(64, 2.0, np.random.default_rng(0))
    assert p.shape == (64, 64) and p.min() == 0 and p.max() == 1
    np.testing.assert_array_equal(p, plasma_fractal(64, 2.0, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="mapsize"):
        plasma_fractal(48, 2.0, np.random.default_rng(0))
    x = np.random.default_rng(0).random((30, 50, 3))
    np.testing.assert_allclose(clipped_zoom(x, 1.0), x)
    assert clipped_zoom(x, 1.3).shape == x.shape


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=3, max_size=3))
def test_hsv_roundtrip(rgb):
    x = np.array(rgb, dtype=np.float64).reshape(1, 1, 3)
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-12)


def test_no_global_rng_use():
    # deliberately touches the legacy global RNG to prove corrupt() never does
    np.random.seed(1234)  # noqa: NPY002
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    for name in NAMES:
        corrupt(synthetic(), name, 2, seed=3)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002


# ----------------------------------------------------------------------------- property tests


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(2, 24),
    w=st.integers(2, 24),
    name=st.sampled_from(NAMES),
    severity=st.sampled_from(SEVS),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_property_any_small_image(h, w, name, severity, seed, data):
    pix = data.draw(st.binary(min_size=h * w * 3, max_size=h * w * 3))
    img = np.frombuffer(pix, dtype=np.uint8).reshape(h, w, 3).copy()
    y = corrupt(img, name, severity, seed=seed)
    assert y.shape == img.shape and y.dtype == np.uint8
    np.testing.assert_array_equal(y, corrupt(img, name, severity, seed=seed))


# ----------------------------------------------------------------------------- per-image transform


def test_make_transform_per_image_seeds():
    img = synthetic()
    t = make_transform("gaussian_noise", 2, seed=7)
    a1, b1 = t(img, "img_a"), t(img, "img_b")
    # order independence: processing b first gives the same result for a
    b2, a2 = t(img, "img_b"), t(img, "img_a")
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a1, b1)
    np.testing.assert_array_equal(
        a1, corrupt(img, "gaussian_noise", 2, seed=derive_seed(7, "img_a"))
    )
    assert not np.array_equal(a1, make_transform("gaussian_noise", 2, seed=8)(img, "img_a"))
    # picklable for worker processes, and describes itself
    t2 = pickle.loads(pickle.dumps(t))
    np.testing.assert_array_equal(t2(img, "img_a"), a1)
    assert t.describe()["corruption"] == "gaussian_noise"


def test_derive_seed_is_stable_across_processes():
    # pinned values: crc32 + SeedSequence, no salted hash()
    assert derive_seed(0, "0001TP_008550") == 6452524621079638229
    assert derive_seed(7, "a") == 3892600722140345293
    code = "from segcal.shift import derive_seed; print(derive_seed(0, '0001TP_008550'))"
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PYTHONHASHSEED": "random"},
        check=True,
    )
    assert res.stdout.strip() == "6452524621079638229"


def test_shift_is_a_leaf_module():
    code = (
        "import sys; import segcal.shift; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('scipy', "
        "'segcal.metrics', 'segcal.calibrators', 'segcal.cli', 'segcal.io'))]; print(bad)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src")},
        check=True,
    )
    assert res.stdout.strip() == "[]", res.stdout


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    img = synthetic()
    with pytest.raises(ValueError, match=r"name: unknown corruption 'frost'.*gaussian_noise"):
        corrupt(img, "frost", 1)
    for bad in (0, 6, -1):
        with pytest.raises(ValueError, match="severity"):
            corrupt(img, "contrast", bad)
    for bad in (2.0, True, "3", None):
        with pytest.raises(TypeError, match="severity"):
            corrupt(img, "contrast", bad)
    with pytest.raises(ValueError, match="seed"):
        corrupt(img, "contrast", 1, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        corrupt(img, "contrast", 1, seed=1.5)
    with pytest.raises(ValueError, match=r"image: expected shape H x W x 3"):
        corrupt(img[..., 0], "contrast", 1)
    with pytest.raises(ValueError, match=r"image: expected shape H x W x 3"):
        corrupt(np.zeros((4, 4, 4), np.uint8), "contrast", 1)
    with pytest.raises(TypeError, match="image: expected dtype uint8"):
        corrupt(img.astype(np.float32), "contrast", 1)
    with pytest.raises(TypeError, match="image: expected a numpy array"):
        corrupt(Image.fromarray(img), "contrast", 1)
    with pytest.raises(ValueError, match="image: expected a non-empty"):
        corrupt(np.zeros((0, 4, 3), np.uint8), "contrast", 1)
    # make_transform validates before any image is seen
    with pytest.raises(ValueError, match="name"):
        make_transform("nope", 1)
    with pytest.raises(ValueError, match="severity"):
        make_transform("fog", 9)
    with pytest.raises(TypeError, match="stem"):
        make_transform("fog", 1)(img, 3)


# ----------------------------------------------------------------------------- third-party cross-check


@pytest.mark.parametrize("name", ["gaussian_noise", "contrast", "brightness", "defocus_blur"])
def test_statistics_match_imagecorruptions(name):
    ic = pytest.importorskip("imagecorruptions", reason="imagecorruptions not installed")
    img = synthetic()
    np.random.seed(0)  # noqa: NPY002 - the reference uses the global RNG
    ref = np.asarray(ic.corrupt(img, corruption_name=name, severity=3), dtype=np.float64)
    ours = corrupt(img, name, 3, seed=0).astype(np.float64)
    assert abs(ref.mean() - ours.mean()) < 2.0
    assert abs(ref.std() - ours.std()) < 0.05 * ref.std() + 1.0
