"""A small registry of segmentation models that ``segcal predict`` can run.

A model is registered with a *factory* (a callable returning an ``nn.Module`` whose forward maps a
``(N, 3, H, W)`` float tensor to ``(N, C, H, W)`` logits), its class list, the label value to
ignore, and a *preprocess* function turning one ``H x W x 3`` uint8 RGB image into a
``(1, 3, H, W)`` tensor. Factories may take a ``data_root`` keyword (the built-in ESPNets use it to
find their weights); others are called with no arguments.

Built-ins (weights under ``<data root>/espnet``, see ``segcal.data.data_root``):

* ``espnet-camvid`` -- ESPNet p=2 q=8 trained on CamVid, 12 outputs (11 classes + void; void=11
  is the ignore label).
* ``espnet-cityscapes`` -- ESPNet p=2 q=8 trained on Cityscapes, 20 raw outputs (19 train ids and
  the authors' extra background class 19).
* ``espnet-cityscapes-camvid`` -- the Cityscapes model followed by the Cityscapes->CamVid
  :class:`~segcal.models.mapping.ClassMapping`, 11 CamVid-class logits (domain shift case).
* ``unet3d-hippocampus`` -- the reference 3D U-Net of :mod:`segcal.models.unet3d` (committed
  weights; building it needs MONAI, ``segcal[medical]``). Its inputs are 3D volumes, which
  ``segcal predict`` sends to :func:`segcal.pipeline.predict.predict_volumes`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segcal.data import data_root as find_data_root
from segcal.datasets.hippocampus import CLASS_NAMES as HIPPOCAMPUS_CLASSES
from segcal.models.espnet import (
    CAMVID_CLASSES,
    CAMVID_MEAN_BGR,
    CAMVID_STD_BGR,
    CITYSCAPES_CLASSES,
    CITYSCAPES_MEAN_BGR,
    CITYSCAPES_STD_BGR,
    CITYSCAPES_TO_CAMVID,
    load_espnet,
    preprocess_bgr,
)
from segcal.models.mapping import ClassMapping, MappedModel
from segcal.models.unet3d import MODEL_DESCRIPTION as UNET3D_DESCRIPTION
from segcal.models.unet3d import MODEL_NAME as UNET3D_NAME
from segcal.models.unet3d import preprocess_volume, unet3d_factory

Preprocess = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model before it is built."""

    name: str
    factory: Callable[..., nn.Module]
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int | None
    preprocess: Preprocess
    description: str = ""


@dataclass
class LoadedModel:
    """A built model in ``eval()`` mode on its device, with everything ``predict`` needs.

    Attributes
    ----------
    module
        The ``nn.Module``; ``module(x)`` maps ``(N, 3, H, W)`` to ``(N, num_classes, H, W)``.
    preprocess
        ``preprocess(image_uint8_rgb) -> (1, 3, H, W)`` float tensor (on the CPU).
    """

    name: str
    module: nn.Module
    preprocess: Preprocess
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int | None
    device: torch.device
    description: str = ""
    extra: dict = field(default_factory=dict)

    @torch.inference_mode()
    def logits(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Run the model on a list of same-size RGB uint8 images; returns ``(N, C, H, W)`` logits."""
        x = torch.cat([self.preprocess(im) for im in images], 0).to(self.device)
        out = self.module(x)
        if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[1] != self.num_classes:
            raise ValueError(
                f"model {self.name!r}: expected output (N={x.shape[0]}, C={self.num_classes}, *spatial), "
                f"got {tuple(out.shape)}"
            )
        return out


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    ignore_index: int | None = None,
    preprocess: Preprocess | None = None,
    description: str = "",
    overwrite: bool = False,
) -> ModelSpec:
    """Register a model factory under ``name`` (usable as ``segcal predict --model name``).

    Parameters
    ----------
    factory
        Callable returning an ``nn.Module`` with ``(N, 3, H, W) -> (N, num_classes, H, W)``
        logits. If it accepts a ``data_root`` keyword it receives the resolved data root (or None).
    class_names
        ``num_classes`` names; defaults to ``class_0 ... class_{C-1}``.
    ignore_index
        The label value that marks pixels to ignore (e.g. CamVid void = 11), or None.
    preprocess
        ``image_uint8_rgb (H, W, 3) -> (1, 3, H, W)`` float tensor; defaults to scaling to [0, 1].
    overwrite
        Allow replacing an existing registration.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"register_model: name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_model: {name!r} is already registered (pass overwrite=True)")
    if not callable(factory):
        raise TypeError(f"register_model: factory for {name!r} is not callable")
    if int(num_classes) < 2:
        raise ValueError(f"register_model: num_classes must be >= 2, got {num_classes}")
    names = (
        tuple(class_names)
        if class_names is not None
        else tuple(f"class_{i}" for i in range(num_classes))
    )
    if len(names) != num_classes:
        raise ValueError(
            f"register_model: {len(names)} class names given for num_classes={num_classes}"
        )
    spec = ModelSpec(
        name=name,
        factory=factory,
        num_classes=int(num_classes),
        class_names=names,
        ignore_index=ignore_index,
        preprocess=preprocess or default_preprocess,
        description=description,
    )
    _REGISTRY[name] = spec
    return spec


def unregister_model(name: str) -> None:
    """Remove a registration (no error if absent)."""
    _REGISTRY.pop(name, None)


def available_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registration of ``name``; an unknown name raises a ``ValueError`` listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        ) from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise the given device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but CUDA is not available; use --device cpu or auto"
        )
    return dev


def _contiguous_output(_module: nn.Module, _inputs: object, output: object) -> object:
    """Forward hook: hand a channels-last output back in the default (contiguous) layout."""
    return output.contiguous() if isinstance(output, torch.Tensor) else output


def use_channels_last(module: nn.Module) -> bool:
    """Run a 2-D convolutional ``module`` in the channels-last memory layout; outputs stay contiguous.

    The weights of every 4-D parameter and buffer move to ``torch.channels_last``; convolutions
    and batch norms then run on NHWC data (ESPNet on CPU: 1.09-1.28x faster inference and
    1.10-1.37x faster training steps, 1-2 threads, ``benchmarks/model_speed.py`` in
    ``docs/benchmarks.md``) while the module's output is made contiguous by
    a forward hook, so callers see the usual NCHW tensor. The state dict keeps its keys and
    shapes (loading it into a default-layout module works). Modules with 3-D convolutions, or with
    no 2-D convolution, are left alone. Returns whether the layout was changed.
    """
    convs = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs or any(not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in convs):
        return False
    module.to(memory_format=torch.channels_last)
    module.register_forward_hook(_contiguous_output)
    return True


def create_model(
    name: str,
    data_root: str | Path | None = None,
    device: str | torch.device | None = None,
    *,
    channels_last: bool = True,
) -> LoadedModel:
    """Build a registered model, put it in ``eval()`` mode on ``device`` (``auto`` by default).

    ``channels_last`` (default on): 2-D convolutional models run in the channels-last layout
    (:func:`use_channels_last`; same outputs to float rounding, faster); ``False`` keeps the
    default layout.
    """
    spec = get_spec(name)
    params = inspect.signature(spec.factory).parameters
    accepts_root = "data_root" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    module = spec.factory(data_root=data_root) if accepts_root else spec.factory()
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"model {name!r}: factory returned {type(module).__name__}, expected nn.Module"
        )
    dev = resolve_device(device)
    module = module.to(dev).eval()
    if channels_last:
        use_channels_last(module)
    return LoadedModel(
        name=spec.name,
        module=module,
        preprocess=spec.preprocess,
        num_classes=spec.num_classes,
        class_names=spec.class_names,
        ignore_index=spec.ignore_index,
        device=dev,
        description=spec.description,
    )


def default_preprocess(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 RGB -> ``1 x 3 x H x W`` float32 in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected an H x W x 3 RGB array, got shape {arr.shape}")
    return torch.from_numpy(
        np.ascontiguousarray(arr.transpose(2, 0, 1))[None].astype(np.float32) / 255.0
    )


# --------------------------------------------------------------------------- built-in ESPNets
def _espnet_weights(data_root: str | Path | None, filename: str) -> Path:
    root = find_data_root(data_root, required=True)
    path = Path(root) / "espnet" / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"ESPNet weights not found: {path} (expected under <data root>/espnet/)"
        )
    return path


def _espnet_camvid(data_root: str | Path | None = None) -> nn.Module:
    return load_espnet(_espnet_weights(data_root, "espnet_p_2_q_8_camvid.pth"), 12, "out0_cat")


def _espnet_cityscapes(data_root: str | Path | None = None) -> nn.Module:
    return load_espnet(_espnet_weights(data_root, "espnet_p_2_q_8.pth"), 20, "out0")


def _espnet_cityscapes_camvid(data_root: str | Path | None = None) -> nn.Module:
    return MappedModel(_espnet_cityscapes(data_root), ClassMapping(CITYSCAPES_TO_CAMVID, 20))


camvid_preprocess = partial(preprocess_bgr, mean_bgr=CAMVID_MEAN_BGR, std_bgr=CAMVID_STD_BGR)
cityscapes_preprocess = partial(
    preprocess_bgr, mean_bgr=CITYSCAPES_MEAN_BGR, std_bgr=CITYSCAPES_STD_BGR
)

register_model(
    "espnet-camvid",
    _espnet_camvid,
    num_classes=12,
    class_names=(*CAMVID_CLASSES, "Unlabelled"),
    ignore_index=11,
    preprocess=camvid_preprocess,
    description="ESPNet p=2 q=8 trained on CamVid (Mehta et al. 2018); 12 outputs, 11 = void",
)
register_model(
    "espnet-cityscapes",
    _espnet_cityscapes,
    num_classes=20,
    class_names=(*CITYSCAPES_CLASSES, "background"),
    ignore_index=255,
    preprocess=cityscapes_preprocess,
    description="ESPNet p=2 q=8 trained on Cityscapes; 20 raw outputs (19 train ids + background)",
)
register_model(
    "espnet-cityscapes-camvid",
    _espnet_cityscapes_camvid,
    num_classes=11,
    class_names=CAMVID_CLASSES,
    ignore_index=11,
    preprocess=cityscapes_preprocess,
    description=(
        "Cityscapes ESPNet mapped to the 11 CamVid classes (logsumexp within groups, "
        "background dropped); CamVid void = 11 is ignored"
    ),
)
register_model(
    UNET3D_NAME,
    unet3d_factory,
    num_classes=len(HIPPOCAMPUS_CLASSES),
    class_names=HIPPOCAMPUS_CLASSES,
    ignore_index=None,
    preprocess=preprocess_volume,
    description=UNET3D_DESCRIPTION,
)
