"""What a bench run hands to the report: the results dict and the data its figures are drawn from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segcal.bench.protocol import ImageData
from segcal.bench.spec import DatasetSpec


@dataclass
class FigureData:
    """Fitted calibrators ``{(row, seed): cal}`` of one model and the clean test images they are shown on."""

    cals: Mapping[tuple[str, int], Any]
    images: Sequence[ImageData]
    ignore: int | None = None


@dataclass
class BenchRun:
    """A finished bench run, before its output files are written (:func:`segcal.report.write_outputs`).

    ``results`` is the content of ``results.json`` (its ``conditions`` already JSON values; the rest
    is cleaned by :func:`segcal.io.files.to_jsonable` when written) except the ``report_s`` /
    ``total_s`` timings, which the report completes: ``timings`` (raw seconds) and ``started``
    (:func:`time.perf_counter` at the start of the run) are kept for that.
    """

    spec: DatasetSpec
    results: dict[str, Any]
    out: Path
    figures: dict[str, FigureData] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    report: bool = True
    report_images: int = 3


__all__ = ["BenchRun", "FigureData"]
