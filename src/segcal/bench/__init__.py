"""The calibration benchmarks: ``segcal bench`` (CamVid) and ``segcal bench --dataset hippocampus``.

* :mod:`segcal.bench.spec`: per dataset, its models, rows, declared properties, CI metrics and columns.
* :mod:`segcal.bench.protocol`: image data, row drawing, split halves, the fit loop, the evaluation.
* :mod:`segcal.bench.bootstrap`: the paired bootstrap over test images and the seed summaries.
* :mod:`segcal.bench.cache`: data finder, prediction cache, run environment.
* :mod:`segcal.bench.camvid`, :mod:`segcal.bench.hippocampus`: one runner per dataset, returning a
  :class:`segcal.bench.results.BenchRun` whose files :func:`segcal.report.outputs.write_outputs` writes.

The package face imports nothing: import the module you need.
"""
