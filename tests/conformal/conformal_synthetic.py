"""Synthetic exchangeable "images" for the conformal tests: each image draws its own difficulty
(temperature) and size, probabilities from a softmax of Gaussian logits, labels drawn from those
probabilities (so the model is calibrated per pixel), and a few ``ignore_index`` pixels."""

from __future__ import annotations

import numpy as np

IGNORE = 255


def image(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int = 4, scale: float = 2.0,
          ignore_frac: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """One image: probabilities ``(C, *shape)`` float32 and labels ``(*shape)`` int64."""
    z = rng.normal(size=(num_classes, *shape)) * scale
    z -= z.max(axis=0, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=0, keepdims=True)
    u = rng.random(shape)
    y = (np.cumsum(p, axis=0) < u[None]).sum(axis=0).clip(0, num_classes - 1).astype(np.int64)
    y[rng.random(shape) < ignore_frac] = IGNORE
    return p.astype(np.float32), y


def pool(rng: np.random.Generator, n: int, num_classes: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` iid images: 2D of varying size and 3D volumes, each with its own difficulty."""
    out = []
    for i in range(n):
        shape = (int(rng.integers(3, 6)), int(rng.integers(4, 9)), int(rng.integers(4, 9))) if i % 4 == 3 \
            else (int(rng.integers(6, 20)), int(rng.integers(6, 20)))
        out.append(image(rng, shape, num_classes, scale=float(rng.uniform(0.5, 4.0))))
    return out


def heterogeneous_pool(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images where difficulty and size go together: 75 % large easy images (32 x 32, sharp
    probabilities), 25 % small hard ones (6 x 6, nearly flat), shuffled (still iid per image)."""
    out = []
    for _ in range(n):
        if rng.random() < 0.25:
            out.append(image(rng, (6, 6), scale=0.3, ignore_frac=0.0))
        else:
            out.append(image(rng, (32, 32), scale=5.0, ignore_frac=0.0))
    return out
