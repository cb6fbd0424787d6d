"""Streaming calibration and segmentation metrics with a fixed-size, mergeable state.

:class:`CalibrationMetrics` accumulates, in one pass per batch, sufficient statistics from
``(N, C, *spatial)`` logits or probabilities (2D images, 3D volumes, or ``(M, C)`` tables) and
``(N, *spatial)`` integer labels. The state never grows with the number of pixels: it is
``O(bins x classes + classes^2 + fine_bins)`` for the pooled statistics plus ``O(bins + classes)``
per image for the image-wise ones. Pixels are processed in chunks of ``chunk_pixels`` so the extra
memory is bounded (a few ``C x chunk_pixels`` float buffers) whatever the input size.

All accumulators are float64 (counts are exact up to 2**53). Scores are processed in float32
(float16 / bfloat16 inputs are upcast) or in float64 when the input is float64.

Definitions (``../shared/methods.md`` §4). For a valid pixel ``i`` (label not ``ignore_index`` and
mask True) with probabilities ``q_i = softmax(z_i)`` (or the given probabilities), prediction
``yhat_i = argmax_k z_ik`` (first index on ties), confidence ``c_i = q_{i, yhat_i}``, correctness
``a_i = 1[yhat_i = y_i]``; ``N`` valid pixels; ``M`` equal-width bins with the ``(lo, hi]``
convention of :func:`segcal.metrics.binning.bin_index` (confidence 1.0 in the last bin):

``ece``
    Top-label ECE pooled over the dataset: ``sum_b (n_b / N) |acc_b - conf_b|``.
``image_ece`` / ``image_ece_std``
    The same ECE computed on each image's valid pixels, then the mean and the population standard
    deviation (ddof=0) over images with at least one valid pixel ([SEL], LTS code).
``mce``
    ``max_b |acc_b - conf_b|`` over non-empty bins (pooled); ``image_mce`` is its image mean.
``rmsce``
    ``sqrt(sum_b (n_b / N) (acc_b - conf_b)^2)`` (pooled).
``ace_adaptive``
    Adaptive (equal-mass) ECE: ``M`` bins each holding ~``N / M`` pixels sorted by confidence,
    ``sum_b (n_b / N) |acc_b - conf_b|``. Computed from a fine histogram of ``fine_bins`` bins
    on ``u = -log(1 - c) / 36.84`` (fine resolution near confidence 1, where segmentation
    confidences concentrate); each fine bin is assigned whole to the adaptive bin where its first
    pixel falls. ``ace_adaptive_error_bound`` is a rigorous bound on the difference from the exact
    sort-based value: ``(2 / N) * sum`` of the counts of fine bins that straddle an equal-mass
    boundary (moving one pixel between two bins changes the sum by at most 2).
``ace_unweighted``
    The unweighted mean of ``|acc_b - conf_b|`` over non-empty equal-width bins: what [RPH] /
    Fiducio call "ACE" (average calibration error); pooled.
``classwise_ece`` / ``classwise_ece_per_class``
    Class-wise ECE (Nixon et al. static calibration error): for each class ``k``, bin the class-k
    probability ``q_ik`` of every valid pixel; ``ECE_k = sum_b (n_kb / N) |freq_kb - conf_kb|``
    with ``freq_kb`` the fraction of pixels in the bin labelled ``k``; ``classwise_ece`` is the mean
    of ``ECE_k`` over the averaged classes.
``sce_lts``
    The "SCE" of the LTS code: top-label bins restricted to pixels *predicted* as class ``k``,
    ``sum_k sum_b (n_kb / N) |acc_kb - conf_kb|`` (no 1/K factor).
``class_level_ece``
    Cal-SFDA's label-conditioned ECE (§3.15(b), hard max confidence): top-label ECE of the pixels
    whose label is ``k``, averaged over the averaged classes (classes without pixels count 0).
``ece_correct`` / ``ece_mispredicted``
    Top-label ECE restricted to correct (``acc = 1``) or mispredicted (``acc = 0``) pixels: the
    selective-scaling paper's analysis ([SEL] §6.3). ``image_ece_correct`` etc. are image means.
``nll``
    ``mean_i -log(max(q_{i, y_i}, nll_floor))``; with the default floor 1e-12 the per-pixel NLL is
    at most 27.63 (the Fiducio convention).
``brier``
    Multiclass sum form ``mean_i sum_k (q_ik - 1[y_i = k])^2`` (range [0, 2]).
``accuracy``, ``confusion_matrix`` (rows = label, cols = prediction), ``iou_per_class``,
``dice_per_class``, ``miou``, ``mdice``
    Dataset-pooled: TP, FP, FN summed over all valid pixels; ``IoU = TP / (TP + FP + FN)``,
    ``Dice = 2TP / (2TP + FP + FN)``; a class with ``TP + FP + FN = 0`` is NaN and left out of the
    means. A prediction of a class outside the averaged classes (e.g. a "void" output channel equal
    to ``ignore_index``) counts as a false negative of the true class.
``image_dice_per_class`` / ``image_iou_per_class``
    Per image (case) and class; NaN where the class is absent from both label and prediction.

Averaged classes: ``range(C)`` minus ``ignore_index`` when the ignore index is a channel index
(e.g. CamVid's 12-output ESPNet with void = 11), unless ``average_classes`` is given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from segcal.validation import (
    as_tensor,
    check_finite,
    check_input_type,
    check_label_range,
    check_labels,
    check_mask,
    check_probabilities,
    check_scores,
)
from segcal.metrics._kernels import HAVE_NUMBA, accumulate_chunk, prepare_chunk
from segcal.metrics.binning import bin_index

#: ``u = -log(1 - c) / FINE_LOG_SPAN`` maps confidences to [0, 1] for the fine histogram;
#: 36.84 = -log(1e-16), beyond float64 resolution of 1 - c.
FINE_LOG_SPAN = 36.841361487904734

STATE_VERSION = 1

#: pooled statistics that are not sums of the per-image blocks
_POOLED_ONLY = ("fine", "classwise", "by_pred", "by_label", "confusion")


def _np(x: Any) -> np.ndarray:
    """Return a numpy view of ``x`` for a torch tensor or array-like (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class CalibrationMetrics:
    """Streaming calibration metrics for segmentation (see the module docstring for formulas).

    Parameters
    ----------
    num_classes
        Number of classes ``C`` (channels of the scores).
    n_bins
        Number of equal-width confidence bins ``M`` (10, 15 and 50 are used in the literature).
    ignore_index
        Label value excluded from every metric (e.g. 255, or 11 for CamVid). ``None``: no ignore.
    input_type
        ``"logits"`` (softmax is applied) or ``"probs"`` (checked to sum to 1 over classes).
    per_image
        Keep the per-image statistics (``O(M + C)`` floats per image) for image-wise metrics.
    fine_bins
        Resolution of the fine confidence histogram behind ``ace_adaptive``.
    nll_floor
        Probability floor of the NLL.
    average_classes
        Classes averaged in ``miou``, ``mdice``, ``classwise_ece``, ``class_level_ece``.
    chunk_pixels
        Pixels processed at a time, default 16384 (bounds the extra memory to a few
        ``C x chunk_pixels`` buffers per worker; a 19-class float32 chunk, 1.2 MiB, stays in L2).
    validate
        Check every chunk for NaN/inf and labels out of range (cheap; leave on).
    backend
        ``"auto"`` (the fused numba kernel on the CPU when numba is installed, torch otherwise),
        ``"torch"`` or ``"numba"``. Both give the same statistics.
    device
        Device of the state; default: the device of the first batch.

    Examples
    --------
    >>> m = CalibrationMetrics(num_classes=3, n_bins=15, ignore_index=255)
    >>> m.update(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
    >>> sorted(m.compute())[:3]
    ['accuracy', 'ace_adaptive', 'ace_adaptive_error_bound']
    """

    def __init__(
        self,
        num_classes: int,
        *,
        n_bins: int = 15,
        ignore_index: int | None = None,
        input_type: str = "logits",
        per_image: bool = True,
        fine_bins: int = 1 << 16,
        nll_floor: float = 1e-12,
        average_classes: Sequence[int] | None = None,
        chunk_pixels: int = 1 << 14,
        validate: bool = True,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        if backend not in ("auto", "torch", "numba"):
            raise ValueError(f"backend: expected 'auto', 'torch' or 'numba', got {backend!r}")
        if backend == "numba" and not HAVE_NUMBA:
            raise ImportError("backend='numba' needs numba: pip install 'segcal[fast]'")
        self.backend = backend
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins: expected a positive integer, got {n_bins!r}")
        if not isinstance(fine_bins, int) or fine_bins < n_bins:
            raise ValueError(f"fine_bins: expected an integer >= n_bins, got {fine_bins!r}")
        if not (0 < nll_floor < 1):
            raise ValueError(f"nll_floor: expected a value in (0, 1), got {nll_floor!r}")
        if chunk_pixels < 1:
            raise ValueError(f"chunk_pixels: expected a positive integer, got {chunk_pixels!r}")
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.ignore_index = ignore_index
        self.input_type = check_input_type(input_type)
        self.per_image = per_image
        self.fine_bins = fine_bins
        self.nll_floor = float(nll_floor)
        if average_classes is None:
            average_classes = [k for k in range(num_classes) if k != ignore_index]
        average_classes = [int(k) for k in average_classes]
        if not average_classes or any(k < 0 or k >= num_classes for k in average_classes):
            raise ValueError(f"average_classes: expected class indices in [0, {num_classes}), got {average_classes}")
        self.average_classes = average_classes
        self.chunk_pixels = int(chunk_pixels)
        self.validate = validate
        self.device = torch.device(device) if device is not None else None
        self._init_state()

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        C, M, F = self.num_classes, self.n_bins, self.fine_bins
        dev = self.device or torch.device("cpu")
        f64 = torch.float64
        # pooled statistics that are not sums of the per-image ones
        self.fine = torch.zeros(F, 3, dtype=f64, device=dev)  # count, sum conf, sum correct
        self.classwise = torch.zeros(C, M, 3, dtype=f64, device=dev)  # count, sum q_k, sum 1[y=k]
        self.by_pred = torch.zeros(C, M, 3, dtype=f64, device=dev)  # count, conf, correct (pred = k)
        self.by_label = torch.zeros(C, M, 3, dtype=f64, device=dev)  # count, conf, correct (label = k)
        self.confusion = torch.zeros(C, C, dtype=f64, device=dev)
        # per-image blocks: top-label bins split by correctness (n, M, 2[wrong, correct], 2[count, sum conf]),
        # totals (n, 3[count, sum nll, sum brier]) and per-class (n, C, 3[label count, tp, pred count])
        self.pooled_bins = torch.zeros(M, 2, 2, dtype=f64, device=dev)
        self.pooled_totals = torch.zeros(3, dtype=f64, device=dev)
        self._img_bins: list[torch.Tensor] = []
        self._img_totals: list[torch.Tensor] = []
        self._img_class: list[torch.Tensor] = []
        self.n_images = 0

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._init_state()

    def _ensure_device(self, device: torch.device) -> None:
        if self.device is None:
            self.device = device
            if device != self.fine.device:
                self._to(device)

    def _to(self, device: torch.device) -> None:
        for name in ("fine", "classwise", "by_pred", "by_label", "confusion", "pooled_bins", "pooled_totals"):
            setattr(self, name, getattr(self, name).to(device))
        self._img_bins = [t.to(device) for t in self._img_bins]
        self._img_totals = [t.to(device) for t in self._img_totals]
        self._img_class = [t.to(device) for t in self._img_class]

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, preds: Any, target: Any, mask: Any = None) -> None:
        """Accumulate one batch.

        Parameters
        ----------
        preds
            ``(N, C, *spatial)`` scores, or an ``(M, C)`` table (counted as one image); torch or
            numpy; float16, bfloat16, float32 or float64; any device.
        target
            ``(N, *spatial)`` (or ``(M,)``) integer labels.
        mask
            Optional boolean array shaped like ``target``; False pixels are excluded.
        """
        x = check_scores(preds, "preds", num_classes=self.num_classes)
        table = x.ndim == 2
        exp_shape = (x.shape[0],) if table else (x.shape[0], *x.shape[2:])
        y = check_labels(target, "target", expected_shape=exp_shape)
        mk = check_mask(mask, exp_shape) if mask is not None else None
        if table:  # (M, C) -> one "image" of M pixels
            x = x.t().unsqueeze(0)
            y = y.unsqueeze(0)
            mk = mk.unsqueeze(0) if mk is not None else None
        n = x.shape[0]
        x = x.reshape(n, self.num_classes, -1)
        y = y.reshape(n, -1)
        mk = mk.reshape(n, -1) if mk is not None else None
        dev = self.device or (x.device if x.device.type != "cpu" else torch.device("cpu"))
        self._ensure_device(dev)

        C, M = self.num_classes, self.n_bins
        f64 = torch.float64
        img_bins = torch.zeros(n, M, 2, 2, dtype=f64, device=dev)
        img_totals = torch.zeros(n, 3, dtype=f64, device=dev)
        img_class = torch.zeros(n, C, 3, dtype=f64, device=dev)
        # accumulate into fresh pooled tensors and add them only on success: a batch that fails
        # validation half-way leaves the state untouched
        saved = {nm: getattr(self, nm) for nm in _POOLED_ONLY}
        for nm, t in saved.items():
            setattr(self, nm, torch.zeros_like(t))
        use_kernel = self.backend != "torch" and HAVE_NUMBA and dev.type == "cpu"
        try:
            if use_kernel:
                self._update_kernel(x, y, mk, dev, img_bins, img_totals, img_class)
            else:
                for img, z, lab, valid in self._chunks(x, y, mk, dev):
                    self._accumulate(img, z, lab, valid, img_bins, img_totals, img_class)
        except BaseException:
            for nm, t in saved.items():
                setattr(self, nm, t)
            raise
        for nm, t in saved.items():
            setattr(self, nm, t.add_(getattr(self, nm)))
        self.pooled_bins += img_bins.sum(0)
        self.pooled_totals += img_totals.sum(0)
        if self.per_image:
            self._img_bins.append(img_bins)
            self._img_totals.append(img_totals)
            self._img_class.append(img_class)
        self.n_images += n

    def _update_kernel(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mk: torch.Tensor | None,
        dev: torch.device,
        img_bins: torch.Tensor,
        img_totals: torch.Tensor,
        img_class: torch.Tensor,
    ) -> None:
        """Numba path: chunks are spread over worker threads (the kernel releases the GIL), each
        with private accumulators that are summed at the end; torch runs single-threaded inside
        the workers meanwhile (restored afterwards), so the threads do not oversubscribe cores."""
        import threading
        from concurrent.futures import ThreadPoolExecutor

        n, _, S = x.shape
        n_chunks = n * -(-S // self.chunk_pixels) if S >= self.chunk_pixels // 2 else 1
        workers = max(1, min(torch.get_num_threads(), n_chunks))
        accs = []
        for _ in range(workers):
            accs.append({
                "img_bins": torch.zeros_like(img_bins),
                "img_totals": torch.zeros_like(img_totals),
                "img_class": torch.zeros_like(img_class),
                **{nm: torch.zeros_like(getattr(self, nm)) for nm in _POOLED_ONLY},
            })
        it = iter(self._chunks(x, y, mk, dev, raw=True))
        lock = threading.Lock()
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        if S >= self.chunk_pixels // 2:  # the largest chunk _chunks will yield
            P = min(self.chunk_pixels, S)
        else:
            P = min(n, max(1, self.chunk_pixels // S)) * S

        def work(acc: dict[str, torch.Tensor]) -> None:
            # per-worker buffers, allocated once per update and reused by every chunk (bounded,
            # steady memory instead of a fresh allocation per chunk)
            C = self.num_classes
            scratch = {
                "z": torch.empty(C * P, dtype=cd),
                "q": torch.empty(C * P, dtype=cd),
                "work": np.empty(4 * P, dtype=np.float64),
                "lg": np.empty(2 * P, dtype=np.float64),
                "pred": np.empty(P, dtype=np.int64),
                "unsure": np.empty(P, dtype=np.int64),
                "cand": np.empty(P, dtype=np.int64),
                "ok": np.empty(P, dtype=np.uint8),
            }
            while True:
                with lock:
                    item = next(it, None)
                if item is None:
                    return
                self._accumulate_kernel(*item, acc, scratch)

        if workers == 1:
            work(accs[0])
        else:
            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(workers) as ex:
                    for f in [ex.submit(work, a) for a in accs]:
                        f.result()
            finally:
                torch.set_num_threads(prev)
        for acc in accs:
            img_bins += acc["img_bins"]
            img_totals += acc["img_totals"]
            img_class += acc["img_class"]
            for nm in _POOLED_ONLY:
                getattr(self, nm).add_(acc[nm])
        # class-wise ECE, completed from the batch's statistics: the top entries are the
        # by-predicted-class bins; bin 0 gets every valid pixel's remaining count and label mass
        top = self.by_pred
        self.classwise += top
        n_valid = img_class[:, :, 0].sum()
        lab_hist = img_class[:, :, 0].sum(0)
        self.classwise[:, 0, 0] += n_valid - top[:, :, 0].sum(1)
        self.classwise[:, 0, 1] -= top[:, :, 1].sum(1)
        self.classwise[:, 0, 2] += lab_hist - top[:, :, 2].sum(1)

    def _chunks(
        self, x: torch.Tensor, y: torch.Tensor, mk: torch.Tensor | None, dev: torch.device, raw: bool = False
    ) -> Iterator[tuple[int | torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yield ``(image index or per-pixel index tensor, z (C, P), labels (P,), mask or None)``.

        ``z`` is a contiguous block in the compute dtype; with ``raw=True`` it is the view of
        ``x`` instead (``(C, P)`` or ``(C, k, S)`` for packed small images), which the caller
        copies into its own buffer.
        """
        n, C, S = x.shape
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        P = self.chunk_pixels
        if S >= P // 2:
            for i in range(n):
                for p0 in range(0, S, P):
                    p1 = min(S, p0 + P)
                    # a (C, P) view with row stride S: one copy to a contiguous block is cheaper
                    # than a strided softmax and strided reads (and both backends see the same)
                    z = x[i, :, p0:p1]
                    if not raw:
                        z = z.to(device=dev, dtype=cd).contiguous()
                    lab = y[i, p0:p1].to(dev)
                    m = mk[i, p0:p1].to(dev) if mk is not None else None
                    yield i, z, lab, m
        else:
            k = max(1, P // S)
            for i0 in range(0, n, k):
                i1 = min(n, i0 + k)
                z = x[i0:i1].permute(1, 0, 2)
                if not raw:
                    z = z.to(device=dev, dtype=cd).reshape(C, -1)
                lab = y[i0:i1].to(dev).reshape(-1)
                m = mk[i0:i1].to(dev).reshape(-1) if mk is not None else None
                img = torch.arange(i0, i1, device=dev).repeat_interleave(S)
                yield img, z, lab, m

    def _accumulate_kernel(
        self,
        img: int | torch.Tensor,
        z: torch.Tensor,
        lab: torch.Tensor,
        m: torch.Tensor | None,
        acc: dict[str, torch.Tensor],
        scratch: dict[str, Any],
    ) -> None:
        """The fused numba path (CPU): same statistics as :meth:`_accumulate`.

        torch does the vectorised transcendental work (softmax, log); the kernel does the
        argmax, the float64 row sums, the binning and every scatter-add.
        """
        C, M = self.num_classes, self.n_bins
        lab = lab.to(torch.int64)
        valid = m
        if self.ignore_index is not None:
            keep = lab != self.ignore_index
            valid = keep if valid is None else (valid & keep)
        if valid is None:
            valid = torch.ones_like(lab, dtype=torch.bool)
        P = lab.numel()
        zb = scratch["z"][: C * P].view(z.shape)
        zb.copy_(z)  # contiguous, in the compute dtype (float16/bfloat16 are upcast here)
        z = zb.view(C, P)
        if self.input_type == "logits":
            q = torch.softmax(z, dim=0, out=scratch["q"][: C * P].view(C, P))
        else:
            if self.validate and bool(valid.any()):
                check_probabilities(z[:, valid], "preds", dim=0)
            q = z
        work = scratch["work"][: 4 * P].reshape(4, P)
        pred = scratch["pred"][:P]
        lg = scratch["lg"][: 2 * P].reshape(2, P)
        zn, qn, labn = z.numpy(), q.numpy(), lab.numpy()
        prepare_chunk(zn, qn, labn, self.nll_floor, work, pred, lg)
        torch.from_numpy(lg).log_()  # vectorised: log max(q_y, floor) and log(1 - conf)
        unsure = scratch["unsure"][:P]
        cand = scratch["cand"][:P]
        ok = scratch["ok"][:P]
        bad = np.zeros(3, dtype=np.int64)
        if isinstance(img, int):
            img_idx, img0 = np.empty(0, dtype=np.int64), img
        else:
            img_idx, img0 = img.numpy(), 0
        accumulate_chunk(
            qn, labn, valid.numpy(), lg, FINE_LOG_SPAN, img_idx, img0, M, self.fine_bins,
            acc["img_bins"].numpy(), acc["img_totals"].numpy(), acc["img_class"].numpy(), acc["fine"].numpy(),
            acc["classwise"].numpy(), acc["by_pred"].numpy(), acc["by_label"].numpy(), acc["confusion"].numpy(),
            work, pred, unsure, cand, ok, bad,
        )
        if bad[1] > 0:
            check_finite(z[:, valid], "preds")
            raise ValueError(f"preds: contains non-finite values ({int(bad[1])} pixels)")
        if bad[0] > 0:  # the kernel found one; the shared check builds the message
            check_label_range(lab, valid, C, "target")
            raise AssertionError("kernel flagged a label the range check accepts")  # pragma: no cover

    def _accumulate(
        self,
        img: int | torch.Tensor,
        z: torch.Tensor,
        lab: torch.Tensor,
        m: torch.Tensor | None,
        img_bins: torch.Tensor,
        img_totals: torch.Tensor,
        img_class: torch.Tensor,
    ) -> None:
        C, M, F = self.num_classes, self.n_bins, self.fine_bins
        f64 = torch.float64
        lab = lab.to(torch.int64)
        # -- valid pixels: per-pixel vectors are compacted with an index; the (C, P) block never is
        valid = m
        if self.ignore_index is not None:
            keep = lab != self.ignore_index
            valid = keep if valid is None else (valid & keep)
        idx = None
        if valid is not None and not bool(valid.all()):
            idx = valid.nonzero().squeeze(1)
            if idx.numel() == 0:
                return
        P = lab.numel() if idx is None else idx.numel()

        def sel(v: torch.Tensor) -> torch.Tensor:
            return v if idx is None else v.index_select(0, idx)

        if self.validate:
            # one cheap reduction catches NaN and +-inf anywhere in a valid pixel's logits
            zs = sel(z.sum(dim=0))
            if not bool(torch.isfinite(zs).all()):
                check_finite(z if idx is None else z.index_select(1, idx), "preds")
        lab_safe = lab.clamp(0, C - 1)  # only for gathers; invalid pixels are dropped after
        lab = sel(lab)
        if self.validate:
            check_label_range(lab, torch.ones_like(lab, dtype=torch.bool), C, "target")
        if isinstance(img, torch.Tensor):
            img = sel(img)
        # -- probabilities, prediction, confidence
        if self.input_type == "logits":
            q = torch.softmax(z, dim=0)
        else:
            if self.validate:
                check_probabilities(z if idx is None else z.index_select(1, idx), "preds", dim=0)
            q = z
        zmax = z.amax(dim=0)
        # first index of the maximum (torch.argmax over a non-contiguous dim is slow on CPU)
        rdt = torch.uint8 if C < 256 else torch.int64
        rank = torch.arange(C, 0, -1, device=z.device, dtype=rdt)[:, None]
        pred_all = (C - (z == zmax).to(rdt).mul_(rank).amax(dim=0).to(torch.int64)).clamp_(max=C - 1)
        pred = sel(pred_all)
        conf = sel(q.gather(0, pred_all[None])[0]).to(f64)
        q_y = sel(q.gather(0, lab_safe[None])[0]).to(f64)
        correct = pred == lab
        corr64 = correct.to(f64)
        nll = -torch.log(q_y.clamp(min=self.nll_floor))
        q64 = q.to(f64)  # squares of float32 values are exact in float64; summed in float64
        sumsq = sel(torch.linalg.vecdot(q64, q64, dim=0))
        del q64
        brier = sumsq - 2.0 * q_y + 1.0
        b = bin_index(conf, M)
        ci = correct.to(torch.int64)
        # -- per-image top-label bins and totals
        if isinstance(img, int):
            key = b * 2 + ci
            img_bins[img, :, :, 0] += torch.bincount(key, minlength=2 * M).view(M, 2)
            img_bins[img, :, :, 1] += torch.bincount(key, weights=conf, minlength=2 * M).view(M, 2)
            img_totals[img, 0] += P
            img_totals[img, 1] += nll.sum()
            img_totals[img, 2] += brier.sum()
            ck = lab * 2 + ci
            lc = torch.bincount(ck, minlength=2 * C).view(C, 2)
            img_class[img, :, 0] += lc.sum(1)
            img_class[img, :, 1] += lc[:, 1]
            img_class[img, :, 2] += torch.bincount(pred, minlength=C)
        else:
            n = img_bins.shape[0]
            key = (img * M + b) * 2 + ci
            L = n * M * 2
            img_bins[..., 0] += torch.bincount(key, minlength=L).view(n, M, 2)
            img_bins[..., 1] += torch.bincount(key, weights=conf, minlength=L).view(n, M, 2)
            img_totals[:, 0] += torch.bincount(img, minlength=n)
            img_totals[:, 1] += torch.bincount(img, weights=nll, minlength=n)
            img_totals[:, 2] += torch.bincount(img, weights=brier, minlength=n)
            ck = (img * C + lab) * 2 + ci
            lc = torch.bincount(ck, minlength=n * C * 2).view(n, C, 2)
            img_class[:, :, 0] += lc.sum(2)
            img_class[:, :, 1] += lc[:, :, 1]
            img_class[:, :, 2] += torch.bincount(img * C + pred, minlength=n * C).view(n, C)
        # -- pooled-only statistics
        lab_hist = torch.bincount(lab, minlength=C)
        self.confusion += torch.bincount(lab * C + pred, minlength=C * C).view(C, C)
        u = torch.log(1.0 - conf).neg_().div_(FINE_LOG_SPAN)  # = -log1p(-conf); same op as the kernel path
        fb = bin_index(u, F)
        # the fine histogram is large: scatter into the state instead of a per-chunk bincount
        self.fine[:, 0].index_add_(0, fb, torch.ones_like(conf))
        self.fine[:, 1].index_add_(0, fb, conf)
        self.fine[:, 2].index_add_(0, fb, corr64)
        top = self._add3(self.by_pred.view(C * M, 3), (pred * M + b) * 2 + ci, conf, C * M)
        self._add3(self.by_label.view(C * M, 3), (lab * M + b) * 2 + ci, conf, C * M)
        self._classwise(q, valid if idx is not None else None, pred_all, lab, conf, idx, top, lab_hist, P)

    @staticmethod
    def _add3(acc: torch.Tensor, key2: torch.Tensor, conf: torch.Tensor, L: int) -> torch.Tensor:
        """acc[k] += (count, sum conf, sum correct) for ``key2 = k * 2 + correct``."""
        cnt = torch.bincount(key2, minlength=2 * L).view(L, 2)
        part = torch.stack(
            [cnt.sum(1).to(conf.dtype), torch.bincount(key2 >> 1, weights=conf, minlength=L), cnt[:, 1].to(conf.dtype)],
            dim=1,
        )
        acc += part
        return part

    def _classwise(
        self,
        q: torch.Tensor,
        valid: torch.Tensor | None,
        pred_all: torch.Tensor,
        lab: torch.Tensor,
        conf: torch.Tensor,
        idx: torch.Tensor | None,
        top: torch.Tensor,
        lab_hist: torch.Tensor,
        P: int,
    ) -> None:
        """Per-class bins of every class probability ``q_k`` (Nixon's class-wise ECE).

        Exact and sparse: the predicted class's entry is the top-label one (already binned in
        ``top``, the by-predicted-class statistics); any other class ``k`` has ``q_k <= 1 - conf``,
        so it can leave bin 0 only in pixels with ``conf < 1 - 1/M``. Only those pixels' other
        entries above ``1/M`` are gathered; everything else lands in bin 0 by subtraction from the
        per-class totals.
        """
        C, M = self.num_classes, self.n_bins
        f64 = torch.float64
        cw = self.classwise.view(C * M, 3)
        cw += top
        thr = (1.0 / M) * (1.0 - 1e-5)  # superset of the q with bin_index(q) >= 1
        unsure = torch.nonzero(conf < 1.0 - thr).squeeze(1)  # positions among valid pixels
        extra_cnt = torch.zeros(C, dtype=f64, device=q.device)
        extra_q = torch.zeros(C, dtype=f64, device=q.device)
        extra_l = torch.zeros(C, dtype=f64, device=q.device)
        if unsure.numel():
            cols = unsure if idx is None else idx.index_select(0, unsure)
            sub = q.index_select(1, cols)
            sub.scatter_(0, pred_all.index_select(0, cols)[None], 0.0)  # drop the top entries
            U = cols.numel()
            flat = torch.nonzero((sub > thr).view(-1)).squeeze(1)
            if flat.numel():
                k = torch.div(flat, U, rounding_mode="floor")
                pos = flat - k * U
                qv = sub.view(-1)[flat].to(f64)
                bv = bin_index(qv, M)
                is_k = (lab.index_select(0, unsure)[pos] == k).to(f64)
                key = k * M + bv
                s_cnt = torch.bincount(key, minlength=C * M).to(f64)
                s_q = torch.bincount(key, weights=qv, minlength=C * M)
                s_l = torch.bincount(key, weights=is_k, minlength=C * M)
                cw[:, 0] += s_cnt
                cw[:, 1] += s_q
                cw[:, 2] += s_l
                extra_cnt = s_cnt.view(C, M).sum(1)
                extra_q = s_q.view(C, M).sum(1)
                extra_l = s_l.view(C, M).sum(1)
        # bin 0 gets everything else: per-class totals minus what was binned above
        # accumulated in float64: a float32 sum over a chunk is off by ~1e-6 relative
        if valid is None:
            tot_q = q.sum(dim=1, dtype=f64)
        else:
            tot_q = torch.mv(q.to(f64), valid.to(f64))
        top_c = top.view(C, M, 3).sum(1)
        self.classwise[:, 0, 0] += P - top_c[:, 0] - extra_cnt
        self.classwise[:, 0, 1] += tot_q - top_c[:, 1] - extra_q
        self.classwise[:, 0, 2] += lab_hist.to(f64) - top_c[:, 2] - extra_l

    # ------------------------------------------------------------ merge / IO
    def merge(self, other: CalibrationMetrics) -> CalibrationMetrics:
        """Add ``other``'s statistics to this one (images of ``other`` come after this one's)."""
        if not isinstance(other, CalibrationMetrics):
            raise TypeError(f"other: expected CalibrationMetrics, got {type(other).__name__}")
        if self._config() != other._config():
            raise ValueError(f"other: incompatible configuration {other._config()} vs {self._config()}")
        dev = self.fine.device
        for name in ("fine", "classwise", "by_pred", "by_label", "confusion", "pooled_bins", "pooled_totals"):
            getattr(self, name).add_(getattr(other, name).to(dev))
        if self.per_image:
            self._img_bins += [t.to(dev) for t in other._img_bins]
            self._img_totals += [t.to(dev) for t in other._img_totals]
            self._img_class += [t.to(dev) for t in other._img_class]
        self.n_images += other.n_images
        return self

    def _config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "n_bins": self.n_bins,
            "ignore_index": self.ignore_index,
            "input_type": self.input_type,
            "per_image": self.per_image,
            "fine_bins": self.fine_bins,
            "nll_floor": self.nll_floor,
            "average_classes": list(self.average_classes),
        }

    def _image_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        C, M = self.num_classes, self.n_bins
        dev = self.fine.device
        if not self._img_bins:
            z = torch.zeros
            return (z(0, M, 2, 2, dtype=torch.float64, device=dev), z(0, 3, dtype=torch.float64, device=dev),
                    z(0, C, 3, dtype=torch.float64, device=dev))
        if len(self._img_bins) > 1:  # consolidate (keeps the list short)
            self._img_bins = [torch.cat(self._img_bins)]
            self._img_totals = [torch.cat(self._img_totals)]
            self._img_class = [torch.cat(self._img_class)]
        return self._img_bins[0], self._img_totals[0], self._img_class[0]

    def state_dict(self) -> dict[str, Any]:
        """A serialisable state (tensors on the CPU + config); see :meth:`from_state_dict`."""
        ib, it, ic = self._image_tensors()
        return {
            "format": "segcal-metric-state",
            "version": STATE_VERSION,
            "config": self._config(),
            "n_images": self.n_images,
            "fine": self.fine.cpu(),
            "classwise": self.classwise.cpu(),
            "by_pred": self.by_pred.cpu(),
            "by_label": self.by_label.cpu(),
            "confusion": self.confusion.cpu(),
            "pooled_bins": self.pooled_bins.cpu(),
            "pooled_totals": self.pooled_totals.cpu(),
            "img_bins": ib.cpu(),
            "img_totals": it.cpu(),
            "img_class": ic.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CalibrationMetrics:
        if state.get("format") != "segcal-metric-state":
            raise ValueError("state: not a segcal metric state")
        if int(state.get("version", -1)) > STATE_VERSION:
            raise ValueError(f"state: version {state['version']} is newer than this segcal ({STATE_VERSION})")
        cfg = dict(state["config"])
        obj = cls(**cfg)
        for name in ("fine", "classwise", "by_pred", "by_label", "confusion", "pooled_bins", "pooled_totals"):
            src = torch.as_tensor(state[name], dtype=torch.float64)
            if src.shape != getattr(obj, name).shape:
                raise ValueError(f"state: {name} has shape {tuple(src.shape)}, expected {tuple(getattr(obj, name).shape)}")
            setattr(obj, name, src.clone())
        if obj.per_image:
            obj._img_bins = [torch.as_tensor(state["img_bins"], dtype=torch.float64).clone()]
            obj._img_totals = [torch.as_tensor(state["img_totals"], dtype=torch.float64).clone()]
            obj._img_class = [torch.as_tensor(state["img_class"], dtype=torch.float64).clone()]
        obj.n_images = int(state["n_images"])
        return obj

    def save(self, path: Any) -> None:
        """Save the state with ``torch.save`` (atomically)."""
        from segcal.io import atomic_write

        with atomic_write(path) as fh:
            torch.save(self.state_dict(), fh)

    @classmethod
    def load(cls, path: Any) -> CalibrationMetrics:
        """Load a state saved by :meth:`save` (``weights_only=True``: no code is executed)."""
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------ distributed
    def sync(self, group: Any = None) -> CalibrationMetrics:
        """Synchronise across ``torch.distributed`` ranks (in place; every rank gets the total).

        Pooled statistics are all-reduced (sum): communication is ``O(state)``, never pixels. The
        per-image blocks (``O(images)``) are all-gathered in rank order.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        names = ("fine", "classwise", "by_pred", "by_label", "confusion", "pooled_bins", "pooled_totals")
        flat = torch.cat([getattr(self, nm).reshape(-1) for nm in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        off = 0
        for nm in names:
            t = getattr(self, nm)
            t.copy_(flat[off : off + t.numel()].view_as(t))
            off += t.numel()
        world = dist.get_world_size(group)
        cnt = torch.tensor([self.n_images], dtype=torch.int64, device=flat.device)
        counts = [torch.zeros_like(cnt) for _ in range(world)]
        dist.all_gather(counts, cnt, group=group)
        counts_l = [int(c.item()) for c in counts]
        if self.per_image:
            ib, it, ic = self._image_tensors()
            packed = torch.cat([ib.reshape(ib.shape[0], -1), it, ic.reshape(ic.shape[0], -1)], dim=1)
            width = packed.shape[1]
            mx = max(counts_l)
            buf = torch.zeros(mx, width, dtype=torch.float64, device=flat.device)
            buf[: packed.shape[0]] = packed
            bufs = [torch.zeros_like(buf) for _ in range(world)]
            dist.all_gather(bufs, buf, group=group)
            allp = torch.cat([b[:c] for b, c in zip(bufs, counts_l, strict=True)])
            C, M = self.num_classes, self.n_bins
            nb = M * 4
            self._img_bins = [allp[:, :nb].reshape(-1, M, 2, 2).clone()]
            self._img_totals = [allp[:, nb : nb + 3].clone()]
            self._img_class = [allp[:, nb + 3 :].reshape(-1, C, 3).clone()]
        self.n_images = sum(counts_l)
        return self

    # ---------------------------------------------------------------- compute
    def compute(self) -> dict[str, Any]:
        """Return every metric (floats, and numpy arrays for per-class / per-image / curve data).

        Raises
        ------
        ValueError
            If no valid pixel was accumulated.
        """
        return compute_from_state(self)


# ---------------------------------------------------------------------------------------------
def _ece_terms(count: np.ndarray, sum_conf: np.ndarray, sum_acc: np.ndarray, total: float | np.ndarray):
    """Weighted |acc - conf| per bin: ``|sum_acc - sum_conf| / total``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(sum_acc - sum_conf) / total


def _binned_summary(count: np.ndarray, sum_conf: np.ndarray, sum_acc: np.ndarray) -> dict[str, float]:
    """ECE, MCE, RMSCE and unweighted CE of one set of bins (last axis = bins)."""
    n = count.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(count > 0, np.abs(sum_acc - sum_conf) / np.where(count > 0, count, 1), np.nan)
        ece = np.abs(sum_acc - sum_conf).sum(-1) / n
        rms = np.sqrt((np.where(count > 0, count, 0) * np.nan_to_num(gap) ** 2).sum(-1) / n)
        nonempty = (count > 0).sum(-1)
        mce = np.where(nonempty > 0, np.nanmax(np.where(count > 0, gap, -np.inf), axis=-1), np.nan)
        unweighted = np.where(nonempty > 0, np.nansum(gap, axis=-1) / np.maximum(nonempty, 1), np.nan)
    return {"ece": ece, "mce": mce, "rmsce": rms, "unweighted": unweighted}


def _adaptive_ece(fine: np.ndarray, n_bins: int) -> tuple[float, float]:
    count, sconf, sacc = fine[:, 0], fine[:, 1], fine[:, 2]
    N = count.sum()
    start = np.cumsum(count) - count  # pixels before each fine bin
    nz = count > 0
    # adaptive bin of each fine bin: where its first pixel falls among N/M-sized groups
    ab = np.minimum((start * n_bins) // N, n_bins - 1).astype(np.int64)
    acc_c = np.bincount(ab[nz], weights=count[nz], minlength=n_bins)
    acc_s = np.bincount(ab[nz], weights=(sacc - sconf)[nz], minlength=n_bins)
    ace = float(np.abs(acc_s).sum() / N)
    del acc_c
    # error bound: fine bins that straddle an exact boundary j*N/M (j = 1..M-1)
    end = start + count
    j = np.arange(1, n_bins) * (N / n_bins)
    straddle = np.zeros_like(count, dtype=bool)
    idx = np.searchsorted(end, j, side="right")  # first fine bin whose end > boundary
    for b_, i in zip(j, idx, strict=True):
        if i < len(count) and start[i] < b_ < end[i]:
            straddle[i] = True
    bound = float(2.0 * count[straddle].sum() / N)
    return ace, bound


def compute_from_state(st: CalibrationMetrics) -> dict[str, Any]:
    M = st.n_bins
    avg = np.asarray(st.average_classes)
    pb = _np(st.pooled_bins)  # (M, 2, 2)
    totals = _np(st.pooled_totals)
    N = float(totals[0])
    if N <= 0:
        raise ValueError("no valid pixels were accumulated (every pixel ignored or masked, or no update)")
    count = pb[:, :, 0].sum(1)
    sconf = pb[:, :, 1].sum(1)
    sacc = pb[:, 1, 0]
    main = _binned_summary(count, sconf, sacc)
    out: dict[str, Any] = {
        "n_pixels": int(N),
        "n_images": int(st.n_images),
        "n_bins": M,
        "ece": float(main["ece"]),
        "mce": float(main["mce"]),
        "rmsce": float(main["rmsce"]),
        "ace_unweighted": float(main["unweighted"]),
    }
    ace, bound = _adaptive_ece(_np(st.fine), M)
    out["ace_adaptive"] = ace
    out["ace_adaptive_error_bound"] = bound
    # correct / mispredicted split
    n_c, n_w = pb[:, 1, 0].sum(), pb[:, 0, 0].sum()
    out["ece_correct"] = float(np.abs(pb[:, 1, 0] - pb[:, 1, 1]).sum() / n_c) if n_c > 0 else float("nan")
    out["ece_mispredicted"] = float(pb[:, 0, 1].sum() / n_w) if n_w > 0 else float("nan")
    out["fraction_mispredicted"] = float(n_w / N)
    out["accuracy"] = float(n_c / N)
    out["mean_confidence"] = float(sconf.sum() / N)
    out["nll"] = float(totals[1] / N)
    out["brier"] = float(totals[2] / N)
    # class-wise ECE (Nixon) over averaged classes
    cw = _np(st.classwise)
    ece_k = np.abs(cw[:, :, 2] - cw[:, :, 1]).sum(1) / N
    out["classwise_ece"] = float(ece_k[avg].mean())
    out["classwise_ece_per_class"] = ece_k
    bp = _np(st.by_pred)
    out["sce_lts"] = float(np.abs(bp[:, :, 2] - bp[:, :, 1]).sum() / N)
    bl = _np(st.by_label)
    nk = bl[:, :, 0].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ece_lbl = np.where(nk > 0, np.abs(bl[:, :, 2] - bl[:, :, 1]).sum(1) / np.maximum(nk, 1), 0.0)
    out["class_level_ece"] = float(ece_lbl[avg].mean())
    out["class_level_ece_per_class"] = ece_lbl
    # segmentation
    cm = _np(st.confusion)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    out["confusion_matrix"] = cm.astype(np.int64)
    out["iou_per_class"] = iou
    out["dice_per_class"] = dice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["miou"] = float(np.nanmean(iou[avg])) if np.isfinite(iou[avg]).any() else float("nan")
        out["mdice"] = float(np.nanmean(dice[avg])) if np.isfinite(dice[avg]).any() else float("nan")
    # reliability diagram data
    with np.errstate(invalid="ignore", divide="ignore"):
        out["reliability"] = {
            "edges": np.linspace(0.0, 1.0, M + 1),
            "count": count.astype(np.int64),
            "confidence": np.where(count > 0, sconf / np.maximum(count, 1), np.nan),
            "accuracy": np.where(count > 0, sacc / np.maximum(count, 1), np.nan),
        }
    # image-wise
    if st.per_image:
        ib, it, ic = (_np(t) for t in st._image_tensors())
        icount = ib[:, :, :, 0].sum(2)
        iconf = ib[:, :, :, 1].sum(2)
        iacc = ib[:, :, 1, 0]
        s = _binned_summary(icount, iconf, iacc)
        n_img = it[:, 0]
        has = n_img > 0
        out["image_ece_values"] = np.where(has, s["ece"], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out["image_ece"] = float(np.nanmean(out["image_ece_values"])) if has.any() else float("nan")
            out["image_ece_std"] = float(np.nanstd(out["image_ece_values"])) if has.any() else float("nan")
            out["image_mce"] = float(np.nanmean(np.where(has, s["mce"], np.nan))) if has.any() else float("nan")
            ic_c = ib[:, :, 1, 0].sum(1)
            ic_w = ib[:, :, 0, 0].sum(1)
            e_c = np.where(ic_c > 0, np.abs(ib[:, :, 1, 0] - ib[:, :, 1, 1]).sum(1) / np.maximum(ic_c, 1), np.nan)
            e_w = np.where(ic_w > 0, ib[:, :, 0, 1].sum(1) / np.maximum(ic_w, 1), np.nan)
            out["image_ece_correct"] = float(np.nanmean(e_c)) if np.isfinite(e_c).any() else float("nan")
            out["image_ece_mispredicted"] = float(np.nanmean(e_w)) if np.isfinite(e_w).any() else float("nan")
            out["image_nll_values"] = np.where(has, it[:, 1] / np.maximum(n_img, 1), np.nan)
            out["image_pixels"] = n_img.astype(np.int64)
            lc, tpi, pc = ic[:, :, 0], ic[:, :, 1], ic[:, :, 2]
            den = lc + pc
            out["image_dice_per_class"] = np.where(den > 0, 2 * tpi / np.maximum(den, 1), np.nan)
            out["image_iou_per_class"] = np.where(den - tpi > 0, tpi / np.maximum(den - tpi, 1), np.nan)
    return out


def calibration_metrics(
    preds: Any,
    target: Any,
    *,
    mask: Any = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Functional form: every metric of :class:`CalibrationMetrics` for one batch.

    Same code path as the stateful object (``update`` once, then ``compute``).
    """
    x = check_scores(preds, "preds")
    m = CalibrationMetrics(num_classes or int(x.shape[1]), **kwargs)
    m.update(x, target, mask)
    return m.compute()


def expected_calibration_error(preds: Any, target: Any, *, n_bins: int = 15, **kwargs: Any) -> float:
    """Pooled top-label ECE (see :class:`CalibrationMetrics`)."""
    return calibration_metrics(preds, target, n_bins=n_bins, per_image=False, **kwargs)["ece"]


def to_jsonable(results: dict[str, Any]) -> dict[str, Any]:
    """Convert a results dict to JSON-serialisable values (NaN -> None)."""

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, np.ndarray):
            return conv(v.tolist())
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, (float, np.floating)):
            f = float(v)
            return None if math.isnan(f) or math.isinf(f) else f
        if isinstance(v, (np.integer,)):
            return int(v)
        return v

    return {k: conv(v) for k, v in results.items()}


__all__ = [
    "CalibrationMetrics",
    "as_tensor",
    "calibration_metrics",
    "compute_from_state",
    "expected_calibration_error",
    "to_jsonable",
]
