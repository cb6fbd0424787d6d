"""Shared checks of the integration tests: two metric dicts of CalibrationMetrics.compute()."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest


def assert_same_metrics(got: dict[str, Any], ref: dict[str, Any], atol: float = 0.0) -> None:
    """Same keys; every float and array equal to ``atol`` (NaN where the reference has NaN)."""
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        g = got[k]
        if isinstance(v, dict):
            assert_same_metrics(g, v, atol)
        elif isinstance(v, np.ndarray):
            np.testing.assert_allclose(np.asarray(g, dtype=float), v.astype(float), rtol=0, atol=atol,
                                       equal_nan=True, err_msg=k)
        elif isinstance(v, float) and math.isnan(v):
            assert isinstance(g, float) and math.isnan(g), k
        elif isinstance(v, float):
            assert g == pytest.approx(v, rel=0, abs=atol), k
        else:
            assert g == v, k


@pytest.fixture
def same_metrics():
    return assert_same_metrics
