"""Fit a calibrator with the model in the loop: no logits written to disk (issues 17 and 19).

:func:`fit_from_model` runs any ``nn.Module`` (eval mode, no gradients) over a loader of
``(image, label)`` batches and hands the logits, brought to the label's size, to
:meth:`segcal.calibrators.Calibrator.fit` as a re-iterable stream (a callable returning an
iterator): the memory budget of today's fit applies (valid pixels gathered in memory up to
``memory_budget``; above it the model is run again at every pass over the data).

``perturb`` adds perturbation-augmented fitting (Tomani et al., CVPR 2021, "Post-hoc uncertainty
calibration for domain drift scenarios"): every image is seen clean and under ImageNet-C
corruptions of :mod:`segcal.shift` (:func:`parse_perturb` reads the spec, the one parser the
command line uses too). The corruption of an image is the one ``segcal predict --corruption NAME
--severity S --seed SEED`` applies to it (:class:`segcal.shift.CorruptionTransform`, seeded by
``(seed, stem)``), so a prediction folder of perturbed images gives the same fit.

:func:`evaluate_model` measures a model (and a calibrator) on a loader with
:class:`segcal.metrics.CalibrationMetrics`; :func:`folder_loader` is the loader ``segcal fit
--model`` builds from an image folder (or a dataset alias) and its labels (it and the other image
folder helpers live in :mod:`segcal.pipeline.image_batches` and are re-exported here).

On several processes (``torchrun``; docs/scaling.md): call :func:`fit_from_model` inside
:func:`segcal.calibrators.collective.sharded` with each rank's loader giving **its contiguous
block of the single-process batches** (rank 0's batches, then rank 1's, ...). Since a loader batch
decides the order of the perturbed copies (its clean images, then each perturbation slot) and
the model's input batch, shard whole batches, not images: :func:`folder_groups` gives the
batches :func:`folder_loader` forms (from the image headers only), and ``segcal fit --model``
passes each rank ``shard(folder_groups(items, batch_size), rank, size)``. Then every rank runs the
model on its own images only and the fit equals the single-process fit (the batches seen, their
order and the model's inputs are the same). :func:`evaluate_model` with ``distributed=True``
synchronises its metrics (:meth:`~segcal.metrics.CalibrationMetrics.sync`) the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from segcal.calibrators import Calibrator, create
from segcal.errors import InputError
from segcal.io.files import to_jsonable
from segcal.metrics import CalibrationMetrics
from segcal.models.calibrated import model_logits, resize_logits
from segcal.pipeline.distributed import agree
from segcal.pipeline.image_batches import (
    batch_preprocess,
    folder_groups,
    folder_items,
    folder_loader,
)
from segcal.shift import SEVERITIES, CorruptionTransform, available_corruptions, derive_seed

__all__ = ["PerturbSpec", "batch_preprocess", "evaluate_model", "fit_from_model", "folder_groups",
           "folder_items", "folder_loader", "model_batches", "parse_perturb"]

#: keys of a mapping batch: the image, the labels, the valid mask, the image ids
IMAGE_KEYS = ("image", "images", "pixel_values", "x")
LABEL_KEYS = ("labels", "label", "target")
STEM_KEYS = ("stem", "stems", "name", "names")


@dataclass(frozen=True)
class PerturbSpec:
    """Which perturbed copies of each image a fit sees (made by :func:`parse_perturb`).

    Attributes
    ----------
    perturbations
        ``(corruption, severity)`` pairs of :mod:`segcal.shift`, in the order given.
    sample
        ``None``: every image is seen clean and under every pair (``1 + len(perturbations)``
        copies). ``k``: clean and under ``k`` pairs drawn without replacement per image, seeded by
        ``derive_seed(seed, "perturb-sample:" + stem)`` (the same pairs on every pass and in every
        process).
    seed
        Seed of the corruptions (each image's noise: ``derive_seed(seed, stem)``, as
        ``segcal predict --seed``) and of the sampling.
    """

    perturbations: tuple[tuple[str, int], ...]
    sample: int | None = None
    seed: int = 0

    @property
    def copies(self) -> int:
        """How many times each image is seen (clean included)."""
        return 1 + (len(self.perturbations) if self.sample is None else self.sample)

    def for_image(self, stem: str) -> list[tuple[str, int]]:
        """The perturbations of one image, in the order they are fed."""
        if self.sample is None:
            return list(self.perturbations)
        rng = np.random.default_rng(derive_seed(self.seed, f"perturb-sample:{stem}"))
        idx = np.sort(rng.choice(len(self.perturbations), size=self.sample, replace=False))
        return [self.perturbations[i] for i in idx]

    def describe(self) -> dict[str, Any]:
        """The spec as plain values (recorded in the calibrator's ``fit_info``)."""
        return {"perturbations": [f"{n}:{s}" for n, s in self.perturbations],
                "sampling": "all" if self.sample is None else f"{self.sample} per image",
                "seed": self.seed, "copies_per_image": self.copies,
                "per_image_seed": "SeedSequence([seed, crc32(stem)])"}


def _severities(text: str, item: str, name: str) -> list[int]:
    lo, sep, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        a = b = 0
    if not (1 <= a <= b <= 5):
        raise InputError(f"{name}: {item!r}: expected a severity 1..5 or a range such as 1-5 after ':'")
    return list(range(a, b + 1))


def parse_perturb(spec: Any, *, sample: int | None = None, seed: int = 0,
                  name: str = "perturb") -> PerturbSpec | None:
    """Read a perturbation spec (the one parser of the library and of ``segcal fit --perturb``).

    Parameters
    ----------
    spec
        ``None`` (no perturbation), a :class:`PerturbSpec` (returned as it is), a string of
        comma-separated items ``NAME:S`` (one severity), ``NAME:A-B`` (severities A..B) or ``NAME``
        (severities 1-5), where ``NAME`` is a corruption of :func:`segcal.shift.available_corruptions`
        or ``all`` (every corruption) -- e.g. ``"gaussian_noise:1-5,contrast:3"`` -- or a sequence of
        such strings and ``(name, severity)`` pairs.
    sample
        ``None``: every perturbation of every image; ``k``: ``k`` drawn per image
        (see :class:`PerturbSpec`), ``1 <= k <= `` the number of perturbations.
    seed
        Seed of the corruptions and of the sampling (a non-negative integer).
    name
        How the caller spells the argument in messages (``"--perturb"`` for the command line).

    Raises
    ------
    InputError
        An unknown corruption, a severity outside 1..5, an empty or repeated item, a bad
        ``sample`` or ``seed``; the message names the argument.
    """
    if spec is None:
        if sample is not None:
            raise InputError(f"{name}: a sample size was given without perturbations")
        return None
    if isinstance(spec, PerturbSpec):
        return spec
    known = available_corruptions()
    items: list[Any] = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    pairs: list[tuple[str, int]] = []
    for item in items:
        if isinstance(item, str):
            text = item.strip()
            corr, sep, sev = text.partition(":")
            corr = corr.strip()
            sevs = _severities(sev.strip(), text, name) if sep else list(SEVERITIES)
        elif isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str):
            corr, text = item[0], f"{item[0]}:{item[1]}"
            if isinstance(item[1], bool) or not isinstance(item[1], int | np.integer) or not 1 <= item[1] <= 5:
                raise InputError(f"{name}: {item!r}: expected a severity 1..5, got {item[1]!r}")
            sevs = [int(item[1])]
        else:
            raise InputError(f"{name}: expected 'name:severity' strings or (name, severity) pairs, "
                             f"got {item!r}")
        if not corr:
            raise InputError(f"{name}: empty item in {spec!r}; expected e.g. 'gaussian_noise:1-5,contrast:3'")
        names = known if corr == "all" else [corr]
        if corr != "all" and corr not in known:
            raise InputError(f"{name}: unknown corruption {corr!r}; available: {', '.join(known)} (or all)")
        for c in names:
            for s in sevs:
                if (c, s) in pairs:
                    raise InputError(f"{name}: {c}:{s} is listed twice in {spec!r}")
                pairs.append((c, s))
    if not pairs:
        raise InputError(f"{name}: no perturbation in {spec!r}; expected e.g. 'gaussian_noise:1-5,contrast:3'")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"{name}: the seed must be a non-negative integer, got {seed!r}")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int | np.integer)
                               or not 1 <= sample <= len(pairs)):
        raise InputError(f"{name}: the sample size must be an integer in 1..{len(pairs)} (the number of "
                         f"perturbations), got {sample!r}")
    return PerturbSpec(tuple(pairs), None if sample is None else int(sample), int(seed))


# ----------------------------------------------------------------------------- the loader's batches
def _pick(item: Mapping[str, Any], keys: tuple[str, ...], what: str, required: bool = True) -> Any:
    for k in keys:
        if k in item:
            return item[k]
    if required:
        raise InputError(f"loader: a batch mapping needs {what} under one of {list(keys)}; got keys "
                         f"{sorted(map(str, item))}")
    return None


def _unpack(item: Any) -> tuple[Any, Any, Any, list[str] | None]:
    """``(images, labels, mask or None, stems or None)`` of one loader batch."""
    if isinstance(item, Mapping):
        stems = _pick(item, STEM_KEYS, "", required=False)
        if isinstance(stems, str):
            stems = [stems]
        return (_pick(item, IMAGE_KEYS, "the images"), _pick(item, LABEL_KEYS, "the labels"),
                item.get("mask"), None if stems is None else [str(s) for s in stems])
    if isinstance(item, list | tuple) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None, None
    raise InputError("loader: each batch must be (images, labels), (images, labels, mask) or a "
                     f"mapping with 'image'/'pixel_values' and 'labels'; got {type(item).__name__}")


def _as_images(images: Any) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise InputError(f"loader: images must be a tensor or an array, got {type(images).__name__}")
    return t


def _to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1]; float input as it is."""
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"loader: uint8 images must be (N, H, W, 3) RGB, got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return images


def _perturbed(images: torch.Tensor, pert: list[tuple[str, int]], stems: list[str], seed: int) -> torch.Tensor:
    """Each image under its own ``(name, severity)``, in the images' layout and dtype."""
    raw = images.dtype == torch.uint8
    if raw:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"perturb: uint8 images must be (N, H, W, 3) RGB, got {tuple(images.shape)}")
        hwc = images.cpu().numpy()
    else:
        if images.ndim != 4 or images.shape[1] != 3 or not torch.is_floating_point(images):
            raise InputError("perturb: the corruptions work on RGB images: the loader must yield uint8 "
                             f"(N, H, W, 3) or float (N, 3, H, W) in [0, 1]; got {images.dtype} "
                             f"{tuple(images.shape)} (normalise in preprocess=, not in the loader)")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise InputError(f"perturb: float images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                             "normalise in preprocess=, not in the loader")
        hwc = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.stack([CorruptionTransform(n, s, seed)(np.ascontiguousarray(im), st)
                    for im, (n, s), st in zip(hwc, pert, stems, strict=True)])
    t = torch.from_numpy(out)
    if raw:
        return t.to(images.device)
    return (t.permute(0, 3, 1, 2).to(torch.float32) / 255.0).to(images.device, images.dtype)


def _iterate(loader: Any) -> Iterable[Any]:
    if callable(loader) and not isinstance(loader, Iterable):
        return loader()
    return loader


def model_batches(
    model: nn.Module,
    loader: Any,
    *,
    device: str | torch.device = "cpu",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    perturb: PerturbSpec | None = None,
    input_type: str = "logits",
    with_image: bool = False,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """The batches ``{"scores", "labels"[, "mask"][, "image"]}`` that :func:`fit_from_model` feeds.

    One batch per image (as a prediction folder gives them to ``fit``). For every loader batch:
    its clean images first, then (with ``perturb``) its images under each perturbation slot ``j``
    (image ``i`` under the ``j``-th pair of its :meth:`PerturbSpec.for_image`).
    Scores are the model's logits brought to the labels' spatial size (:func:`resize_logits`),
    float32 on the CPU (``softmax`` of them for ``input_type="probs"``); ``image`` (``with_image``)
    is the model's input, as :class:`segcal.CalibratedModel` gives it to an image branch.
    """
    dev = torch.device(device)
    index = 0
    bar = tqdm(desc="model batches", unit="batch", leave=False, disable=not progress)
    try:
        for item in _iterate(loader):
            images, labels, mask, stems = _unpack(item)
            images = _as_images(images)
            n = int(images.shape[0])
            if stems is None:
                stems = [str(i) for i in range(index, index + n)]
            elif len(stems) != n:
                raise InputError(f"loader: {len(stems)} stems for a batch of {n} images")
            index += n
            labels = torch.as_tensor(np.asarray(labels)) if isinstance(labels, np.ndarray) else labels
            labels = labels.cpu() if isinstance(labels, torch.Tensor) else labels
            if isinstance(mask, torch.Tensor):
                mask = mask.cpu()
            slots: list[list[tuple[str, int]] | None] = [None]
            if perturb is not None:
                per = [perturb.for_image(s) for s in stems]
                slots += [[p[j] for p in per] for j in range(perturb.copies - 1)]
            for pert in slots:
                imgs = images if pert is None else _perturbed(images, pert, stems, perturb.seed)  # type: ignore[union-attr]
                x = _to_model_input(imgs) if preprocess is None else preprocess(imgs)
                x = x.to(dev)
                with torch.no_grad():
                    logits = model_logits(model(x))
                if logits.ndim < 3 or logits.shape[0] != n:
                    raise InputError(f"model output: expected (N={n}, C, *spatial) logits, got "
                                     f"{tuple(logits.shape)}")
                size = tuple(labels.shape[1:]) if hasattr(labels, "shape") else tuple(logits.shape[2:])
                scores = resize_logits(logits, size).cpu()
                if input_type == "probs":
                    scores = scores.softmax(1)
                image = x.detach().to(torch.float32).cpu() if with_image else None
                for i in range(n):  # one batch per image, as a prediction folder gives them
                    batch: dict[str, Any] = {"scores": scores[i : i + 1], "labels": labels[i : i + 1]}
                    if mask is not None:
                        batch["mask"] = mask[i : i + 1]
                    if image is not None:
                        batch["image"] = image[i : i + 1]
                    yield batch
            bar.update(1)
    finally:
        bar.close()


class _Stream:
    """A re-iterable source of model batches (a fresh pass per call), or a one-pass generator."""

    def __init__(self, loader: Any, model: nn.Module, kw: dict[str, Any]) -> None:
        self.loader, self.model, self.kw = loader, model, kw

    def reiterable(self) -> bool:
        # a generator / iterator is read once; a DataLoader, a list or a callable gives a fresh pass
        return not isinstance(self.loader, Iterator)

    def __call__(self) -> Iterator[dict[str, Any]]:
        return model_batches(self.model, self.loader, **self.kw)

    def source(self) -> Any:
        return self if self.reiterable() else self()


def fit_from_model(
    model: nn.Module,
    loader: Any,
    method: str = "ts",
    *,
    calibrator: Calibrator | None = None,
    val_loader: Any = None,
    device: str | torch.device = "cpu",
    ignore_index: int | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    perturb: Any = None,
    perturb_sample: int | None = None,
    perturb_seed: int = 0,
    progress: bool = False,
    **calibrator_kwargs: Any,
) -> Calibrator:
    """Fit a calibrator on a model's outputs over a loader, without writing logits to disk.

    Parameters
    ----------
    model
        Any ``nn.Module``: ``x (N, C_in, *spatial) -> logits (N, C, *spatial')``, a tensor or an
        output with ``"logits"`` / ``"out"`` / ``.logits`` (:func:`segcal.models.calibrated.model_logits`).
        It runs in eval mode under ``torch.no_grad()`` (its mode is restored afterwards); logits at
        another resolution than the labels are resized to the labels' size (bilinear / trilinear,
        ``align_corners=False``, as :class:`segcal.CalibratedModel` does at apply time).
    loader
        Batches ``(images, labels)``, ``(images, labels, mask)`` or mappings with the images under
        ``"image"``/``"images"``/``"pixel_values"``/``"x"``, labels under ``"labels"``/``"label"``/
        ``"target"``, optionally ``"mask"`` (True = pixel counts) and the image ids under
        ``"stem"``/``"name"`` (seeds of the perturbations; default: the running image index, so
        do not shuffle). A re-iterable loader (a ``DataLoader``, a list, or a callable returning an
        iterator) can be streamed when the gathered pixels exceed ``memory_budget`` (the model
        then runs at every pass); a one-shot generator cannot.
        Images are float ``(N, C_in, *spatial)`` tensors given to the model as they are, or uint8
        ``(N, H, W, 3)`` RGB (divided by 255 to ``(N, 3, H, W)``), unless ``preprocess`` is given.
    method
        Calibrator name or alias (:func:`segcal.calibrators.create`); ignored with ``calibrator``.
    calibrator
        An unfitted (or to-be-refitted) calibrator instance to fit instead of ``create(method)``.
    val_loader
        Validation batches (the same forms) for early stopping / the best iterate; perturbed like
        ``loader`` when ``perturb`` is given.
    device
        Where the model runs (move the model there yourself); the calibrator's device is its own
        (``device=`` among ``calibrator_kwargs``).
    ignore_index
        Label value excluded from the fit.
    preprocess
        ``preprocess(images) -> x``, applied to every batch (clean and perturbed) before the model,
        e.g. the normalisation; with ``perturb`` the loader must yield RGB images (uint8
        ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in [0, 1]) and the normalisation belongs here.
    perturb, perturb_sample, perturb_seed
        Perturbation-augmented fitting (Tomani et al. 2021): the spec, sample size and seed read by
        :func:`parse_perturb`, e.g. ``"gaussian_noise:1-5,contrast:3"``. Every image is seen clean
        and under every listed perturbation (``perturb_sample=None``) or under ``k`` of them drawn
        per image; the corruption of image ``stem`` is ``CorruptionTransform(name, severity,
        perturb_seed)(image, stem)``, as ``segcal predict --corruption`` makes it. Float images are
        quantised to 8 bits for the corruption (ImageNet-C works on 8-bit images); clean images are
        used as they are.
    progress
        Progress bars (the batches, then the optimiser steps of :meth:`Calibrator.fit`).
    **calibrator_kwargs
        Constructor arguments of the calibrator (``create(method, **calibrator_kwargs)``: fit
        settings such as ``memory_budget``, ``max_iter``, ``seed``, ``input_type``).

    Returns
    -------
    Calibrator
        The fitted calibrator; ``fit_info["fit_from_model"]`` records the images seen and the
        perturbation spec.

    Raises
    ------
    InputError
        A bad perturbation spec (naming ``perturb``), a batch of an unknown form, a model output
        that is not ``(N, C, *spatial)``, images the corruptions cannot take.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if calibrator is not None and calibrator_kwargs:
        raise InputError(f"calibrator_kwargs: {sorted(calibrator_kwargs)} given together with calibrator=; "
                         "build the calibrator with them instead")
    spec = parse_perturb(perturb, sample=perturb_sample, seed=perturb_seed, name="perturb")
    cal = calibrator if calibrator is not None else create(method, **calibrator_kwargs)
    kw = dict(device=device, preprocess=preprocess, perturb=spec, input_type=cal.input_type,
              with_image=cal.uses_image, progress=progress)
    was_training = model.training
    model.eval()
    try:
        train = _Stream(loader, model, kw)
        val = None if val_loader is None else _Stream(val_loader, model, {**kw, "progress": False}).source()
        cal.fit(train.source(), ignore_index=ignore_index, val=val, progress=progress)
    finally:
        model.train(was_training)
    cal.fit_info["fit_from_model"] = to_jsonable({
        "model": type(model).__name__, "perturb": None if spec is None else spec.describe(),
        "copies_per_image": 1 if spec is None else spec.copies,
    })
    return cal


def evaluate_model(
    model: nn.Module,
    loader: Any,
    calibrator: Calibrator | None = None,
    *,
    num_classes: int | None = None,
    n_bins: int = 15,
    ignore_index: int | None = None,
    device: str | torch.device = "cpu",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    distributed: bool = False,
) -> tuple[CalibrationMetrics, CalibrationMetrics | None]:
    """Calibration metrics of a model over a loader (clean images), before and after ``calibrator``.

    The loader, ``preprocess`` and the resizing are those of :func:`fit_from_model`. Returns
    ``(before, after)``: :class:`~segcal.metrics.CalibrationMetrics` of the model's logits and of
    the calibrated logits (``None`` without a calibrator).

    ``distributed=True`` (an initialised process group; every rank calls it with its contiguous
    block of the batches, in rank order): the states are synchronised
    (:meth:`~segcal.metrics.CalibrationMetrics.sync`), so every rank returns the metrics of all
    images, per-image rows in the single-process order. A rank may have no batch; a rank that
    fails stops every rank (:func:`segcal.pipeline.distributed.agree`).
    """
    before = after = None
    was_training = model.training
    dev = torch.device(device)
    state_device = dev if distributed and dev.type == "cuda" else None  # NCCL reduces on the GPU

    def metrics(c: int) -> tuple[CalibrationMetrics, CalibrationMetrics | None]:
        kw: dict[str, Any] = dict(n_bins=n_bins, ignore_index=ignore_index, device=state_device)
        return (CalibrationMetrics(c, **kw),
                None if calibrator is None else CalibrationMetrics(c, **kw))

    if num_classes is not None:
        before, after = metrics(int(num_classes))
    failure: BaseException | None = None
    n_batches = 0
    model.eval()
    try:
        for b in model_batches(model, loader, device=device, preprocess=preprocess,
                               with_image=calibrator is not None and calibrator.uses_image):
            n_batches += 1
            if before is None:
                before, after = metrics(int(b["scores"].shape[1]))
            before.update(b["scores"], b["labels"], b.get("mask"))
            if calibrator is not None and after is not None:
                scores = b["scores"].softmax(1) if calibrator.input_type == "probs" else b["scores"]
                with torch.no_grad():
                    out = calibrator(scores, image=b.get("image"))
                after.update(out, b["labels"], b.get("mask"))
    except Exception as exc:
        if not distributed:
            raise
        failure = exc  # shared with every rank by agree() below, then raised
    finally:
        model.train(was_training)
    if distributed:
        infos = agree(failure, (n_batches, None if before is None else before.num_classes))
        n_batches = sum(i[0] for i in infos)
        seen = [i[1] for i in infos if i[1] is not None]
        if before is None and seen:  # this rank had no batch: the others' class count
            before, after = metrics(int(seen[0]))
        if n_batches and before is not None:
            before.sync()
            if after is not None:
                after.sync()
    if before is None or n_batches == 0:  # on every rank alike
        raise InputError("loader: no batch to evaluate")
    return before, after
