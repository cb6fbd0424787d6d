"""File plumbing shared by every reader and writer: atomic writes and the one JSON cleaner.

Every writer in segcal is atomic: data go to a temporary file in the destination folder that is
renamed over the final name only once complete, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_jsonable(
    obj: Any,
    *,
    finite: bool = True,
    drop_private: bool = False,
    unknown: str = "keep",
) -> Any:
    """Recursively convert ``obj`` to plain JSON / ``torch.load(weights_only=True)`` values.

    The one cleaner of segcal: results, bench outputs, calibrator configurations and adaptation
    logs all go through it. Dict keys become ``str``, tuples and arrays lists, NumPy scalars
    Python scalars.

    Parameters
    ----------
    obj
        Any nesting of dicts, lists, tuples, NumPy arrays and scalars.
    finite
        Replace NaN and +-Inf floats by ``None`` (JSON has no NaN). ``False`` keeps them (a
        ``torch.save`` payload may hold NaN).
    drop_private
        Drop dict entries whose key starts with ``"_"`` (bench-internal values).
    unknown
        What to do with any other object: ``"keep"`` it as is, or ``"str"`` it.
    """
    if isinstance(obj, dict):
        return {
            str(k): to_jsonable(v, finite=finite, drop_private=drop_private, unknown=unknown)
            for k, v in obj.items()
            if not (drop_private and str(k).startswith("_"))
        }
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, list | tuple):
        return [to_jsonable(v, finite=finite, drop_private=drop_private, unknown=unknown) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return None if finite and not math.isfinite(obj) else obj
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    return str(obj) if unknown == "str" else obj


__all__ = ["atomic_write", "to_jsonable"]
