"""Covariate-shift image corruptions after ImageNet-C, deterministic under a seed.

Source definitions
------------------
D. Hendrycks and T. Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations", ICLR 2019 (arXiv:1903.12261). The formulas and the five severity levels of
each corruption follow the authors' generator ``ImageNet-C/create_c/make_imagenet_c.py``
(repository ``hendrycks/robustness``), written for 224 x 224 crops, and its generalisation to
arbitrary image sizes in the ``imagecorruptions`` package (Michaelis et al., "Benchmarking
Robustness in Object Detection: Autonomous Driving when Winter is Coming", 2019; repository
``bethgelab/imagecorruptions``). Each corruption's docstring gives its parameter table and says
how (or whether) a parameter defined for 224 px is adapted to the image size. This module is an
independent implementation with NumPy, SciPy and Pillow only: no OpenCV, scikit-image or
ImageMagick. Where the reference used one of those, the docstring names the replacement.

Conventions
-----------
- Input and output: ``H x W x 3`` ``uint8`` RGB. Internally each corruption works on float64
  values in ``[0, 1]``; the result is clipped to ``[0, 255]`` and **rounded to the nearest
  integer** (the reference truncates with ``np.uint8`` and ImageNet-C then re-saved every image
  as JPEG quality 85; we do neither).
- Randomness comes only from a ``numpy.random.Generator`` built from ``seed``
  (``np.random.default_rng(seed)``); the global NumPy RNG is never touched. The same
  ``(image, name, severity, seed)`` gives bit-identical output on the same platform and
  library versions. All severities of one corruption draw the same random numbers in the same
  order for a given seed (common random numbers), so, e.g., the motion-blur angle and the fog
  pattern do not change with severity.
- Registry functions (the values of :data:`CORRUPTIONS`) have the signature
  ``fn(x, severity, rng) -> y`` with ``x`` float64 ``H x W x 3`` in ``[0, 1]``; use
  :func:`corrupt` for validated ``uint8`` in and out.
"""

from __future__ import annotations

import io
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from segcal.shift.common import (
    check_seed,
    check_severity,
    derive_seed,
    scipy_ndimage,
)
from segcal.shift.filters import (
    clipped_zoom,
    disk_kernel,
    filter2d_reflect101,
    gray,
    hsv_to_rgb,
    line_blur,
    next_pow2,
    plasma_fractal,
    rgb_to_hsv,
    to_uint8,
)

FloatArray = np.ndarray
CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]



# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- parameter tables
# One entry per severity 1..5, copied from make_imagenet_c.py (hendrycks/robustness) unless a
# docstring says otherwise.

PARAMETERS: Mapping[str, tuple[Any, ...]] = types.MappingProxyType(
    {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "zoom_blur": (
            (1.0, 1.11, 0.01),
            (1.0, 1.16, 0.01),
            (1.0, 1.21, 0.02),
            (1.0, 1.26, 0.02),
            (1.0, 1.31, 0.03),
        ),
        "snow": (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
        "fog": ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "saturate": ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2)),
        "jpeg_compression": (25, 18, 15, 10, 7),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
        "elastic_transform": (12.5, 16.25, 21.25, 25.0, 30.0),
    }
)


def _p(name: str, severity: int) -> Any:
    return PARAMETERS[name][severity - 1]


# --------------------------------------------------------------------------- noise


def gaussian_noise(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Additive Gaussian noise: ``clip(x + N(0, c^2))`` per pixel and channel.

    ``c`` (std, image in ``[0, 1]``) = 0.08, 0.12, 0.18, 0.26, 0.38 for severities 1-5
    (ImageNet-C). Not size dependent.
    """
    c = _p("gaussian_noise", severity)
    return np.clip(x + rng.normal(0.0, c, size=x.shape), 0.0, 1.0)


def shot_noise(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Poisson (photon) noise: ``Poisson(x * c) / c``.

    ``c`` (photons at full intensity) = 60, 25, 12, 5, 3 (ImageNet-C). Not size dependent.
    """
    c = _p("shot_noise", severity)
    return np.clip(rng.poisson(x * c) / float(c), 0.0, 1.0)


def impulse_noise(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Salt-and-pepper noise, independently per pixel and channel.

    A fraction ``c`` = 0.03, 0.06, 0.09, 0.17, 0.27 of the values (ImageNet-C, which called
    ``skimage.util.random_noise(mode='s&p', amount=c)``) is replaced, half by 0 and half by 1
    in expectation. Not size dependent.
    """
    c = _p("impulse_noise", severity)
    flip = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flip & salt] = 1.0
    out[flip & ~salt] = 0.0
    return out


def speckle_noise(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Multiplicative Gaussian noise: ``clip(x + x * N(0, c^2))``.

    ``c`` = 0.15, 0.2, 0.35, 0.45, 0.6 (ImageNet-C "extra" corruption). Not size dependent.
    """
    c = _p("speckle_noise", severity)
    return np.clip(x + x * rng.normal(0.0, c, size=x.shape), 0.0, 1.0)


# --------------------------------------------------------------------------- blur


def gaussian_blur(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Gaussian blur of each channel.

    ``sigma`` (pixels) = 1, 2, 3, 4, 6 (ImageNet-C "extra" corruption; ``skimage`` ``gaussian``
    = ``scipy.ndimage.gaussian_filter(mode='nearest', truncate=4)``). Kept in pixels, not scaled
    to the image size (as ``imagecorruptions`` does), so a 480 x 360 image is blurred less,
    relative to its size, than a 224 x 224 crop.
    """
    ndi = scipy_ndimage()
    s = _p("gaussian_blur", severity)
    return ndi.gaussian_filter(x, sigma=(s, s, 0), mode="nearest", truncate=4.0)


def defocus_blur(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Defocus: correlation with an anti-aliased disk (:func:`disk_kernel`).

    ``(radius, alias_blur)`` = (3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5) pixels
    (ImageNet-C). Borders reflect-101 (OpenCV ``filter2D`` default). Radii kept in pixels, not
    scaled to the image size (as ``imagecorruptions``).
    """
    r, a = _p("defocus_blur", severity)
    return np.clip(filter2d_reflect101(x, disk_kernel(r, a)), 0.0, 1.0)


def motion_blur(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Motion blur along a random direction.

    ``(radius, sigma)`` = (10, 3), (15, 5), (15, 8), (15, 12), (20, 15) pixels, angle
    ``U(-45, 45)`` degrees (ImageNet-C). ImageNet-C called ImageMagick's ``MotionBlurImage``;
    like ``imagecorruptions`` we approximate it by a one-sided line kernel of ``2*radius + 1``
    taps with half-Gaussian weights (:func:`motion_kernel_offsets`), each tap rounded to a whole
    pixel, and edge replication at the borders (the streak trails from each pixel towards the
    direction ``angle``). ImageMagick's exact kernel width and sub-pixel sampling differ, so
    the result is close to, not identical with, ImageNet-C. Radii kept in pixels.
    """
    r, s = _p("motion_blur", severity)
    angle = rng.uniform(-45.0, 45.0)
    return np.clip(line_blur(x, r, s, angle), 0.0, 1.0)


def zoom_factors(severity: int) -> np.ndarray:
    """Zoom factors averaged by :func:`zoom_blur` at ``severity`` (``np.arange`` as ImageNet-C)."""
    start, stop, step = _p("zoom_blur", severity)
    return np.arange(start, stop, step)


def zoom_blur(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Zoom blur: mean of the image and centre zooms of it (:func:`clipped_zoom`).

    Zoom factors ``np.arange(1, 1.11, 0.01)``, ``(1, 1.16, 0.01)``, ``(1, 1.21, 0.02)``,
    ``(1, 1.26, 0.02)``, ``(1, 1.31, 0.03)`` (ImageNet-C). Zoom factors are relative, so the
    corruption scales with the image; non-square images zoom each axis about its own centre
    (``imagecorruptions``). Deterministic (no randomness).
    """
    out = x.copy()
    zs = zoom_factors(severity)
    for z in zs:
        out += clipped_zoom(x, float(z))
    return np.clip(out / (len(zs) + 1), 0.0, 1.0)


# --------------------------------------------------------------------------- weather


def snow(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Snow: a thresholded, zoomed, motion-blurred noise layer added twice (and rotated 180°).

    Parameters ``(loc, scale, zoom, threshold, blur_radius, blur_sigma, blend)`` (ImageNet-C):
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55). The layer is ``N(loc, scale^2)`` at full image size,
    zoomed into its centre by ``zoom``, set to 0 below ``threshold``, clipped to ``[0, 1]``,
    motion blurred (our line kernel, as in :func:`motion_blur`) at angle ``U(-135, -45)``
    and quantised to 1/255. The image is whitened towards ``max(x, 1.5 * gray + 0.5)`` with
    weight ``1 - blend``. Flake size and streak length stay in pixels (as
    ``imagecorruptions``), so flakes look smaller on larger images.
    """
    loc, scale, zoom, thr, br, bs, blend = _p("snow", severity)
    layer = rng.normal(loc, scale, size=x.shape[:2])
    layer = clipped_zoom(layer, zoom)
    layer = np.where(layer < thr, 0.0, layer)
    layer = np.clip(layer, 0.0, 1.0)
    angle = rng.uniform(-135.0, -45.0)
    layer = line_blur(layer, br, bs, angle)
    layer = np.rint(np.clip(layer, 0.0, 1.0) * 255.0) / 255.0
    layer = layer[..., None]
    grey = gray(x)[..., None] * 1.5 + 0.5
    base = blend * x + (1.0 - blend) * np.maximum(x, grey)
    return np.clip(base + layer + np.rot90(layer, k=2), 0.0, 1.0)


def fog(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Fog: add a plasma fractal (:func:`plasma_fractal`) and rescale.

    ``(strength, wibbledecay)`` = (1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4) (ImageNet-C);
    ``out = clip((x + strength * plasma) * max(x) / (max(x) + strength))``.

    Size adaptation: ImageNet-C drew a 256 x 256 map and cropped it to 224 x 224. Like
    ``imagecorruptions`` we draw a square map whose side is the next power of two >= max(H, W)
    (512 for 480 x 360) and keep its top-left ``H x W`` corner, so the fog blobs keep the same
    size relative to the image (the map is not resized). Deterministic under the seed.
    """
    strength, decay = _p("fog", severity)
    h, w = x.shape[:2]
    plasma = plasma_fractal(next_pow2(max(h, w, 2)), decay, rng)[:h, :w]
    mx = float(x.max())
    out = (x + strength * plasma[..., None]) * mx / (mx + strength)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- digital / colour


def brightness(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Brightness: add ``c`` = 0.1, 0.2, 0.3, 0.4, 0.5 to the HSV value channel, clipped.

    ImageNet-C (via ``skimage.color.rgb2hsv``; here :func:`rgb_to_hsv`, same convention).
    Deterministic, not size dependent.
    """
    c = _p("brightness", severity)
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0.0, 1.0)
    return np.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def contrast(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Contrast: ``(x - mean) * c + mean`` with the per-channel image mean.

    ``c`` = 0.4, 0.3, 0.2, 0.1, 0.05 (ImageNet-C). Deterministic, not size dependent.
    """
    c = _p("contrast", severity)
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0.0, 1.0)


def saturate(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Saturation: HSV ``S * a + b`` clipped.

    ``(a, b)`` = (0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2) (ImageNet-C "extra"). Note that
    severities 1-2 *desaturate* and 3-5 *oversaturate*, so strength is not monotone in a single
    direction. Deterministic, not size dependent.
    """
    a, b = _p("saturate", severity)
    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0.0, 1.0)
    return np.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def jpeg_compression(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """JPEG re-encoding with Pillow at quality 25, 18, 15, 10, 7 (ImageNet-C).

    Pillow's default chroma subsampling and tables, as in the reference. Deterministic.
    """
    q = _p("jpeg_compression", severity)
    buf = io.BytesIO()
    Image.fromarray(to_uint8(x), mode="RGB").save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def pixelate(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Pixelation: Pillow ``BOX`` downsampling by ``c`` then ``BOX`` upsampling to the size.

    ``c`` = 0.6, 0.5, 0.4, 0.3, 0.25 (ImageNet-C, which resized 224 -> ``int(224 c)`` -> 224).
    For ``H x W`` images each side is scaled by ``c`` (``imagecorruptions``), so blocks are
    ``1/c`` pixels whatever the size. Deterministic.
    """
    c = _p("pixelate", severity)
    h, w = x.shape[:2]
    im = Image.fromarray(to_uint8(x), mode="RGB")
    small = im.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    big = small.resize((w, h), Image.Resampling.BOX)
    return np.asarray(big, dtype=np.float64) / 255.0


def elastic_transform(x: FloatArray, severity: int, rng: np.random.Generator) -> FloatArray:
    """Elastic warp by a smoothed random displacement field (size-adapted variant).

    Follows ``imagecorruptions`` (which replaced ImageNet-C's 224-px-specific affine + elastic
    parameters by size-relative ones): displacement ``U(-d, d)`` per pixel with
    ``d = 0.005 * H``, smoothed by a Gaussian with std ``0.01 * (H, W)`` (reflect borders,
    truncate 3) and multiplied by ``alpha`` = 12.5, 16.25, 21.25, 25, 30 (``250 * (0.05, 0.065,
    0.085, 0.1, 0.12)``); the image is resampled bilinearly (reflect borders). The random
    affine pre-warp of ImageNet-C is not applied.
    """
    ndi = scipy_ndimage()
    alpha = _p("elastic_transform", severity)
    h, w = x.shape[:2]
    sigma = (0.01 * h, 0.01 * w)
    d = 0.005 * h
    dx = (
        ndi.gaussian_filter(rng.uniform(-d, d, size=(h, w)), sigma, mode="reflect", truncate=3.0)
        * alpha
    )
    dy = (
        ndi.gaussian_filter(rng.uniform(-d, d, size=(h, w)), sigma, mode="reflect", truncate=3.0)
        * alpha
    )
    yy, xx = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    coords = np.stack([yy + dy, xx + dx])
    out = np.empty_like(x)
    for ch in range(x.shape[2]):
        out[..., ch] = ndi.map_coordinates(x[..., ch], coords, order=1, mode="reflect")
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- registry

CORRUPTIONS: Mapping[str, CorruptionFn] = types.MappingProxyType(
    {
        "gaussian_noise": gaussian_noise,
        "shot_noise": shot_noise,
        "impulse_noise": impulse_noise,
        "speckle_noise": speckle_noise,
        "gaussian_blur": gaussian_blur,
        "defocus_blur": defocus_blur,
        "motion_blur": motion_blur,
        "zoom_blur": zoom_blur,
        "snow": snow,
        "fog": fog,
        "brightness": brightness,
        "contrast": contrast,
        "saturate": saturate,
        "jpeg_compression": jpeg_compression,
        "pixelate": pixelate,
        "elastic_transform": elastic_transform,
    }
)

#: Corruptions that draw random numbers (their output depends on ``seed``).
STOCHASTIC = frozenset(
    {
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "speckle_noise",
        "motion_blur",
        "snow",
        "fog",
        "elastic_transform",
    }
)


def available_corruptions() -> list[str]:
    """Names accepted by :func:`corrupt`, in registry order."""
    return list(CORRUPTIONS)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in CORRUPTIONS:
        raise ValueError(f"name: unknown corruption {name!r}; available: {', '.join(CORRUPTIONS)}")
    return name


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image: expected a numpy array H x W x 3 uint8 (RGB), got {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected shape H x W x 3 (RGB), got {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image: expected dtype uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image: expected a non-empty image, got shape {image.shape}")
    return image


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """Apply one ImageNet-C corruption to an RGB image.

    Parameters
    ----------
    image
        ``H x W x 3`` ``uint8`` RGB array. Not modified.
    name
        A corruption name, see :func:`available_corruptions`.
    severity
        Integer 1 (mild) to 5 (strong), the ImageNet-C levels.
    seed
        Non-negative integer seeding ``np.random.default_rng``. The same
        ``(image, name, severity, seed)`` gives bit-identical output; deterministic corruptions
        ignore it.

    Returns
    -------
    numpy.ndarray
        New ``H x W x 3`` ``uint8`` array.

    Raises
    ------
    ValueError, TypeError
        Unknown ``name`` (the message lists the available ones), ``severity`` outside 1..5,
        a negative or non-integer ``seed``, or an ``image`` that is not ``H x W x 3`` ``uint8``.
    """
    name = _check_name(name)
    severity = check_severity(severity)
    seed = check_seed(seed)
    image = _check_image(image)
    rng = np.random.default_rng(seed)
    x = image.astype(np.float64) / 255.0
    y = CORRUPTIONS[name](x, severity, rng)
    return to_uint8(y)


@dataclass(frozen=True)
class CorruptionTransform:
    """Picklable per-image hook ``(image_uint8, stem) -> image_uint8`` (see :func:`make_transform`)."""

    name: str
    severity: int
    seed: int = 0

    def __call__(self, image: np.ndarray, stem: str) -> np.ndarray:
        return corrupt(image, self.name, self.severity, seed=derive_seed(self.seed, stem))

    def describe(self) -> dict[str, Any]:
        """Parameters to record next to results (JSON-serialisable)."""
        return {
            "corruption": self.name,
            "severity": self.severity,
            "seed": self.seed,
            "per_image_seed": "SeedSequence([seed, crc32(stem)])",
        }


def make_transform(name: str, severity: int, seed: int = 0) -> CorruptionTransform:
    """Build the per-image hook used by ``segcal predict``.

    The returned callable maps ``(image_uint8, stem)`` to the corrupted image with seed
    :func:`derive_seed` ``(seed, stem)``, so each image gets its own reproducible noise whatever
    the processing order or number of workers. Arguments are validated here, before any image
    is processed.
    """
    return CorruptionTransform(_check_name(name), check_severity(severity), check_seed(seed))


__all__ = [
    "CORRUPTIONS",
    "PARAMETERS",
    "STOCHASTIC",
    "CorruptionFn",
    "CorruptionTransform",
    "available_corruptions",
    "corrupt",
    "make_transform",
    "zoom_factors",
]
