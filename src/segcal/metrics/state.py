"""The metric state of :class:`segcal.metrics.CalibrationMetrics`, declared once.

Like torchmetrics' ``Metric.add_state``, every accumulator is declared here with its name, its
shape as a function of the configuration, its dtype and how two states combine (``reduction``):

``"sum"``
    a fixed-size tensor; two states add (merge, distributed all-reduce).
``"cat"``
    one row per image; two states concatenate in order (merge, distributed all-gather). The
    declared shape is the shape of one row; the state holds ``(n_images, *shape)``.

Every operation of the engine -- creation and reset, ``to(device)``, merge, ``state_dict`` /
``from_state_dict`` (and the validation of a loaded state), save / load and ``sync`` -- loops over
:data:`FIELDS`; no operation names a state by hand. The statistics themselves (what each entry
holds) are defined in ``../shared/methods.md`` §4 and documented on each field below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from segcal.errors import InputError

#: ``format`` entry of a saved state
STATE_FORMAT = "segcal-metric-state"
#: version of the saved layout (1: the layout of segcal 0.x, unchanged; ``sync_ids`` is optional)
STATE_VERSION = 1


class Dims(NamedTuple):
    """The configuration values the state shapes depend on."""

    num_classes: int
    n_bins: int
    fine_bins: int


@dataclass(frozen=True)
class Field:
    """One declared accumulator.

    Attributes
    ----------
    name
        Attribute / ``state_dict`` key.
    shape
        Shape (of one row for ``"cat"``) as a function of :class:`Dims`.
    reduction
        ``"sum"`` or ``"cat"`` (see the module docstring).
    counts
        Index on the last axis of the entries that are pixel counts (exact non-negative integers
        in float64); ``None``: every entry is a count. Checked when a state is loaded.
    total_of
        For a ``"sum"`` field that is the image sum of a ``"cat"`` field (kept even when the
        per-image rows are not): the name of that field. An update fills the ``"cat"`` rows and
        adds their sum here.
    doc
        What each entry holds.
    """

    name: str
    shape: Callable[[Dims], tuple[int, ...]]
    reduction: str
    counts: tuple[int, ...] | None
    total_of: str | None = None
    doc: str = ""
    dtype: torch.dtype = torch.float64


FIELDS: tuple[Field, ...] = (
    Field("fine", lambda d: (d.fine_bins, 3), "sum", (0, 2),
          doc="fine histogram of u = -log(1 - conf) / 36.84: count, sum conf, sum correct"),
    Field("classwise", lambda d: (d.num_classes, d.n_bins, 3), "sum", (0,),
          doc="per class k, bins of q_k: count, sum q_k, sum 1[y = k]"),
    Field("by_pred", lambda d: (d.num_classes, d.n_bins, 3), "sum", (0, 2),
          doc="top-label bins of the pixels predicted k: count, sum conf, sum correct"),
    Field("by_label", lambda d: (d.num_classes, d.n_bins, 3), "sum", (0, 2),
          doc="top-label bins of the pixels labelled k: count, sum conf, sum correct"),
    Field("confusion", lambda d: (d.num_classes, d.num_classes), "sum", None,
          doc="confusion matrix, rows = label, columns = prediction"),
    Field("pooled_bins", lambda d: (d.n_bins, 2, 2), "sum", (0,), total_of="img_bins",
          doc="top-label bins x [wrong, correct] x [count, sum conf], all images"),
    Field("pooled_totals", lambda d: (3,), "sum", (0,), total_of="img_totals",
          doc="[count, sum nll, sum brier], all images"),
    Field("img_bins", lambda d: (d.n_bins, 2, 2), "cat", (0,),
          doc="per image: top-label bins x [wrong, correct] x [count, sum conf]"),
    Field("img_totals", lambda d: (3,), "cat", (0,),
          doc="per image: [count, sum nll, sum brier]"),
    Field("img_class", lambda d: (d.num_classes, 3), "cat", None,
          doc="per image and class: [label count, true positives, prediction count]"),
)

SUM_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.reduction == "sum")
CAT_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.reduction == "cat")
#: the fields an update accumulates directly (the ``total_of`` fields are sums of ``"cat"`` rows)
ACCUMULATED: tuple[Field, ...] = tuple(f for f in FIELDS if f.total_of is None)
#: the fixed-size fields an update accumulates (the ones a reusable workspace holds)
ACCUMULATED_SUMS: tuple[Field, ...] = tuple(f for f in ACCUMULATED if f.reduction == "sum")
ACCUMULATED_ROWS: tuple[Field, ...] = tuple(f for f in ACCUMULATED if f.reduction == "cat")


def field_shape(field: Field, dims: Dims, n_images: int = 0) -> tuple[int, ...]:
    """The full shape of ``field``'s tensor (``(n_images, *row)`` for a ``"cat"`` field)."""
    row = tuple(field.shape(dims))
    return (n_images, *row) if field.reduction == "cat" else row


def zeros(dims: Dims, device: torch.device, n_images: int = 0,
          fields: tuple[Field, ...] = FIELDS) -> dict[str, torch.Tensor]:
    """A zero tensor per field (``"cat"`` fields with ``n_images`` rows)."""
    return {f.name: torch.zeros(field_shape(f, dims, n_images), dtype=f.dtype, device=device) for f in fields}


class Workspace:
    """Reusable zeroed accumulators for the fixed-size fields of one batch, one set per worker.

    An update accumulates a batch apart from the state (so a batch that fails half-way leaves the
    state untouched). Allocating those accumulators afresh for every batch costs more than the
    batch itself on small images: the fine histogram alone is 1.5 MiB, and a fresh allocation of
    that size is a new memory mapping whose pages fault in while it is zeroed. A workspace keeps
    them and zeroes them in place (:meth:`take`); the ``"cat"`` rows (a few numbers per image) are
    still allocated per batch.
    """

    def __init__(self) -> None:
        self._sets: list[dict[str, torch.Tensor]] = []
        self._key: tuple[Dims, torch.device] | None = None

    def take(self, dims: Dims, device: torch.device, count: int, n_images: int) -> list[dict[str, torch.Tensor]]:
        """``count`` accumulator sets for a batch of ``n_images``: the fixed-size fields zeroed in
        place, fresh zero ``"cat"`` rows."""
        if self._key != (dims, device):
            self._sets, self._key = [], (dims, device)
        while len(self._sets) < count:
            self._sets.append(zeros(dims, device, fields=ACCUMULATED_SUMS))
        out = []
        for sums in self._sets[:count]:
            for t in sums.values():
                t.zero_()
            out.append({**sums, **zeros(dims, device, n_images, ACCUMULATED_ROWS)})
        return out

    def clear(self) -> None:
        """Free the accumulators (after a move to another device, or to release memory)."""
        self._sets, self._key = [], None


def row_width(dims: Dims) -> int:
    """Number of values of one image's ``"cat"`` rows, all fields together (for packing)."""
    return sum(int(torch.Size(f.shape(dims)).numel()) for f in CAT_FIELDS)


def pack_rows(rows: Mapping[str, torch.Tensor], dims: Dims) -> torch.Tensor:
    """The ``"cat"`` fields side by side as one ``(n_images, row_width)`` float64 block."""
    n = rows[CAT_FIELDS[0].name].shape[0]
    widths = [int(torch.Size(f.shape(dims)).numel()) for f in CAT_FIELDS]
    return torch.cat([rows[f.name].reshape(n, w) for f, w in zip(CAT_FIELDS, widths, strict=True)], dim=1)


def unpack_rows(block: torch.Tensor, dims: Dims) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_rows`."""
    n = block.shape[0]
    out: dict[str, torch.Tensor] = {}
    off = 0
    for f in CAT_FIELDS:
        row = tuple(f.shape(dims))
        w = int(torch.Size(row).numel())
        out[f.name] = block[:, off : off + w].reshape(n, *row).clone()
        off += w
    return out


def pack_sums(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every ``"sum"`` field flattened into one float64 vector (one all-reduce)."""
    return torch.cat([state[f.name].reshape(-1).to(torch.float64) for f in SUM_FIELDS])


def unpack_sums(flat: torch.Tensor, into: Mapping[str, torch.Tensor]) -> None:
    """Copy :func:`pack_sums`' vector back into the ``"sum"`` tensors of ``into`` (in place)."""
    off = 0
    for f in SUM_FIELDS:
        t = into[f.name]
        t.copy_(flat[off : off + t.numel()].view_as(t))
        off += t.numel()


def check_state(state: Mapping[str, Any], dims: Dims, *, per_image: bool, n_images: int,
                source: str) -> dict[str, torch.Tensor]:
    """Validate the tensors of a loaded state; return them as float64 CPU tensors.

    Raises
    ------
    InputError
        Naming ``source`` (the file or "state"), the field, what was found and what was expected:
        a missing field, a tensor that is not numeric, a wrong shape (for ``"cat"`` fields: not
        ``n_images`` rows when ``per_image``), a non-finite value, or a negative or fractional
        count.
    """
    out: dict[str, torch.Tensor] = {}
    for f in FIELDS:
        if f.name not in state:
            raise InputError(f"{source}: the metric state has no {f.name!r} entry; expected every field of "
                             f"{[g.name for g in FIELDS]} (a state written by CalibrationMetrics.save)")
        raw = state[f.name]
        try:
            t = torch.as_tensor(raw)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{source}: {f.name} is a {type(raw).__name__}, expected a float64 tensor") from exc
        if t.dtype == torch.bool or t.is_complex():
            raise InputError(f"{source}: {f.name} has dtype {t.dtype}, expected float64")
        t = t.detach().to(device="cpu", dtype=torch.float64)
        rows = n_images if (f.reduction == "cat" and per_image) else 0
        exp = field_shape(f, dims, rows)
        if tuple(t.shape) != exp:
            what = f" ({n_images} images)" if f.reduction == "cat" else ""
            raise InputError(f"{source}: {f.name} has shape {tuple(t.shape)}, expected {exp}{what} "
                             f"for num_classes={dims.num_classes}, n_bins={dims.n_bins}, fine_bins={dims.fine_bins}")
        if t.numel():
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"{source}: {f.name} holds non-finite values, expected finite sums")
            cnt = t if f.counts is None else t[..., list(f.counts)]
            if bool((cnt < 0).any()) or not bool((cnt == torch.round(cnt)).all()):
                bad = cnt[(cnt < 0) | (cnt != torch.round(cnt))][0].item()
                raise InputError(f"{source}: {f.name} holds a pixel count of {bad}, expected non-negative integers")
        out[f.name] = t.clone()
    # the pooled totals of per-image rows agree with the rows (a tampered row would otherwise give
    # image-wise metrics that contradict the pooled ones)
    if per_image:
        for f in SUM_FIELDS:
            if f.total_of is not None and n_images:
                got = out[f.total_of].sum(0)
                tol = 1e-9 * max(1.0, float(out[f.name].abs().max()))
                if not torch.allclose(got, out[f.name], rtol=0, atol=tol):
                    raise InputError(f"{source}: {f.total_of} does not sum to {f.name} "
                                     f"(largest difference {float((got - out[f.name]).abs().max()):.3g}); "
                                     "the state was modified after it was written")
    return out


__all__ = [
    "ACCUMULATED",
    "ACCUMULATED_ROWS",
    "ACCUMULATED_SUMS",
    "CAT_FIELDS",
    "FIELDS",
    "STATE_FORMAT",
    "STATE_VERSION",
    "SUM_FIELDS",
    "Dims",
    "Field",
    "Workspace",
    "check_state",
    "field_shape",
    "pack_rows",
    "pack_sums",
    "row_width",
    "unpack_rows",
    "unpack_sums",
    "zeros",
]
