"""segcal.integrations.torchmetrics.CalibrationMetric: a torchmetrics.Metric backed by the engine."""

from __future__ import annotations

import io
import os
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ranks import free_port
from segcal.errors import InputError
from segcal.integrations.torchmetrics import CalibrationMetric
from segcal.metrics import CalibrationMetrics
from segcal.metrics.state import CAT_FIELDS, FIELDS, SUM_FIELDS


def _data(spatial=(10, 9), n=5, c=4, seed=0, dtype=torch.float64):
    """float64 logits by default: the engine then computes in float64 and any split of the images
    gives the same metrics to 1e-12 (float32 scores: to ~1e-10, the kernel's float32 softmax)."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(n, c, *spatial)) * 2).to(dtype)
    labels = torch.from_numpy(rng.integers(0, c, size=(n, *spatial)))
    labels[torch.from_numpy(rng.random(labels.shape) < 0.2)] = 255
    return logits, labels


def _reference(logits, labels, mask=None, **kw):
    ref = CalibrationMetrics(logits.shape[1], ignore_index=255, **kw)
    ref.update(logits, labels, mask)
    return ref.compute()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial", [(10, 9), (5, 4, 6)], ids=["2d", "3d"])
def test_equals_calibration_metrics_batch_by_batch(spatial, dtype, same_metrics):
    logits, labels = _data(spatial, dtype=dtype)
    mask = torch.from_numpy(np.random.default_rng(1).random(labels.shape) < 0.9)
    metric = CalibrationMetric(4, ignore_index=255)
    ref = CalibrationMetrics(4, ignore_index=255)
    for part in (slice(0, 2), slice(2, 5)):
        metric.update(logits[part], labels[part], mask[part])
        ref.update(logits[part], labels[part], mask[part])
    # one addition per batch, as the engine: the same statistics bitwise
    same_metrics(metric.compute(), ref.compute(), atol=0.0)
    for f in SUM_FIELDS:
        torch.testing.assert_close(getattr(metric, f.name), ref.tensors()[f.name], rtol=0, atol=0)


@pytest.mark.parametrize("splits", [[5], [1, 4], [2, 1, 2], [1, 1, 1, 1, 1]])
def test_any_batch_split_gives_the_same_metrics(splits, same_metrics):
    logits, labels = _data()
    ref = _reference(logits, labels)
    metric = CalibrationMetric(4, ignore_index=255)
    start = 0
    for n in splits:
        metric.update(logits[start : start + n], labels[start : start + n])
        start += n
    same_metrics(metric.compute(), ref, atol=1e-12)


def test_states_are_registered_from_the_declaration():
    metric = CalibrationMetric(4)
    declared = {f.name for f in FIELDS} | {"n_images"}
    assert set(metric._defaults) == declared  # torchmetrics' registry of add_state
    for f in SUM_FIELDS:
        assert metric._reductions[f.name].__name__ == "dim_zero_sum"
    for f in CAT_FIELDS:
        assert metric._reductions[f.name].__name__ == "dim_zero_cat"


def test_forward_returns_the_batch_and_accumulates_the_total(same_metrics):
    logits, labels = _data()
    metric = CalibrationMetric(4, ignore_index=255)
    first = metric(logits[:2], labels[:2])
    metric(logits[2:], labels[2:])
    same_metrics(first, _reference(logits[:2], labels[:2]), atol=0.0)
    same_metrics(metric.compute(), _reference(logits, labels), atol=1e-12)


def test_state_dict_round_trip_reset_and_to(same_metrics):
    logits, labels = _data()
    metric = CalibrationMetric(4, ignore_index=255).to("cpu")
    metric.update(logits, labels)
    buf = io.BytesIO()
    torch.save(metric.state_dict(), buf)
    buf.seek(0)
    loaded = CalibrationMetric(4, ignore_index=255)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    with warnings.catch_warnings():  # torchmetrics: compute before update (the state was loaded)
        warnings.simplefilter("ignore", UserWarning)
        same_metrics(loaded.compute(), _reference(logits, labels), atol=0.0)
    # a dtype cast of the module (Lightning "16-true") must not cast the float64 counts
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: nn.Sequential(m).to(torch.float16)):
        cast(metric)
        assert all(getattr(metric, f.name).dtype == torch.float64 for f in SUM_FIELDS)
        assert all(t.dtype == torch.float64 for f in CAT_FIELDS for t in getattr(metric, f.name))
    same_metrics(metric.compute(), _reference(logits, labels), atol=0.0)
    metric.reset()
    assert metric.img_bins == [] and float(metric.n_images) == 0
    assert float(metric.pooled_totals.sum()) == 0
    with pytest.raises(InputError, match="float64"):
        metric.set_dtype(torch.float16)


def test_a_tampered_state_is_refused_on_compute():
    logits, labels = _data()
    metric = CalibrationMetric(4, ignore_index=255)
    metric.update(logits, labels)
    sd = metric.state_dict()
    sd["confusion"] = sd["confusion"] - 1e6  # negative pixel counts
    loaded = CalibrationMetric(4, ignore_index=255)
    loaded.load_state_dict(sd)
    with warnings.catch_warnings(), pytest.raises(InputError, match="confusion"):
        warnings.simplefilter("ignore", UserWarning)
        loaded.compute()


def test_per_image_false_and_bad_input(same_metrics):
    logits, labels = _data()
    metric = CalibrationMetric(4, ignore_index=255, per_image=False)
    metric.update(logits, labels)
    assert metric.img_bins == []
    same_metrics(metric.compute(), _reference(logits, labels, per_image=False), atol=0.0)
    before = metric.pooled_totals.clone()
    with pytest.raises(InputError):
        metric.update(logits[:, :3], labels)  # 3 classes for a 4-class metric
    torch.testing.assert_close(metric.pooled_totals, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_classes"):
        CalibrationMetric(1)


# ------------------------------------------------------------------ DDP through torchmetrics' sync


SHARDS = {"unequal": [slice(0, 2), slice(2, 5)], "empty-rank": [slice(0, 0), slice(0, 5)]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        logits, labels = _data()
        results = {}
        for case, parts in SHARDS.items():
            for per_image in (True, False):
                metric = CalibrationMetric(4, ignore_index=255, per_image=per_image)
                part = parts[rank]
                for i in range(part.start, part.stop, 2):  # batches of 2 images
                    metric.update(logits[i : min(i + 2, part.stop)], labels[i : min(i + 2, part.stop)])
                with warnings.catch_warnings():  # the empty rank: compute before update
                    warnings.simplefilter("ignore", UserWarning)
                    results[f"{case}-{per_image}"] = metric.compute()  # torchmetrics syncs here
                # after compute the local state is back (torchmetrics' unsync)
                results[f"{case}-{per_image}-local"] = float(metric.n_images)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path, same_metrics):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, labels = _data()
    for per_image in (True, False):
        ref = _reference(logits, labels, per_image=per_image)
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
            for case, parts in SHARDS.items():
                same_metrics(got[f"{case}-{per_image}"], ref, atol=1e-12)
                assert got[f"{case}-{per_image}-local"] == parts[rank].stop - parts[rank].start
