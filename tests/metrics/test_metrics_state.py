"""The metric state: declared once, validated on load, idempotent under sync, never merged twice.

Each test here reproduces a trust item of issue 16 (a silently wrong figure, a raw traceback or a
refused valid input on the state layer of :class:`segcal.metrics.CalibrationMetrics`).
"""

from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ranks import free_port
from segcal.errors import InputError
from segcal.metrics import (
    CalibrationMetrics,
    calibration_metrics,
    compute_from_state,
    ece_from_bins,
    to_jsonable,
)
from segcal.metrics.state import CAT_FIELDS, FIELDS, SUM_FIELDS


def _metric(seed: int = 0, n: int = 3, per_image: bool = True) -> CalibrationMetrics:
    rng = np.random.default_rng(seed)
    m = CalibrationMetrics(4, ignore_index=255, per_image=per_image)
    y = rng.integers(0, 4, size=(n, 6, 5))
    y[0, 0] = 255
    m.update(torch.from_numpy(rng.normal(size=(n, 4, 6, 5)) * 2), torch.from_numpy(y))
    return m


# ------------------------------------------------------------------ the declaration
def test_every_declared_field_is_in_the_state_dict_with_its_declared_shape():
    m = _metric()
    st = m.state_dict()
    for f in FIELDS:
        row = tuple(f.shape(m.dims))
        assert tuple(st[f.name].shape) == ((m.n_images, *row) if f.reduction == "cat" else row), f.name
        assert st[f.name].dtype == f.dtype
    assert {f.name for f in SUM_FIELDS} | {f.name for f in CAT_FIELDS} == {f.name for f in FIELDS}


def test_compute_from_state_of_a_state_dict_equals_compute():
    m = _metric()
    a, b = m.compute(), compute_from_state(m.state_dict())
    assert json.dumps(to_jsonable(a), sort_keys=True) == json.dumps(to_jsonable(b), sort_keys=True)


def test_results_json_turns_nan_into_null():
    x = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    y[1] = 255  # an image without valid pixels: NaN image ECE
    r = calibration_metrics(x, y, ignore_index=255)
    js = to_jsonable(r)
    assert js["image_ece_values"][1] is None and isinstance(js["image_ece_values"][0], float)
    assert isinstance(js["n_pixels"], int) and isinstance(js["confusion_matrix"][0][0], int)
    json.dumps(js, allow_nan=False)


def test_image_bins_accessor():
    m = _metric(n=4)
    ib = m.image_bins()
    assert ib.dtype == torch.float64 and tuple(ib.shape) == (4, 3, m.n_bins)
    # the per-image ECE of these bins is the engine's image_ece_values
    r = m.compute()
    np.testing.assert_allclose(ece_from_bins(*(ib[:, j].numpy() for j in range(3))), r["image_ece_values"],
                               rtol=0, atol=1e-15)
    assert ib[:, 0].sum().item() == r["n_pixels"]
    with pytest.raises(ValueError, match="per_image=False"):
        _metric(per_image=False).image_bins()


# ------------------------------------------------------------------ merge
def test_merge_with_itself_is_refused():
    m = _metric()
    n = m.compute()["n_pixels"]
    with pytest.raises(ValueError, match="into itself"):
        m.merge(m)
    assert m.compute()["n_pixels"] == n  # untouched


# ------------------------------------------------------------------ validated states
def _tampered(tmp_path, edit):
    st = _metric().state_dict()
    edit(st)
    p = tmp_path / "state.pt"
    torch.save(st, p)
    return p


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda st: st.__setitem__("img_bins", st["img_bins"][:2]), r"img_bins has shape \(2, 15, 2, 2\), expected \(3, 15, 2, 2\)"),
        (lambda st: st.__setitem__("img_bins", st["img_bins"][..., :1]), "img_bins has shape"),
        (lambda st: st["pooled_bins"].__setitem__((0, 0, 0), -5.0), "pooled_bins holds a pixel count of -5"),
        (lambda st: st["confusion"].__setitem__((0, 0), -1.0), "confusion holds a pixel count of -1"),
        (lambda st: st["fine"].__setitem__((3, 0), float("nan")), "fine holds non-finite"),
        (lambda st: st.pop("classwise"), "no 'classwise' entry"),
        (lambda st: st["img_totals"].__setitem__((0, 0), 1.0e6), "img_totals does not sum to pooled_totals"),
        (lambda st: st.__setitem__("n_images", 7), r"img_bins has shape \(3, 15, 2, 2\), expected \(7, 15, 2, 2\)"),
        (lambda st: st.__setitem__("n_images", -1), "n_images is -1"),
        (lambda st: st["config"].__setitem__("n_bins", 10), r"has shape .*expected .*n_bins=10"),
        (lambda st: st["config"].__setitem__("num_classes", 1), "invalid metric state config: num_classes"),
        (lambda st: st["config"].pop("fine_bins"), "config is .*expected the keys"),
        (lambda st: st.__setitem__("config", [1, 2]), "config is list"),
        (lambda st: st.__setitem__("format", "other"), "not a segcal metric state"),
        (lambda st: st.__setitem__("version", 99), "version 99"),
    ],
)
def test_tampered_state_is_refused_naming_the_file(tmp_path, edit, match):
    p = _tampered(tmp_path, edit)
    with pytest.raises(InputError, match=match) as exc:
        CalibrationMetrics.load(p)
    assert str(p) in str(exc.value)


def test_tampered_state_dict_is_refused():
    st = _metric().state_dict()
    st["img_class"] = st["img_class"][:, :2]
    with pytest.raises(InputError, match=r"state: img_class has shape \(3, 2, 3\), expected \(3, 4, 3\)"):
        CalibrationMetrics.from_state_dict(st)


def test_saved_state_without_sync_ids_still_loads(tmp_path):
    """States written before sync ids existed (segcal 0.x layout) load unchanged."""
    m = _metric()
    st = m.state_dict()
    del st["sync_ids"]
    p = tmp_path / "old.pt"
    torch.save(st, p)
    assert CalibrationMetrics.load(p).compute()["ece"] == m.compute()["ece"]


def _write_pickle(p):
    with open(p, "wb") as fh:
        pickle.dump(argparse.Namespace(a=1), fh)


def _write_truncated(p):
    _metric().save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "write",
    [
        _write_pickle,
        lambda p: p.write_text("not a state\n"),
        lambda p: p.write_bytes(b""),
        _write_truncated,
        lambda p: torch.save([torch.zeros(3)], p),
        lambda p: torch.save({"format": "segcal-metric-state"}, p),
    ],
    ids=["pickle-of-an-object", "text", "zero-byte", "truncated", "a-list", "half-a-state"],
)
def test_load_of_a_non_state_file_is_an_input_error(tmp_path, write):
    p = tmp_path / "bad.pt"
    write(p)
    with pytest.raises(InputError) as exc:
        CalibrationMetrics.load(p)
    msg = str(exc.value)
    assert str(p) in msg
    assert "weights_only" not in msg.replace("weights_only=True", "")
    assert "weights_only=False" not in msg and exc.value.__cause__ is None


# ------------------------------------------------------------------ sync (one process)


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_synced_state_is_marked_and_sealed(world_of_one):
    m = _metric()
    ref = m.compute()
    assert not m.synced
    m.sync()
    assert m.synced
    m.sync()  # a second sync is a no-op
    got = m.compute()
    assert got["n_images"] == ref["n_images"] and got["n_pixels"] == ref["n_pixels"]
    with pytest.raises(RuntimeError, match="synchronised"):
        m.update(torch.randn(1, 4, 6, 5), torch.zeros(1, 6, 5, dtype=torch.long))
    # two copies of the same synchronised total (e.g. the states two ranks saved) are not added
    copy = CalibrationMetrics.from_state_dict(m.state_dict())
    assert copy.synced and copy.sync_ids == m.sync_ids
    with pytest.raises(ValueError, match="same synchronised total"):
        copy.merge(m)
    # another evaluation's total can be merged; reset() starts a local state again
    other = _metric(seed=1)
    other.sync()
    merged = CalibrationMetrics(4, ignore_index=255).merge(m).merge(other)
    assert merged.compute()["n_images"] == 6
    m.reset()
    assert not m.synced


# ------------------------------------------------------------------ labels
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32])
def test_unsigned_label_tensors_are_accepted(dtype):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(2, 3, 5, 4)))
    y = torch.from_numpy(rng.integers(0, 3, size=(2, 5, 4)))
    y[0, 0, 0] = 255
    ref = calibration_metrics(x, y, ignore_index=255)
    got = calibration_metrics(x, y.to(dtype), ignore_index=255)
    assert got["ece"] == ref["ece"] and got["n_pixels"] == ref["n_pixels"] == 39


# ------------------------------------------------------------------ probabilities in float16
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_float16_probabilities_are_checked_with_float16_tolerance(backend):
    """What ``segcal apply --output probs`` writes (float16 rows summing to one within float16
    rounding) is accepted; the same deviation in float32 is still refused."""
    rng = np.random.default_rng(0)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(2, 12, 32, 32)) * 3), 1).to(torch.float16)
    y = torch.from_numpy(rng.integers(0, 12, size=(2, 32, 32)))
    assert float((p.double().sum(1) - 1).abs().max()) > 1e-4 * 12**0.5  # beyond float32's tolerance
    r = calibration_metrics(p, y, input_type="probs", backend=backend)
    assert r["n_pixels"] == 2 * 32 * 32
    with pytest.raises(ValueError, match="do not sum to 1"):
        calibration_metrics(p.float(), y, input_type="probs", backend=backend)
