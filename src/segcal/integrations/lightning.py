"""Calibration on Lightning's validation loop, and a calibrator fitted at the end of training:
:class:`CalibrationCallback`.

``Trainer(callbacks=[CalibrationCallback(num_classes, fit="ts")])``:

* **every validation epoch** the callback accumulates segcal's metric state over the validation
  batches (:class:`segcal.integrations.torchmetrics.CalibrationMetric`: the streaming engine,
  synchronised over DDP ranks by torchmetrics when the epoch ends) and logs ``val/ece``,
  ``val/nll``, ... through ``pl_module.log`` (every rank logs the same synchronised total, so the
  values can be monitored, e.g. by ``ModelCheckpoint(monitor="val/ece", mode="min")``). The
  sanity-check pass is not logged.
* **at the end of training** (``fit=`` a calibrator name or alias, :func:`segcal.calibrators.create`)
  it fits that calibrator on the model's outputs over the validation dataloader with
  :func:`segcal.pipeline.fit_model.fit_from_model` (streamed: no logits on disk, the memory
  budget of :meth:`segcal.calibrators.Calibrator.fit` applies) and saves it beside the checkpoints
  as ``calibrator.pt`` (``trainer.checkpoint_callback.dirpath``, else ``trainer.default_root_dir``),
  loadable with :func:`segcal.load`. In a multi-process run rank 0 fits on the whole validation
  set (a loader over the same dataset without the distributed sampler) and saves; the other
  ranks wait at a barrier.

The logits of a validation batch are taken from what ``validation_step`` returns when that is
logits (a ``(N, C, *spatial)`` tensor, a mapping with ``"logits"`` or an object with
``.logits``), else from ``pl_module(x)`` under ``torch.no_grad()``; logits at a lower resolution
than the labels are resized to the labels' size (as :class:`segcal.CalibratedModel` does). A batch
is ``(x, y)``, ``(x, y, mask)`` or a mapping with the keys :func:`~segcal.pipeline.fit_model.fit_from_model`
reads; ``batch_transform(batch) -> (x, y[, mask])`` adapts any other layout.

Needs Lightning (``pip install 'segcal[lightning]'``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from segcal.calibrators import Calibrator, create, load
from segcal.errors import InputError, missing_dependency
from segcal.integrations.torchmetrics import CalibrationMetric
from segcal.models.calibrated import model_logits, resize_logits
from segcal.pipeline.fit_model import IMAGE_KEYS, LABEL_KEYS, fit_from_model

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as exc:  # the point of this module: say which extra installs it
    raise missing_dependency("lightning", "lightning", "segcal.integrations.lightning") from exc

__all__ = ["DEFAULT_LOG_KEYS", "CalibrationCallback", "split_batch"]

#: the metrics logged by default (every key of :meth:`segcal.metrics.CalibrationMetrics.compute`
#: that is a float can be chosen)
DEFAULT_LOG_KEYS = ("ece", "mce", "classwise_ece", "nll", "brier", "image_ece")


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x, y, mask or None)`` of a batch ``(x, y)``, ``(x, y, mask)`` or a mapping (the image
    under ``"image"``/``"images"``/``"pixel_values"``/``"x"``, the labels under
    ``"labels"``/``"label"``/``"target"``, optionally ``"mask"``).

    Raises
    ------
    InputError
        For any other layout (pass ``batch_transform=`` to the callback).
    """
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in IMAGE_KEYS if k in batch), None)
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if x is not None and y is not None:
            return x, y, batch.get("mask")
    elif isinstance(batch, Sequence) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    found = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
    raise InputError(f"batch: expected (x, y), (x, y, mask) or a mapping with one of {list(IMAGE_KEYS)} and one "
                     f"of {list(LABEL_KEYS)}; got {found}. Pass batch_transform=lambda b: (x, y) to the callback")


def _returned_logits(outputs: Any, num_classes: int) -> torch.Tensor | None:
    """The logits in what ``validation_step`` returned, or ``None`` (a loss, nothing)."""
    if isinstance(outputs, torch.Tensor):
        cand: Any = outputs
    elif isinstance(outputs, Mapping) and "logits" in outputs:
        cand = outputs["logits"]
    else:
        cand = getattr(outputs, "logits", None)
    ok = isinstance(cand, torch.Tensor) and cand.ndim >= 3 and cand.shape[1] == num_classes
    return cand if ok else None


class _Batches:
    """A re-iterable view of a dataloader through ``batch_transform`` (for :func:`fit_from_model`)."""

    def __init__(self, loader: Any, transform: Callable[[Any], Any]) -> None:
        self.loader, self.transform = loader, transform

    def __iter__(self) -> Iterator[Any]:
        return (self.transform(b) for b in self.loader)


class CalibrationCallback(Callback):
    """Log calibration metrics on the validation loop; optionally fit and save a calibrator.

    Parameters
    ----------
    num_classes
        Number of classes ``C`` (channels of the logits).
    fit
        Calibrator name or alias to fit at the end of training (``"ts"``, ``"vs"``, ``"lts"``...;
        ``segcal calibrators`` lists them); ``None`` (default): only log metrics.
    filename
        Name of the saved calibrator file (default ``calibrator.pt``).
    dirpath
        Folder of the saved calibrator (default: the checkpoint folder of
        ``trainer.checkpoint_callback``, else ``trainer.default_root_dir``).
    log_keys
        Metrics to log (float entries of :meth:`segcal.metrics.CalibrationMetrics.compute`).
    prefix
        Prefix of the logged names (``"val/"``: ``val/ece``, ...).
    ignore_index
        Label value excluded from the metrics and from the fit.
    batch_transform
        ``batch -> (x, y[, mask])`` for batches of another layout (see :func:`split_batch`);
        ``x`` is the model's input.
    dataloader_idx
        Which validation dataloader to use when there are several.
    fit_kwargs
        Passed to :func:`~segcal.pipeline.fit_model.fit_from_model` (calibrator settings such as
        ``max_iter``, ``memory_budget``; ``perturb=``).
    **metric_kwargs
        Passed to :class:`~segcal.integrations.torchmetrics.CalibrationMetric` (``n_bins``,
        ``per_image``, ``input_type``, ...).

    Attributes
    ----------
    metrics
        The last validation epoch's full metric dict (``None`` before one ran).
    calibrator, calibrator_path
        The fitted calibrator and its file (``None`` without ``fit``; ``calibrator`` is loaded
        from the file on ranks other than 0).
    """

    def __init__(self, num_classes: int, *, fit: str | None = None, filename: str = "calibrator.pt",
                 dirpath: str | os.PathLike | None = None, log_keys: Sequence[str] = DEFAULT_LOG_KEYS,
                 prefix: str = "val/", ignore_index: int | None = None,
                 batch_transform: Callable[[Any], Any] | None = None, dataloader_idx: int = 0,
                 fit_kwargs: Mapping[str, Any] | None = None, **metric_kwargs: Any) -> None:
        super().__init__()
        self.metric = CalibrationMetric(num_classes, ignore_index=ignore_index, **metric_kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.fit_method = fit
        if fit is not None:
            create(fit, num_classes=num_classes)  # an unknown name fails now, not after training
        self.filename = filename
        self.dirpath = dirpath
        self.log_keys = tuple(log_keys)
        self.prefix = prefix
        self.batch_transform = batch_transform
        self.dataloader_idx = dataloader_idx
        self.fit_kwargs = dict(fit_kwargs or {})
        self.metrics: dict[str, Any] | None = None
        self.calibrator: Calibrator | None = None
        self.calibrator_path: Path | None = None

    # ------------------------------------------------------------ validation
    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return split_batch(self.batch_transform(batch) if self.batch_transform is not None else batch)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.metric.reset()
        self.metric.to(pl_module.device)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != self.dataloader_idx:
            return
        x, y, mask = self._split(batch)
        logits = _returned_logits(outputs, self.num_classes)
        if logits is None:
            with torch.no_grad():
                logits = model_logits(pl_module(x))
        logits = resize_logits(logits.detach(), tuple(y.shape[1:]))
        self.metric.update(logits, y, mask)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.metric.update_count == 0 and not torch.distributed.is_initialized():
            return  # no batch of this dataloader (limit_val_batches=0)
        self.metrics = self.metric.compute()  # torchmetrics syncs the ranks' states here
        for key in self.log_keys:
            if key not in self.metrics or not isinstance(self.metrics[key], int | float):
                floats = sorted(k for k, v in self.metrics.items() if isinstance(v, float))
                raise InputError(f"log_keys: {key!r} is not a float metric of segcal; expected some of {floats}")
            # the same synchronised total on every rank: no further reduction
            pl_module.log(self.prefix + key, float(self.metrics[key]), on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ fit
    def calibrator_dir(self, trainer: Trainer) -> Path:
        """Where ``calibrator.pt`` goes: ``dirpath``, the checkpoint folder or ``default_root_dir``."""
        if self.dirpath is not None:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) if ckpt is not None else None
        return Path(folder) if folder else Path(trainer.default_root_dir)

    def _val_loader(self, trainer: Trainer) -> Any:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, Sequence) and not isinstance(loaders, DataLoader):
            loaders = loaders[self.dataloader_idx] if len(loaders) > self.dataloader_idx else None
        if loaders is None:
            return None
        if trainer.world_size > 1 and isinstance(loaders, DataLoader):
            # rank 0 fits on the whole validation set: the dataset without the distributed sampler
            loaders = DataLoader(loaders.dataset, batch_size=loaders.batch_size, collate_fn=loaders.collate_fn,
                                 num_workers=loaders.num_workers, shuffle=False)
        return loaders if self.batch_transform is None else _Batches(loaders, self.batch_transform)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fit_method is None:
            return
        path = self.calibrator_dir(trainer) / self.filename
        if trainer.is_global_zero:
            loader = self._val_loader(trainer)
            if loader is None:
                rank_zero_warn(f"CalibrationCallback: no validation dataloader (index {self.dataloader_idx}); "
                               f"no {self.fit_method} calibrator was fitted")
            else:
                cal = fit_from_model(pl_module, loader, self.fit_method, device=pl_module.device,
                                     ignore_index=self.ignore_index, num_classes=self.num_classes,
                                     **self.fit_kwargs)
                path.parent.mkdir(parents=True, exist_ok=True)
                cal.save(path)
                self.calibrator, self.calibrator_path = cal, path
        trainer.strategy.barrier("segcal-calibrator")
        if not trainer.is_global_zero and path.is_file():
            self.calibrator, self.calibrator_path = load(path), path
