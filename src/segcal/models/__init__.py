"""Segmentation models for ``segcal predict``: a registry, the ESPNet port, class mappings and
the reference 3D U-Net (``unet3d-hippocampus``), and :class:`CalibratedModel` (a network and its
calibrator as one exportable module).

Used by the pipeline only; nothing below ``segcal.pipeline`` imports this package.
"""

from segcal.models.calibrated import NOT_EXPORTABLE, NOT_ONNX_EXPORTABLE, CalibratedModel
from segcal.models.espnet import ESPNet, load_espnet, preprocess_bgr
from segcal.models.mapping import ClassMapping, MappedModel
from segcal.models.registry import (
    LoadedModel,
    ModelSpec,
    available_models,
    create_model,
    get_spec,
    register_model,
    resolve_device,
    unregister_model,
    use_channels_last,
)
from segcal.models.unet3d import MODEL_NAME as UNET3D_MODEL_NAME
from segcal.models.unet3d import build_unet, load_unet3d_hippocampus

__all__ = [
    "NOT_EXPORTABLE",
    "NOT_ONNX_EXPORTABLE",
    "UNET3D_MODEL_NAME",
    "CalibratedModel",
    "ClassMapping",
    "ESPNet",
    "LoadedModel",
    "MappedModel",
    "ModelSpec",
    "available_models",
    "build_unet",
    "create_model",
    "get_spec",
    "load_espnet",
    "load_unet3d_hippocampus",
    "preprocess_bgr",
    "register_model",
    "resolve_device",
    "unregister_model",
    "use_channels_last",
]
