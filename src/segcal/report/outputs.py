"""The output files of a bench run: ``report.html``, ``results.md`` and ``results.json``.

:func:`prepare_outputs` checks the output folder before the (long) run, so that an unusable
``--out`` fails at once; :func:`write_outputs` writes every file of a finished
:class:`~segcal.bench.results.BenchRun` (atomically: a reader never sees half a file).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segcal.bench.results import BenchRun
from segcal.errors import InputError
from segcal.io.files import atomic_write, to_jsonable
from segcal.report.html import write_report
from segcal.report.tables import markdown_report


def prepare_outputs(out: str | os.PathLike) -> Path:
    """Check, before a (long) run, that the folder ``out`` can be created; nothing is created.

    The command line checks first what ``out`` may not be (an input, an existing file:
    :func:`segcal.cli.common.check_out_path`); this checks that its nearest existing parent is
    a writable folder. Raises :class:`~segcal.errors.InputError` otherwise.
    """
    path = Path(out)
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent != path and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise InputError(f"--out {path}: cannot create the output folder ({parent} is not a writable folder)")
    if parent == path and not path.is_dir():
        raise InputError(f"--out {path}: is an existing file; expected a folder for results.json, results.md, report.html")
    return path


def write_outputs(run: BenchRun, markdown: Callable[[dict[str, Any]], str] = markdown_report) -> dict[str, Any]:
    """Write ``report.html`` (when ``run.report``), ``results.md`` and ``results.json`` into ``run.out``.

    ``markdown`` renders ``results.md`` from the results (default: the calibrator bench's tables;
    the shift-calibration bench passes its own).

    The HTML report is drawn first (its tables show the wall time "before the report"); the
    timings of ``results.md`` / ``results.json`` then include ``report_s`` and the final
    ``total_s``. Returns the results dict as written.
    """
    out = prepare_outputs(run.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the output folder: {exc.strerror or exc}") from exc
    results = run.results
    timings = dict(run.timings)
    if run.report:
        t0 = time.perf_counter()
        write_report(results, run.figures, out / "report.html", n_images=run.report_images)
        timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - run.started
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    with atomic_write(out / "results.md", "w") as fh:
        fh.write(markdown(results))
    with atomic_write(out / "results.json", "w") as fh:
        json.dump(to_jsonable(results, drop_private=True), fh, indent=1, allow_nan=False)
    return results


__all__ = ["prepare_outputs", "write_outputs"]
