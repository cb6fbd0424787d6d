"""The one-process pieces of a distributed adaptation (no process group needed).

Rank slices of a batch must add up to the batch: the losses with a :class:`BatchShare` summed over
the slices equal the one-process loss and their gradients the one-process gradient (to float
rounding), the negative-label draws are the one-process draws, and the thresholds from pooled
shards equal :func:`segcal.estimation.class_thresholds` exactly. The two-rank runs are in
``tests/cli/test_distributed_adapt.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcal.adaptation import CalSFDALoss, class_weights, mean_entropy
from segcal.adaptation.distributed import Team, batch_input, pool_confidences, pooled_thresholds
from segcal.adaptation.losses import batch_share, negative_labels, share_ce, share_entropy
from segcal.adaptation.target import TargetImages
from segcal.estimation import class_thresholds
from segcal.models.registry import default_preprocess
from segcal.pipeline.distributed import shard_bounds

C = 5


def _batch(n: int = 3, seed: int = 0, unlabelled: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, 6, 7, generator=g) * 2
    y = torch.randint(0, C, (n, 6, 7), generator=g)
    y[torch.rand(n, 6, 7, generator=g) < unlabelled] = 255
    return logits, y


def _slices(n: int, size: int) -> list[tuple[int, int]]:
    return [shard_bounds(n, r, size) for r in range(size)]


def _split_loss(fn, logits, y, size):
    """Sum over the slices of ``fn(logits[s:e], y[s:e], share)`` and the concatenated grads."""
    total, grads = 0.0, []
    for s, e in _slices(len(logits), size):
        part = logits[s:e].clone().requires_grad_()
        share = batch_share(y.numpy(), (s, e), getattr(fn, "weights", None))
        loss = fn(part, y[s:e], share)
        loss.backward()
        total += float(loss.detach())
        grads.append(part.grad)
    return total, torch.cat(grads)


@pytest.mark.parametrize("size", [2, 4])  # 3 images on 4 ranks: a slice without rows
@pytest.mark.parametrize("unlabelled", [0.3, 1.0])  # 1.0: no labelled pixel in the batch
def test_calsfda_loss_shares_add_up_to_the_batch(size, unlabelled):
    logits, y = _batch(unlabelled=unlabelled)
    loss_fn = CalSFDALoss(class_weights([0.6, 0.7, 0.8, 0.9, 0.5]), eta=0.5)
    full = logits.clone().requires_grad_()
    g1 = torch.Generator().manual_seed(4)
    want, want_parts = loss_fn(full, y, g1)
    want.backward()
    g2 = torch.Generator().manual_seed(4)
    got, grads, parts = 0.0, [], {}
    for s, e in _slices(len(logits), size):
        part = logits[s:e].clone().requires_grad_()
        share = batch_share(y.numpy(), (s, e), loss_fn.weights)
        gen_state = g2.get_state()
        loss, p = loss_fn(part, y[s:e], g2, share)
        if (s, e) != _slices(len(logits), size)[-1]:
            g2.set_state(gen_state)  # every rank draws the same numbers from the same state
        loss.backward()
        got += float(loss.detach())
        grads.append(part.grad)
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v
    assert got == pytest.approx(float(want.detach()), abs=1e-6)
    assert parts.keys() == want_parts.keys()
    for k in parts:
        assert parts[k] == pytest.approx(want_parts[k], abs=1e-6), k
    torch.testing.assert_close(torch.cat(grads), full.grad, rtol=0, atol=1e-7)
    assert torch.equal(g1.get_state(), g2.get_state())  # the stream goes on as in one process


def test_negative_labels_rows_are_the_batch_draws():
    probs = torch.softmax(torch.randn(4, 9, 5, 5), 1)
    want = negative_labels(probs, torch.Generator().manual_seed(1))
    for s, e in ((0, 2), (2, 4), (3, 3)):
        got = negative_labels(probs[s:e], torch.Generator().manual_seed(1), rows=(s, e, 4))
        assert torch.equal(got, want[s:e])


@pytest.mark.parametrize("unlabelled", [0.3, 1.0])
def test_selftrain_and_tent_shares_add_up(unlabelled):
    logits, y = _batch(unlabelled=unlabelled)
    full = logits.clone().requires_grad_()
    ce = F.cross_entropy(full, y, ignore_index=255) if bool((y != 255).any()) else full.sum() * 0.0
    ce.backward()
    got, grads = _split_loss(lambda lg, t, sh: share_ce(lg, t, sh), logits, y, 2)
    assert got == pytest.approx(float(ce.detach()), abs=1e-6)
    torch.testing.assert_close(grads, full.grad, rtol=0, atol=1e-7)
    full = logits.clone().requires_grad_()
    ent = mean_entropy(full)
    ent.backward()
    got, grads = _split_loss(lambda lg, t, sh: share_entropy(lg, sh), logits, y, 2)
    assert got == pytest.approx(float(ent.detach()), abs=1e-6)
    torch.testing.assert_close(grads, full.grad, rtol=0, atol=1e-7)


def test_pooled_thresholds_equal_class_thresholds():
    g = torch.Generator().manual_seed(2)
    scores = [torch.randn(C, 9, 11, generator=g) * 3 for _ in range(5)]
    scores[3][2] = -50.0  # class 2 never predicted in one image
    ece = [0.1, 0.3, 0.05, 0.2, 0.15]
    for prop, subsample in ((0.15, 5), (0.5, 1), (1.0, 3)):
        want, want_counts = class_thresholds(scores, prop=prop, num_classes=C, ece=ece, subsample=subsample)
        pools = []
        for r in range(3):  # 2 + 2 + 1 images
            s, e = shard_bounds(5, r, 3)
            pools.append(pool_confidences(((i, scores[i]) for i in range(s, e)), ece, subsample))
        got, counts = pooled_thresholds(pools[::-1], prop, C)  # the order of the pools does not matter
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(counts, want_counts)
    # a class nobody predicts keeps the default threshold
    got, counts = pooled_thresholds([pool_confidences([(0, scores[0])], ece, 1)], 0.5, C + 2)
    assert counts[C:].tolist() == [0, 0] and got[C:].tolist() == [0.5, 0.5]


def test_batch_input_empty_slice_and_mixed_sizes():
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 255, (6, 8, 3), dtype=np.uint8) for _ in range(2)] + [rng.integers(0, 255, (4, 8, 3), dtype=np.uint8)]
    inputs = TargetImages(raw, default_preprocess)
    shapes = [tuple(inputs[i].shape) for i in range(3)]
    x = batch_input(inputs, [], [0, 1], shapes, torch.float32, torch.device("cpu"))
    assert tuple(x.shape) == (0, 3, 6, 8)
    assert torch.equal(batch_input(inputs, [1], [0, 1], shapes, torch.float32, torch.device("cpu")), inputs[1])
    with pytest.raises(ValueError, match="different sizes"):
        batch_input(inputs, [0], [0, 2], shapes, torch.float32, torch.device("cpu"))


def test_team_of_one_process():
    team = Team.here(torch.device("cpu"))
    assert not team.distributed and team.is_main
    assert team.part([4, 5, 6]) == [4, 5, 6] and team.images(3) == [0, 1, 2]
    assert team.batches([[0, 1], [2]]) == [[0, 1], [2]]
    assert team.sum([1.5, 2.0]) == [1.5, 2.0]
    assert team.gather(lambda: 7) == [7] and team.main(lambda: 8) == 8
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    team.sum_grads([p])
    assert p.grad.tolist() == [3.0, 3.0]
    # four ranks, three images in a batch: slices 1, 1, 1, 0
    assert [Team(r, 4).part([7, 8, 9]) for r in range(4)] == [[7], [8], [9], []]
