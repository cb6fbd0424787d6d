"""Threshold selection on a per-image loss table: CRC (in expectation) and Learn-then-Test (w.p. 1 − δ).

Both work on the rows of a :class:`~segcal.conformal.tables.LossTable`, i.e. on images or volumes
(the exchangeable units), never on pixels. Losses ``L_i(λ)`` lie in ``[0, B]`` and are
non-increasing in λ; ``R̂_n(λ) = (1/n) Σ_i L_i(λ)`` is the calibration risk of ``n`` images.

Conformal risk control (``../shared/methods.md`` §9.3, Angelopoulos et al., ICLR 2024)::

    λ̂ = inf { λ : (n / (n+1)) R̂_n(λ) + B / (n+1) ≤ α }

The finite-sample correction is the ``B / (n+1)`` term (the unseen test image counted at the worst
loss B) and the factor ``n / (n+1)``. Guarantee: ``E[L_{n+1}(λ̂)] ≤ α``, the expectation taken over
the calibration images and a new exchangeable test image. It needs ``B / (n+1) ≤ α`` at the
largest λ where the loss is 0, i.e. ``n ≥ B/α − 1`` images.

Learn-then-Test with Hoeffding–Bentkus p-values (§9.4, Angelopoulos, Bates, Candès, Jordan, Lei
2021; losses in [0, 1]): for each λ the null ``H_λ : R(λ) > α`` gets the p-value ::

    p_H(λ)  = exp(−n · h(min(R̂_n(λ), α), α)),  h(a, b) = a log(a/b) + (1 − a) log((1 − a)/(1 − b))
    p_B(λ)  = e · P(Binomial(n, α) ≤ ⌈n R̂_n(λ)⌉)
    p_HB(λ) = min(p_H(λ), p_B(λ))

For a binary loss (COSE, ``"coverage"``) ``n R̂_n(λ)`` is Binomial(n, R(λ)), so
``P(Binomial(n, α) ≤ n R̂_n(λ))`` is itself a valid p-value and the factor e is dropped
(``binary=True``; LTT paper §3.2 [paper], as MAPIE's ``binary`` option) [inferred from §9.4].

Fixed-sequence testing from the most conservative λ (the largest) downwards rejects while
``p_HB ≤ δ`` and stops at the first failure; λ̂ is the smallest rejected λ. The family-wise error
is at most δ, so with probability at least 1 − δ over the calibration images
``R(λ̂) = E[L(λ̂)] ≤ α``.
"""

from __future__ import annotations

import math

import numpy as np

from segcal.errors import InputError


def check_level(value: float, name: str) -> float:
    """A level α or δ in (0, 1), as float."""
    v = float(value)
    if not 0.0 < v < 1.0 or not math.isfinite(v):
        raise InputError(f"{name}: expected a level in (0, 1), found {value!r}")
    return v


def check_losses(losses: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """A loss table ``(n, G)`` as float64, refused unless finite and inside ``[0, bound]``."""
    a = np.asarray(losses, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"losses: expected a table (n_images, n_grid), found shape {a.shape}")
    if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > bound:
        raise InputError(f"losses: values must be finite and in [0, {bound}]")
    return a


def crc_index(losses: np.ndarray, alpha: float, bound: float = 1.0) -> int:
    """Index into the grid of the CRC threshold λ̂ (§9.3; formula in the module docstring).

    Parameters
    ----------
    losses
        ``(n_images, G)`` per-image losses in ``[0, bound]``, non-increasing along the grid.
    alpha
        Target risk α.
    bound
        The loss bound B.

    Raises
    ------
    InputError
        No grid point satisfies the inequality (too few images for α, or a grid whose largest λ
        still has a risk above α): the message gives the number of images needed.
    """
    a = check_losses(losses, bound)
    alpha = check_level(alpha, "alpha")
    n = a.shape[0]
    # (n/(n+1)) R̂ + B/(n+1) <= alpha  <=>  Σ_i L_i + B <= alpha (n+1): the same inequality with one
    # rounding less, so that a tie (e.g. binary losses with alpha (n+1) an integer) counts as <=
    total = a.sum(axis=0) + bound
    ok = np.flatnonzero(total <= alpha * (n + 1))
    adjusted = total / (n + 1)
    if ok.size == 0:
        need = max(math.ceil(bound / alpha - 1), 1)
        raise InputError(
            f"alpha: no threshold on the grid controls the risk at alpha={alpha} with {n} images "
            f"(smallest corrected risk {adjusted.min():.4g}); CRC needs at least {need} images and a grid "
            "that reaches a zero loss (lambda = 1)"
        )
    return int(ok[0])


def _log_binom_cdf(n: int, p: float) -> np.ndarray:
    """``log P(Binomial(n, p) ≤ k)`` for k = 0..n (float64, no SciPy)."""
    k = np.arange(n + 1, dtype=np.float64)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    logpmf = logfact[n] - logfact - logfact[::-1] + k * math.log(p) + (n - k) * math.log1p(-p)
    return np.logaddexp.accumulate(logpmf)


def hb_pvalues(risk_hat: np.ndarray, n: int, alpha: float, binary: bool = False) -> np.ndarray:
    """Hoeffding–Bentkus p-values of ``H : R > α`` for empirical risks ``risk_hat`` of ``n`` units (§9.4).

    ``p = min(exp(−n h(min(R̂, α), α)), e · P(Bin(n, α) ≤ ⌈n R̂⌉))`` for losses in [0, 1]; capped at 1.
    ``binary=True`` (losses in {0, 1}) drops the factor e (module docstring).
    """
    r = np.asarray(risk_hat, dtype=np.float64)
    alpha = check_level(alpha, "alpha")
    a = np.minimum(r, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(a > 0, a * np.log(a / alpha), 0.0)
        t2 = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - alpha)), 0.0)
    p_h = np.exp(-n * (t1 + t2))
    kk = np.clip(np.ceil(n * r), 0, n).astype(np.int64)  # rounding can only raise it: conservative
    p_b = (1.0 if binary else math.e) * np.exp(_log_binom_cdf(n, alpha)[kk])
    return np.minimum(np.minimum(p_h, p_b), 1.0)


def ltt_index(losses: np.ndarray, alpha: float, delta: float, binary: bool = False) -> int:
    """Index of the Learn-then-Test threshold (Hoeffding–Bentkus p-values, fixed-sequence testing
    from the largest λ down; §9.4, formulas in the module docstring). ``binary=True`` for losses
    in {0, 1} (refused otherwise): the exact binomial p-value without the factor e.

    Raises
    ------
    InputError
        Not even the largest λ is certified at (α, δ) with these images.
    """
    a = check_losses(losses, 1.0)
    delta = check_level(delta, "delta")
    n = a.shape[0]
    if binary and not np.isin(a, (0.0, 1.0)).all():
        raise InputError("losses: binary=True needs losses in {0, 1}")
    p = hb_pvalues(a.mean(axis=0), n, alpha, binary)
    idx = None
    for j in range(p.size - 1, -1, -1):
        if p[j] > delta:
            break
        idx = j
    if idx is None:
        raise InputError(
            f"delta: with {n} images no threshold is certified at alpha={alpha}, delta={delta} "
            f"(p-value at the largest lambda {p[-1]:.3g}); use more calibration images or larger levels"
        )
    return idx


__all__ = ["check_level", "check_losses", "crc_index", "hb_pvalues", "ltt_index"]
