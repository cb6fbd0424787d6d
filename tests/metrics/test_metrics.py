"""The streaming metric engine against an independent float64 reference, torchmetrics and
scikit-learn, plus property tests (merge, batch split, chunk size, permutation) and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metric_reference import reference_metrics, softmax
from segcal.metrics import CalibrationMetrics, bin_index, calibration_metrics
from segcal.metrics.kernels_numba import HAVE_NUMBA, bin_rule

SCALARS = [
    "ece",
    "mce",
    "rmsce",
    "ace_unweighted",
    "image_ece",
    "image_ece_std",
    "accuracy",
    "nll",
    "brier",
    "classwise_ece",
    "ece_correct",
    "ece_mispredicted",
    "sce_lts",
    "class_level_ece",
    "miou",
    "mdice",
]


def make_data(seed=0, n=4, c=5, shape=(12, 10), scale=3.0, ignore=None, frac_ignore=0.1):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c, *shape)) * scale
    labels = rng.integers(0, c, size=(n, *shape))
    # make it informative: label agrees with argmax most of the time
    am = logits.argmax(1)
    agree = rng.random(labels.shape) < 0.6
    labels = np.where(agree, am, labels)
    if ignore is not None:
        labels = np.where(rng.random(labels.shape) < frac_ignore, ignore, labels)
    return logits, labels


BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_bins", [10, 15, 50])
@pytest.mark.parametrize("ignore", [None, 255])
def test_matches_float64_reference(n_bins, ignore, backend):
    logits, labels = make_data(seed=n_bins, ignore=ignore)
    ours = calibration_metrics(
        torch.from_numpy(logits), torch.from_numpy(labels), n_bins=n_bins, ignore_index=ignore, backend=backend
    )
    ref = reference_metrics(softmax(logits), labels, n_bins=n_bins, ignore_index=ignore)
    for k in SCALARS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-9, rel=0), k
    np.testing.assert_allclose(ours["classwise_ece_per_class"], ref["classwise_ece_per_class"], atol=1e-9, rtol=0)
    np.testing.assert_array_equal(ours["confusion_matrix"], ref["confusion_matrix"])
    np.testing.assert_allclose(ours["iou_per_class"], ref["iou_per_class"], atol=1e-12)
    # adaptive ECE: within the documented, data-dependent resolution bound of the exact value
    assert abs(ours["ace_adaptive"] - ref["ace_adaptive_exact"]) <= ours["ace_adaptive_error_bound"] + 1e-12


def test_adaptive_ece_bound_is_tight_on_large_data():
    rng = np.random.default_rng(3)
    n, c = 200_000, 4
    logits = rng.normal(size=(n, c)) * 4
    labels = rng.integers(0, c, size=n)
    labels = np.where(rng.random(n) < 0.7, logits.argmax(1), labels)
    ours = calibration_metrics(torch.from_numpy(logits), torch.from_numpy(labels), n_bins=15)
    ref = reference_metrics(softmax(logits).T[None], labels[None], n_bins=15)
    assert ours["ace_adaptive_error_bound"] < 5e-3
    assert abs(ours["ace_adaptive"] - ref["ace_adaptive_exact"]) <= ours["ace_adaptive_error_bound"]
    assert ours["ece"] == pytest.approx(ref["ece"], abs=1e-9)


def test_probabilities_input_equals_logits_input():
    logits, labels = make_data(seed=5, ignore=255)
    a = calibration_metrics(torch.from_numpy(logits), torch.from_numpy(labels), ignore_index=255)
    b = calibration_metrics(softmax(logits), labels, ignore_index=255, input_type="probs")
    for k in SCALARS:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_torchmetrics_agreement():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    logits, labels = make_data(seed=11, n=3, c=6, shape=(20, 20), scale=2.0)
    probs = softmax(logits)
    assert probs.max(1).max() < 1.0  # torchmetrics puts confidence 1.0 in an extra bin
    ours = calibration_metrics(torch.from_numpy(logits), torch.from_numpy(labels), n_bins=15, per_image=False)
    p = torch.from_numpy(probs)
    t = torch.from_numpy(labels)
    for norm, key in [("l1", "ece"), ("max", "mce"), ("l2", "rmsce")]:
        ref = float(tm.multiclass_calibration_error(p, t, num_classes=6, n_bins=15, norm=norm))
        # torchmetrics accumulates in float32 -> agreement is at float32 precision
        assert ours[key] == pytest.approx(ref, abs=2e-6), key


def test_sklearn_agreement():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5000, 4)) * 2
    labels = rng.integers(0, 4, size=5000)
    ours = calibration_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
    probs = softmax(logits, axis=1)
    assert ours["nll"] == pytest.approx(metrics.log_loss(labels, probs, labels=range(4)), abs=1e-12)
    assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(labels, probs.argmax(1)), abs=1e-15)
    onehot = np.eye(4)[labels]
    assert ours["brier"] == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), abs=1e-12)
    try:  # multiclass brier_score_loss exists in recent scikit-learn (mean over samples of the sum)
        sk = metrics.brier_score_loss(labels, probs, labels=range(4))
    except (ValueError, TypeError):
        sk = None
    if sk is not None:
        assert ours["brier"] == pytest.approx(sk, abs=1e-12)
    np.testing.assert_array_equal(ours["confusion_matrix"], metrics.confusion_matrix(labels, probs.argmax(1)))


def test_bin_index_convention():
    v = torch.tensor([0.0, 1e-9, 0.1, 0.1000001, 0.5, 0.9999, 1.0], dtype=torch.float64)
    assert bin_index(v, 10).tolist() == [0, 0, 0, 1, 4, 9, 9]
    # float32 values are binned against the exact edge b/M
    v32 = torch.tensor([0.2], dtype=torch.float32)  # float32(0.2) > 0.2 exactly
    assert bin_index(v32, 5).item() == 1
    assert bin_index(torch.tensor([0.2], dtype=torch.float64), 5).item() == 0


def test_kernel_bin_rule_equals_bin_index():
    vals = [0.0, 1e-12, 0.1, 0.2, 1 / 3, 0.5, 0.9999999, 1.0, float(np.float32(0.2)), 1.5, float("inf")]
    for n in (1, 10, 15, 50, 1 << 16):
        t = torch.tensor(vals, dtype=torch.float64)
        assert bin_index(t, n).tolist() == [bin_rule(v, n) for v in vals]
    if HAVE_NUMBA:  # the compiled rule too (a confidence of 1 has fine coordinate +inf)
        import numba

        from segcal.metrics.kernels_numba import bin_rule_jit

        probe = numba.njit(lambda v, n: bin_rule_jit(v, n))
        assert [probe(v, n) for n in (10, 1 << 16) for v in vals] == [
            bin_rule(v, n) for n in (10, 1 << 16) for v in vals
        ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype, backend):
    logits, labels = make_data(seed=7, ignore=255)
    x = torch.from_numpy(logits).to(dtype)
    ours = calibration_metrics(x, torch.from_numpy(labels), ignore_index=255, backend=backend)
    ref = reference_metrics(softmax(x.double().numpy()), labels, ignore_index=255)
    for k in ("ece", "nll", "brier", "accuracy", "classwise_ece"):
        assert ours[k] == pytest.approx(ref[k], abs=5e-6), k


def test_3d_volumes_and_tables():
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(2, 3, 6, 7, 5)) * 2
    lab = rng.integers(0, 3, size=(2, 6, 7, 5))
    ours = calibration_metrics(vol, lab)
    ref = reference_metrics(softmax(vol), lab)
    assert ours["ece"] == pytest.approx(ref["ece"], abs=1e-12)
    assert ours["image_ece"] == pytest.approx(ref["image_ece"], abs=1e-12)
    # (M, C) table: one "image"
    tab = vol.transpose(0, 2, 3, 4, 1).reshape(-1, 3)
    t = calibration_metrics(tab, lab.reshape(-1))
    assert t["ece"] == pytest.approx(ref["ece"], abs=1e-12)
    assert t["n_images"] == 1


def test_mask_equals_ignore_index():
    logits, labels = make_data(seed=9, ignore=255)
    a = calibration_metrics(logits, labels, ignore_index=255)
    b = calibration_metrics(logits, np.where(labels == 255, 0, labels), mask=labels != 255)
    for k in SCALARS:
        assert a[k] == pytest.approx(b[k], abs=1e-12), k


def test_ignore_channel_is_left_out_of_class_means():
    # a "void" output channel equal to ignore_index (CamVid ESPNet: 12 outputs, void = 11)
    logits, labels = make_data(seed=4, c=4, ignore=3)
    ours = calibration_metrics(logits, labels, ignore_index=3)
    assert ours["miou"] == pytest.approx(np.nanmean(ours["iou_per_class"][:3]))
    # the ignore channel has no per-class value (it was the computed 0.0, while the table said n/a)
    # and the mean of every per-class list's finite entries is its class mean
    means = {"iou_per_class": "miou", "dice_per_class": "mdice", "classwise_ece_per_class": "classwise_ece",
             "class_level_ece_per_class": "class_level_ece"}
    for key, mean in means.items():
        assert np.isnan(ours[key][3]) and np.isfinite(ours[key][:3]).all(), key
        assert np.nanmean(ours[key]) == pytest.approx(ours[mean], abs=1e-12), key
    assert np.isnan(ours["image_iou_per_class"][:, 3]).all() and np.isnan(ours["image_dice_per_class"][:, 3]).all()
    ref = reference_metrics(softmax(logits.astype(np.float64)), labels, ignore_index=3)
    for key in means:
        np.testing.assert_allclose(ours[key], ref[key], atol=1e-9, rtol=0, err_msg=key)
    # an ignore channel averaged on purpose keeps its computed values
    kept = calibration_metrics(logits, labels, ignore_index=3, average_classes=[0, 1, 2, 3])
    assert np.isfinite(kept["iou_per_class"]).all()


def test_all_ignored_image_is_handled():
    logits, labels = make_data(seed=1, n=3, ignore=255)
    labels[1] = 255
    r = calibration_metrics(logits, labels, ignore_index=255)
    assert np.isnan(r["image_ece_values"][1])
    assert np.isfinite(r["image_ece"])
    ref = reference_metrics(softmax(logits), labels, ignore_index=255)
    assert r["image_ece"] == pytest.approx(ref["image_ece"], abs=1e-12)


def _run(logits, labels, splits, chunk, backend="auto"):
    m = CalibrationMetrics(logits.shape[1], ignore_index=255, chunk_pixels=chunk, backend=backend)
    for s in splits:
        m.update(logits[s], labels[s])
    return m


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 6),
    chunk=st.sampled_from([7, 64, 1000, 1 << 16]),
    cut=st.integers(1, 5),
)
def test_properties_merge_split_chunk_permutation(seed, n, chunk, cut):
    logits, labels = make_data(seed=seed, n=n, shape=(9, 8), ignore=255)
    cut = min(cut, n - 1)
    whole = _run(logits, labels, [slice(None)], 1 << 16, backend="torch").compute()
    # batch split, chunk size and backend do not matter
    split = _run(logits, labels, [slice(0, cut), slice(cut, None)], chunk).compute()
    # merging two halves equals one pass
    a = _run(logits, labels, [slice(0, cut)], chunk)
    b = _run(logits, labels, [slice(cut, None)], 1 << 16)
    merged = a.merge(b).compute()
    # permuting images leaves pooled metrics unchanged
    perm = np.random.default_rng(seed).permutation(n)
    permuted = _run(logits[perm], labels[perm], [slice(None)], chunk).compute()
    for k in SCALARS:
        assert split[k] == pytest.approx(whole[k], abs=1e-10), k
        assert merged[k] == pytest.approx(whole[k], abs=1e-10), k
        assert permuted[k] == pytest.approx(whole[k], abs=1e-10), k
    np.testing.assert_allclose(merged["image_ece_values"], whole["image_ece_values"], atol=1e-12)


def test_state_roundtrip(tmp_path):
    logits, labels = make_data(seed=2, ignore=255)
    m = CalibrationMetrics(5, ignore_index=255)
    m.update(logits, labels)
    p = tmp_path / "state.pt"
    m.save(p)
    m2 = CalibrationMetrics.load(p)
    a, b = m.compute(), m2.compute()
    for k in SCALARS:
        assert a[k] == b[k]
    m2.update(logits, labels)  # keeps accumulating after a load
    assert m2.compute()["n_pixels"] == 2 * a["n_pixels"]


def test_state_is_bounded():
    m = CalibrationMetrics(19, n_bins=15, per_image=False)
    before = sum(t.numel() for t in m.state_dict().values() if isinstance(t, torch.Tensor))
    x = torch.randn(2, 19, 64, 64)
    y = torch.randint(0, 19, (2, 64, 64))
    for _ in range(3):
        m.update(x, y)
    after = sum(t.numel() for t in m.state_dict().values() if isinstance(t, torch.Tensor))
    assert before == after


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_errors(backend):
    x = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    m = CalibrationMetrics(3, ignore_index=255, backend=backend)
    with pytest.raises(ValueError, match="preds: expected shape"):
        m.update(torch.randn(3), y)
    with pytest.raises(ValueError, match="target: shape"):
        m.update(x, y[:, :3])
    with pytest.raises(ValueError, match="preds: expected 3 classes"):
        m.update(torch.randn(2, 4, 4, 4), y)
    with pytest.raises(TypeError, match="target: expected integer"):
        m.update(x, y.float() + 0.5)
    with pytest.raises(ValueError, match=r"labels \[7\] are outside \[0, 3\)"):
        m.update(x, torch.where(y == 0, 7, y))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="preds: contains non-finite"):
        m.update(bad, y)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        m.update(bad, y)
    with pytest.raises(ValueError, match="empty input"):
        m.update(torch.randn(0, 3, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="preds: expected a floating"):
        m.update(torch.randint(0, 3, (2, 3, 4, 4)), y)
    with pytest.raises(ValueError, match="no valid pixels"):
        CalibrationMetrics(3).compute()
    mp = CalibrationMetrics(3, input_type="probs", backend=backend)
    with pytest.raises(ValueError, match="do not sum to 1"):
        mp.update(torch.rand(2, 3, 4, 4), y)
    with pytest.raises(ValueError, match="input_type"):
        CalibrationMetrics(3, input_type="logit")
    with pytest.raises(ValueError, match="num_classes"):
        CalibrationMetrics(1)
    with pytest.raises(ValueError, match="incompatible"):
        CalibrationMetrics(3).merge(CalibrationMetrics(3, n_bins=10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_nan_pixels_are_not_an_error(backend):
    x = torch.randn(1, 3, 4, 4)
    y = torch.randint(0, 3, (1, 4, 4))
    y[0, 0, 0] = 255
    x[0, :, 0, 0] = float("nan")
    r = calibration_metrics(x, y, ignore_index=255, backend=backend)
    assert r["n_pixels"] == 15


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_update_leaves_state_untouched(backend):
    x = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    m = CalibrationMetrics(3, backend=backend)
    m.update(x, y)
    before = m.compute()
    bad = y.clone()
    bad[1, 3, 3] = 9  # fails late, after pixels of the batch were accumulated
    with pytest.raises(ValueError, match="outside"):
        m.update(x, bad)
    after = m.compute()
    assert after["n_pixels"] == before["n_pixels"] and after["ece"] == before["ece"]
    np.testing.assert_array_equal(after["confusion_matrix"], before["confusion_matrix"])


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_threaded_kernel_equals_torch_path():
    logits, labels = make_data(seed=21, n=3, c=6, shape=(40, 30), ignore=255)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # two worker threads over 3 x 5 chunks of 256 pixels
    try:
        a = CalibrationMetrics(6, ignore_index=255, chunk_pixels=256, backend="numba")
        a.update(logits, labels)
        assert torch.get_num_threads() == 2  # restored after the threaded update
    finally:
        torch.set_num_threads(prev)
    b = CalibrationMetrics(6, ignore_index=255, backend="torch")
    b.update(logits, labels)
    ra, rb = a.compute(), b.compute()
    for k in SCALARS:
        assert ra[k] == pytest.approx(rb[k], abs=1e-12), k
    np.testing.assert_allclose(ra["image_ece_values"], rb["image_ece_values"], atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_logits_match_reference(backend):
    """A trained-model-like, confident distribution: few pixels where a non-top class can exceed
    1/M (the kernel then visits those pixels only)."""
    rng = np.random.default_rng(8)
    n, c, shape = 3, 6, (30, 20)
    labels = rng.integers(0, c, size=(n, *shape))
    logits = rng.normal(size=(n, c, *shape))
    np.put_along_axis(logits, labels[:, None], 4.5 + 6 * rng.random((n, 1, *shape)), axis=1)
    unsure = softmax(logits).max(1) < 1 - 1 / 15
    assert 0 < unsure.mean() < 0.25
    labels = np.where(rng.random(labels.shape) < 0.1, rng.integers(0, c, size=labels.shape), labels)
    ours = calibration_metrics(logits, labels, backend=backend)
    ref = reference_metrics(softmax(logits), labels)
    for k in SCALARS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
    np.testing.assert_allclose(ours["classwise_ece_per_class"], ref["classwise_ece_per_class"], atol=1e-9)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_numba_class_wise_paths_match_torch(scale):
    """The kernel bins class-wise entries through a sparse (few unsure pixels) or a compacting
    dense path depending on the data; both must give the torch backend's statistics, with a
    mask, the ignore index and several images packed in one chunk."""
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(size=(3, 19, 40, 30)) * scale).float()
    labels = torch.from_numpy(rng.integers(0, 19, size=(3, 40, 30)))
    labels[:, :3] = 255
    mask = torch.from_numpy(rng.random((3, 40, 30)) > 0.1)
    out = {}
    for backend in ("torch", "numba"):
        for chunk in (512, 1 << 14):
            m = CalibrationMetrics(19, ignore_index=255, backend=backend, chunk_pixels=chunk)
            m.update(logits, labels, mask=mask)
            out[backend, chunk] = m
    # same chunking -> the same float32 softmax values -> the same float64 sums (the chunk width
    # itself changes the last ulp of the softmax, so chunk sizes are compared per backend pair)
    for chunk in (512, 1 << 14):
        ref, m = out["torch", chunk], out["numba", chunk]
        for nm in ("classwise", "by_pred", "by_label", "fine", "confusion", "pooled_bins", "pooled_totals"):
            torch.testing.assert_close(getattr(m, nm), getattr(ref, nm), rtol=0, atol=1e-9, msg=f"{chunk} {nm}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_do_not_depend_on_torch_threads(backend):
    """torch splits a chunk's softmax between its threads, and the last pixels of each thread's
    share take a scalar exp that differs from the vectorised one in the last bit: the engine
    computes the softmax single-threaded so that the statistics are the same for any thread
    count (this made test_numba_class_wise_paths_match_torch fail when run alone, with torch's
    default 2 threads, and pass after other test modules had set 1 thread)."""
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(size=(3, 19, 40, 30)) * 0.5).float()
    labels = torch.from_numpy(rng.integers(0, 19, size=(3, 40, 30)))
    prev = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m = CalibrationMetrics(19, backend=backend, chunk_pixels=512)
            m.update(logits, labels)
            states.append(m.state_dict())
    finally:
        torch.set_num_threads(prev)
    for nm in ("classwise", "by_pred", "fine", "pooled_bins", "img_bins"):
        torch.testing.assert_close(states[0][nm], states[1][nm], rtol=0, atol=1e-12, msg=nm)
