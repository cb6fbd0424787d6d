"""The image batches of a model run over an image folder: ``segcal fit --model``'s loader.

:func:`folder_items` pairs an image folder (or a dataset alias such as ``camvid:val``) with its
labels; :func:`folder_loader` reads them as batches of up to ``batch_size`` consecutive images of
one size (as ``segcal predict`` batches them); :func:`folder_groups` gives those batches from the
image headers only, so that ranks under ``torchrun`` can take whole batches
(:mod:`segcal.pipeline.fit_model`); :func:`batch_preprocess` applies a registered model's
per-image preprocessing to a batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from segcal.datasets import (
    SegItem,
    image_folder,
    image_size,
    load_image,
    load_label,
    resolve_images,
)
from segcal.errors import InputError

__all__ = ["batch_preprocess", "folder_groups", "folder_items", "folder_loader"]


def folder_items(images: str | os.PathLike, labels: str | os.PathLike | None = None, *,
                 data_root: str | os.PathLike | None = None) -> list[SegItem]:
    """Image/label pairs of an image folder or a dataset alias (``camvid:val``), sorted by stem,
    as ``segcal predict --images`` resolves them; labels are required (the alias's by default)."""
    img_dir, alias_labels = resolve_images(images, data_root)
    labels = labels if labels is not None else alias_labels
    if labels is None:
        raise InputError(f"--labels: fitting needs the label folder of {os.fspath(images)} (only a dataset "
                         "alias such as camvid:val brings its own)")
    return image_folder(img_dir, labels, strict=True)


def folder_groups(items: Sequence[SegItem], batch_size: int = 4) -> list[list[SegItem]]:
    """The batches :func:`folder_loader` forms from ``items``, from the image headers only:
    runs of consecutive images of one size, cut into pieces of up to ``batch_size``.

    ``folder_loader`` over the concatenation of any contiguous run of these groups forms exactly
    those groups again (its grouping restarts at each group's first image), so ranks that take
    ``shard(folder_groups(items, b), rank, size)`` see the single-process batches.

    Raises
    ------
    InputError
        A bad ``batch_size``, or an image whose header cannot be read (naming the file).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size: expected >= 1, got {batch_size}")
    groups: list[list[SegItem]] = []
    last: tuple[int, int] | None = None
    for it in items:
        size = image_size(it.image_path)
        if groups and size == last and len(groups[-1]) < batch_size:
            groups[-1].append(it)
        else:
            groups.append([it])
        last = size
    return groups


def folder_loader(items: Sequence[SegItem], preprocess: Callable[[np.ndarray], torch.Tensor], *,
                  batch_size: int = 4) -> Callable[[], Iterator[dict[str, Any]]]:
    """A re-iterable loader over image/label files: mappings ``{"image": uint8 (n, H, W, 3),
    "labels", "stem"}`` of up to ``batch_size`` consecutive images of one size (as
    ``segcal predict`` batches them). ``preprocess`` is a registered model's per-image function
    (``(H, W, 3) uint8 -> (1, 3, H, W)``); pass :func:`batch_preprocess` of it to
    :func:`fit_from_model`."""
    if batch_size < 1:
        raise InputError(f"--batch-size: expected >= 1, got {batch_size}")

    def batches() -> Iterator[dict[str, Any]]:
        group: list[tuple[str, np.ndarray, np.ndarray]] = []

        def emit() -> dict[str, Any]:
            out = {"image": np.stack([g[1] for g in group]),
                   "labels": torch.from_numpy(np.stack([g[2] for g in group]).astype(np.int64)),
                   "stem": [g[0] for g in group]}
            group.clear()
            return out

        for it in items:
            img = load_image(it.image_path)
            lab = load_label(it.label_path, expected_hw=img.shape[:2]) if it.label_path else None
            if lab is None:
                raise InputError(f"--labels: no label map for image {it.image_path}")
            if group and (group[0][1].shape != img.shape or len(group) >= batch_size):
                yield emit()
            group.append((it.stem, img, lab))
        if group:
            yield emit()

    return batches


def batch_preprocess(preprocess: Callable[[np.ndarray], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A per-image ``preprocess`` (``(H, W, 3) uint8 -> (1, 3, H, W)``, the model registry's) applied
    to a uint8 ``(N, H, W, 3)`` batch."""

    def run(images: torch.Tensor) -> torch.Tensor:
        arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return torch.cat([preprocess(im) for im in arr], 0)

    return run
