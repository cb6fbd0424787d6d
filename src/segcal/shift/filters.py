"""Image-processing building blocks of the ImageNet-C corruptions (NumPy, Pillow, SciPy).

Float64 ``H x W x 3`` images in ``[0, 1]``; see :mod:`segcal.shift.corruptions` for the sources
each kernel follows.
"""

from __future__ import annotations

import math

import numpy as np

from segcal.shift.common import scipy_ndimage, scipy_signal

FloatArray = np.ndarray


def to_uint8(x: FloatArray) -> np.ndarray:
    """``[0, 1]`` floats -> ``uint8`` with clipping and round-to-nearest."""
    return np.rint(np.clip(x * 255.0, 0.0, 255.0)).astype(np.uint8)


def gray(x: FloatArray) -> FloatArray:
    """ITU-R BT.601 luma (the weights of OpenCV's ``COLOR_RGB2GRAY``), shape ``H x W``."""
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def rgb_to_hsv(x: FloatArray) -> FloatArray:
    """RGB in ``[0, 1]`` -> HSV in ``[0, 1]`` (same convention as ``skimage.color.rgb2hsv``)."""
    x = np.asarray(x, dtype=np.float64)
    v = x.max(axis=-1)
    delta = v - x.min(axis=-1)
    safe_v = np.where(v > 0, v, 1.0)
    s = np.where(v > 0, delta / safe_v, 0.0)
    safe_d = np.where(delta > 0, delta, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h = np.where(
        x[..., 0] == v,
        (g - b) / safe_d,
        np.where(x[..., 1] == v, 2.0 + (b - r) / safe_d, 4.0 + (r - g) / safe_d),
    )
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: FloatArray) -> FloatArray:
    """HSV in ``[0, 1]`` -> RGB in ``[0, 1]`` (inverse of :func:`rgb_to_hsv`)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = h * 6.0
    i = np.floor(h6)
    f = h6 - i
    i = i.astype(np.int64) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def gauss1d(ksize: int, sigma: float) -> FloatArray:
    """Normalised 1-D Gaussian of ``ksize`` taps (OpenCV ``getGaussianKernel`` formula)."""
    i = np.arange(ksize) - (ksize - 1) / 2.0
    k = np.exp(-(i**2) / (2.0 * sigma**2))
    return k / k.sum()


def disk_kernel(radius: float, alias_blur: float) -> FloatArray:
    """Anti-aliased disk (defocus) kernel as in ImageNet-C's ``disk`` helper.

    A binary disk ``x^2 + y^2 <= radius^2`` on a ``(2*max(8, radius) + 1)``-wide grid, normalised
    to sum 1, then smoothed by a 3 x 3 (radius <= 8) or 5 x 5 Gaussian of std ``alias_blur``
    (OpenCV ``GaussianBlur`` in the reference; here a separable correlation with reflect-101
    borders) and renormalised to sum 1. (The reference does not renormalise; for radius 8 and
    10 its kernel sums to about 1.011-1.013 because the disk touches the grid edge.)
    """
    ndi = scipy_ndimage()
    if radius <= 8:
        half, ksize = 8, 3
    else:
        half, ksize = int(radius), 5
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    k = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    k /= k.sum()
    g = gauss1d(ksize, alias_blur)
    k = ndi.correlate1d(k, g, axis=0, mode="mirror")
    k = ndi.correlate1d(k, g, axis=1, mode="mirror")
    return k / k.sum()


def filter2d_reflect101(x: FloatArray, kernel: FloatArray) -> FloatArray:
    """Correlate each channel with a 2-D kernel, borders reflect-101 (OpenCV's default)."""
    sig = scipy_signal()
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    pad = ((ph, kh - 1 - ph), (pw, kw - 1 - pw)) + ((0, 0),) * (x.ndim - 2)
    xp = np.pad(x, pad, mode="reflect")
    # correlation == convolution with the flipped kernel
    kf = kernel[::-1, ::-1]
    if x.ndim == 3:
        kf = kf[..., None]
    return sig.fftconvolve(xp, kf, mode="valid", axes=(0, 1))


def motion_kernel_offsets(
    radius: int, sigma: float, angle_deg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps of the one-sided line kernel used for motion blur.

    ``2 * radius + 1`` taps at distances ``i = 0 .. 2*radius`` along the direction ``angle_deg``
    (degrees, counter-clockwise from the +x axis in image coordinates with y down), weighted by
    a half-Gaussian ``exp(-i^2 / (2 sigma^2))`` normalised to sum 1, each tap rounded to the
    nearest pixel (``ceil(v - 0.5)``). Returns ``(dy, dx, weights)``.
    """
    n = 2 * int(radius) + 1
    i = np.arange(n, dtype=np.float64)
    w = np.exp(-(i**2) / (2.0 * float(sigma) ** 2))
    w /= w.sum()
    a = np.deg2rad(angle_deg)
    dy = np.ceil(i * np.sin(a) - 0.5).astype(np.int64)
    dx = np.ceil(i * np.cos(a) - 0.5).astype(np.int64)
    return dy, dx, w


def line_blur(x: FloatArray, radius: int, sigma: float, angle_deg: float) -> FloatArray:
    """``out[y, x] = sum_i w_i * in[y + dy_i, x + dx_i]`` with edge replication (2-D or 3-D)."""
    dy, dx, w = motion_kernel_offsets(radius, sigma, angle_deg)
    m = int(max(np.abs(dy).max(), np.abs(dx).max()))
    h, wd = x.shape[:2]
    pad = ((m, m), (m, m)) + ((0, 0),) * (x.ndim - 2)
    xp = np.pad(x, pad, mode="edge")
    out = np.zeros_like(x, dtype=np.float64)
    for oy, ox, wi in zip(dy, dx, w, strict=True):
        out += wi * xp[m + oy : m + oy + h, m + ox : m + ox + wd]
    return out


def clipped_zoom(x: FloatArray, zoom: float) -> FloatArray:
    """Zoom into the centre by ``zoom`` (>= 1) and keep the original size.

    The centre ``ceil(H / zoom) x ceil(W / zoom)`` crop is resized by ``zoom`` with bilinear
    interpolation (``scipy.ndimage.zoom(order=1)``) and the centre ``H x W`` is kept. Each axis
    uses its own size (``imagecorruptions``' generalisation of ImageNet-C's square version).
    """
    ndi = scipy_ndimage()
    h, w = x.shape[:2]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top : top + ch, left : left + cw]
    factors = (zoom, zoom) + (1,) * (x.ndim - 2)
    z = ndi.zoom(crop, factors, order=1)
    if z.shape[0] < h or z.shape[1] < w:  # pragma: no cover - round(ceil(h/z)*z) >= h
        pad = ((0, max(0, h - z.shape[0])), (0, max(0, w - z.shape[1]))) + ((0, 0),) * (x.ndim - 2)
        z = np.pad(z, pad, mode="edge")
    t, lft = (z.shape[0] - h) // 2, (z.shape[1] - w) // 2
    return z[t : t + h, lft : lft + w]


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> FloatArray:
    """Square diamond-square ("plasma") height map in ``[0, 1]`` as used by ImageNet-C's fog.

    ``mapsize`` must be a power of two. Starting from a zero corner, each pass fills square
    centres then diamond centres with the mean of their four neighbours (periodic wrap) plus
    uniform noise ``wibble * U(-wibble, wibble)``; ``wibble`` starts at 100 and is divided by
    ``wibbledecay`` after each pass. The map is min-max normalised. Random numbers are drawn
    from ``rng`` only.
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize: expected a power of two >= 2, got {mapsize}")
    a = np.zeros((mapsize, mapsize), dtype=np.float64)
    step = mapsize
    wibble = 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        return total / 4.0 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        # squares: centre of each step x step cell
        corners = a[0:mapsize:step, 0:mapsize:step]
        s = corners + np.roll(corners, -1, axis=0)
        s = s + np.roll(s, -1, axis=1)
        a[half:mapsize:step, half:mapsize:step] = noisy_mean(s)
        # diamonds: edge midpoints
        centres = a[half:mapsize:step, half:mapsize:step]
        corners = a[0:mapsize:step, 0:mapsize:step]
        top = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        a[0:mapsize:step, half:mapsize:step] = noisy_mean(top)
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        a[half:mapsize:step, 0:mapsize:step] = noisy_mean(left)
        step //= 2
        wibble /= wibbledecay
    a -= a.min()
    mx = a.max()
    return a / mx if mx > 0 else a


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


__all__ = [
    "clipped_zoom",
    "disk_kernel",
    "filter2d_reflect101",
    "gauss1d",
    "gray",
    "hsv_to_rgb",
    "line_blur",
    "motion_kernel_offsets",
    "next_pow2",
    "plasma_fractal",
    "rgb_to_hsv",
    "to_uint8",
]
