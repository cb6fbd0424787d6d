"""Medical 3D segmentation: the reference 3D U-Net on MSD hippocampus and nnU-Net v2 interop.

Needs the ``segcal[medical]`` extra (MONAI, nibabel, scipy). Nothing here is imported by the rest
of segcal; the CLI hooks in through ``register()`` and ``predict_volumes`` (model) and
``segcal.medical.nnunet.read_aligned`` / ``write_calibrated`` (nnU-Net folders).
"""

from __future__ import annotations

MODEL_NAME = "unet3d-hippocampus"
MODEL_DESCRIPTION = (
    "MONAI 3D U-Net (16-32-64-128, 2 residual units) trained by segcal on MSD Task04 hippocampus "
    "(160 training cases of the committed split); input: raw 3D MRI NIfTI, per-case z-score; "
    "output: (3, X, Y, Z) logits in nibabel voxel order"
)


def register(overwrite: bool = False):
    """Register ``unet3d-hippocampus`` with ``segcal.models`` (the registry on the models branch).

    The registry's ``LoadedModel.logits`` runs 2D RGB batches; a 3D model needs whole-volume
    normalisation, padding and cropping back, so ``segcal predict`` must send this model's inputs
    to :func:`segcal.medical.predict.predict_volumes` (``spec.name == MODEL_NAME``) rather than
    the 2D image loop. The registered ``preprocess`` is the volume preprocessing for completeness.
    """
    from segcal.medical.hippocampus import CLASS_NAMES, NUM_CLASSES
    from segcal.medical.unet import load_unet3d_hippocampus
    from segcal.models import register_model  # provided by the models branch

    def _factory(data_root=None):  # weights are committed; data_root is not needed
        return load_unet3d_hippocampus()

    return register_model(
        MODEL_NAME,
        _factory,
        num_classes=NUM_CLASSES,
        class_names=CLASS_NAMES,
        ignore_index=None,
        preprocess=preprocess_volume,
        description=MODEL_DESCRIPTION,
        overwrite=overwrite,
    )


def preprocess_volume(volume):
    """Raw ``(X, Y, Z)`` volume -> ``(1, 1, X', Y', Z')`` normalised, zero-padded float tensor."""
    import numpy as np
    import torch

    from segcal.medical.hippocampus import DIVISOR, normalise, pad_to_divisible

    padded, _ = pad_to_divisible(normalise(np.asarray(volume)), DIVISOR)
    return torch.from_numpy(np.ascontiguousarray(padded))[None, None]


def predict_volumes(model, images, out_dir, **kwargs):
    """See :func:`segcal.medical.predict.predict_volumes` (lazy import: MONAI is optional)."""
    from segcal.medical.predict import predict_volumes as _pv

    return _pv(model, images, out_dir, **kwargs)


__all__ = ["MODEL_DESCRIPTION", "MODEL_NAME", "predict_volumes", "preprocess_volume", "register"]
