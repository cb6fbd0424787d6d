"""segcal's streaming calibration metrics with MONAI's metric interface: :class:`MonaiCalibrationMetric`.

MONAI's metrics follow ``metric(y_pred=..., y=...)`` per iteration, ``metric.aggregate()`` at the
end and ``metric.reset()``; ``monai.handlers.IgniteMetricHandler(metric_fn=...)`` and MONAI's
evaluators drive any ``monai.metrics.CumulativeIterationMetric`` that way.
:class:`MonaiCalibrationMetric` subclasses ``CumulativeIterationMetric`` (so those accept it) but
does **not** use its buffers: a cumulative MONAI metric appends each iteration's per-image
results to a list and gathers the whole list across ranks, while calibration statistics do not
reduce per image (a pooled ECE is not a mean of image ECEs). Each call instead adds the batch to
segcal's streaming state (:class:`segcal.metrics.CalibrationMetrics`: O(bins x classes) pooled
statistics plus O(bins + classes) per image, never pixels), and ``aggregate`` synchronises a copy
of that state over ``torch.distributed`` ranks (O(state) communication;
:meth:`segcal.metrics.CalibrationMetrics.sync`) and computes it.

MONAI's conventions are accepted: ``y_pred`` a batch-first ``(B, C, *spatial)`` tensor (logits
by default, ``input_type="probs"`` for probabilities after ``Activations(softmax=True)``) or a
list of channel-first ``(C, *spatial)`` tensors (``decollate_batch``); ``y`` class indices
``(B, *spatial)`` or ``(B, 1, *spatial)``, or one-hot ``(B, C, *spatial)`` (``AsDiscrete(to_onehot=C)``;
a pixel whose one-hot row is all zero is left out, as an ignored label). ``MetaTensor`` inputs are
read as plain tensors.

Needs MONAI (``pip install 'segcal[medical]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from segcal.errors import InputError, missing_dependency
from segcal.metrics.engine import CalibrationMetrics

try:
    from monai.data import MetaTensor
    from monai.metrics import CumulativeIterationMetric
except ImportError as exc:  # the point of this module: say which extra installs it
    raise missing_dependency("monai", "medical", "segcal.integrations.monai") from exc

__all__ = ["MonaiCalibrationMetric", "monai_labels"]


def _plain(x: Any) -> Any:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def monai_labels(y: Any, pred_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MONAI labels as ``(B, *spatial)`` class indices and a mask (or ``None``).

    Parameters
    ----------
    y
        ``(B, *spatial)`` or ``(B, 1, *spatial)`` class indices, or one-hot ``(B, C, *spatial)``.
    pred_shape
        The shape of ``y_pred``, ``(B, C, *spatial)``.

    Returns
    -------
    labels, mask
        The class indices; for one-hot labels, the mask of the pixels whose row is not all zero
        (``None`` when every pixel has a label).

    Raises
    ------
    InputError
        If ``y`` has another shape, or one-hot rows that are not 0/1 with at most one 1.
    """
    y = torch.as_tensor(_plain(y))
    b, c, *spatial = (int(s) for s in pred_shape)
    shape = tuple(y.shape)
    if shape == (b, *spatial):
        return y, None
    if shape == (b, 1, *spatial):
        return y[:, 0], None
    if shape == (b, c, *spatial):
        if not bool(((y == 0) | (y == 1)).all()):
            raise InputError("y: one-hot labels hold values other than 0 and 1")
        per_pixel = y.sum(1)
        if bool((per_pixel > 1).any()):
            raise InputError("y: a one-hot label row has more than one class set, expected one (or none: ignored)")
        mask = per_pixel == 1
        return y.argmax(1), (None if bool(mask.all()) else mask)
    raise InputError(f"y: shape {shape}, expected {(b, *spatial)}, {(b, 1, *spatial)} (class indices) or "
                     f"{(b, c, *spatial)} (one-hot) for y_pred of shape {(b, c, *spatial)}")


class MonaiCalibrationMetric(CumulativeIterationMetric):
    """segcal's :class:`~segcal.metrics.CalibrationMetrics` behind MONAI's metric interface.

    Parameters
    ----------
    num_classes
        Number of classes ``C`` (channels of ``y_pred``).
    metric_name
        ``None`` (default): :meth:`aggregate` returns the dict of
        :meth:`segcal.metrics.CalibrationMetrics.compute`; a key (``"ece"``, ``"nll"``,
        ``"image_ece"``...): it returns that value as a 0-d float64 tensor, as MONAI metrics do
        (``IgniteMetricHandler`` then logs a float, and a ``key_val_metric`` can rank epochs).
    **kwargs
        Passed to :class:`segcal.metrics.CalibrationMetrics` (``n_bins``, ``ignore_index``,
        ``input_type``, ``per_image``, ``device``, ...).

    Examples
    --------
    >>> metric = MonaiCalibrationMetric(3, metric_name="ece")
    >>> metric(y_pred=torch.randn(2, 3, 8, 8), y=torch.randint(0, 3, (2, 1, 8, 8)))
    >>> float(metric.aggregate()) >= 0
    True
    """

    def __init__(self, num_classes: int, *, metric_name: str | None = None, **kwargs: Any) -> None:
        # the state exists before MONAI's constructor calls reset()
        self._metrics = CalibrationMetrics(num_classes, **kwargs)  # validates the arguments
        self._last: dict[str, Any] | None = None
        self.metric_name = metric_name
        super().__init__()

    def reset(self) -> None:
        """Forget the accumulated statistics."""
        super().reset()
        self._metrics.reset()
        self._last = None

    def __call__(self, y_pred: Any, y: Any = None, **kwargs: Any) -> None:  # type: ignore[override]
        """Add one iteration: ``y_pred`` batch-first or a list of channel-first tensors, ``y``
        likewise (see the module docstring); ``mask=`` an optional boolean ``(B, *spatial)`` mask
        (batch-first input only). Returns ``None``: the statistics are not per-image values.

        Raises
        ------
        InputError
            If ``y`` is missing or has another shape, or the engine refuses the batch.
        """
        if y is None:
            raise InputError(f"y: {type(self).__name__} needs the labels (y=...)")
        mask = kwargs.pop("mask", None)
        if kwargs:
            raise InputError(f"{type(self).__name__}: unexpected arguments {sorted(kwargs)}; accepted: mask")
        if isinstance(y_pred, list | tuple) or isinstance(y, list | tuple):
            if mask is not None:
                raise InputError("mask: only with batch-first y_pred and y")
            if len(y_pred) != len(y):
                raise InputError(f"y: {len(y)} label tensors for {len(y_pred)} predictions")
            for p, t in zip(y_pred, y, strict=True):
                self._compute_tensor(torch.as_tensor(_plain(p))[None], torch.as_tensor(_plain(t))[None])
            return None
        self._compute_tensor(y_pred, y, mask=mask)
        return None

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None,  # type: ignore[override]
                        **kwargs: Any) -> None:
        """Add one batch-first batch to the streaming state (MONAI's per-iteration hook)."""
        y_pred = torch.as_tensor(_plain(y_pred)).detach()
        if y_pred.ndim < 3:
            raise InputError(f"y_pred: shape {tuple(y_pred.shape)}, expected (B, C, *spatial)")
        labels, onehot_mask = monai_labels(y, y_pred.shape)
        mask = kwargs.get("mask")
        if mask is not None:
            mask = torch.as_tensor(_plain(mask)).bool()
            mask = mask if onehot_mask is None else mask & onehot_mask
        else:
            mask = onehot_mask
        self._metrics.update(y_pred, labels, mask)
        self._last = None

    def __len__(self) -> int:
        """Number of images accumulated on this rank."""
        return self._metrics.n_images

    def aggregate(self) -> Any:  # type: ignore[override]
        """Every metric of the state summed over the ranks (all ranks must call it when
        distributed): the dict of :meth:`segcal.metrics.CalibrationMetrics.compute`, or the
        ``metric_name`` entry as a 0-d float64 tensor.

        Raises
        ------
        ValueError
            If no valid pixel was accumulated (on any rank).
        """
        self._last = self._metrics.copy().sync().compute()  # sync: a no-op without torch.distributed
        if self.metric_name is None:
            return self._last
        if self.metric_name not in self._last:
            raise InputError(f"metric_name: {self.metric_name!r} is not a segcal metric; expected one of "
                             f"{sorted(self._last)}")
        return torch.tensor(self._last[self.metric_name], dtype=torch.float64)

    def get_buffer(self) -> torch.Tensor | None:
        """Per-image ECE of every image (all ranks, rank order; MONAI's ``IgniteMetricHandler``
        stores it as the metric details), from the last :meth:`aggregate` (computed when there is
        none); ``None`` with ``per_image=False``."""
        if not self._metrics.per_image:
            return None
        if self._last is None:
            self._last = self._metrics.copy().sync().compute()
        return torch.as_tensor(self._last["image_ece_values"], dtype=torch.float64)
