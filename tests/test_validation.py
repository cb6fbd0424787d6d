"""segcal.validation: the one input-validation layer (issue 16 items that live in the API).

Each test fails on a8985da: 16/32-bit label tensors refused, no channel-last hint, messages
naming only the API keyword, no probabilities-as-logits check, plain ValueError/TypeError.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.errors import InputError, InputTypeError
from segcal.metrics import CalibrationMetrics
from segcal.validation import (
    channel_last_hint,
    check_class_count,
    check_input_kind,
    check_label_range,
    check_labels,
    check_scores,
    looks_like_probabilities,
)


def _logits(seed=0, shape=(2, 3, 5, 6)):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32])
def test_wide_unsigned_label_tensors_are_accepted(dtype):
    z = _logits()
    y = torch.from_numpy(np.random.default_rng(1).integers(0, 3, (2, 5, 6)))
    ref = CalibrationMetrics(3, n_bins=10)
    ref.update(z, y)
    got = CalibrationMetrics(3, n_bins=10)
    got.update(z, y.to(dtype))
    assert got.compute()["ece"] == ref.compute()["ece"]
    assert check_labels(y.to(dtype)).dtype == torch.int64


def test_uint64_labels_that_do_not_fit_int64_are_refused():
    with pytest.raises(InputError, match="do not fit int64"):
        check_labels(np.array([2**63 + 5], dtype=np.uint64))


def test_errors_are_input_errors_of_the_usual_types():
    with pytest.raises(InputError) as e1:
        check_scores(torch.zeros(1, 1, 4, 4))
    assert isinstance(e1.value, ValueError)
    with pytest.raises(InputTypeError) as e2:
        check_scores(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    assert isinstance(e2.value, TypeError) and isinstance(e2.value, InputError)


def test_channel_last_hint():
    with pytest.raises(InputError, match="channel-last"):
        check_scores(np.zeros((1, 360, 480, 11), np.float32), num_classes=11)
    with pytest.raises(InputError, match="channel-last"):
        check_class_count(np.zeros((8, 10, 3), np.float32), 3, "pred/a.npy")
    assert channel_last_hint((3, 8, 10), 0, 3) == ""
    assert channel_last_hint((11, 360, 480)) == ""


def test_label_range_message_names_the_cli_flag_with_the_value():
    y = torch.tensor([0, 1, 255])
    with pytest.raises(InputError) as exc:
        check_label_range(y, torch.ones(3, dtype=torch.bool), 3)
    assert "ignore_index=255" in str(exc.value) and "--ignore-index 255" in str(exc.value)


def test_probabilities_given_as_logits_and_back():
    z = _logits(shape=(3, 5, 6))
    p = torch.softmax(z, 0)
    assert looks_like_probabilities(p) and not looks_like_probabilities(z)
    assert looks_like_probabilities(p.half())  # a float16 probabilities file (float16 tolerance)
    with pytest.raises(InputError, match="input_type='probs'"):
        check_input_kind(p, "logits", "preds")
    with pytest.raises(InputError, match="--probabilities"):
        check_input_kind(p, "logits", "pred/a.npy", flags={"probs": "--probabilities", "logits": "x"})
    with pytest.raises(InputError, match="input_type='logits'"):
        check_input_kind(z, "probs", "preds")
    check_input_kind(z, "logits", "preds")
    check_input_kind(p.half(), "probs", "preds")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_finite_finds_any_nan_or_inf_and_counts_all(dtype):
    """check_finite (min / max test): a NaN or inf anywhere -- first or last element, alone or
    with the other, in a non-contiguous view, a NaN beside +inf and -inf -- is found and every one
    counted; finite, empty and integer input passes."""
    from segcal import validation as v

    n = (1 << 23) + 5
    x = torch.zeros(n, dtype=dtype)
    v.check_finite(x, "x")
    for i, val in [(0, "nan"), (n - 1, "nan"), (n - 1, "inf"), (7, "-inf")]:
        z = x.clone()
        z[i] = float(val)
        want = "1 NaN, 0 inf" if val == "nan" else "0 NaN, 1 inf"
        with pytest.raises(InputError, match=rf"x: contains non-finite values \({want}\)"):
            v.check_finite(z, "x")
    x[-1] = float("nan")
    x[3] = float("inf")
    x[4] = float("-inf")
    with pytest.raises(InputError, match=r"x: contains non-finite values \(1 NaN, 2 inf\)"):
        v.check_finite(x, "x")
    y = torch.zeros(19, 64, 64, dtype=dtype).movedim(0, -1)  # not contiguous
    y[5, 7, 3] = float("-inf")
    with pytest.raises(InputError, match="0 NaN, 1 inf"):
        v.check_finite(y, "y")
    v.check_finite(torch.zeros(0, dtype=dtype), "empty")
    v.check_finite(torch.arange(10), "ints")
