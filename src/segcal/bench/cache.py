"""Where a bench finds its data and keeps its predictions, and what it records about the run.

* :func:`default_cache_dir`: ``$XDG_CACHE_HOME/segcal/<bench>`` (``~/.cache`` without it).
* :func:`find_dataset`: the one dataset finder; a missing dataset is a :class:`BenchDataError`
  saying what to provide and how (``--data-root DIR`` or ``SEGCAL_DATA=DIR``).
* :class:`PredictionCache`: float16 logits per (model, split, condition) with a ``manifest.json``;
  a rerun reads them and never calls the model.
* :func:`git_commit`, :func:`environment`: recorded in ``results.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.errors import InputError
from segcal.io.files import atomic_write
from segcal.models import create_model
from segcal.pipeline.predict import predict_folder


class BenchDataError(InputError, FileNotFoundError):
    """The data a bench needs are missing; the message says what to provide and where."""


def default_cache_dir(name: str) -> Path:
    """Default prediction cache of the bench ``name`` (``DatasetSpec.cache_name``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "segcal" / name


def find_dataset(locate: Callable[[str | None], Path], data_root: str | None, *, needs: str,
                 subdirs: Sequence[str], provide: str, label: str = "") -> Path:
    """The dataset folder ``locate(data_root)`` found, checked to hold ``subdirs``.

    Parameters
    ----------
    locate
        Finds the dataset folder under the data root; raises ``FileNotFoundError``.
    needs
        What the bench needs, said when the folder is not found.
    subdirs, provide, label
        Sub-folders that must exist; what they are (``provide``); the folder's name in the message.
    """
    try:
        d = locate(data_root)
    except FileNotFoundError as exc:
        raise BenchDataError(f"{exc}. {needs}; pass --data-root DIR or set SEGCAL_DATA=DIR") from exc
    for sub in subdirs:
        if not (d / sub).is_dir():
            raise BenchDataError(f"{label}{d} has no {sub}/: provide {d}/{sub}/ ({provide})")
    return d


class PredictionCache:
    """Float16 logits per (model, split, condition) under ``root`` with a ``manifest.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, Any] = {}
        if self.manifest_path.is_file():
            with contextlib.suppress(ValueError, OSError):
                self.manifest = json.loads(self.manifest_path.read_text())
        self.predicted_images = 0
        self.reused_images = 0
        self.predict_seconds = 0.0

    @staticmethod
    def key(model: str, split: str, corruption: str | None = None, severity: int = 0, seed: int = 0) -> str:
        cond = "clean" if corruption is None else f"{corruption}-s{severity}-seed{seed}"
        return f"{model}/{split}/{cond}"

    def folder(self, key: str) -> Path:
        return self.root / key

    def ensure(self, key: str, model: str, items: Sequence[Any], transform: Any, data_root: Path,
               loaded: dict[str, Any], progress: bool = False) -> Path:
        """Predict the items whose logits are not cached yet; return the folder."""
        folder = self.folder(key)
        missing = [it for it in items if not (folder / f"{it.stem}.npy").is_file()]
        self.reused_images += len(items) - len(missing)
        if missing:
            if model not in loaded:
                loaded[model] = create_model(model, data_root, "cpu")
            res = predict_folder(loaded[model], list(missing), folder, transform=transform, progress=progress)
            self.predicted_images += len(res.stems)
            self.predict_seconds += res.seconds
            entry = self.manifest.setdefault(key, {"model": model, "stems": []})
            entry["stems"] = sorted(set(entry["stems"]) | set(res.stems))
            entry["transform"] = transform.describe() if hasattr(transform, "describe") else None
            entry["seconds"] = round(entry.get("seconds", 0.0) + res.seconds, 3)
            entry["dtype"] = "float16"
            with atomic_write(self.manifest_path, "w") as fh:
                json.dump(self.manifest, fh, indent=1, sort_keys=True)
        return folder


def git_commit() -> str | None:
    """Short commit of the source tree (``-dirty`` with uncommitted changes); None outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Versions and machine of the run."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count()}


def prepare_run(report: bool, threads: int | None) -> None:
    """Shared start of a bench run: fail early if the report cannot be drawn; set torch threads."""
    if report:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ImportError("the HTML report needs matplotlib: pip install 'segcal[plot]' (or pass --no-report)") from exc
    if threads:
        torch.set_num_threads(int(threads))


__all__ = [
    "BenchDataError", "PredictionCache", "default_cache_dir", "environment", "find_dataset", "git_commit",
    "prepare_run",
]
