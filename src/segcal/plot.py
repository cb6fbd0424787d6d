"""Plots from the API: ``segcal.plot.reliability_diagram``.

The public face of :mod:`segcal.report.reliability` (where the drawing lives, one floor below);
importing it needs matplotlib only once a diagram is drawn (``pip install 'segcal[plot]'``).

Examples
--------
>>> import segcal.plot
>>> fig = segcal.plot.reliability_diagram(metrics)                  # doctest: +SKIP
>>> fig.savefig("reliability.png")                                  # doctest: +SKIP
>>> segcal.plot.reliability_diagram("eval.json", per_class=True)    # doctest: +SKIP
"""

from __future__ import annotations

from segcal.report.reliability import ReliabilityData, reliability_data, reliability_diagram

__all__ = ["ReliabilityData", "reliability_data", "reliability_diagram"]
