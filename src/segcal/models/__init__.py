"""Segmentation models for ``segcal predict``: a registry, the ESPNet port, class mappings.

Used by the pipeline only; nothing below ``segcal.pipeline`` imports this package.
"""

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

__all__ = [
    "ClassMapping",
    "ESPNet",
    "LoadedModel",
    "MappedModel",
    "ModelSpec",
    "available_models",
    "create_model",
    "get_spec",
    "load_espnet",
    "preprocess_bgr",
    "register_model",
    "resolve_device",
    "unregister_model",
    "use_channels_last",
]
