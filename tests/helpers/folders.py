"""A small prediction folder for the command-line tests: float16 logits ``.npy`` and PNG labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def logit_folder(root: Path, n: int, seed: int = 0, *, num_classes: int = 4, height: int = 10, width: int = 12,
                 void: float = 0.05) -> tuple[Path, Path]:
    """``root/pred`` and ``root/labels`` with ``n`` images ``img_000 ...`` of ``height + i`` x ``width``
    pixels: logits ``3 N(0, 1)`` in float16, labels the argmax with probability 0.6 (else a random
    class), a fraction ``void`` of them 255; seeded, so a test gets the same folder every run."""
    rng = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir()
    lab.mkdir()
    for i in range(n):
        shape = (height + i, width)
        z = (rng.normal(size=(num_classes, *shape)) * 3).astype(np.float16)
        y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, num_classes, shape)).astype(np.uint8)
        y[rng.random(shape) < void] = 255
        np.save(pred / f"img_{i:03d}.npy", z)
        Image.fromarray(y).save(lab / f"img_{i:03d}.png")
    return pred, lab
