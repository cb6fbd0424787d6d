"""Streaming calibration and segmentation metrics with a fixed-size, mergeable state.

:class:`CalibrationMetrics` accumulates, in one pass per batch, sufficient statistics from
``(N, C, *spatial)`` logits or probabilities (2D images, 3D volumes, or ``(M, C)`` tables) and
``(N, *spatial)`` integer labels. The state never grows with the number of pixels: it is
``O(bins x classes + classes^2 + fine_bins)`` for the pooled statistics plus ``O(bins + classes)``
per image for the image-wise ones. Pixels are processed in chunks of ``chunk_pixels`` so the extra
memory is bounded (a few ``C x chunk_pixels`` float buffers) whatever the input size.

All accumulators are float64 (counts are exact up to 2**53). Scores are processed in float32
(float16 / bfloat16 inputs are upcast) or in float64 when the input is float64.

Where things are: the state is declared in :mod:`segcal.metrics.state` (every operation below
loops over that declaration), the chunking in :mod:`segcal.metrics.chunks`, the two kernels in
:mod:`segcal.metrics.kernels_torch` and :mod:`segcal.metrics.kernels_numba`, and the metrics
with their definitions (``../shared/methods.md`` §4) in :mod:`segcal.metrics.scores`.

Distributed and saved states: :meth:`CalibrationMetrics.sync` replaces each rank's state by the
total over the ranks and marks it synchronised (a second ``sync`` is a no-op; ``update`` on a
synchronised state is refused; merging two copies of the same synchronised total is refused);
:meth:`CalibrationMetrics.load` and :meth:`CalibrationMetrics.from_state_dict` check every field's
shape and counts and raise :class:`segcal.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import secrets
import warnings
import zlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist

from segcal.errors import InputError, unreadable
from segcal.io.files import atomic_write
from segcal.metrics import chunks, kernels_numba, kernels_torch
from segcal.metrics.chunks import Settings, iter_chunks, single_thread
from segcal.metrics.kernels_numba import HAVE_NUMBA
from segcal.metrics.scores import compute_from_state
from segcal.metrics.state import (
    CAT_FIELDS,
    STATE_FORMAT,
    STATE_VERSION,
    SUM_FIELDS,
    Dims,
    Workspace,
    check_state,
    pack_rows,
    pack_sums,
    unpack_rows,
    unpack_sums,
    zeros,
)
from segcal.validation import check_input_type, check_labels, check_mask, check_scores

#: the configuration entries of a saved state (the constructor's arguments it records)
CONFIG_KEYS = ("num_classes", "n_bins", "ignore_index", "input_type", "per_image", "fine_bins", "nll_floor",
               "average_classes")


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
        chunk_pixels: int = chunks.DEFAULT_CHUNK_PIXELS,
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
        #: reusable per-batch accumulators (not state: never saved, merged or synchronised)
        self._workspace = Workspace()
        self._init_state()

    # ------------------------------------------------------------------ state
    @property
    def dims(self) -> Dims:
        """The configuration values the state shapes depend on."""
        return Dims(self.num_classes, self.n_bins, self.fine_bins)

    @property
    def synced(self) -> bool:
        """True once the state holds a total made by :meth:`sync` (here or in a merged state)."""
        return bool(self.sync_ids)

    def _settings(self) -> Settings:
        return Settings(self.num_classes, self.n_bins, self.fine_bins, self.ignore_index, self.input_type,
                        self.nll_floor, self.validate, self.chunk_pixels)

    def _init_state(self) -> None:
        dev = self.device or torch.device("cpu")
        for name, t in zeros(self.dims, dev, fields=SUM_FIELDS).items():
            setattr(self, name, t)
        #: the "cat" fields: a list of row blocks per field (concatenated on first read)
        self._rows: dict[str, list[torch.Tensor]] = {f.name: [] for f in CAT_FIELDS}
        self.n_images = 0
        #: identifiers of the sync() totals this state holds (empty: a local state)
        self.sync_ids: frozenset[int] = frozenset()

    def reset(self) -> None:
        """Forget everything accumulated (the state is local again: not synchronised)."""
        self._init_state()

    def _state_device(self) -> torch.device:
        return getattr(self, SUM_FIELDS[0].name).device

    def _ensure_device(self, device: torch.device) -> None:
        if self.device is None:
            self.device = device
            if device != self._state_device():
                self._to(device)

    def _to(self, device: torch.device) -> None:
        self._workspace.clear()
        for f in SUM_FIELDS:
            setattr(self, f.name, getattr(self, f.name).to(device))
        self._rows = {name: [t.to(device) for t in parts] for name, parts in self._rows.items()}

    def _cat_rows(self) -> dict[str, torch.Tensor]:
        """The ``"cat"`` fields as ``(n_images, *row)`` tensors (0 rows without ``per_image``)."""
        dev = self._state_device()
        out = {}
        for f in CAT_FIELDS:
            parts = self._rows[f.name]
            if not parts:
                out[f.name] = zeros(self.dims, dev, 0, (f,))[f.name]
                continue
            if len(parts) > 1:  # consolidate (keeps the list short)
                self._rows[f.name] = [torch.cat(parts)]
            out[f.name] = self._rows[f.name][0]
        return out

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every declared field, on the state's device (no copy)."""
        return {**{f.name: getattr(self, f.name) for f in SUM_FIELDS}, **self._cat_rows()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field of :data:`segcal.metrics.state.FIELDS` on the state's device, without a
        copy (``"cat"`` fields as ``(n_images, *row)``; 0 rows without ``per_image``).

        Read-only: for adapters that add one batch's statistics into a state of their own
        (:mod:`segcal.integrations.torchmetrics`); :meth:`state_dict` is the copy on the CPU.
        """
        return self._tensors()

    def copy(self, device: torch.device | str | None = None) -> CalibrationMetrics:
        """An independent copy (configuration, statistics, synchronisation marks) on ``device``
        (default: the state's device); e.g. to :meth:`sync` a total while this state goes on
        accumulating (the MONAI and Ignite adapters of :mod:`segcal.integrations` do so)."""
        out = CalibrationMetrics.from_state_dict(self.state_dict())
        out.backend, out.chunk_pixels, out.validate = self.backend, self.chunk_pixels, self.validate
        out.device = torch.device(device) if device is not None else self._state_device()
        out._to(out.device)
        return out

    def image_bins(self) -> torch.Tensor:
        """Per-image top-label bins: float64 ``(n_images, 3, n_bins)`` = count, sum of confidences,
        sum of correctness per bin and image (the statistics behind ``image_ece``).

        Raises
        ------
        ValueError
            If the metric was created with ``per_image=False`` (no per-image statistics kept).
        """
        if not self.per_image:
            raise ValueError("image_bins: this CalibrationMetrics keeps no per-image statistics (per_image=False)")
        ib = self._cat_rows()["img_bins"].cpu()  # (n, M, 2[wrong, correct], 2[count, sum conf])
        return torch.stack([ib[..., 0].sum(2), ib[..., 1].sum(2), ib[:, :, 1, 0]], dim=1)

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, preds: Any, target: Any, mask: Any = None, *, on_chunk: chunks.ChunkHook | None = None) -> None:
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
        on_chunk
            Optional :data:`segcal.metrics.chunks.ChunkHook`: sees every accumulated chunk's
            probabilities (a caller's per-pixel statistic without a second softmax).
        """
        if self.synced:
            raise RuntimeError(
                "update: this state was synchronised with sync() and holds every rank's total; adding a "
                "batch now would be counted once per rank by a later sync. Call reset() to start again."
            )
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
        # accumulate apart from the state (zeroed workspace accumulators) and add only on success:
        # a batch that fails validation half-way leaves the state untouched
        cfg = self._settings()._replace(score_dtype=x.dtype)

        def take(count: int) -> list[dict[str, torch.Tensor]]:
            with single_thread() if dev.type == "cpu" else nullcontext():  # see kernels_numba.update
                return self._workspace.take(self.dims, dev, count, n)

        if self.backend != "torch" and HAVE_NUMBA and dev.type == "cpu":
            acc = kernels_numba.update(cfg, x, y, mk, take, on_chunk)
        else:
            acc = take(1)[0]
            for chunk in iter_chunks(x, y, mk, dev, cfg.chunk_pixels):
                kernels_torch.accumulate(cfg, *chunk, acc, on_chunk)
        with single_thread() if dev.type == "cpu" else nullcontext():
            for f in SUM_FIELDS:
                getattr(self, f.name).add_(acc[f.total_of].sum(0) if f.total_of else acc[f.name])
        if self.per_image:
            for f in CAT_FIELDS:
                self._rows[f.name].append(acc[f.name])
        self.n_images += n

    # ------------------------------------------------------------ merge / IO
    def merge(self, other: CalibrationMetrics) -> CalibrationMetrics:
        """Add ``other``'s statistics to this one (images of ``other`` come after this one's).

        Raises
        ------
        ValueError
            If ``other`` is this object, has another configuration, or holds the same
            synchronised total as this one (two ranks' copies of one :meth:`sync`: merging them
            would count every pixel twice).
        """
        if not isinstance(other, CalibrationMetrics):
            raise TypeError(f"other: expected CalibrationMetrics, got {type(other).__name__}")
        if other is self:
            raise ValueError("other: a state cannot be merged into itself (every pixel would count twice)")
        if self._config() != other._config():
            raise ValueError(f"other: incompatible configuration {other._config()} vs {self._config()}")
        if self.sync_ids & other.sync_ids:
            raise ValueError(
                "other: both states hold the same synchronised total (after sync() every rank holds the "
                "total of all ranks); merging them would count every pixel more than once"
            )
        dev = self._state_device()
        for f in SUM_FIELDS:
            getattr(self, f.name).add_(getattr(other, f.name).to(dev))
        if self.per_image:
            for name, t in other._cat_rows().items():
                self._rows[name].append(t.to(dev))
        self.n_images += other.n_images
        self.sync_ids = self.sync_ids | other.sync_ids
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

    def state_dict(self) -> dict[str, Any]:
        """A serialisable state (tensors on the CPU + config); see :meth:`from_state_dict`."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self._config(),
            "n_images": self.n_images,
            "sync_ids": sorted(self.sync_ids),
            **{name: t.cpu() for name, t in self._tensors().items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, source: str = "state") -> CalibrationMetrics:
        """Rebuild a metric from :meth:`state_dict`'s output, checking it first.

        Parameters
        ----------
        state
            The mapping written by :meth:`state_dict` (or loaded from a :meth:`save` file).
        source
            What to name in error messages (the file, for :meth:`load`).

        Raises
        ------
        InputError
            If ``state`` is not a segcal metric state, is newer than this segcal, or has a missing
            or invalid configuration, a missing field, a field of the wrong shape, a non-finite
            value or a negative count (see :func:`segcal.metrics.state.check_state`).
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            found = f"a {type(state).__name__}" if not isinstance(state, Mapping) else f"format {state.get('format')!r}"
            raise InputError(f"{source}: not a segcal metric state (found {found}, expected a mapping with "
                             f"format {STATE_FORMAT!r}, as written by CalibrationMetrics.save)")
        version = state.get("version")
        if not isinstance(version, int) or version < 1 or version > STATE_VERSION:
            raise InputError(f"{source}: metric state version {version!r}; this segcal reads versions 1 to "
                             f"{STATE_VERSION}")
        cfg = state.get("config")
        if not isinstance(cfg, Mapping) or set(cfg) != set(CONFIG_KEYS):
            found = sorted(cfg) if isinstance(cfg, Mapping) else type(cfg).__name__
            raise InputError(f"{source}: metric state config is {found}, expected the keys {sorted(CONFIG_KEYS)}")
        try:
            obj = cls(**dict(cfg))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{source}: invalid metric state config: {exc}") from exc
        n_images = state.get("n_images")
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
            raise InputError(f"{source}: n_images is {n_images!r}, expected a non-negative integer")
        ids = state.get("sync_ids", [])
        if not isinstance(ids, list | tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InputError(f"{source}: sync_ids is {ids!r}, expected a list of integers")
        tensors = check_state(state, obj.dims, per_image=obj.per_image, n_images=n_images, source=source)
        for f in SUM_FIELDS:
            setattr(obj, f.name, tensors[f.name])
        if obj.per_image:
            obj._rows = {f.name: [tensors[f.name]] for f in CAT_FIELDS}
        obj.n_images = n_images
        obj.sync_ids = frozenset(ids)
        return obj

    def save(self, path: Any) -> None:
        """Save the state with ``torch.save`` (atomically)."""
        with atomic_write(path) as fh:
            torch.save(self.state_dict(), fh)

    @classmethod
    def load(cls, path: Any) -> CalibrationMetrics:
        """Load a state saved by :meth:`save` (``weights_only=True``: no code is executed).

        Raises
        ------
        InputError
            If the file is not a metric state written by :meth:`save` (another pickle, a text or
            empty file, a truncated file) or fails the checks of :meth:`from_state_dict`.
        OSError
            If the file cannot be opened (missing, a directory, no permission).
        """
        try:
            with warnings.catch_warnings():  # torch's note on the pickle protocol of a foreign file
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:  # torch raises many types for a bad file
            # never repeat torch's advice to retry with weights_only=False (it would run the
            # file's code): segcal.errors.unreadable names the file and what it should be
            raise unreadable(path, exc, "a metric state written by CalibrationMetrics.save") from None
        return cls.from_state_dict(state, source=str(path))

    # ------------------------------------------------------------ distributed
    def sync(self, group: Any = None) -> CalibrationMetrics:
        """Synchronise across ``torch.distributed`` ranks (in place; every rank gets the total).

        Pooled statistics are all-reduced (sum): communication is ``O(state)``, never pixels. The
        per-image rows (``O(images)``) are all-gathered in rank order. A rank that saw no image
        takes part like the others. Afterwards the state is marked synchronised (:attr:`synced`):
        calling ``sync`` again is a no-op, ``update`` is refused until :meth:`reset`, and merging
        two ranks' copies of the total is refused. Every rank must call it (it is a collective).
        Ranks whose configurations differ, or a mix of synchronised and local ranks, raise on every
        rank (instead of one rank waiting forever). On NCCL pass ``device=`` so that a rank
        without batches holds its state on its GPU too.

        Raises
        ------
        ValueError
            If the ranks' configurations differ.
        RuntimeError
            If some ranks' states are synchronised and others are not.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        dev = self._state_device()
        world = dist.get_world_size(group)
        # first, one small exchange that every rank sees alike (so all raise, or none waits
        # forever): image counts, an identifier of this synchronisation (the first rank's is
        # used), the configuration's checksum and whether the rank is already synchronised
        cfg_sum = zlib.crc32(json.dumps(self._config(), sort_keys=True).encode())
        mine = torch.tensor([self.n_images, secrets.randbits(52), cfg_sum, int(self.synced)], dtype=torch.int64,
                            device=dev)
        infos = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(infos, mine, group=group)
        info = torch.stack(infos).cpu()
        if bool((info[:, 2] != info[0, 2]).any()):
            raise ValueError("sync: the ranks' CalibrationMetrics have different configurations; create them "
                             "with the same arguments on every rank")
        if bool(info[:, 3].all()):
            return self  # every rank already holds the total: a second sync is a no-op
        if bool(info[:, 3].any()):
            raise RuntimeError("sync: some ranks' states are already synchronised and others are not "
                               "(sync() was called on some ranks only); reset() every rank and start again")
        sums = {f.name: getattr(self, f.name) for f in SUM_FIELDS}
        flat = pack_sums(sums)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        unpack_sums(flat, sums)
        counts_l = [int(c) for c in info[:, 0]]
        if self.per_image and max(counts_l) > 0:
            packed = pack_rows(self._cat_rows(), self.dims)
            buf = torch.zeros(max(counts_l), packed.shape[1], dtype=torch.float64, device=dev)
            buf[: packed.shape[0]] = packed
            bufs = [torch.zeros_like(buf) for _ in range(world)]
            dist.all_gather(bufs, buf, group=group)
            rows = unpack_rows(torch.cat([b[:c] for b, c in zip(bufs, counts_l, strict=True)]), self.dims)
            self._rows = {name: [t] for name, t in rows.items()}
        self.n_images = sum(counts_l)
        self.sync_ids = frozenset({int(info[0, 1])})
        return self

    # ---------------------------------------------------------------- compute
    def compute(self) -> dict[str, Any]:
        """Return every metric (floats, and numpy arrays for per-class / per-image / curve data).

        See :func:`segcal.metrics.scores.compute_from_state`.

        Raises
        ------
        ValueError
            If no valid pixel was accumulated.
        """
        return compute_from_state({**self._tensors(), "n_images": self.n_images}, self._config())


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


__all__ = [
    "CONFIG_KEYS",
    "CalibrationMetrics",
    "calibration_metrics",
    "compute_from_state",
    "expected_calibration_error",
]
