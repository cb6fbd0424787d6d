"""THE fitting loop of segcal: every calibrator is fitted by :func:`minimize` on a :class:`FitData`.

Data
----
:func:`prepare_data` turns what the user passes to ``fit`` into a :class:`FitData`:

* an in-memory tensor / array ``(N, C, *spatial)`` or ``(M, C)`` with labels (and a mask);
* an iterable of batches ``(scores, labels)`` / ``(scores, labels, mask)`` (a list, or a callable
  returning a fresh iterator, is re-iterable; a generator can be read once);
* a :class:`segcal.io.PredictionFolder` (the format of ``segcal eval``) or :class:`FolderBatches`.

Calibrators with an image branch (LTS / IBTS with ``use_image=True``) also need the input image of
every logit map: ``images=`` ``(N, C_img, *spatial)`` for in-memory input, an ``"image"`` entry in
every streamed batch (a mapping ``{"scores", "labels", "mask", "image"}``), or an image folder
(``FolderBatches(folder, images=DIR)``, stems matching the predictions). Images travel with their
logit map through the loop (``_Batch.image``); a missing image or one of the wrong shape is an
error, never silently dropped.

For pointwise calibrators the valid pixels (label not ``ignore_index``, mask True) are gathered to
``(P, C)`` rows and ``(P,)`` labels, kept in the input's float dtype (float16 stays float16: half
the memory) and up-cast to float32 chunk by chunk. If the gathered rows fit ``memory_budget``
bytes the data stay in memory; otherwise the source is re-read at every pass (streaming; needs a
re-iterable source). Spatial calibrators (``Calibrator.spatial``) get whole images instead.

Optimisation
------------
* ``optimizer="auto"``: full-batch L-BFGS (strong-Wolfe line search) when the data are in memory,
  mini-batch Adam over streamed batches otherwise. ``"lbfgs"`` on streamed data evaluates the exact
  full-batch objective by streaming (bounded memory, one read of the data per evaluation);
  ``"adam"`` on in-memory data takes mini-batches of ``batch_size`` pixels.
* Full-batch objectives are evaluated chunk by chunk (``chunk_size`` rows) with a backward pass per
  chunk, so memory is bounded by one chunk's autograd graph; non-linear objectives (soft Dice,
  differentiable ECE) are handled exactly through their additive statistics (see
  :mod:`segcal.calibrators.objectives`).
* Early stopping on the validation NLL (``patience`` evaluations without an improvement larger
  than ``min_delta``), ``ReduceLROnPlateau`` (Adam, ``lr_patience``), and the iterate with the best
  monitored value (validation NLL, else training loss) is restored at the end. With
  ``monitor="objective"`` the validation split is scored by the fitting objective instead.
* Seeded (``seed``): the order of batches and the optional pixel subsampling are drawn from a
  ``torch.Generator``. Subsampling (``subsample``: fraction of valid pixels kept per batch) is never
  done implicitly; it is recorded in the calibrator's config.
* Spatial calibrators take Adam steps on groups of ``batch_size`` whole images (the mean loss over
  their valid pixels; accumulated image by image for linear objectives).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segcal.validation import (
    check_finite,
    check_label_range,
    check_labels,
    check_mask,
    check_probabilities,
    check_scores,
)
from segcal.io.predictions import PredictionFolder

__all__ = ["FitData", "FolderBatches", "check_image", "minimize", "prepare_data"]


class FolderBatches:
    """Re-iterable ``(scores[None], labels[None], None, input_type[, image[None]])`` batches from
    (a subset of) a folder.

    Parameters
    ----------
    folder
        A :class:`~segcal.io.PredictionFolder` with labels.
    stems
        The image ids to use (default: all), in this order.
    images
        Optional folder of input images (``.png``/``.jpg``/``.jpeg``, or ``.npy`` arrays
        ``(C_img, *spatial)`` used as they are) whose stems match the predictions, for calibrators
        with an image branch; RGB files are read by :func:`segcal.datasets.folders.load_image_tensor`.
        Every used stem needs an image (a ``ValueError`` lists the missing ones).
    """

    def __init__(self, folder: PredictionFolder, stems: Iterable[str] | None = None,
                 images: str | os.PathLike | None = None) -> None:
        self.folder = folder
        by_stem = {it.stem: it for it in folder.items}
        if stems is None:
            self.items = list(folder.items)
        else:
            missing = [s for s in stems if s not in by_stem]
            if missing:
                raise ValueError(f"stems not in {folder.pred_dir}: {missing[:5]}")
            self.items = [by_stem[s] for s in stems]
        if any(it.label_path is None for it in self.items):
            raise ValueError("labels: fitting from a prediction folder needs a label folder")
        self.image_dir = None if images is None else os.fspath(images)
        self.image_paths: dict[str, Any] = {}
        if images is not None:
            from segcal.datasets.folders import image_files
            from segcal.io.predictions import check_stems_match

            found = image_files(images)
            want = {it.stem for it in self.items}
            # extra images are fine (e.g. a whole dataset split for a subset of predictions)
            check_stems_match(want, set(found) & want,
                              f"images: file stems do not match ({folder.pred_dir} vs {images})",
                              "prediction(s) without an image", "")
            self.image_paths = {s: found[s] for s in want}

    def __len__(self) -> int:
        return len(self.items)

    def read_image(self, stem: str) -> np.ndarray:
        """The image of ``stem`` as ``(C_img, *spatial)`` float32 (requires ``images``)."""
        from segcal.datasets.folders import load_image_tensor

        return load_image_tensor(self.image_paths[stem])

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for it in self.items:
            scores, labels, itype = self.folder.read(it)
            if self.image_dir is None:
                yield scores[None], labels[None], None, itype
            else:
                yield scores[None], labels[None], None, itype, self.read_image(it.stem)[None]


@dataclass
class _Batch:
    """Prepared data of one batch: rows ``(P, C)`` + labels, or a whole image for spatial ones."""

    x: torch.Tensor  # (P, C) raw rows (input dtype) or (1, C, *spatial) image
    y: torch.Tensor  # (P,) or (1, *spatial) labels (int64)
    valid: torch.Tensor | None = None  # (1, *spatial) for spatial batches
    image: torch.Tensor | None = None  # (1, C_img, *spatial): input image (image-branch calibrators)
    pre: Any = None  # parameter-free features of the rows, cached by FitData.precompute

    @property
    def n(self) -> int:
        return int(self.y.shape[0]) if self.valid is None else int(self.valid.sum())

    @property
    def nbytes(self) -> int:
        extra = 0 if self.image is None else self.image.numel() * self.image.element_size()
        return self.x.numel() * self.x.element_size() + self.y.numel() * self.y.element_size() + extra


def _stack_images(group: list[_Batch]) -> _Batch:
    """Whole-image batches of equal spatial size -> one ``(n, C, *spatial)`` batch."""
    if len(group) == 1:
        return group[0]
    image = None if group[0].image is None else torch.cat([b.image for b in group], 0)  # type: ignore[misc]
    return _Batch(torch.cat([b.x for b in group], 0), torch.cat([b.y for b in group], 0),
                  torch.cat([b.valid for b in group], 0), image)  # type: ignore[misc]


def _group_step(stats_fn: Callable[[_Batch, Any], torch.Tensor], group: list[_Batch],
                objective: Any, regularizer: Callable[[], torch.Tensor | None]) -> float:
    """Loss and gradients of one mini-batch step (``backward`` done); returns the loss.

    A group of whole images is the mean loss over all their valid pixels. For linear objectives it
    is accumulated image by image (``Σ_i stats_i / n``; the same gradient as one stacked batch,
    with the memory of one image: stacking 4 CamVid images was slower than 4 single passes on
    CPU); other objectives stack images of equal size.
    """
    n = sum(b.n for b in group)
    if len(group) > 1 and objective.linear:
        total = 0.0
        for b in group:
            part = objective.finalize(stats_fn(b, objective), n)
            _check_finite_loss(part.detach(), "training loss")
            part.backward()
            total += float(part.detach())
        reg = regularizer()
        if reg is not None:
            reg.backward()
            total += float(reg.detach())
        return total
    if len(group) > 1 and any(b.x.shape[2:] != group[0].x.shape[2:] for b in group):
        raise ValueError("fit: a non-linear objective needs images of equal size within a step; "
                         "use batch_size=1")
    b = _stack_images(group)
    loss = objective.finalize(stats_fn(b, objective), b.n)
    reg = regularizer()
    if reg is not None:
        loss = loss + reg
    _check_finite_loss(loss.detach(), "training loss")
    loss.backward()
    return float(loss.detach())


@dataclass
class FitData:
    """Training or validation data for the fitting loop (in memory or streamed)."""

    num_classes: int
    n: int
    batches: list[_Batch] | None = None  # in memory
    stream: Callable[[], Iterator[_Batch]] | None = None  # streaming
    info: dict[str, Any] = field(default_factory=dict)
    cached: tuple[int, list[_Batch]] | None = None  # (chunk_size, chunks with .pre): see precompute

    @property
    def in_memory(self) -> bool:
        return self.batches is not None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.batches) if self.batches is not None else 0

    def precompute(self, chunk_size: int, fn: Callable[[_Batch], Any], budget: float) -> int:
        """Cache ``fn(chunk)`` (parameter-free features) on every full-batch chunk, within ``budget`` bytes.

        Only for in-memory data; the cached chunks are then what :meth:`iter_chunks` yields for
        ``chunk_size`` without shuffling (the full-batch evaluations of L-BFGS). ``fn`` returns a
        tuple of tensors and plain values, or None (nothing to cache). Returns the bytes cached
        (0 when nothing was cached: streamed data, no features, or over the budget).
        """
        self.cached = None
        if self.batches is None:
            return 0
        out: list[_Batch] = []
        used = 0
        for b in self.iter_chunks(chunk_size):
            pre = fn(b)
            if pre is None:
                return 0
            used += sum(t.numel() * t.element_size() for t in pre if isinstance(t, torch.Tensor))
            if used > budget:
                return 0
            out.append(_Batch(b.x, b.y, b.valid, b.image, pre))
        self.cached = (chunk_size, out)
        return used

    def iter_batches(self) -> Iterator[_Batch]:
        if self.batches is not None:
            yield from self.batches
        else:
            assert self.stream is not None
            yield from self.stream()

    def iter_chunks(self, chunk_size: int, gen: torch.Generator | None = None) -> Iterator[_Batch]:
        """Batches split into row chunks of at most ``chunk_size`` (shuffled when ``gen``)."""
        if gen is None and self.cached is not None and self.cached[0] == chunk_size:
            yield from self.cached[1]
            return
        batches: Iterable[_Batch]
        if gen is not None and self.batches is not None:
            order = torch.randperm(len(self.batches), generator=gen).tolist()
            batches = [self.batches[i] for i in order]
        else:
            batches = self.iter_batches()
        for b in batches:
            if b.valid is not None or b.n <= chunk_size:
                yield b
                continue
            if gen is not None:
                perm = torch.randperm(b.n, generator=gen)
                for s in range(0, b.n, chunk_size):
                    idx = perm[s : s + chunk_size]
                    yield _Batch(b.x[idx], b.y[idx])
            else:
                for s in range(0, b.n, chunk_size):
                    yield _Batch(b.x[s : s + chunk_size], b.y[s : s + chunk_size])

    def iter_steps(self, batch_size: int, gen: torch.Generator | None = None,
                   images: int | None = None) -> Iterator[list[_Batch]]:
        """The data of one optimisation step, as a list of batches: one chunk of ``batch_size``
        pixels (pointwise data, as :meth:`iter_chunks`) or up to ``images`` (default
        ``batch_size``) whole images (spatial data)."""
        per = batch_size if images is None else images
        group: list[_Batch] = []
        for b in self.iter_chunks(batch_size, gen):
            if b.valid is None or b.x.ndim == 2:
                yield [b]
                continue
            if len(group) >= per:
                yield group
                group = []
            group.append(b)
        if group:
            yield group


# ----------------------------------------------------------------------------- data preparation


def _is_array(x: Any) -> bool:
    return isinstance(x, torch.Tensor | np.ndarray)


def _normalise_source(data: Any, labels: Any, mask: Any, what: str,
                      images: Any = None) -> tuple[Callable[[], Iterator], bool]:
    """Return (factory of an iterator of batches (tuples or mappings, see :func:`_unpack`),
    reiterable)."""
    img_name = "images" if what == "logits" else f"{what} images"
    if isinstance(data, str | os.PathLike):
        if labels is None:
            raise ValueError(f"{what}: fitting from a prediction folder needs the label folder")
        data = PredictionFolder(data, labels)
        labels = None
    if isinstance(data, PredictionFolder):
        if images is not None and not isinstance(images, str | os.PathLike):
            raise ValueError(f"{img_name}: with a prediction folder, pass the image folder (a path)")
        data = FolderBatches(data, images=images)
        images = None
    if _is_array(data):
        if labels is None:
            raise ValueError(f"labels: required to fit (got None for {what})")
        if images is not None and not _is_array(images):
            raise ValueError(f"{img_name}: expected an (N, C_img, *spatial) tensor/array with "
                             f"in-memory {what}, got {type(images).__name__}")
        return (lambda: iter([(data, labels, mask, None, images)])), True
    if labels is not None or mask is not None:
        raise ValueError(
            f"labels/mask: pass them inside the batches when {what} is an iterable of batches"
        )
    if images is not None:
        raise ValueError(
            f"{img_name}: pass each image inside its batch (a mapping with an 'image' entry) when "
            f"{what} is an iterable of batches, or an image folder to FolderBatches"
        )
    if callable(data) and not isinstance(data, FolderBatches):
        return (lambda: iter(data())), True
    if isinstance(data, list | tuple | FolderBatches):
        return (lambda: iter(data)), True
    if isinstance(data, Iterable):
        return (lambda: iter(data)), False
    raise TypeError(
        f"{what}: expected a tensor/array, an iterable of (scores, labels[, mask]) batches, "
        f"a PredictionFolder or a folder path, got {type(data).__name__}"
    )


def _unpack(item: Any, what: str) -> tuple[Any, Any, Any, str | None, Any]:
    """``(scores, labels, mask, input_type, image)`` of one batch.

    A batch is ``(scores, labels)``, ``(scores, labels, mask)`` (internally also
    ``(..., input_type[, image])``) or a mapping with keys ``scores`` (or ``logits``), ``labels``
    and optionally ``mask``, ``image``, ``input_type``.
    """
    if isinstance(item, Mapping):
        unknown = set(item) - {"scores", "logits", "labels", "mask", "image", "input_type"}
        if unknown or ("scores" in item) == ("logits" in item) or "labels" not in item:
            raise TypeError(
                f"{what}: a batch mapping needs 'scores' (or 'logits') and 'labels', optionally "
                f"'mask', 'image', 'input_type'; got keys {sorted(item)}"
            )
        scores = item["scores"] if "scores" in item else item["logits"]
        return scores, item["labels"], item.get("mask"), item.get("input_type"), item.get("image")
    if not isinstance(item, list | tuple) or len(item) not in (2, 3, 4, 5):
        raise TypeError(f"{what}: each batch must be (scores, labels), (scores, labels, mask) or a "
                        "mapping {'scores', 'labels', 'mask', 'image'}")
    scores, labels = item[0], item[1]
    mask = item[2] if len(item) > 2 else None
    itype = item[3] if len(item) > 3 else None
    image = item[4] if len(item) > 4 else None
    return scores, labels, mask, itype, image


def check_image(image: Any, scores: torch.Tensor, image_channels: int, name: str) -> torch.Tensor:
    """Validate the input image of a logit map: ``(N, image_channels, *spatial)`` with the scores'
    ``N`` and spatial size, finite; returned as a float tensor (float16 kept, else float32)."""
    from segcal.validation import as_tensor

    img = as_tensor(image, name)
    want = (scores.shape[0], image_channels, *scores.shape[2:])
    if scores.ndim < 3:
        raise ValueError(f"{name}: the image branch needs images with spatial dimensions; the "
                         f"scores are an {tuple(scores.shape)} table")
    if tuple(img.shape) != want:
        raise ValueError(f"{name}: expected shape ({', '.join(map(str, want))}) (N, image_channels, "
                         f"*spatial of the logits), got {tuple(img.shape)}")
    if not torch.is_floating_point(img):
        img = img.to(torch.float32)
    elif img.dtype not in (torch.float16, torch.float32):
        img = img.to(torch.float32)
    check_finite(img, name)
    return img


def _prepare_batch(
    scores: Any,
    labels: Any,
    mask: Any,
    *,
    num_classes: int | None,
    input_type: str,
    ignore_index: int | None,
    spatial: bool,
    subsample: float | None,
    gen: torch.Generator,
    what: str,
    image: Any = None,
    image_channels: int | None = None,
) -> _Batch | None:
    s = check_scores(scores, what, num_classes=num_classes)
    img_name = "images" if what == "logits" else f"{what} images"
    img = None
    if image_channels is not None:
        if image is None:
            raise ValueError(
                f"{img_name}: this calibrator has an image branch (use_image=True) and needs the "
                "input image of every logit map: pass images= to fit (val_images= for val), an "
                "'image' entry in every batch, or an image folder"
            )
        img = check_image(image, s, int(image_channels), img_name)
    elif image is not None:
        raise ValueError(f"{img_name}: given, but this calibrator has no image branch "
                         "(build it with use_image=True to use images)")
    expected = (s.shape[0], *s.shape[2:])
    y = check_labels(labels, "labels" if what == "logits" else f"{what} labels", expected_shape=expected)
    valid = torch.ones(expected, dtype=torch.bool) if ignore_index is None else y != ignore_index
    if mask is not None:
        valid &= check_mask(mask, expected)
    c = s.shape[1]
    check_label_range(y, valid, c, "labels" if what == "logits" else f"{what} labels")
    store_dtype = s.dtype if s.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if spatial:
        check_finite(s, what)
        if input_type == "probs":
            check_probabilities(s, what, dim=1)
        ys = torch.where(valid, y, torch.zeros_like(y)).to(torch.int64)
        if s.ndim == 2:  # an (M, C) table has no spatial context: one batch of isolated pixels
            if not bool(valid.any()):
                return None
            return [_Batch(s.to(store_dtype), ys, valid)]  # type: ignore[return-value]
        out = []
        for i in range(s.shape[0]):
            if bool(valid[i].any()):
                out.append(_Batch(s[i : i + 1].to(store_dtype), ys[i : i + 1], valid[i : i + 1],
                                  None if img is None else img[i : i + 1]))
        return out  # type: ignore[return-value]
    if s.ndim == 2:
        rows = s[valid]
        yy = y[valid]
    else:
        rows = s.movedim(1, -1)[valid]
        yy = y[valid]
    if subsample is not None and rows.shape[0] > 0:
        k = max(1, round(rows.shape[0] * subsample))
        idx = torch.randperm(rows.shape[0], generator=gen)[:k].sort().values
        rows, yy = rows[idx], yy[idx]
    if rows.shape[0] == 0:
        return None
    rows = rows.to(store_dtype).contiguous()
    check_finite(rows, what)
    if input_type == "probs":
        check_probabilities(rows, what, dim=1)
    return [_Batch(rows, yy.to(torch.int64))]  # type: ignore[return-value]


def prepare_data(
    data: Any,
    labels: Any = None,
    mask: Any = None,
    *,
    input_type: str,
    ignore_index: int | None,
    num_classes: int | None,
    spatial: bool = False,
    memory_budget: float = 2 * 2**30,
    subsample: float | None = None,
    seed: int = 0,
    what: str = "logits",
    progress: bool = False,
    images: Any = None,
    image_channels: int | None = None,
) -> FitData:
    """Gather valid pixels from any supported source (see the module docstring).

    ``image_channels`` (calibrators with an image branch; requires ``spatial``) makes the input
    image of every logit map mandatory (``images`` or inside the batches); ``None`` rejects images.
    """
    if subsample is not None and not (0 < float(subsample) <= 1):
        raise ValueError(f"subsample: expected a fraction in (0, 1], got {subsample}")
    if image_channels is not None and not spatial:
        raise ValueError("image_channels: the image branch needs spatial (whole-image) data")
    factory, reiterable = _normalise_source(data, labels, mask, what, images)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    kw = dict(
        input_type=input_type,
        ignore_index=ignore_index,
        spatial=spatial,
        subsample=subsample,
        what=what,
        image_channels=image_channels,
    )

    def batches(nc: int | None, g: torch.Generator, bar: Any = None) -> Iterator[tuple[_Batch, int]]:
        for item in factory():
            sc, la, ma, itype, im = _unpack(item, what)
            if itype is not None and itype != input_type:
                raise ValueError(
                    f"{what}: the prediction folder holds {itype} but the calibrator has "
                    f"input_type={input_type!r}; pass input_type={itype!r}"
                )
            sc_shape_c = sc.shape[1] if hasattr(sc, "shape") and len(sc.shape) > 1 else None
            got = _prepare_batch(sc, la, ma, num_classes=nc, gen=g, image=im, **kw)  # type: ignore[arg-type]
            if bar is not None:
                bar.update(1)
            for b in got or []:
                yield b, int(sc_shape_c)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"reading {what}", unit="file", leave=False)
    kept: list[_Batch] | None = []
    nbytes = 0
    n = 0
    nc = num_classes
    n_batches = 0
    try:
        for b, c in batches(nc, gen, bar):
            nc = c if nc is None else nc
            n += b.n
            n_batches += 1
            if kept is not None:
                nbytes += b.nbytes
                if nbytes > memory_budget:
                    kept = None  # too large: stream instead (keep counting)
                else:
                    kept.append(b)
    finally:
        if bar is not None:
            bar.close()
    if n == 0 or nc is None:
        raise ValueError(
            f"{what}: no valid pixels to fit on (empty input, or every pixel is masked or equals "
            "ignore_index)"
        )
    info = {"n_pixels": n, "n_batches": n_batches, "nbytes": nbytes}
    if kept is not None:
        return FitData(nc, n, batches=kept, info={**info, "mode": "in-memory"})
    if not reiterable:
        raise ValueError(
            f"{what}: the data exceed memory_budget={memory_budget:.3g} bytes and the source can only "
            "be read once; pass a list of batches, a callable returning an iterator, or a "
            "PredictionFolder so that it can be streamed"
        )

    def stream() -> Iterator[_Batch]:
        g = torch.Generator().manual_seed(int(seed) + 7919)  # same subsample every pass
        for b, _ in batches(nc, g):
            yield b

    return FitData(nc, n, stream=stream, info={**info, "mode": "streaming"})


# ----------------------------------------------------------------------------- the loop


@dataclass
class FitSettings:
    optimizer: str = "auto"
    lr: float | None = None
    max_iter: int = 100
    max_steps: int = 500
    batch_size: int = 2**20
    chunk_size: int = 2**20
    patience: int | None = None
    lr_patience: int | None = None
    lr_factor: float = 0.1
    min_delta: float = 0.0
    eval_every: int = 10
    seed: int = 0
    tol: float = 1e-7
    weight_decay: float = 0.0  # AdamW only
    monitor: str = "nll"  # validation score: "nll" or "objective" (the fitting objective)
    images_per_step: int | None = None  # spatial data: whole images per Adam step (None: batch_size)


def _check_finite_loss(v: torch.Tensor | float, what: str) -> None:
    if not math.isfinite(float(v)):
        raise ValueError(f"fit: the {what} became non-finite (NaN/inf); check the inputs or lower lr")


def _evaluate(
    stats_fn: Callable[[_Batch, Any], torch.Tensor], data: FitData, objective: Any, chunk: int
) -> float:
    """Objective value on all the data, without gradients."""
    with torch.no_grad():
        total = None
        for b in data.iter_chunks(chunk):
            s = stats_fn(b, objective)
            total = s if total is None else total + s
        assert total is not None
        return float(objective.finalize(total, data.n))


def _value_and_grad(
    stats_fn: Callable[[_Batch, Any], torch.Tensor],
    params: list[torch.nn.Parameter],
    data: FitData,
    objective: Any,
    chunk: int,
    regularizer: Callable[[], torch.Tensor | None],
) -> torch.Tensor:
    """Exact full-batch objective + regulariser, gradients accumulated chunk by chunk."""
    for p in params:
        p.grad = None
    if objective.linear:
        total = 0.0
        for b in data.iter_chunks(chunk):
            s = stats_fn(b, objective) / data.n
            s.backward()
            total += float(s.detach())
        value = torch.tensor(total)
    else:
        with torch.no_grad():
            acc = None
            for b in data.iter_chunks(chunk):
                s = stats_fn(b, objective)
                acc = s if acc is None else acc + s
        assert acc is not None
        acc = acc.detach().requires_grad_(True)
        v = objective.finalize(acc, data.n)
        (g,) = torch.autograd.grad(v, acc)
        for b in data.iter_chunks(chunk):
            s = stats_fn(b, objective)
            if s.requires_grad:
                (s * g).sum().backward()
        value = v.detach()
    reg = regularizer()
    if reg is not None and reg.requires_grad:
        reg.backward()
        value = value + reg.detach()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif not bool(torch.isfinite(p.grad).all()):
            raise ValueError("fit: non-finite gradients; check the inputs or lower lr")
    _check_finite_loss(value, "training loss")
    return value


def minimize(
    params: list[torch.nn.Parameter],
    stats_fn: Callable[[_Batch, Any], torch.Tensor],
    train: FitData,
    objective: Any,
    settings: FitSettings,
    *,
    val: FitData | None = None,
    val_stats_fn: Callable[[_Batch, Any], torch.Tensor] | None = None,
    regularizer: Callable[[], torch.Tensor | None] = lambda: None,
    default_lr: tuple[float, float] = (1.0, 0.01),
    buffers: Iterable[torch.Tensor] = (),
    precompute: Callable[[_Batch], Any] | None = None,
    precompute_budget: float = 0.0,
) -> dict[str, Any]:
    """Minimise ``objective`` (+ regulariser) over ``params`` in place; returns a fit record.

    ``stats_fn(batch, objective)`` returns the objective's additive statistics of one chunk,
    computed through the calibrator. The validation NLL is computed with ``val_stats_fn``.
    ``default_lr`` is ``(lbfgs_lr, adam_lr)`` used when ``settings.lr`` is None.

    A calibrator with its own training target (e.g. the misprediction classifier of selective
    scaling) passes a ``stats_fn`` that ignores ``objective`` and returns its own additive loss
    (and the same function as ``val_stats_fn`` to select the best iterate on it). Mini-batch
    optimisation with ``settings.optimizer = "adamw"`` uses ``torch.optim.AdamW`` with
    ``settings.weight_decay``; ``buffers`` (e.g. BatchNorm running statistics) are restored
    together with the parameters of the best iterate.

    ``precompute(chunk)``: parameter-free features of a chunk (e.g. sorted log-probabilities) that
    ``stats_fn`` reads from ``chunk.pre`` instead of recomputing them at every evaluation; cached
    once for full-batch L-BFGS on in-memory data when they fit ``precompute_budget`` bytes, and
    released before returning.
    """
    from segcal.calibrators.objectives import NLL

    t0 = time.perf_counter()
    params = [p for p in params if p.requires_grad]
    opt_name = settings.optimizer
    if opt_name not in ("auto", "lbfgs", "adam", "adamw"):
        raise ValueError(f"optimizer: expected 'auto', 'lbfgs', 'adam' or 'adamw', got {opt_name!r}")
    if opt_name == "auto":
        opt_name = "lbfgs" if train.in_memory else "adam"
    nll = NLL()
    vfn = val_stats_fn or stats_fn
    val_objective = objective if settings.monitor == "objective" else nll

    def monitor(train_value: float) -> float:
        if val is None:
            return train_value
        v = _evaluate(vfn, val, val_objective, settings.chunk_size)
        _check_finite_loss(v, f"validation {val_objective.name}")
        return v

    history: list[dict[str, float]] = []
    best = math.inf
    buffers = list(buffers)
    best_state = [p.detach().clone() for p in params]
    best_bufs = [b.detach().clone() for b in buffers]
    stale = 0
    stop_best = math.inf
    steps = 0
    stopped_early = False

    def record(train_value: float) -> bool:
        """Track the best iterate; return True to stop early."""
        nonlocal best, best_state, best_bufs, stale, stop_best
        m = monitor(train_value)
        history.append({"step": steps, "train": train_value, "monitor": m})
        if m < best:
            best = m
            best_state = [p.detach().clone() for p in params]
            best_bufs = [b.detach().clone() for b in buffers]
        if m < stop_best - settings.min_delta:
            stop_best = m
            stale = 0
        else:
            stale += 1
        if sched is not None:
            sched.step(m)
        return settings.patience is not None and stale >= settings.patience

    sched = None
    cached = 0
    if not params:
        pass
    elif opt_name == "lbfgs":
        if precompute is not None and train.in_memory:
            with torch.no_grad():
                cached = train.precompute(settings.chunk_size, precompute, precompute_budget)
                if cached and val is not None:
                    val.precompute(settings.chunk_size, precompute, precompute_budget - cached)
        lr = settings.lr if settings.lr is not None else default_lr[0]
        inner = max(1, min(settings.eval_every, settings.max_iter))
        opt = torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=inner,
            max_eval=inner * 3,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure() -> torch.Tensor:
            return _value_and_grad(stats_fn, params, train, objective, settings.chunk_size, regularizer)

        if val is not None:
            record(math.nan)
        prev = math.inf
        while steps < settings.max_iter:
            before = [p.detach().clone() for p in params]
            value = float(opt.step(closure))  # objective at the start of this step
            steps = int(opt.state[opt._params[0]].get("n_iter", 0))
            if val is not None:
                if record(value):
                    stopped_early = True
                    break
            else:
                history.append({"step": steps, "train": value, "monitor": value})
            moved = max(float((p.detach() - q).abs().max()) for p, q in zip(params, before, strict=True))
            if moved < 1e-9 or prev - value < settings.tol * max(1.0, abs(value)):
                break  # converged: no movement, or no decrease over a whole outer step
            prev = value
        if val is None:  # strong-Wolfe L-BFGS decreases monotonically: the last iterate is best
            best_state = [p.detach().clone() for p in params]
            best_bufs = [b.detach().clone() for b in buffers]
            best = _evaluate(stats_fn, train, objective, settings.chunk_size) if not history else history[-1]["train"]
    else:
        lr = settings.lr if settings.lr is not None else default_lr[1]
        if opt_name == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=lr)
        if settings.lr_patience is not None:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=settings.lr_factor, patience=settings.lr_patience
            )
        gen = torch.Generator().manual_seed(int(settings.seed))
        record(_evaluate(stats_fn, train, objective, settings.chunk_size) if val is None else math.nan)
        window: list[float] = []
        done = False
        while not done:
            per_step = settings.batch_size if settings.images_per_step is None else settings.images_per_step
            for group in train.iter_steps(settings.batch_size, gen, images=per_step):
                opt.zero_grad()
                loss_value = _group_step(stats_fn, group, objective, regularizer)
                opt.step()
                steps += 1
                window.append(loss_value)
                if steps % settings.eval_every == 0 or steps >= settings.max_steps:
                    stop = record(sum(window) / len(window))
                    window = []
                    if stop:
                        stopped_early = True
                        done = True
                        break
                if steps >= settings.max_steps:
                    done = True
                    break
    with torch.no_grad():
        for p, q in zip(params, best_state, strict=True):
            p.copy_(q)
        for b, q in zip(buffers, best_bufs, strict=True):
            b.copy_(q)
    train.cached = None  # release the feature cache
    if val is not None:
        val.cached = None
    return {
        "optimizer": opt_name,
        "mode": train.info.get("mode"),
        "n_pixels": train.n,
        "n_val_pixels": val.n if val is not None else 0,
        "steps": steps,
        "best_monitor": best,
        "monitor": f"val_{val_objective.name}" if val is not None else f"train_{objective.name}",
        "stopped_early": stopped_early,
        "seconds": time.perf_counter() - t0,
        "cached_feature_mb": round(cached / 2**20, 1),
        "history": history[-50:],
    }
