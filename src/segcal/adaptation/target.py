"""The unlabeled target images of an adaptation run: listing, subsetting, loading, batching.

No target label is ever read: target images come from a list of paths, an image folder, or a
dataset alias such as ``camvid:train`` of which only the image folder is resolved.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from segcal.datasets import IMAGE_SUFFIXES, is_alias, resolve_images
from segcal.datasets.folders import list_files, load_image
from segcal.errors import InputError

__all__ = ["TargetImages", "batches", "load_target_images", "quick_subset", "resolve_target_images", "stack"]

T = TypeVar("T")


def resolve_target_images(
    target: str | os.PathLike | Sequence[str | os.PathLike], data_root: str | os.PathLike | None = None
) -> list[Path]:
    """Image paths of the target set: a list of paths, an image folder, or an alias (``camvid:train``).

    Only image folders are listed; for an alias the split's *label* folder is never opened.
    """
    if isinstance(target, list | tuple):
        paths = [Path(p) for p in target]
        what = "the given list"
    else:
        folder = resolve_images(target, data_root)[0] if is_alias(target) else Path(target).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"target: {folder} does not exist (an image folder or an alias like camvid:train)")
        if not folder.is_dir():
            raise NotADirectoryError(f"target: {folder} is not a folder of images")
        paths = list(list_files(folder, IMAGE_SUFFIXES, "target").values())
        what = str(folder)
    if not paths:
        raise InputError(f"target: no images in {what} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return paths


def quick_subset(items: list[T], n: int) -> list[T]:
    """``n`` items spread evenly over ``items`` (first and last included); all of them if fewer."""
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


class TargetImages:
    """The (transformed) target images as uint8; ``[i]`` gives the preprocessed ``(1, 3, H, W)``."""

    def __init__(self, raw: list[np.ndarray], preprocess: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.raw, self.preprocess = raw, preprocess

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(self.raw[i])


def load_target_images(
    target_images: Any,
    preprocess: Callable[[np.ndarray], torch.Tensor],
    *,
    max_images: int | None = None,
    transform: Callable[[np.ndarray, str], np.ndarray] | None = None,
    data_root: str | os.PathLike | None = None,
) -> tuple[list[str], TargetImages]:
    """``(stems, images)`` of the target set (images only; never a label).

    Parameters
    ----------
    target_images
        Image paths, an image folder, an alias (``camvid:train``), or a list of ``H x W x 3``
        uint8 arrays (stems ``img00000``, ...).
    preprocess
        uint8 image -> ``(1, 3, H, W)`` model input, applied per batch.
    max_images
        Keep at most this many, spread evenly (:func:`quick_subset`).
    transform
        ``transform(image_uint8, stem) -> image_uint8`` applied on load (a corruption).
    """
    if isinstance(target_images, list | tuple) and target_images and isinstance(target_images[0], np.ndarray):
        stems = [f"img{i:05d}" for i in range(len(target_images))]
        raw = [np.asarray(a) for a in target_images]
        if max_images:
            keep = quick_subset(list(range(len(raw))), max_images)
            stems, raw = [stems[i] for i in keep], [raw[i] for i in keep]
    else:
        paths = resolve_target_images(target_images, data_root)
        if max_images:
            paths = quick_subset(paths, max_images)
        stems = [p.stem for p in paths]
        raw = [load_image(p) for p in paths]
    if transform is not None:
        raw = [np.asarray(transform(a, s), dtype=np.uint8) for a, s in zip(raw, stems, strict=True)]
    return stems, TargetImages(raw, preprocess)  # uint8 kept in memory, preprocessed per batch


def batches(idx: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive chunks of ``idx`` of at most ``size``."""
    for i in range(0, len(idx), size):
        yield list(idx[i : i + size])


def stack(inputs: TargetImages, idx: Sequence[int], device: torch.device) -> torch.Tensor:
    """The preprocessed images ``idx`` as one ``(B, 3, H, W)`` batch on ``device``."""
    return torch.cat([inputs[i] for i in idx], 0).to(device)
