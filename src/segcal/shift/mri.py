"""MRI acquisition shifts on 3-D volumes, five severities each, deterministic under a seed.

The shifts model common MR artefacts, as in the MRI augmentation libraries TorchIO (Pérez-García
et al., "TorchIO: a Python library for efficient loading, preprocessing, augmentation and
patch-based sampling of medical images in deep learning", CMPB 2021: ``RandomBiasField``,
``RandomGhosting``, ``RandomBlur``, ``RandomGamma``, ``RandomAnisotropy``) and MONAI
(``RandBiasField``, ``RandRicianNoise``, ``RandGaussianSmooth``, ``RandAdjustContrast``).
This module is an independent NumPy + SciPy implementation (no torch, no MONAI): every random
draw comes from ``np.random.default_rng(seed)``, so the same ``(volume, name, severity, seed)``
gives bit-identical output. The severity tables are segcal's own choice (the libraries define
random *ranges* for augmentation, not severity levels); they are listed in :data:`MRI_PARAMETERS`
and in ``docs/shift.md``.

Intensities are arbitrary in MRI, so intensity-valued parameters (noise std) are relative to
the volume's robust range ``ref = p99.5 - p0.5`` of its voxel values. Spatial parameters are in
voxels (MSD hippocampus crops are 1 mm isotropic, about 35 x 51 x 35).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from segcal.shift.common import check_seed, check_severity, derive_seed, scipy_ndimage

VolumeFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

MRI_PARAMETERS: Mapping[str, tuple[Any, ...]] = types.MappingProxyType(
    {
        # max |coefficient| of the degree-3 Legendre log-field (TorchIO default range is 0.5)
        "bias_field": (0.1, 0.2, 0.3, 0.4, 0.5),
        # Rician noise std, relative to the robust intensity range
        "rician_noise": (0.02, 0.04, 0.06, 0.09, 0.12),
        # Gaussian blur std in voxels
        "gaussian_blur": (0.5, 0.75, 1.0, 1.5, 2.0),
        # gamma exponent on the min-max normalised intensities (> 1 darkens mid-tones)
        "gamma": (1.25, 1.5, 2.0, 2.5, 3.0),
        # (ghost period n in k-space lines, attenuation of the other lines)
        "ghosting": ((4, 0.2), (4, 0.35), (3, 0.5), (3, 0.65), (2, 0.8)),
        # down-sampling factor per axis before linear up-sampling back
        "low_resolution": (1.5, 2.0, 2.5, 3.0, 4.0),
    }
)


def _robust_range(v: np.ndarray) -> float:
    lo, hi = np.percentile(v, [0.5, 99.5])
    r = float(hi - lo)
    return r if r > 0 else float(np.abs(v).max() or 1.0)


def legendre_bias_field(
    shape: tuple[int, ...], coefficient: float, rng: np.random.Generator, order: int = 3
) -> np.ndarray:
    """Multiplicative bias field ``exp(sum_{i+j+k<=order} c_ijk P_i(z) P_j(y) P_k(x))``.

    ``P_n`` are Legendre polynomials on ``[-1, 1]`` along each axis and ``c_ijk ~ U(-coefficient,
    coefficient)`` (TorchIO ``RandomBiasField``, order 3; MONAI ``RandBiasField`` uses the same
    form). Coefficients are drawn in lexicographic ``(i, j, k)`` order.
    """
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    polys = [
        [np.polynomial.legendre.legval(a, [0] * d + [1]) for d in range(order + 1)] for a in axes
    ]
    log_field = np.zeros(shape, dtype=np.float64)
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                c = rng.uniform(-coefficient, coefficient)
                log_field += c * np.multiply.outer(
                    np.multiply.outer(polys[0][i], polys[1][j]), polys[2][k]
                )
    return np.exp(log_field)


def bias_field(v: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative intensity inhomogeneity (:func:`legendre_bias_field`).

    Coefficient bound 0.1, 0.2, 0.3, 0.4, 0.5 for severities 1-5. Stochastic.
    """
    return v * legendre_bias_field(v.shape, MRI_PARAMETERS["bias_field"][severity - 1], rng)


def rician_noise(v: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rician noise ``sqrt((v + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, sigma^2)`` (MONAI ``RandRicianNoise``).

    ``sigma = s * ref`` with ``s`` = 0.02, 0.04, 0.06, 0.09, 0.12 and ``ref`` the robust intensity
    range. Magnitude images are non-negative, so the result is too. Stochastic.
    """
    sigma = MRI_PARAMETERS["rician_noise"][severity - 1] * _robust_range(v)
    n1 = rng.normal(0.0, sigma, size=v.shape)
    n2 = rng.normal(0.0, sigma, size=v.shape)
    return np.sqrt((v + n1) ** 2 + n2**2)


def gaussian_blur(v: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Isotropic Gaussian blur, std 0.5, 0.75, 1, 1.5, 2 voxels (nearest borders). Deterministic."""
    ndi = scipy_ndimage()
    return ndi.gaussian_filter(v, MRI_PARAMETERS["gaussian_blur"][severity - 1], mode="nearest")


def gamma(v: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gamma contrast change ``lo + (hi - lo) * ((v - lo) / (hi - lo)) ** g`` (TorchIO ``RandomGamma``).

    ``g`` = 1.25, 1.5, 2, 2.5, 3 with ``lo, hi`` the volume min and max (the intensity range is
    kept). Deterministic.
    """
    g = MRI_PARAMETERS["gamma"][severity - 1]
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return v.copy()
    return lo + (hi - lo) * ((v - lo) / (hi - lo)) ** g


def ghosting(v: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """k-space ghosting along a random axis (after TorchIO ``RandomGhosting``).

    In the centred 3-D Fourier spectrum, every k-space plane along the chosen axis whose index is
    not a multiple of ``n`` is multiplied by ``1 - a``; the centre plane is kept, so the mean
    intensity is preserved. This creates ``n`` shifted replicas (ghosts) of the object along the
    axis. ``(n, a)`` = (4, 0.2), (4, 0.35), (3, 0.5), (3, 0.65), (2, 0.8). The axis is drawn
    uniformly from the three axes (stochastic). The magnitude of the inverse transform is
    returned.
    """
    n, a = MRI_PARAMETERS["ghosting"][severity - 1]
    axis = int(rng.integers(0, v.ndim))
    k = np.fft.fftshift(np.fft.fftn(v))
    size = v.shape[axis]
    centre = size // 2
    idx = np.arange(size) - centre
    mask = np.where(idx % n == 0, 1.0, 1.0 - a)
    shape = [1] * v.ndim
    shape[axis] = size
    k = k * mask.reshape(shape)
    return np.abs(np.fft.ifftn(np.fft.ifftshift(k)))


def low_resolution(v: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Down-sample by ``f`` (linear, after an anti-alias Gaussian of std ``(f - 1) / 2``) and
    up-sample back to the original shape (linear). ``f`` = 1.5, 2, 2.5, 3, 4 per axis.
    Deterministic.
    """
    ndi = scipy_ndimage()
    f = MRI_PARAMETERS["low_resolution"][severity - 1]
    smooth = ndi.gaussian_filter(v, (f - 1.0) / 2.0, mode="nearest")
    small_shape = tuple(max(2, round(n / f)) for n in v.shape)
    small = ndi.zoom(
        smooth,
        [s / n for s, n in zip(small_shape, v.shape, strict=True)],
        order=1,
        mode="nearest",
        grid_mode=True,
    )
    back = ndi.zoom(
        small,
        [n / s for n, s in zip(v.shape, small.shape, strict=True)],
        order=1,
        mode="nearest",
        grid_mode=True,
    )
    return back


MRI_SHIFTS: Mapping[str, VolumeFn] = types.MappingProxyType(
    {
        "bias_field": bias_field,
        "rician_noise": rician_noise,
        "gaussian_blur": gaussian_blur,
        "gamma": gamma,
        "ghosting": ghosting,
        "low_resolution": low_resolution,
    }
)

#: MRI shifts whose output depends on the seed.
MRI_STOCHASTIC = frozenset({"bias_field", "rician_noise", "ghosting"})


def available_mri_shifts() -> list[str]:
    """Names accepted by :func:`corrupt_volume`."""
    return list(MRI_SHIFTS)


def _check_volume(volume: Any) -> np.ndarray:
    if not isinstance(volume, np.ndarray):
        raise TypeError(f"volume: expected a 3-D numpy array, got {type(volume).__name__}")
    if volume.ndim != 3:
        raise ValueError(f"volume: expected a 3-D array (D x H x W), got shape {volume.shape}")
    if volume.dtype.kind not in "fiu" or volume.dtype == np.float16:
        raise TypeError(
            f"volume: expected a real float32/float64 or integer array, got {volume.dtype}"
        )
    if min(volume.shape) < 2:
        raise ValueError(f"volume: every axis needs at least 2 voxels, got shape {volume.shape}")
    if volume.dtype.kind == "f" and not np.all(np.isfinite(volume)):
        raise ValueError("volume: contains NaN or infinite values")
    return volume


def corrupt_volume(volume: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """Apply one MRI shift to a 3-D volume.

    Parameters
    ----------
    volume
        ``D x H x W`` real array (float or integer). Not modified.
    name
        One of :func:`available_mri_shifts`.
    severity
        Integer 1..5.
    seed
        Non-negative integer for ``np.random.default_rng``; bit-identical output for the same
        inputs.

    Returns
    -------
    numpy.ndarray
        Same shape; float32 for float32 input, float64 otherwise.
    """
    if not isinstance(name, str) or name not in MRI_SHIFTS:
        raise ValueError(f"name: unknown MRI shift {name!r}; available: {', '.join(MRI_SHIFTS)}")
    severity = check_severity(severity)
    seed = check_seed(seed)
    volume = _check_volume(volume)
    out_dtype = np.float32 if volume.dtype == np.float32 else np.float64
    rng = np.random.default_rng(seed)
    y = MRI_SHIFTS[name](volume.astype(np.float64), severity, rng)
    return np.ascontiguousarray(y, dtype=out_dtype)


@dataclass(frozen=True)
class VolumeShiftTransform:
    """Picklable per-case hook ``(volume, stem) -> volume`` with seed ``derive_seed(seed, stem)``."""

    name: str
    severity: int
    seed: int = 0

    def __call__(self, volume: np.ndarray, stem: str) -> np.ndarray:
        return corrupt_volume(volume, self.name, self.severity, seed=derive_seed(self.seed, stem))


def make_volume_transform(name: str, severity: int, seed: int = 0) -> VolumeShiftTransform:
    """Per-case hook for 3-D pipelines; arguments validated eagerly."""
    if not isinstance(name, str) or name not in MRI_SHIFTS:
        raise ValueError(f"name: unknown MRI shift {name!r}; available: {', '.join(MRI_SHIFTS)}")
    return VolumeShiftTransform(name, check_severity(severity), check_seed(seed))
