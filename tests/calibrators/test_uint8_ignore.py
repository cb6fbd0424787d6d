"""An ignore index outside the labels' dtype (256, -1 for uint8) marks no pixel in every fit.

torch compares ``uint8_tensor != 256`` with the index wrapped to the dtype (256 -> 0, -1 -> 255), so
a fit on uint8 labels used to leave every class-0 (or 255) pixel out, exit 0, while the same labels
as int64 kept them (segcal.validation.valid_labels is the exact comparison)."""

from __future__ import annotations

import pytest
import torch

import segcal.calibrators as sc
from segcal.calibrators.selective import ece_vs_selector_accuracy


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 8, 8, generator=g) * 3
    y = torch.randint(0, 3, (2, 8, 8), generator=g)
    y[0, 0, :4] = 255  # a uint8 value that -1 would wrap onto
    return z, y


@pytest.mark.parametrize("ignore", [256, 300, -1])
@pytest.mark.parametrize("method", ["ts", "vs", "cmsop"])
def test_fit_on_uint8_labels_equals_int64_for_an_out_of_range_ignore_index(data, method, ignore):
    z, y = data
    y = y.clone()
    y[y == 255] = 2  # every label in 0..2: the ignore index marks nothing
    a = sc.create(method, seed=0).fit(z, y.to(torch.uint8), ignore_index=ignore)
    b = sc.create(method, seed=0).fit(z, y, ignore_index=ignore)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # and not what leaving class 0 (the wrapped 256) out gives
    if ignore == 256:
        c = sc.create(method, seed=0).fit(z, y, ignore_index=0)
        assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_selector_accuracy_curve_on_uint8_labels_equals_int64(data):
    z, y = data
    y = y.clone()
    y[y == 255] = 1
    a = ece_vs_selector_accuracy(z, y.to(torch.uint8), ignore_index=256)
    b = ece_vs_selector_accuracy(z, y, ignore_index=256)
    assert a == b
