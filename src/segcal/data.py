"""Where segcal finds the shared real data (CamVid, ESPNet weights, MSD hippocampus).

The data root is, in order: an explicit argument (``--data-root``), the ``SEGCAL_DATA``
environment variable, then ``../shared/data`` next to the current directory or next to the
checkout that holds this package. The project never copies these files into its own tree.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SEGCAL_DATA"


def candidate_roots() -> list[Path]:
    """The fallback data roots, in search order (``../shared/data`` near the cwd and the checkout)."""
    here = Path(__file__).resolve()
    cands = [Path.cwd() / ".." / "shared" / "data", Path.cwd() / "shared" / "data"]
    # src/segcal/data.py -> checkout root is parents[2]
    if len(here.parents) > 2:
        cands.append(here.parents[2] / ".." / "shared" / "data")
    return [c.resolve() for c in cands]


def data_root(explicit: str | os.PathLike | None = None, *, required: bool = True) -> Path | None:
    """Return the data root.

    Raises
    ------
    FileNotFoundError
        When ``required`` and no root is found; the message says exactly what to provide.
    """
    if explicit is not None:
        p = Path(explicit).expanduser().resolve()
        if not p.is_dir():
            raise FileNotFoundError(f"--data-root: {p} is not a folder")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser().resolve()
        if not p.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={env}: not a folder")
        return p
    for c in candidate_roots():
        if c.is_dir():
            return c
    if required:
        raise FileNotFoundError(
            "data root not found: pass --data-root DIR or set SEGCAL_DATA=DIR, where DIR holds "
            "camvid/ (train, trainannot, val, valannot, test, testannot), espnet/ (*.pth) and "
            "msd_task04_hippocampus/ (imagesTr, labelsTr); looked in "
            + ", ".join(str(c) for c in candidate_roots())
        )
    return None
