"""The fit's progress bar: optimiser steps on stderr with the training loss and, with validation
data, the monitored validation value; nothing without ``progress``."""

from __future__ import annotations

import io

import numpy as np
import pytest

import segcal.calibrators as sc


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def data(seed: int):
    g = np.random.default_rng(seed)
    z = (g.normal(size=(4, 3, 16, 16)) * 3).astype(np.float32)
    y = np.where(g.random((4, 16, 16)) < 0.7, z.argmax(1), g.integers(0, 3, (4, 16, 16)))
    return z, y


@pytest.mark.parametrize("method,optimizer", [("ts", "lbfgs"), ("ts", "adam")])
@pytest.mark.parametrize("progress", [True, False])
def test_fit_bar_shows_loss_and_validation(monkeypatch, method, optimizer, progress):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # redraw on every update (a small fit ends in < 0.1 s)
    z, y = data(0)
    cal = sc.create(method, optimizer=optimizer, **({"max_steps": 40, "eval_every": 10} if optimizer == "adam" else {}))
    cal.fit(z, y, val=data(1), progress=progress)
    out = term.getvalue()
    assert ("loss=" in out and "val=" in out) is progress, out[-300:]
