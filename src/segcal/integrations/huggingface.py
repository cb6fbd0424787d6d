"""Hugging Face ``transformers`` semantic segmentation: per-pixel class scores to calibrate.

:func:`hf_scores` turns the output of a ``transformers`` segmentation model into per-pixel class
scores ``(N, C, H, W)`` at the size you ask for; :class:`HFSegmentationModel` wraps the model so
that ``model(x)`` returns them, ready for :class:`segcal.CalibratedModel` and
:func:`segcal.pipeline.fit_model.fit_from_model`.

What is (and is not) a calibratable logit:

* **Per-pixel classifiers** (``SegformerForSemanticSegmentation``,
  ``UperNetForSemanticSegmentation``, and every model whose output has ``.logits`` of shape
  ``(N, C, h, w)``: BEiT, DPT, MobileViT, ...): ``.logits`` are the logits of a per-pixel softmax
  the model was trained with (cross-entropy); SegFormer predicts them at 1/4 of the input's
  resolution. They are resized bilinearly (``align_corners=False``, as
  ``post_process_semantic_segmentation`` does) and returned as they are: real logits, calibrated
  like any others.
* **Mask classifiers** (``Mask2FormerForUniversalSegmentation``,
  ``MaskFormerForInstanceSegmentation``): there is no per-pixel softmax. ``transformers``' semantic
  post-processing scores class ``c`` at pixel ``x`` by ``S_c(x) = sum_q p_q(c) sigmoid(m_q(x))``
  (``p_q`` the softmax of query ``q``'s class logits without the "no object" class, ``m_q`` its
  mask logits; Mask2Former first resizes the mask logits to 384 x 384, as ``transformers`` does)
  and takes the argmax. These scores are not probabilities (they do not sum to 1 over classes).
  :func:`hf_scores` returns ``log(S_c / sum_k S_k)`` after resizing ``S`` to the output size:
  log-probabilities of the normalised mixture, whose argmax is ``transformers``' semantic map.
  A calibrator fitted on them calibrates that derived distribution; it is a post-hoc score, not
  the model's training likelihood, and the normalisation hides how much mass the queries gave to
  "no object" (a pixel no query claims gets a confident-looking distribution from tiny scores).
  Instance and panoptic outputs are not per-pixel class distributions and are not handled.

Nothing here imports ``transformers``: the functions read the output's fields
(``logits``, ``class_queries_logits``, ``masks_queries_logits``); building the models needs
``pip install 'segcal[huggingface]'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segcal.errors import InputError
from segcal.models.calibrated import resize_logits

__all__ = ["MASK2FORMER_MASK_SIZE", "HFSegmentationModel", "hf_scores", "mask_classification_scores"]

#: the size Mask2Former's semantic post-processing resizes the mask logits to (transformers 4.x)
MASK2FORMER_MASK_SIZE = (384, 384)
#: floor of the normalised mask-classification scores before the log
SCORE_FLOOR = 1e-12


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def mask_classification_scores(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor,
                               size: tuple[int, int] | None = None, *,
                               mask_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-pixel class log-scores of a mask classifier (MaskFormer / Mask2Former).

    Parameters
    ----------
    class_queries_logits
        ``(N, Q, C + 1)``: class logits of every query, the last class being "no object".
    masks_queries_logits
        ``(N, Q, h, w)``: mask logits of every query.
    size
        Output spatial size (default: the masks' size, or ``mask_size``).
    mask_size
        Resize the mask logits to this size first (Mask2Former's post-processing uses
        :data:`MASK2FORMER_MASK_SIZE`; ``None``: no resizing, as MaskFormer's).

    Returns
    -------
    torch.Tensor
        ``(N, C, *size)`` float32 ``log(S / sum_c S_c)``, ``S = einsum("nqc,nqhw->nchw",
        softmax(class logits)[..., :-1], sigmoid(mask logits))`` resized bilinearly to ``size``
        (``align_corners=False``) before normalising; its argmax is ``transformers``'
        ``post_process_semantic_segmentation`` map.
    """
    cls, masks = class_queries_logits, masks_queries_logits
    if cls.ndim != 3 or masks.ndim != 4 or cls.shape[:2] != masks.shape[:2] or cls.shape[2] < 3:
        raise InputError(f"mask classification output: expected class_queries_logits (N, Q, C+1) and "
                         f"masks_queries_logits (N, Q, h, w) with the same N and Q, got {tuple(cls.shape)} "
                         f"and {tuple(masks.shape)}")
    masks = masks.to(torch.float32)
    if mask_size is not None:
        masks = resize_logits(masks, tuple(mask_size))
    probs = cls.to(torch.float32).softmax(-1)[..., :-1]
    scores = torch.einsum("nqc,nqhw->nchw", probs, masks.sigmoid())
    if size is not None:
        scores = resize_logits(scores, tuple(size))
    scores = scores.clamp_min(0.0)  # bilinear interpolation of non-negative scores stays >= 0
    return torch.log((scores / scores.sum(1, keepdim=True).clamp_min(SCORE_FLOOR)).clamp_min(SCORE_FLOOR))


def hf_scores(output: Any, size: tuple[int, int] | None = None, *, mask_size: Any = "auto") -> torch.Tensor:
    """Per-pixel class scores ``(N, C, *size)`` of a ``transformers`` segmentation output.

    Parameters
    ----------
    output
        A model output (or mapping) with ``logits`` ``(N, C, h, w)`` (SegFormer, UperNet, ...), or
        with ``class_queries_logits`` and ``masks_queries_logits`` (MaskFormer, Mask2Former).
    size
        Output spatial size (e.g. the input's or the labels'); ``None`` keeps the model's.
    mask_size
        Mask classifiers only: ``"auto"`` resizes the mask logits to :data:`MASK2FORMER_MASK_SIZE`
        first for a Mask2Former output (as ``transformers`` does) and not for MaskFormer; or a size,
        or ``None``.

    Returns
    -------
    torch.Tensor
        float32 logits (per-pixel classifiers) or log-probabilities of the normalised mask mixture
        (mask classifiers); see the module docstring for what each one is.
    """
    cls, masks = _field(output, "class_queries_logits"), _field(output, "masks_queries_logits")
    if isinstance(cls, torch.Tensor) and isinstance(masks, torch.Tensor):
        if mask_size == "auto":
            mask_size = MASK2FORMER_MASK_SIZE if type(output).__name__.startswith("Mask2Former") else None
        return mask_classification_scores(cls, masks, size, mask_size=mask_size)
    logits = output if isinstance(output, torch.Tensor) else _field(output, "logits")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
        raise InputError("model output: expected .logits (N, C, h, w) (SegFormer, UperNet, ...) or "
                         ".class_queries_logits and .masks_queries_logits (MaskFormer, Mask2Former); got "
                         f"{type(output).__name__}"
                         + (f" with logits of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else ""))
    return logits.to(torch.float32) if size is None else resize_logits(logits, tuple(size))


class HFSegmentationModel(nn.Module):
    """A ``transformers`` segmentation model whose ``forward(x)`` returns per-pixel scores at ``x``'s size.

    ``HFSegmentationModel(model)(pixel_values)`` is :func:`hf_scores` ``(model(pixel_values=x),
    size=x.shape[2:])``: ``(N, C, H, W)`` logits of a per-pixel classifier, or the log-probabilities
    of a mask classifier's normalised mixture. Use it as the network of
    :class:`segcal.CalibratedModel` and in :func:`segcal.pipeline.fit_model.fit_from_model`
    (SegFormer and UperNet also work there unwrapped: their output's ``.logits`` are found and
    resized; MaskFormer / Mask2Former need this wrapper).

    Parameters
    ----------
    model
        The ``transformers`` model (called as ``model(pixel_values=x)``).
    mask_size
        As in :func:`hf_scores`.
    """

    def __init__(self, model: nn.Module, *, mask_size: Any = "auto") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InputError(f"model: expected a transformers model (torch.nn.Module), got {type(model).__name__}")
        self.model = model
        self.mask_size = mask_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise InputError(f"x: expected pixel_values (N, C, H, W), got shape {tuple(x.shape)}")
        return hf_scores(self.model(pixel_values=x), tuple(x.shape[2:]), mask_size=self.mask_size)
