"""Checkpoints of an adaptation run: the per-epoch files, the log, the selection, loading back.

Every epoch of :func:`~segcal.adaptation.adapt` writes ``epoch_XXX.pt`` (model ``state_dict``,
optimizer state, RNG state, the log so far) and rewrites ``adapt_log.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from segcal.errors import InputError, unreadable
from segcal.io import atomic_write
from segcal.io.files import to_jsonable
from segcal.models import MappedModel

__all__ = ["CHECKPOINT_FORMAT", "LOG_NAME", "load_adapted", "load_checkpoint", "save_checkpoint",
           "select_checkpoint", "write_log"]

CHECKPOINT_FORMAT = "segcal-adapt-checkpoint"
LOG_NAME = "adapt_log.json"
#: keys every checkpoint holds
CHECKPOINT_KEYS = ("method", "epoch", "state_dict")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of an ``epoch_XXX.pt`` written by :func:`~segcal.adaptation.adapt`.

    Read with torch's restricted unpickler (tensors and plain values only).

    Raises
    ------
    InputError
        The file is unreadable (truncated, random bytes), not an adaptation checkpoint, lacks
        a key, or holds NaN / infinite weights.
    """
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error says it all
            warnings.simplefilter("ignore", UserWarning)
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile) as exc:
        raise unreadable(path, exc, "a segcal adaptation checkpoint (epoch_XXX.pt)") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a segcal adaptation checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing or not isinstance(ck["state_dict"], dict):
        raise InputError(f"{path}: a damaged segcal adaptation checkpoint (missing {', '.join(missing) or 'state_dict'})")
    bad = [k for k, v in ck["state_dict"].items()
           if not isinstance(v, torch.Tensor) or (v.is_floating_point() and not bool(torch.isfinite(v).all()))]
    if bad:
        raise InputError(f"{path}: the checkpoint's weights {bad[:5]} are not finite tensors")
    return ck


def load_adapted(model: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights of an adaptation checkpoint into a registered model, in place.

    Parameters
    ----------
    model
        A :class:`segcal.models.LoadedModel` (``create_model(...)``). Its ``module`` receives the
        checkpoint's ``state_dict`` when the checkpoint was made by adapting a model of the same
        name; when ``module`` is a :class:`segcal.models.MappedModel` (e.g.
        ``espnet-cityscapes-camvid``) the adapted weights of the un-mapped model
        (``espnet-cityscapes``) are loaded into ``module.model``, so the adapted model predicts
        in the mapped label space.
    path
        An ``epoch_XXX.pt`` written by :func:`adapt`.

    Returns
    -------
    dict
        ``{"model", "method", "epoch", "estimated_ece", "target"}``, with ``target`` the module
        (``"module"`` or ``"module.model"``) that was loaded.

    Raises
    ------
    InputError
        Not an adaptation checkpoint, or its weights do not fit the model (another architecture or
        class count); the message names the adapted model.
    """
    ck = load_checkpoint(path)
    adapted = json.loads(ck["log"]).get("model") if ck.get("log") else None
    candidates = [("module", model.module)]
    if isinstance(model.module, MappedModel):
        candidates.append(("module.model", model.module.model))
    if adapted == getattr(model, "name", None):
        candidates = candidates[:1]
    errors = []
    for where, mod in candidates:
        try:
            mod.load_state_dict(ck["state_dict"], strict=True)
        except RuntimeError as exc:
            errors.append(f"{where}: {str(exc).splitlines()[0]}")
            continue
        model.module.eval()
        return {"model": adapted, "method": ck.get("method"), "epoch": int(ck["epoch"]),
                "estimated_ece": ck.get("estimated_ece"), "target": where}
    raise InputError(
        f"{path}: checkpoint of an adapted {adapted!r} does not fit model {getattr(model, 'name', '?')!r} "
        f"({'; '.join(errors)})"
    )


def save_checkpoint(path: Path, obj: Any) -> None:
    """Write a checkpoint payload atomically (a complete file or none)."""
    with atomic_write(path) as fh:
        torch.save(obj, fh)


def write_log(path: Path, log: dict[str, Any]) -> None:
    """Write the run's log (``adapt_log.json``) atomically, NaN / Inf as null."""
    with atomic_write(path, "w") as fh:
        json.dump(to_jsonable(log), fh, indent=1)


def select_checkpoint(method: str, log: dict[str, Any], out: Path) -> None:
    """Record the selected epoch in ``log``: the lowest estimated target ECE for ``calsfda``, else
    the last epoch (ties: the earlier epoch)."""
    eps = log["epochs"]
    if method == "calsfda":
        best = min(eps, key=lambda e: (e["estimated_ece"], e["epoch"]))
        log["selection_rule"] = "argmin estimated target ECE"
    else:
        best = eps[-1]
        log["selection_rule"] = "last epoch"
    log["selected_epoch"] = best["epoch"]
    log["selected_checkpoint"] = str(out / f"epoch_{best['epoch']:03d}.pt")
