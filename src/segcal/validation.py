"""Input validation shared by every layer of segcal.

Every public entry point that takes predictions or labels goes through these helpers, so that bad
input fails early with an error that names the argument and says what was expected (shape, dtype,
NaN, labels out of range, empty input). Nothing here copies pixel data unless a conversion is
needed (numpy -> torch is zero-copy for supported dtypes).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch

InputType = Literal["logits", "probs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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
            arr = x
            if not arr.flags.c_contiguous and not arr.flags.f_contiguous:
                arr = np.ascontiguousarray(arr)
            if arr.dtype == np.uint16 or arr.dtype == np.uint32 or arr.dtype == np.uint64:
                arr = arr.astype(np.int64)
            if not arr.flags.writeable:  # e.g. a memory-mapped .npy: segcal never writes inputs
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.from_numpy(arr)
            else:
                t = torch.from_numpy(arr)
        else:
            raise TypeError(f"{name}: unsupported numpy dtype {x.dtype}; expected float or integer")
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:  # pragma: no cover - defensive
            raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}") from exc
    if device is not None:
        t = t.to(device)
    return t


def check_input_type(input_type: str) -> InputType:
    if input_type not in ("logits", "probs"):
        raise ValueError(f"input_type: expected 'logits' or 'probs', got {input_type!r}")
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
        raise TypeError(
            f"{name}: expected a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.ndim < 2:
        raise ValueError(f"{name}: expected shape (N, C, *spatial) or (M, C), got {tuple(t.shape)}")
    if t.shape[0] == 0 or t.numel() == 0:
        raise ValueError(f"{name}: empty input (shape {tuple(t.shape)})")
    c = t.shape[1]
    if c < min_classes:
        raise ValueError(f"{name}: expected at least {min_classes} classes on axis 1, got {c}")
    if num_classes is not None and c != num_classes:
        raise ValueError(f"{name}: expected {num_classes} classes on axis 1, got {c} (shape {tuple(t.shape)})")
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
        raise TypeError(f"{name}: expected integer class labels, got bool")
    if t.dtype in _FLOAT_DTYPES:
        if not bool(torch.all(t == torch.round(t))) or not bool(torch.isfinite(t).all()):
            raise TypeError(f"{name}: expected integer class labels, got {t.dtype} with non-integer values")
        t = t.to(torch.int64)
    elif t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if expected_shape is not None and tuple(t.shape) != tuple(expected_shape):
        raise ValueError(
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
            raise TypeError(f"{name}: expected a boolean mask, got {t.dtype}")
    if tuple(t.shape) != tuple(expected_shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the labels, expected {tuple(expected_shape)}")
    return t


def check_finite(chunk: torch.Tensor, name: str) -> None:
    """Raise if ``chunk`` holds NaN or infinite values."""
    if not bool(torch.isfinite(chunk).all()):
        n_nan = int(torch.isnan(chunk).sum())
        n_inf = int(torch.isinf(chunk).sum())
        raise ValueError(f"{name}: contains non-finite values ({n_nan} NaN, {n_inf} inf)")


def check_label_range(
    labels: torch.Tensor, valid: torch.Tensor, num_classes: int, name: str = "target"
) -> None:
    """Raise if a valid (not ignored, not masked) label is outside ``[0, num_classes)``."""
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        vals = torch.unique(labels[bad])[:10].tolist()
        raise ValueError(
            f"{name}: labels {vals} are outside [0, {num_classes}) and are not the ignore_index; "
            "pass ignore_index= or a mask to exclude them"
        )


def check_probabilities(chunk: torch.Tensor, name: str, dim: int = 0, atol: float | None = None) -> None:
    """Raise if ``chunk`` is not a probability vector along ``dim`` (within a dtype-aware tolerance)."""
    if atol is None:
        atol = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}.get(chunk.dtype, 1e-6)
    if bool((chunk < 0).any()) or bool((chunk > 1 + atol).any()):
        raise ValueError(f"{name}: probabilities must lie in [0, 1] (input_type='probs')")
    s = chunk.sum(dim=dim, dtype=torch.float64 if chunk.dtype == torch.float64 else torch.float32)
    dev = (s - 1).abs().max()
    if float(dev) > atol * max(1.0, chunk.shape[dim] ** 0.5):
        raise ValueError(
            f"{name}: probabilities do not sum to 1 over the class axis (max deviation {float(dev):.3g}); "
            "pass input_type='logits' if these are logits"
        )
