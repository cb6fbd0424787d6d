"""segcal's streaming calibration metrics as a ``torchmetrics.Metric``: :class:`CalibrationMetric`.

``CalibrationMetric`` drops in where torchmetrics metrics go (a Lightning module, a
``MetricCollection``): it is an ``nn.Module`` with ``update`` / ``compute`` / ``forward`` /
``reset``, ``.to(device)``, ``state_dict`` / ``load_state_dict``, and DDP synchronisation through
torchmetrics' own ``sync`` (``dist_sync_on_step``, ``process_group``, ``sync_on_compute`` and the
other ``torchmetrics.Metric`` keyword arguments are passed on).

What it holds is segcal's metric state, declared once in :data:`segcal.metrics.state.FIELDS`:
one ``add_state`` per field, in a loop over that declaration, ``dist_reduce_fx="sum"`` for the
``"sum"`` fields and ``"cat"`` for the per-image ``"cat"`` fields, plus one ``"sum"`` counter
``n_images`` (the image count the engine also keeps beside its fields). Nothing is named by hand,
so a field added to the declaration is added here too.

* ``update(preds, target, mask=None)`` runs segcal's kernel on the batch (a fresh
  :class:`segcal.metrics.CalibrationMetrics` with the same configuration, on the batch's device:
  the same validation, chunking and numba / torch kernel) and adds its fields into the state.
  The statistics equal those of one ``CalibrationMetrics`` fed the same batches bitwise (one
  addition per batch, as the engine does).
* ``compute()`` rebuilds a ``CalibrationMetrics`` from the state
  (:meth:`~segcal.metrics.CalibrationMetrics.from_state_dict`, which checks every field's shape
  and counts) and returns its :meth:`~segcal.metrics.CalibrationMetrics.compute`: the same dict
  (floats, and NumPy arrays for per-class / per-image data), so log one entry at a time
  (``self.log("val/ece", metric.compute()["ece"])``).

The per-image rows of a ``"cat"`` field are kept flattened (one 1-D float64 tensor per batch)
and reshaped on ``compute``, so that a rank that saw no image can take part in torchmetrics'
gather with a 0-length 1-D block (torchmetrics pads and trims blocks of unequal length). The
states are float64 by design (counts are exact up to 2**53): ``set_dtype`` to another dtype is
refused, and a module-wide dtype cast (``model.to(torch.bfloat16)``) moves them without casting.

Needs ``torchmetrics`` (``pip install 'segcal[bench]'``; Lightning installs it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from segcal.errors import InputError, missing_dependency
from segcal.metrics.engine import CalibrationMetrics
from segcal.metrics.state import FIELDS, field_shape

try:
    from torchmetrics import Metric
    from torchmetrics.utilities import dim_zero_cat
except ImportError as exc:  # the point of this module: say which extra installs it
    raise missing_dependency("torchmetrics", "bench", "segcal.integrations.torchmetrics") from exc

__all__ = ["N_IMAGES", "CalibrationMetric"]

#: name of the image counter kept beside the declared fields
N_IMAGES = "n_images"
_REDUCE = {"sum": "sum", "cat": "cat"}  # segcal reduction -> torchmetrics dist_reduce_fx


class CalibrationMetric(Metric):
    """segcal's :class:`~segcal.metrics.CalibrationMetrics` as a ``torchmetrics.Metric``.

    Parameters
    ----------
    num_classes, n_bins, ignore_index, input_type, per_image, fine_bins, nll_floor, average_classes, chunk_pixels, validate, backend
        As for :class:`segcal.metrics.CalibrationMetrics` (the same defaults).
    persistent
        Include the state in ``state_dict`` (default True: a checkpoint holds the statistics
        accumulated so far, and ``load_state_dict`` restores them).
    **kwargs
        Passed to ``torchmetrics.Metric`` (``dist_sync_on_step``, ``process_group``,
        ``sync_on_compute``, ``compute_on_cpu``, ...).

    Examples
    --------
    >>> metric = CalibrationMetric(num_classes=3, ignore_index=255)
    >>> metric.update(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
    >>> round(metric.compute()["ece"], 6) >= 0
    True
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

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
        backend: str = "auto",
        persistent: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._engine_kw: dict[str, Any] = {
            "n_bins": n_bins, "ignore_index": ignore_index, "input_type": input_type, "per_image": per_image,
            "fine_bins": fine_bins, "nll_floor": nll_floor, "average_classes": average_classes,
            "chunk_pixels": chunk_pixels, "validate": validate, "backend": backend,
        }
        template = CalibrationMetrics(num_classes, **self._engine_kw)  # validates every argument
        self.num_classes = num_classes
        self.per_image = per_image
        empty = template.state_dict()
        #: the configuration recorded with the state (``CalibrationMetrics.state_dict()["config"]``)
        self.config: dict[str, Any] = empty["config"]
        self._row_shapes: dict[str, tuple[int, ...]] = {}
        for f in FIELDS:
            if f.reduction not in _REDUCE:
                raise NotImplementedError(f"state field {f.name}: reduction {f.reduction!r} has no torchmetrics "
                                          "counterpart")
            if f.reduction == "sum":
                default: Any = torch.zeros(field_shape(f, template.dims), dtype=f.dtype)
            else:
                default = []
                self._row_shapes[f.name] = tuple(f.shape(template.dims))
            self.add_state(f.name, default=default, dist_reduce_fx=_REDUCE[f.reduction], persistent=persistent)
        self.add_state(N_IMAGES, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum",
                       persistent=persistent)
        self._state_format = {k: empty[k] for k in ("format", "version")}

    # ------------------------------------------------------- dtype / device
    def set_dtype(self, dst_type: str | torch.dtype) -> CalibrationMetric:
        """Refused for any dtype but float64: the statistics are float64 (exact pixel counts)."""
        if dst_type not in (torch.float64, "torch.float64", "float64", "torch.DoubleTensor"):
            raise InputError(f"dst_type: the calibration state is float64 by design (exact counts), got {dst_type!r}")
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CalibrationMetric:
        """``.to(device)`` moves the state; a dtype cast (``.to(torch.float16)``, a Lightning
        ``"16-true"`` module conversion) moves it to the target device only and keeps float64:
        a float16 pixel count is not exact beyond 2048."""
        probe = fn(torch.zeros(1, dtype=torch.float64, device=self.device))
        if isinstance(probe, torch.Tensor) and probe.dtype != torch.float64:
            device = probe.device
            return super()._apply(lambda t: t.to(device), *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """torchmetrics' ``sync`` (arguments passed on); a rank without images first gets a float64
        0-row block in each ``"cat"`` state, so that every rank gathers a 1-D float64 tensor
        (torchmetrics' own placeholder for an empty list takes the metric's default dtype)."""
        for f in FIELDS:
            value = getattr(self, f.name)
            if f.reduction == "cat" and isinstance(value, list) and not value:
                value.append(torch.zeros(0, dtype=torch.float64, device=self.device))
        super().sync(*args, **kwargs)

    # ---------------------------------------------------------------- update
    def update(self, preds: Any, target: Any, mask: Any = None) -> None:
        """Accumulate one batch (arguments as :meth:`segcal.metrics.CalibrationMetrics.update`:
        ``(N, C, *spatial)`` scores, ``(N, *spatial)`` labels, optional boolean mask).

        Raises
        ------
        InputError
            As ``CalibrationMetrics.update`` (scores of another class count, NaN, labels out of
            range, shapes that disagree); the state is left unchanged.
        """
        batch = CalibrationMetrics(self.num_classes, **self._engine_kw)
        batch.update(preds, target, mask)
        dev = self.device
        fields = batch.tensors()
        for f in FIELDS:
            t = fields[f.name].to(dev)
            if f.reduction == "sum":
                setattr(self, f.name, getattr(self, f.name) + t)
            elif self.per_image:
                getattr(self, f.name).append(t.reshape(-1))
        setattr(self, N_IMAGES, getattr(self, N_IMAGES) + batch.n_images)

    # --------------------------------------------------------------- compute
    def _rows(self, name: str) -> torch.Tensor:
        """The ``"cat"`` field ``name`` as ``(n_images, *row)`` (flattened blocks joined)."""
        value = getattr(self, name)
        if isinstance(value, list) and not value:
            flat = torch.zeros(0, dtype=torch.float64)
        else:
            flat = dim_zero_cat(value)
        return flat.reshape(-1, *self._row_shapes[name])

    def metrics(self) -> CalibrationMetrics:
        """The state as a :class:`segcal.metrics.CalibrationMetrics` (checked: every field's
        shape, finite values, non-negative integer counts, per-image rows summing to the totals).

        Raises
        ------
        InputError
            If the state is not a valid segcal state (e.g. a tampered ``load_state_dict``).
        """
        state: dict[str, Any] = {**self._state_format, "config": self.config, "sync_ids": []}
        n_images = float(getattr(self, N_IMAGES))
        if n_images != int(n_images) or n_images < 0:
            raise InputError(f"{N_IMAGES}: the image count is {n_images}, expected a non-negative integer")
        state[N_IMAGES] = int(n_images)
        for f in FIELDS:
            state[f.name] = getattr(self, f.name) if f.reduction == "sum" else self._rows(f.name)
        return CalibrationMetrics.from_state_dict(state, source=f"{type(self).__name__} state")

    def compute(self) -> dict[str, Any]:
        """Every metric of the accumulated state: :meth:`segcal.metrics.CalibrationMetrics.compute`
        (after torchmetrics' synchronisation over the ranks when distributed).

        Raises
        ------
        ValueError
            If no valid pixel was accumulated.
        """
        return self.metrics().compute()
