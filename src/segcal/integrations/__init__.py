"""Framework integrations: segcal where users already put their metrics and callbacks.

Each module wraps segcal's own machinery (the streaming engine
:class:`segcal.metrics.CalibrationMetrics`, :meth:`segcal.calibrators.Calibrator.fit`) for one
framework and imports that framework at module level (``huggingface`` reads output fields and
imports nothing); import the module you need. Nothing
below this package imports it, and this package face imports none of them, so a missing
framework costs nothing until its module is imported (then the error names the extra to
install):

``segcal.integrations.torchmetrics``
    :class:`~segcal.integrations.torchmetrics.CalibrationMetric`, a ``torchmetrics.Metric``
    (``pip install 'segcal[bench]'`` or ``torchmetrics``).
``segcal.integrations.monai``
    :class:`~segcal.integrations.monai.MonaiCalibrationMetric`, MONAI's
    ``CumulativeIterationMetric`` interface (``pip install 'segcal[medical]'``).
``segcal.integrations.ignite``
    :class:`~segcal.integrations.ignite.IgniteCalibrationMetric`, an ``ignite.metrics.Metric``
    (``pip install 'segcal[ignite]'``).
``segcal.integrations.lightning``
    :class:`~segcal.integrations.lightning.CalibrationCallback`, a ``lightning.pytorch.Callback``
    (``pip install 'segcal[lightning]'``).
``segcal.integrations.huggingface``
    :func:`~segcal.integrations.huggingface.hf_scores`,
    :class:`~segcal.integrations.huggingface.HFSegmentationModel`: ``transformers`` segmentation
    outputs (SegFormer, UperNet, MaskFormer, Mask2Former) as per-pixel scores for
    ``CalibratedModel`` / ``fit_from_model`` (reads the output's fields and imports no framework;
    the models themselves need ``pip install 'segcal[huggingface]'``).

Examples that run: ``docs/integrations.md``.
"""

__all__: list[str] = []
