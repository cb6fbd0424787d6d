"""segcal's streaming calibration metrics as an Ignite metric: :class:`IgniteCalibrationMetric`.

``IgniteCalibrationMetric(num_classes, ...).attach(evaluator, "calibration")`` accumulates
segcal's metric state (:class:`segcal.metrics.CalibrationMetrics`: O(bins x classes) pooled
statistics plus O(bins + classes) per image, never pixels) from each iteration's
``(y_pred, y)`` output (or ``{"y_pred": ..., "y": ...}``; ``output_transform`` as for every
Ignite metric; a third element is taken as a boolean mask), and on ``compute`` returns the dict
of :meth:`segcal.metrics.CalibrationMetrics.compute`. Ignite puts a dict result into
``engine.state.metrics`` under its own keys and under the attached name
(``metrics_result_mode="both"``, Ignite's default; ``"named"`` keeps only the attached name, to
avoid clashing with another metric's key such as ``"accuracy"``); ``keys=("ece", "nll")`` returns
those entries only.

Distributed runs (Ignite's native backends gloo / NCCL, i.e. ``torch.distributed``): ``compute``
synchronises a copy of the state with :meth:`segcal.metrics.CalibrationMetrics.sync` (one
all-reduce of the pooled statistics, one all-gather of the per-image rows; every rank gets the
total), so the local state goes on accumulating. Ignite's ``sync_all_reduce`` decorator is not
used: it reduces tensors of equal shape, and the per-image rows have one row per image of each
rank. On NCCL pass ``device=`` (a rank without batches then holds its state on its GPU too).

Needs ``pytorch-ignite`` (``pip install 'segcal[ignite]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from segcal.errors import InputError, missing_dependency
from segcal.metrics.engine import CalibrationMetrics

try:
    import ignite.distributed as idist
    from ignite.exceptions import NotComputableError
    from ignite.metrics import Metric
    from ignite.metrics.metric import reinit__is_reduced
except ImportError as exc:  # the point of this module: say which extra installs it
    raise missing_dependency("ignite", "ignite", "segcal.integrations.ignite") from exc

__all__ = ["IgniteCalibrationMetric"]


class IgniteCalibrationMetric(Metric):
    """segcal's :class:`~segcal.metrics.CalibrationMetrics` as an ``ignite.metrics.Metric``.

    Parameters
    ----------
    num_classes
        Number of classes ``C`` (channels of ``y_pred``).
    keys
        Entries of the result to return (default: every entry of
        :meth:`segcal.metrics.CalibrationMetrics.compute`).
    output_transform, device, skip_unrolling, metrics_result_mode
        As for ``ignite.metrics.Metric``; ``device`` is where the state accumulates (the
        statistics of an update on another device are computed there).
    **kwargs
        Passed to :class:`segcal.metrics.CalibrationMetrics` (``n_bins``, ``ignore_index``,
        ``input_type``, ``per_image``, ...).

    Examples
    --------
    >>> m = IgniteCalibrationMetric(3, keys=("ece",))
    >>> m.update((torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))))
    >>> sorted(m.compute())
    ['ece']
    """

    def __init__(self, num_classes: int, *, keys: Sequence[str] | None = None,
                 output_transform: Any = lambda x: x, device: str | torch.device = "cpu",
                 skip_unrolling: bool = False, metrics_result_mode: str = "both", **kwargs: Any) -> None:
        self._metrics = CalibrationMetrics(num_classes, device=device, **kwargs)  # validates the arguments
        self.keys = None if keys is None else tuple(keys)
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=skip_unrolling,
                         metrics_result_mode=metrics_result_mode)

    @reinit__is_reduced
    def reset(self) -> None:
        """Forget the accumulated statistics."""
        self._metrics.reset()

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """Accumulate one iteration's ``(y_pred, y)`` or ``(y_pred, y, mask)``: ``(N, C, *spatial)``
        scores (``input_type``: logits or probabilities) and ``(N, *spatial)`` integer labels.

        Raises
        ------
        InputError
            If ``output`` is not such a pair / triple, or the engine refuses the batch (see
            :meth:`segcal.metrics.CalibrationMetrics.update`).
        """
        if not isinstance(output, Sequence) or len(output) not in (2, 3):
            found = f"a sequence of {len(output)}" if isinstance(output, Sequence) else type(output).__name__
            raise InputError(f"output: expected (y_pred, y) or (y_pred, y, mask), got {found}; "
                             "set output_transform to select them from the engine's output")
        self._metrics.update(*output)

    def compute(self) -> dict[str, Any]:
        """Every metric (or the ``keys`` entries) of the state summed over the ranks.

        Raises
        ------
        NotComputableError
            If no image was accumulated on any rank, or no valid pixel.
        InputError
            If the run has several processes on a backend other than ``torch.distributed``
            (Ignite's Horovod or XLA backends).
        """
        if idist.get_world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
            raise InputError(f"{type(self).__name__}: distributed backend {idist.backend()!r} is not supported; "
                             "segcal's state synchronises over torch.distributed (Ignite's gloo / nccl backends)")
        total = self._metrics.copy().sync()  # a no-op without torch.distributed
        if total.n_images == 0:
            raise NotComputableError(f"{type(self).__name__} must have at least one update before compute")
        try:
            result = total.compute()
        except ValueError as exc:  # every pixel ignored or masked
            raise NotComputableError(f"{type(self).__name__}: {exc}") from exc
        if self.keys is None:
            return result
        missing = [k for k in self.keys if k not in result]
        if missing:
            raise InputError(f"keys: {missing} are not segcal metrics; expected some of {sorted(result)}")
        return {k: result[k] for k in self.keys}
