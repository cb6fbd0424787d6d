"""segcal.integrations.monai and .ignite: MONAI's metric interface and an Ignite metric on the engine."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine, create_supervised_evaluator
from ignite.exceptions import NotComputableError
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import CalibrationErrorMetric, CumulativeIterationMetric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ranks import free_port
from segcal.errors import InputError
from segcal.integrations.ignite import IgniteCalibrationMetric
from segcal.integrations.monai import MonaiCalibrationMetric
from segcal.metrics import CalibrationMetrics


def _data(spatial=(10, 9), n=5, c=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(n, c, *spatial)) * 2)
    labels = torch.from_numpy(rng.integers(0, c, size=(n, *spatial)))
    labels[torch.from_numpy(rng.random(labels.shape) < 0.2)] = 255
    return logits, labels


def _reference(logits, labels, mask=None, **kw):
    ref = CalibrationMetrics(logits.shape[1], **kw)
    ref.update(logits, labels, mask)
    return ref.compute()


# -------------------------------------------------------------------------------------- MONAI
@pytest.mark.parametrize("spatial", [(10, 9), (5, 4, 6)], ids=["2d", "3d"])
def test_monai_metric_equals_calibration_metrics(spatial, same_metrics):
    logits, labels = _data(spatial)
    metric = MonaiCalibrationMetric(4, ignore_index=255)
    assert isinstance(metric, CumulativeIterationMetric)  # MONAI's handlers and evaluators take it
    assert metric(y_pred=MetaTensor(logits[:2]), y=labels[:2, None]) is None  # (B, 1, *spatial) labels
    metric(y_pred=list(logits[2:]), y=list(labels[2:, None]))  # decollated channel-first tensors
    assert len(metric) == 5
    same_metrics(metric.aggregate(), _reference(logits, labels, ignore_index=255), atol=1e-12)
    np.testing.assert_allclose(metric.get_buffer().numpy(),
                               _reference(logits, labels, ignore_index=255)["image_ece_values"], rtol=0, atol=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="no valid pixels"):
        metric.aggregate()


def test_monai_one_hot_labels_with_unlabelled_pixels(same_metrics):
    logits, labels = _data()
    keep = labels != 255
    onehot = torch.zeros_like(logits)
    onehot.scatter_(1, labels.clamp(max=3)[:, None], 1.0)
    onehot *= keep[:, None]  # an all-zero row: no label (left out)
    metric = MonaiCalibrationMetric(4, metric_name="ece")
    metric(y_pred=logits, y=onehot)
    ref = _reference(logits, labels.clamp(max=3), keep)
    assert float(metric.aggregate()) == pytest.approx(ref["ece"], abs=1e-12)
    two = onehot.clone()
    two[0, :, 0, 0] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    with pytest.raises(InputError, match="more than one"):
        metric(y_pred=logits, y=two)
    with pytest.raises(InputError, match="other than 0 and 1"):
        metric(y_pred=logits, y=onehot * 2)
    with pytest.raises(InputError, match="expected"):
        metric(y_pred=logits, y=labels[:, :5])
    bad = MonaiCalibrationMetric(4, metric_name="dice_score")
    bad(y_pred=logits, y=labels.clamp(max=3))
    with pytest.raises(InputError, match="metric_name"):
        bad.aggregate()


def test_classwise_ece_equals_monai_calibration_error_metric():
    """Independent peer: MONAI's own CalibrationErrorMetric (per image and channel, ECE of the
    class-k probability against 1[y = k]) is segcal's classwise_ece_per_class on one image."""
    rng = np.random.default_rng(3)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(1, 3, 24, 20)) * 2), 1).float()
    labels = torch.from_numpy(rng.integers(0, 3, size=(1, 24, 20)))
    onehot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
    peer = CalibrationErrorMetric(num_bins=10, metric_reduction="none")
    peer(y_pred=probs, y=onehot)
    ours = MonaiCalibrationMetric(3, n_bins=10, input_type="probs")
    ours(y_pred=probs, y=onehot)
    np.testing.assert_allclose(ours.aggregate()["classwise_ece_per_class"], peer.aggregate()[0].numpy(),
                               rtol=0, atol=1e-6)


def test_monai_ignite_metric_handler_runs_it(same_metrics):
    logits, labels = _data()
    evaluator = Engine(lambda engine, batch: batch)
    IgniteMetricHandler(metric_fn=MonaiCalibrationMetric(4, ignore_index=255, metric_name="ece")).attach(
        evaluator, "val_ece")
    evaluator.run(DataLoader(TensorDataset(logits, labels), batch_size=2))
    ref = _reference(logits, labels, ignore_index=255)
    assert evaluator.state.metrics["val_ece"] == pytest.approx(ref["ece"], abs=1e-12)
    np.testing.assert_allclose(evaluator.state.metric_details["val_ece"].numpy(), ref["image_ece_values"],
                               rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------- Ignite
def test_ignite_evaluation_over_a_data_loader(same_metrics):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).double()
    images = torch.randn(6, 3, 12, 10, dtype=torch.float64)
    labels = torch.randint(0, 4, (6, 12, 10))
    labels[:, :2] = 255
    evaluator = create_supervised_evaluator(
        net, metrics={"calibration": IgniteCalibrationMetric(4, ignore_index=255)})
    state = evaluator.run(DataLoader(TensorDataset(images, labels), batch_size=4))  # batches of 4 and 2
    with torch.no_grad():
        ref = _reference(net(images), labels, ignore_index=255)
    same_metrics(state.metrics["calibration"], ref, atol=1e-12)
    assert state.metrics["ece"] == state.metrics["calibration"]["ece"]  # Ignite flattens a dict result
    # a second run starts from zero (Ignite resets at EPOCH_STARTED)
    state = evaluator.run(DataLoader(TensorDataset(images[:2], labels[:2]), batch_size=2))
    with torch.no_grad():
        assert state.metrics["ece"] == pytest.approx(_reference(net(images[:2]), labels[:2],
                                                                ignore_index=255)["ece"], abs=1e-12)


def test_ignite_metric_keys_mask_dict_output_and_errors():
    logits, labels = _data()
    mask = labels != 0
    metric = IgniteCalibrationMetric(4, ignore_index=255, keys=("ece", "nll"))
    with pytest.raises(NotComputableError):
        metric.compute()
    metric.update((logits, labels, mask))
    ref = _reference(logits, labels, mask, ignore_index=255)
    assert metric.compute() == pytest.approx({"ece": ref["ece"], "nll": ref["nll"]}, abs=1e-12)
    with pytest.raises(InputError, match="y_pred, y"):
        metric.update(logits)
    evaluator = Engine(lambda engine, batch: {"y_pred": batch[0], "y": batch[1]})  # Ignite's mapping output
    IgniteCalibrationMetric(4, ignore_index=255, keys=("ece",), metrics_result_mode="named").attach(evaluator, "cal")
    state = evaluator.run([(logits, labels)])
    assert set(state.metrics) == {"cal"}
    assert state.metrics["cal"]["ece"] == pytest.approx(_reference(logits, labels, ignore_index=255)["ece"], abs=1e-12)


def test_copy_is_independent_of_the_original():
    logits, labels = _data()
    m = CalibrationMetrics(4, ignore_index=255)
    m.update(logits[:2], labels[:2])
    c = m.copy()
    m.update(logits[2:], labels[2:])
    assert c.n_images == 2 and c.compute()["ece"] == _reference(logits[:2], labels[:2], ignore_index=255)["ece"]
    assert m.compute()["n_images"] == 5


# -------------------------------------------------------------- two gloo processes, both adapters


SHARDS = {"unequal": [slice(0, 2), slice(2, 5)], "empty-rank": [slice(0, 0), slice(0, 5)]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        logits, labels = _data()
        results = {}
        for case, parts in SHARDS.items():
            part = parts[rank]
            mon = MonaiCalibrationMetric(4, ignore_index=255)
            ign = IgniteCalibrationMetric(4, ignore_index=255)
            for i in range(part.start, part.stop, 2):
                batch = slice(i, min(i + 2, part.stop))
                mon(y_pred=logits[batch], y=labels[batch])
                ign.update((logits[batch], labels[batch]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[f"monai-{case}"] = mon.aggregate()
                results[f"ignite-{case}"] = ign.compute()
            results[f"local-{case}"] = (len(mon), ign._metrics.n_images)  # the local states go on
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path, same_metrics):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, labels = _data()
    ref = _reference(logits, labels, ignore_index=255)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for case, parts in SHARDS.items():
            same_metrics(got[f"monai-{case}"], ref, atol=1e-12)
            same_metrics(got[f"ignite-{case}"], ref, atol=1e-12)
            n = parts[rank].stop - parts[rank].start
            assert got[f"local-{case}"] == (n, n)
