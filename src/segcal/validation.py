"""Input validation shared by every layer of segcal: the one place that refuses bad arrays.

Every public entry point that takes predictions or labels goes through these helpers, so that bad
input fails early with an error that names the argument and says what was expected (shape, dtype,
NaN, labels out of range, empty input, probabilities given as logits, a channel-last array). Every
error is a :class:`segcal.errors.InputError` (a ``ValueError``; :class:`~segcal.errors.InputTypeError`
for a wrong dtype is also a ``TypeError``), which the command line prints as one line with exit
code 2. Nothing here copies pixel data unless a conversion is
needed (numpy -> torch is zero-copy for supported dtypes).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np
import torch

from segcal.errors import InputError, InputTypeError

InputType = Literal["logits", "probs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: unsigned dtypes torch stores but cannot index or compare with: cast to int64 (exact)
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def native_byte_order(arr: np.ndarray) -> np.ndarray:
    """``arr`` in the machine's byte order: a big-endian array (``>f4``: a ``.npy`` written on or for
    another platform, a NIfTI file stored big-endian) is converted (one copy; a memory map is then
    read into memory), since torch cannot hold it; a native array is returned as it is."""
    if arr.dtype.isnative or arr.dtype.byteorder == "|":
        return arr
    return arr.astype(arr.dtype.newbyteorder("="))


def as_tensor(x: Any, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Convert ``x`` (numpy array, torch tensor, or nested sequence) to a tensor without copying.

    Parameters
    ----------
    x
        The input.
    name
        Argument name used in error messages.
    device
        Optional target device.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype == np.float16 or x.dtype.kind in "fiub":
            arr = native_byte_order(x)
            if not arr.flags.c_contiguous and not arr.flags.f_contiguous:
                arr = np.ascontiguousarray(arr)
            if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
                raise InputError(f"{name}: uint64 values up to {int(arr.max())} do not fit int64")
            if arr.dtype == np.uint16 or arr.dtype == np.uint32 or arr.dtype == np.uint64:
                arr = arr.astype(np.int64)  # exact: torch cannot compare or index with these dtypes
            if not arr.flags.writeable:  # e.g. a memory-mapped .npy: segcal never writes inputs
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.from_numpy(arr)
            else:
                t = torch.from_numpy(arr)
        else:
            raise InputTypeError(f"{name}: unsupported numpy dtype {x.dtype}; expected float or integer")
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:  # pragma: no cover - defensive
            raise InputTypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}") from exc
    if device is not None:
        t = t.to(device)
    return t


def check_input_type(input_type: str) -> InputType:
    if input_type not in ("logits", "probs"):
        raise InputError(f"input_type: expected 'logits' or 'probs', got {input_type!r}")
    return input_type  # type: ignore[return-value]


def check_scores(
    scores: Any,
    name: str = "preds",
    *,
    num_classes: int | None = None,
    min_classes: int = 2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Validate ``(N, C, *spatial)`` or ``(M, C)`` float scores (logits or probabilities).

    Returns the tensor (not copied). Raises a ``ValueError``/``TypeError`` naming ``name``.
    """
    t = as_tensor(scores, name, device)
    if t.dtype not in _FLOAT_DTYPES:
        raise InputTypeError(
            f"{name}: expected a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.ndim < 2:
        raise InputError(f"{name}: expected shape (N, C, *spatial) or (M, C), got {tuple(t.shape)}")
    if t.shape[0] == 0 or t.numel() == 0:
        raise InputError(f"{name}: empty input (shape {tuple(t.shape)})")
    c = t.shape[1]
    if c < min_classes:
        raise InputError(f"{name}: expected at least {min_classes} classes on axis 1, got {c}")
    if num_classes is not None and c != num_classes:
        raise InputError(f"{name}: expected {num_classes} classes on axis 1, got {c} (shape {tuple(t.shape)})"
                         + channel_last_hint(tuple(t.shape), 1))
    return t


def check_labels(
    labels: Any,
    name: str = "target",
    *,
    expected_shape: tuple[int, ...] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Validate an integer label tensor; float labels holding exact integers are accepted.

    Parameters
    ----------
    labels
        ``(N, *spatial)`` (or ``(M,)``) class indices.
    expected_shape
        The shape the labels must have (the scores' shape without the class axis).
    """
    t = as_tensor(labels, name, device)
    if t.dtype == torch.bool:
        raise InputTypeError(f"{name}: expected integer class labels, got bool")
    if t.dtype in _FLOAT_DTYPES:
        if not bool(torch.all(t == torch.round(t))) or not bool(torch.isfinite(t).all()):
            raise InputTypeError(f"{name}: expected integer class labels, got {t.dtype} with non-integer values")
        t = t.to(torch.int64)
    elif t.dtype in _WIDE_UNSIGNED:  # e.g. 16-bit label maps: exact in int64
        t = t.to(torch.int64)
        if bool((t < 0).any()):  # only uint64 above 2**63 - 1 wraps
            raise InputError(f"{name}: uint64 labels do not fit int64")
    elif t.dtype not in _INT_DTYPES:
        raise InputTypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if expected_shape is not None and tuple(t.shape) != tuple(expected_shape):
        raise InputError(
            f"{name}: shape {tuple(t.shape)} does not match the predictions, expected {tuple(expected_shape)}"
        )
    return t


def check_mask(mask: Any, expected_shape: tuple[int, ...], name: str = "mask", device=None) -> torch.Tensor:
    """Validate a boolean mask with the labels' shape (True = pixel counts)."""
    t = as_tensor(mask, name, device)
    if t.dtype != torch.bool:
        if t.dtype in _INT_DTYPES and bool(((t == 0) | (t == 1)).all()):
            t = t.to(torch.bool)
        else:
            raise InputTypeError(f"{name}: expected a boolean mask, got {t.dtype}")
    if tuple(t.shape) != tuple(expected_shape):
        raise InputError(f"{name}: shape {tuple(t.shape)} does not match the labels, expected {tuple(expected_shape)}")
    return t


def check_finite(chunk: torch.Tensor, name: str) -> None:
    """Raise if ``chunk`` holds NaN or infinite values.

    The test is the minimum and maximum of floating input (``torch.aminmax``: one pass, no
    temporaries, NaN propagates): ~25 ms for a 19 x 1024 x 2048 float16 map against ~400 ms for
    ``torch.isfinite`` (docs/scaling.md); only when an extreme is not finite are the NaN and inf
    counted, for the message. Integer and boolean input is finite.
    """
    if chunk.numel() == 0 or not (chunk.is_floating_point() or chunk.is_complex()):
        return
    if chunk.is_floating_point():
        lo, hi = torch.aminmax(chunk)
        if math.isfinite(float(lo)) and math.isfinite(float(hi)):
            return
    elif bool(torch.isfinite(chunk).all()):
        return
    n_nan = int(torch.isnan(chunk).sum())
    n_inf = int(torch.isinf(chunk).sum())
    raise InputError(f"{name}: contains non-finite values ({n_nan} NaN, {n_inf} inf)")


#: the reason a file with NaN / inf at ignored pixels only is refused where a calibrator runs
EVERY_PIXEL_HINT = ("the metrics leave ignored pixels out, but a calibrator is applied to every pixel (as segcal "
                    "apply does): store finite values there (e.g. numpy.nan_to_num)")


def finite_where_valid(scores: torch.Tensor, valid: Any, name: str, fill: float) -> torch.Tensor:
    """``scores`` ``(C, *spatial)`` checked finite at the ``valid`` positions only.

    The rule of every number computed from scores and labels without a calibrator (the metrics,
    the conformal loss tables): a pixel whose label is the ignore index never enters a number, so
    NaN / inf there are accepted (``docs/metrics.md``). Where every value is finite, ``scores``
    itself is returned (one ``aminmax`` pass); otherwise a copy whose non-valid positions hold
    ``fill`` (e.g. 0 for logits, ``1 / C`` for probabilities), so that nothing computed over the
    whole array meets a NaN.

    Parameters
    ----------
    scores
        Scores with the class axis first.
    valid
        Boolean array or tensor of the spatial shape: True where the label is not ignored.
    name
        The file or argument named in the error.
    fill
        The value stored at the non-valid positions of the copy.

    Raises
    ------
    InputError
        If a valid position holds NaN or inf (:func:`check_finite`'s message).
    """
    try:
        check_finite(scores, name)
        return scores
    except InputError:
        pass
    mask = torch.as_tensor(np.asarray(valid, dtype=bool) if not isinstance(valid, torch.Tensor) else valid,
                           device=scores.device).to(torch.bool)
    if tuple(mask.shape) != tuple(scores.shape[1:]):
        check_finite(scores, name)  # no valid positions to go by: every value must be finite
    check_finite(scores[:, mask], name)
    out = scores.clone()
    out[:, ~mask] = fill
    return out


def ignore_index_note(ignore_index: int | None, dtype: Any) -> str | None:
    """Why ``ignore_index`` can mark no pixel of labels stored as ``dtype`` (None when it can).

    An ignore index outside the range of the labels' integer dtype (300 or -1 for uint8 PNG
    labels) can equal no label, so nothing is ignored: almost certainly a mistake (255 with labels
    0..11 is the usual, legitimate case: inside the range). Float and unknown dtypes: None.
    """
    if ignore_index is None:
        return None
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        return None
    info = np.iinfo(dt)
    if info.min <= int(ignore_index) <= info.max:
        return None
    return (f"outside the range {info.min}..{info.max} of the labels' dtype {dt.name}: no label can equal it, "
            "so no pixel is ignored")


def valid_labels(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """``labels != ignore_index`` as a boolean tensor, exact for every ignore index.

    ``uint8_tensor != 256`` in torch compares with the index wrapped to the tensor's dtype (256 ->
    0, -1 -> 255), so class 0 (or 255) would be ignored; an ignore index outside the dtype's range
    matches no label (:func:`ignore_index_note`).
    """
    if ignore_index is None:
        return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    if not labels.is_floating_point() and labels.dtype != torch.bool:
        info = torch.iinfo(labels.dtype)
        if not info.min <= int(ignore_index) <= info.max:
            return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    return labels != ignore_index


def check_label_range(
    labels: torch.Tensor, valid: torch.Tensor, num_classes: int, name: str = "target"
) -> None:
    """Raise if a valid (not ignored, not masked) label is outside ``[0, num_classes)``."""
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        vals = torch.unique(labels[bad])[:10].tolist()
        k = vals[-1] if vals[-1] >= num_classes else vals[0]
        raise InputError(
            f"{name}: labels {vals} are outside [0, {num_classes}) and are not the ignore_index; "
            f"pass ignore_index={k} (command line: --ignore-index {k}) or a mask to exclude them"
        )


def check_probabilities(chunk: torch.Tensor, name: str, dim: int = 0, atol: float | None = None) -> None:
    """Raise if ``chunk`` is not a probability vector along ``dim`` (within a dtype-aware tolerance)."""
    if atol is None:
        atol = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}.get(chunk.dtype, 1e-6)
    if bool((chunk < 0).any()) or bool((chunk > 1 + atol).any()):
        raise InputError(f"{name}: probabilities must lie in [0, 1] (input_type='probs'); "
                         "pass input_type='logits' (command line: --input-type logits) if these are logits")
    s = chunk.sum(dim=dim, dtype=torch.float64 if chunk.dtype == torch.float64 else torch.float32)
    dev = (s - 1).abs().max()
    if float(dev) > atol * max(1.0, chunk.shape[dim] ** 0.5):
        raise InputError(
            f"{name}: probabilities do not sum to 1 over the class axis (max deviation {float(dev):.3g}); "
            "pass input_type='logits' (command line: --input-type logits) if these are logits"
        )


def score_kind(scores: Any, axis: int = 0, max_pixels: int = 1 << 16) -> str | None:
    """What ``scores`` hold, from their values: ``"probs"``, ``"logits"``, or ``None`` (undecided).

    Probabilities: every value in ``[0, 1]`` and the values summing to one over the class axis
    ``axis``, within the storage dtype's rounding (the tolerance of :func:`check_probabilities`).
    Logits practically never pass both tests. Only the first ``max_pixels`` positions along the
    flattened other axes are read, so a memory-mapped volume costs one small read. ``None``: the
    positions read hold NaN or inf (the finite check names them), or the input is not a float
    array with at least 2 classes.

    Parameters
    ----------
    scores
        ``(C, *spatial)`` (``axis=0``) or ``(N, C, *spatial)`` (``axis=1``) numpy array or tensor.
    axis
        The class axis.
    max_pixels
        Positions looked at.
    """
    if isinstance(scores, torch.Tensor):
        t = scores.detach()
        a = (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
    else:
        a = np.asarray(scores)
    if a.dtype.kind != "f" or a.ndim < 1 or a.size == 0 or a.shape[axis] < 2:
        return None
    c = a.shape[axis]
    rows = np.moveaxis(a, axis, 0).reshape(c, -1)[:, :max_pixels]
    atol = {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 1e-4}.get(rows.dtype, 1e-6)
    if not np.isfinite(rows).all():
        return None
    if rows.min() < 0 or rows.max() > 1 + atol:
        return "logits"
    dev = np.abs(rows.sum(0, dtype=np.float64) - 1).max()
    return "probs" if dev <= atol * max(1.0, c**0.5) else "logits"


def looks_like_probabilities(scores: Any, axis: int = 0, max_pixels: int = 1 << 16) -> bool:
    """True when ``scores`` hold probabilities rather than logits (:func:`score_kind` is ``"probs"``)."""
    return score_kind(scores, axis, max_pixels) == "probs"


#: what a message tells the user to pass, per input type (the API's keyword by default)
API_FLAGS = {"probs": "input_type='probs'", "logits": "input_type='logits'"}


def check_input_kind(
    scores: Any,
    input_type: str,
    name: str,
    *,
    axis: int = 0,
    flags: dict[str, str] | None = None,
) -> None:
    """Refuse probabilities given as logits and logits given as probabilities.

    Logits are unconstrained; probabilities lie in ``[0, 1]`` and sum to one over the class axis
    (:func:`looks_like_probabilities`). Probabilities read as logits give a silently wrong
    calibration error (their softmax is nearly uniform), so they are refused, naming what to pass.
    Pass the array as stored (a float16 file in float16): the tolerance follows its dtype.

    Parameters
    ----------
    scores
        ``(C, *spatial)`` (``axis=0``) or ``(N, C, *spatial)`` (``axis=1``) array or tensor.
    input_type
        What the caller says ``scores`` hold: ``"logits"`` or ``"probs"``.
    name
        The argument or file, for the message.
    axis
        The class axis.
    flags
        What to tell the user to pass, per input type (:data:`API_FLAGS` by default; the command
        line passes its flags).

    Raises
    ------
    InputError
        ``input_type="logits"`` and the values are probabilities, or ``"probs"`` and they are not.
    """
    flags = flags or API_FLAGS
    is_probs = looks_like_probabilities(scores, axis)
    if input_type == "logits" and is_probs:
        raise InputError(
            f"{name}: every value lies in [0, 1] and the values sum to one over the class axis: these "
            f"are probabilities, not logits; pass {flags['probs']}"
        )
    if input_type == "probs" and not is_probs:
        raise InputError(
            f"{name}: not probabilities (values outside [0, 1], or not summing to one over the class "
            f"axis {axis}); if these are logits pass {flags['logits']}"
        )


def channel_last_hint(shape: tuple[int, ...], class_axis: int = 0, expected: int | None = None) -> str:
    """A hint for an error message when ``shape`` looks channel-last, else ``""``.

    segcal reads classes first: ``(C, H, W)`` per file, ``(N, C, H, W)`` per batch. An array
    saved as ``(H, W, C)`` shows it by its last axis: of the ``expected`` class count where the
    class axis is not, or (no count known) short (at most 256) behind a class axis of more than
    256 "classes".
    """
    if len(shape) < class_axis + 3:
        return ""
    c, last = shape[class_axis], shape[-1]
    if expected is not None:
        looks = c != expected and last == expected
    else:
        looks = c > 256 and 2 <= last <= 256
    if looks:
        return (f"; the shape {tuple(shape)} looks channel-last ({last} classes on the last axis): "
                "segcal expects the classes first, (C, H, W); transpose it, e.g. "
                "np.moveaxis(x, -1, 0)")
    return ""


def check_class_count(scores: Any, expected: int, name: str, *, axis: int = 0) -> None:
    """Refuse scores whose class axis does not hold ``expected`` classes (hinting at channel-last).

    Parameters
    ----------
    scores
        Array or tensor with the classes on ``axis``.
    expected
        The class count (the model's, the calibrator's, or the first file's of a folder).
    name
        The argument or file, for the message.
    """
    shape = tuple(scores.shape)
    if len(shape) <= axis or shape[axis] != expected:
        got = shape[axis] if len(shape) > axis else "no"
        raise InputError(f"{name}: {got} classes on axis {axis} (shape {shape}), expected {expected}"
                         + channel_last_hint(shape, axis, expected))
