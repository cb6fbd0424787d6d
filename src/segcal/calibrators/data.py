"""The data side of fitting: what ``fit`` accepts, turned into :class:`FitData` of :class:`Batch`.

:func:`prepare_data` turns what the user passes to ``fit`` into a :class:`FitData`:

* an in-memory tensor / array ``(N, C, *spatial)`` or ``(M, C)`` with labels (and a mask);
* an iterable of batches ``(scores, labels)`` / ``(scores, labels, mask)`` (a list, or a callable
  returning a fresh iterator, is re-iterable; a generator can be read once);
* a :class:`segcal.io.PredictionFolder` (the format of ``segcal eval``) or :class:`FolderBatches`.

Calibrators with an image branch (LTS / IBTS with ``use_image=True``) also need the input image of
every logit map: ``images=`` ``(N, C_img, *spatial)`` for in-memory input, an ``"image"`` entry in
every streamed batch (a mapping ``{"scores", "labels", "mask", "image"}``), or an image folder
(``FolderBatches(folder, images=DIR)``, stems matching the predictions). Images travel with their
logit map through the loop (:attr:`Batch.image`); a missing image or one of the wrong shape is an
error, never silently dropped.

For pointwise calibrators the valid pixels (label not ``ignore_index``, mask True) are gathered to
``(P, C)`` rows and ``(P,)`` labels, kept in the input's float dtype (float16 stays float16: half
the memory) and up-cast to float32 chunk by chunk. If the gathered rows fit ``memory_budget``
bytes the data stay in memory; otherwise the source is re-read at every pass (streaming; needs a
re-iterable source). Spatial calibrators (``Calibrator.spatial``) get whole images instead.

The decision needs the count of valid pixels, i.e. one reading pass. Where the source tells its
shapes without being read (an array, a folder of ``.npy`` files: :class:`~segcal.calibrators.sources.Source`),
their upper bound of the bytes (:func:`~segcal.calibrators.sources.nbytes_bound`, every pixel
valid; in a distributed fit the sum of every rank's, the decision being the whole data's) decides first: within the budget, the counting pass keeps what it reads (as without a
bound); above it, the counting pass keeps nothing, so a streamed fit never holds the budget, and
in the rare case where the ignored pixels bring the data under the budget the source is read once
more to keep them. Either way the data end in memory exactly when their bytes fit the budget.

Every hook of a calibrator subclass that sees data (``_stats_fn``, ``_stage_loss``'s function,
``_post_fit``) receives :class:`Batch` objects, from :meth:`FitData.iter_chunks` /
:meth:`FitData.iter_steps`. The optimisation loops are in :mod:`segcal.calibrators.fitting`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from segcal.calibrators.collective import FitGroup, active, agree
from segcal.calibrators.folder_data import FolderBatches
from segcal.calibrators.sources import is_array, nbytes_bound, normalise_source, unpack_batch
from segcal.errors import InputError
from segcal.validation import (
    as_tensor,
    check_finite,
    check_label_range,
    check_labels,
    check_mask,
    check_probabilities,
    check_scores,
    valid_labels,
)

__all__ = ["Batch", "FitData", "FolderBatches", "check_image", "prepare_data", "split_val"]


@dataclass
class Batch:
    """Prepared data of one batch, as every data hook of a calibrator receives it.

    Pointwise data are rows: ``x`` ``(P, C)`` raw scores of the valid pixels (the input's float
    dtype: float16 stays float16) and ``y`` ``(P,)`` int64 labels, ``valid`` None. Spatial data
    (whole images, for ``Calibrator.spatial``) keep the image: ``x`` ``(n, C, *spatial)``, ``y``
    ``(n, *spatial)`` (ignored pixels set to 0) and ``valid`` the ``(n, *spatial)`` boolean mask of
    the pixels that count.

    Attributes
    ----------
    x, y, valid
        Scores, labels, valid mask (see above).
    image
        ``(n, C_img, *spatial)`` input image, for calibrators with an image branch (else None).
    pre
        Parameter-free features of the rows, cached by :meth:`FitData.precompute` (else None).
    """

    x: torch.Tensor
    y: torch.Tensor
    valid: torch.Tensor | None = None
    image: torch.Tensor | None = None
    pre: Any = None

    @property
    def n(self) -> int:
        """Number of valid pixels."""
        return int(self.y.shape[0]) if self.valid is None else int(self.valid.sum())

    @property
    def nbytes(self) -> int:
        """Bytes held by the batch's tensors."""
        extra = 0 if self.image is None else self.image.numel() * self.image.element_size()
        return self.x.numel() * self.x.element_size() + self.y.numel() * self.y.element_size() + extra


@dataclass
class FitData:
    """Training or validation data for the fitting loop (in memory or streamed)."""

    num_classes: int
    n: int
    batches: list[Batch] | None = None  # in memory
    stream: Callable[[], Iterator[Batch]] | None = None  # streaming
    info: dict[str, Any] = field(default_factory=dict)
    cached: tuple[int, list[tuple[int, Batch]]] | None = None  # (chunk_size, (batch, chunk)): precompute
    #: distributed fit (:func:`segcal.calibrators.collective.sharded`): the group, and the valid
    #: pixels of every batch of every rank (``layout[r][i]``); ``n`` is then the global count
    group: FitGroup | None = None
    layout: list[list[int]] | None = None

    @property
    def first_batch(self) -> int:
        """The index of this rank's first batch among the batches of all ranks (0 in one process)."""
        return 0 if self.layout is None or self.group is None else sum(map(len, self.layout[: self.group.rank]))

    @property
    def local_n(self) -> int:
        """Valid pixels held (or streamed) by this rank (``n`` in one process)."""
        return self.n if self.layout is None or self.group is None else sum(self.layout[self.group.rank])

    def empty_batch(self) -> Batch:
        """A batch without pixels (the statistics of a rank without data: zeros of the right shape)."""
        return Batch(torch.zeros(0, self.num_classes), torch.zeros(0, dtype=torch.int64))

    @property
    def in_memory(self) -> bool:
        return self.batches is not None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.batches) if self.batches is not None else 0

    def precompute(self, chunk_size: int, fn: Callable[[Batch], Any], budget: float) -> int:
        """Cache ``fn(chunk)`` (parameter-free features) on every full-batch chunk, within ``budget`` bytes.

        Only for in-memory data; the cached chunks are then what :meth:`iter_chunks` yields for
        ``chunk_size`` without shuffling (the full-batch evaluations of L-BFGS). ``fn`` returns a
        tuple of tensors and plain values, or None (nothing to cache). Returns the bytes cached
        (0 when nothing was cached: streamed data, no features, or over the budget).
        """
        self.cached = None
        if self.batches is None:
            return 0
        out: list[tuple[int, Batch]] = []
        used = 0
        for i, b in self.iter_file_chunks(chunk_size):
            pre = fn(b)
            if pre is None:
                return 0
            used += sum(t.numel() * t.element_size() for t in pre if isinstance(t, torch.Tensor))
            if used > budget:
                return 0
            out.append((i, Batch(b.x, b.y, b.valid, b.image, pre)))
        self.cached = (chunk_size, out)
        return used

    def iter_batches(self) -> Iterator[Batch]:
        if self.batches is not None:
            yield from self.batches
        else:
            assert self.stream is not None
            yield from self.stream()

    def iter_file_chunks(self, chunk_size: int) -> Iterator[tuple[int, Batch]]:
        """``(batch index, chunk)`` of :meth:`iter_chunks` without shuffling; every batch (a folder's
        file, the unit of sharding) yields >= 1 chunk (the full-batch sums group chunks by batch)."""
        if self.cached is not None and self.cached[0] == chunk_size:
            yield from self.cached[1]
            return
        for i, b in enumerate(self.iter_batches()):
            for c in self._split(b, chunk_size, None):
                yield i, c
            b = c = None  # streamed: this file's rows are freed before the next file is read

    def iter_chunks(self, chunk_size: int, gen: torch.Generator | None = None) -> Iterator[Batch]:
        """Batches split into row chunks of at most ``chunk_size`` (shuffled when ``gen``)."""
        if gen is None:
            yield from (c for _, c in self.iter_file_chunks(chunk_size))
            return
        batches: Iterable[Batch] = self.iter_batches()  # streamed: in order, pixels shuffled
        if self.batches is not None:
            order = torch.randperm(len(self.batches), generator=gen).tolist()
            batches = [self.batches[i] for i in order]
        for b in batches:
            yield from self._split(b, chunk_size, gen)
            del b  # streamed: this file's rows are freed before the next file is read

    def _split(self, b: Batch, chunk_size: int, gen: torch.Generator | None) -> Iterator[Batch]:
        """One batch in row chunks of at most ``chunk_size`` (its pixels shuffled when ``gen``)."""
        if b.valid is not None or b.n <= chunk_size:
            yield b
        elif gen is not None:
            perm = torch.randperm(b.n, generator=gen)
            for s in range(0, b.n, chunk_size):
                idx = perm[s : s + chunk_size]
                yield Batch(b.x[idx], b.y[idx])
        else:
            for s in range(0, b.n, chunk_size):
                x, y = b.x[s : s + chunk_size], b.y[s : s + chunk_size]
                if self.batches is None and s + chunk_size >= b.n:  # a caller holding the last
                    x, y = x.clone(), y.clone()  # chunk must not keep the file's rows alive
                yield Batch(x, y)

    def iter_steps(self, batch_size: int, gen: torch.Generator | None = None,
                   images: int | None = None) -> Iterator[list[Batch]]:
        """The data of one optimisation step, as a list of batches: one chunk of ``batch_size``
        pixels (pointwise data, as :meth:`iter_chunks`) or up to ``images`` (default
        ``batch_size``) whole images (spatial data)."""
        per = batch_size if images is None else images
        group: list[Batch] = []
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


def check_image(image: Any, scores: torch.Tensor, image_channels: int, name: str) -> torch.Tensor:
    """Validate the input image of a logit map: ``(N, image_channels, *spatial)`` with the scores'
    ``N`` and spatial size, finite; returned as a float tensor (float16 kept, else float32)."""
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
) -> list[Batch] | None:
    """Validate one batch and gather it into :class:`Batch` rows (or whole images)."""
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
    valid = valid_labels(y, ignore_index)
    if mask is not None:
        valid &= check_mask(mask, expected)
    c = s.shape[1]
    label_name = "labels" if what == "logits" else f"{what} labels"
    if spatial:
        check_label_range(y, valid, c, label_name)
    store_dtype = s.dtype if s.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if spatial:
        check_finite(s, what)
        if input_type == "probs":
            check_probabilities(s, what, dim=1)
        ys = torch.where(valid, y, torch.zeros_like(y)).to(torch.int64)
        if s.ndim == 2:  # an (M, C) table has no spatial context: one batch of isolated pixels
            if not bool(valid.any()):
                return None
            return [Batch(s.to(store_dtype), ys, valid)]
        out = []
        for i in range(s.shape[0]):
            if bool(valid[i].any()):
                out.append(Batch(s[i : i + 1].to(store_dtype), ys[i : i + 1], valid[i : i + 1],
                                  None if img is None else img[i : i + 1]))
        return out
    keep = valid.reshape(-1).nonzero().squeeze(1)  # the valid pixels, in row-major order
    if s.ndim == 2:
        rows = s[keep]
    elif s.shape[0] == 1:  # one map (a folder's file): a 1-D index gather, no 3-D nonzero
        rows = s[0].reshape(c, -1).t()[keep]  # (40-60 % faster, ~45 MiB less transient)
    else:
        rows = s.movedim(1, -1)[valid]
    yy = y.reshape(-1).index_select(0, keep)  # = y[valid], several times faster for uint8 maps
    if yy.numel() and (int(yy.min()) < 0 or int(yy.max()) >= c):
        check_label_range(y, valid, c, label_name)  # raises, naming the labels
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
    return [Batch(rows, yy.to(torch.int64))]


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
    The returned ``info`` has ``nbytes`` (the gathered bytes), ``nbytes_bound`` (the shapes'
    bound, or None), ``read_again`` (whether the source was read a second time to keep it) and
    ``mode`` (``"in-memory"`` or ``"streaming"``).
    """
    if subsample is not None and not (0 < float(subsample) <= 1):
        raise ValueError(f"subsample: expected a fraction in (0, 1], got {subsample}")
    if image_channels is not None and not spatial:
        raise ValueError("image_channels: the image branch needs spatial (whole-image) data")
    fg = active()
    if fg is not None and spatial:
        raise ValueError(f"{what}: a distributed fit of a spatial calibrator (LTS / IBTS) is not "
                         "supported yet; fit it in one process")
    if fg is not None and subsample is not None:
        raise ValueError("subsample: not supported by a distributed fit (the pixels kept would "
                         "depend on the sharding); fit on all pixels, or in one process")
    source = normalise_source(data, labels, mask, what, images)
    # an upper bound of the bytes kept, from the shapes alone: far above the budget, the
    # counting pass keeps nothing (else it would hold up to the budget for nothing)
    bound = None if source.shapes is None else nbytes_bound(source.shapes, subsample=None if spatial else subsample)
    if fg is not None:  # the whole data's bound (one small gather): a shard under the budget is no reason to keep
        bounds = agree(None, bound, fg.group)
        bound = None if any(b is None for b in bounds) else sum(bounds)
    kw = dict(
        input_type=input_type,
        ignore_index=ignore_index,
        spatial=spatial,
        subsample=subsample,
        what=what,
        image_channels=image_channels,
    )

    def batches(nc: int | None, bar: Any = None) -> Iterator[tuple[Batch, int]]:
        g = torch.Generator().manual_seed(int(seed) + 7919)  # the same subsample at every read
        for item in source.factory():
            sc, la, ma, itype, im, file = unpack_batch(item, what)
            if itype is not None and itype != input_type:
                raise ValueError(
                    f"{what}: the prediction folder holds {itype} but the calibrator has "
                    f"input_type={input_type!r}; pass input_type={itype!r}"
                )
            sc_shape_c = sc.shape[1] if hasattr(sc, "shape") and len(sc.shape) > 1 else None
            try:
                got = _prepare_batch(sc, la, ma, num_classes=nc, gen=g, image=im, **kw)  # type: ignore[arg-type]
            except ValueError as exc:
                if file is None:
                    raise
                raise InputError(f"{file}: {exc}") from None  # a folder's batch: name its file
            nc = int(sc_shape_c) if nc is None else nc  # every later batch must have these classes
            if bar is not None:
                bar.update(1)
            while got:  # handed over one by one: no reference to this file while the next is read
                yield got.pop(0), int(sc_shape_c)
            del item, sc, la, ma, im

    bar = None
    if progress:
        bar = tqdm(desc=f"reading {what}", unit="file", leave=False)
    kept: list[Batch] | None = [] if bound is None or bound <= memory_budget else None
    nbytes = 0
    n = 0
    nc = num_classes
    n_batches = 0
    sizes: list[int] = []
    failure: BaseException | None = None
    try:
        for b, c in batches(nc, bar):
            nc = c if nc is None else nc
            n += b.n
            n_batches += 1
            sizes.append(b.n)
            nbytes += b.nbytes
            if kept is not None:
                if nbytes > memory_budget:
                    kept = None  # too large: stream instead (keep counting)
                else:
                    kept.append(b)
            del b
    except Exception as exc:
        if fg is None:
            raise
        failure = exc  # shared with every rank by agree() below, then raised
    finally:
        if bar is not None:
            bar.close()
    layout = None
    reread = kept is None and nbytes <= memory_budget  # the bound was passed, the data were not
    if fg is not None:
        infos = agree(failure, (n, nbytes, nc, n_batches, sizes, kept is None), fg.group)
        layout = [info[4] for info in infos]
        n, nbytes, n_batches = (sum(info[k] for info in infos) for k in (0, 1, 3))
        seen = [(r, info[2]) for r, info in enumerate(infos) if info[2] is not None]
        for r, c in seen[1:]:
            if c != seen[0][1]:
                raise ValueError(f"{what}: rank {r} read {c} classes, rank {seen[0][0]} read {seen[0][1]}; "
                                 f"expected {seen[0][1]} classes on every rank")
        nc = seen[0][1] if seen else nc
        reread = kept is None and nbytes <= memory_budget  # the decision on the whole data, every rank
        if nbytes > memory_budget:
            kept = None
        if nbytes <= memory_budget and any(info[5] for info in infos):  # some rank reads again
            failure = None
            if reread:
                try:
                    kept = [b for b, _ in batches(nc)]
                except Exception as exc:
                    failure = exc
            agree(failure, None, fg.group)  # a rank failing to read again stops every rank
    elif reread:
        kept = [b for b, _ in batches(nc)]
    if n == 0 or nc is None:
        raise ValueError(
            f"{what}: no valid pixels to fit on (empty input, or every pixel is masked or equals "
            "ignore_index)"
        )
    info = {"n_pixels": n, "n_batches": n_batches, "nbytes": nbytes, "nbytes_bound": bound,
            "read_again": reread}
    if kept is not None:
        return FitData(nc, n, batches=kept, info={**info, "mode": "in-memory"}, group=fg, layout=layout)
    if not source.reiterable:
        raise ValueError(
            f"{what}: the data exceed memory_budget={memory_budget:.3g} bytes and the source can only "
            "be read once; pass a list of batches, a callable returning an iterator, or a "
            "PredictionFolder so that it can be streamed"
        )

    def stream() -> Iterator[Batch]:
        for b, _ in batches(nc):
            yield b
            del b

    return FitData(nc, n, stream=stream, info={**info, "mode": "streaming"}, group=fg, layout=layout)


def split_val(val: Any) -> tuple[Any, Any, Any]:
    """``(data, labels, mask)`` of ``fit``'s ``val``: an in-memory tuple ``(scores, labels[, mask])``,
    or any streamed source (labels and mask inside it)."""
    if isinstance(val, tuple) and len(val) in (2, 3) and is_array(val[0]):
        return val[0], val[1], val[2] if len(val) == 3 else None
    return val, None, None
