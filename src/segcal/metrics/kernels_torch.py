"""The torch accumulation kernel of the metric engine (any device).

One chunk of pixels at a time, :func:`accumulate` adds the chunk's statistics into the
accumulators of :mod:`segcal.metrics.state` (``acc``: a dict of the accumulated fields, the
``"cat"`` ones with one row per image of the batch). Definitions: ``../shared/methods.md`` §4;
the fused CPU kernel (:mod:`segcal.metrics.kernels_numba`) computes the same statistics.
"""

from __future__ import annotations

import torch

from segcal.metrics.binning import bin_index
from segcal.metrics.chunks import (
    FINE_LOG_SPAN,
    ChunkHook,
    Settings,
    check_chunk_probabilities,
    single_thread,
    valid_pixels,
)
from segcal.validation import check_finite, check_label_range


def softmax(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (0) of a chunk, single-threaded on the CPU (see
    :mod:`segcal.metrics.chunks`: the values then do not depend on torch's thread count)."""
    if z.device.type != "cpu":
        return torch.softmax(z, dim=0)
    with single_thread():
        return torch.softmax(z, dim=0)


def accumulate(
    cfg: Settings,
    img: int | torch.Tensor,
    z: torch.Tensor,
    lab: torch.Tensor,
    m: torch.Tensor | None,
    acc: dict[str, torch.Tensor],
    on_chunk: ChunkHook | None = None,
) -> None:
    """Add one chunk's statistics to ``acc`` (see :func:`segcal.metrics.chunks.iter_chunks`);
    ``on_chunk`` (see :data:`segcal.metrics.chunks.ChunkHook`) then sees the chunk's probabilities."""
    C, M, F = cfg.num_classes, cfg.n_bins, cfg.fine_bins
    f64 = torch.float64
    img_bins, img_totals, img_class = acc["img_bins"], acc["img_totals"], acc["img_class"]
    lab = lab.to(torch.int64)
    lab_all, img_all = lab, img
    # -- valid pixels: per-pixel vectors are compacted with an index; the (C, P) block never is
    valid = valid_pixels(lab, m, cfg.ignore_index)
    idx = None
    if valid is not None and not bool(valid.all()):
        idx = valid.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
    P = lab.numel() if idx is None else idx.numel()

    def sel(v: torch.Tensor) -> torch.Tensor:
        return v if idx is None else v.index_select(0, idx)

    if cfg.validate:
        # one cheap reduction catches NaN and +-inf anywhere in a valid pixel's logits
        zs = sel(z.sum(dim=0))
        if not bool(torch.isfinite(zs).all()):
            check_finite(z if idx is None else z.index_select(1, idx), "preds")
    lab_safe = lab.clamp(0, C - 1)  # only for gathers; invalid pixels are dropped after
    lab = sel(lab)
    if cfg.validate:
        check_label_range(lab, torch.ones_like(lab, dtype=torch.bool), C, "target")
    if isinstance(img, torch.Tensor):
        img = sel(img)
    # -- probabilities, prediction, confidence
    if cfg.input_type == "logits":
        q = softmax(z)
    else:
        if cfg.validate:
            check_chunk_probabilities(cfg, z if idx is None else z.index_select(1, idx))
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
    nll = -torch.log(q_y.clamp(min=cfg.nll_floor))
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
    acc["confusion"] += torch.bincount(lab * C + pred, minlength=C * C).view(C, C)
    u = torch.log(1.0 - conf).neg_().div_(FINE_LOG_SPAN)  # = -log1p(-conf); same op as the kernel path
    fb = bin_index(u, F)
    # the fine histogram is large: scatter into the state instead of a per-chunk bincount
    fine = acc["fine"]
    fine[:, 0].index_add_(0, fb, torch.ones_like(conf))
    fine[:, 1].index_add_(0, fb, conf)
    fine[:, 2].index_add_(0, fb, corr64)
    top = _add3(acc["by_pred"].view(C * M, 3), (pred * M + b) * 2 + ci, conf, C * M)
    _add3(acc["by_label"].view(C * M, 3), (lab * M + b) * 2 + ci, conf, C * M)
    _classwise(cfg, acc["classwise"], q, valid if idx is not None else None, pred_all, lab, conf, idx, top,
               lab_hist, P)
    if on_chunk is not None:
        keep = valid if valid is not None else torch.ones_like(lab_all, dtype=torch.bool)
        on_chunk(0, img_all if isinstance(img_all, int) else img_all.cpu().numpy(), q.cpu().numpy(),
                 pred_all.cpu().numpy(), lab_all.cpu().numpy(), keep.cpu().numpy())


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
    cfg: Settings,
    classwise: torch.Tensor,
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
    C, M = cfg.num_classes, cfg.n_bins
    f64 = torch.float64
    cw = classwise.view(C * M, 3)
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
    classwise[:, 0, 0] += P - top_c[:, 0] - extra_cnt
    classwise[:, 0, 1] += tot_q - top_c[:, 1] - extra_q
    classwise[:, 0, 2] += lab_hist.to(f64) - top_c[:, 2] - extra_l


__all__ = ["accumulate", "softmax"]
