"""The settings of the fitting loop: :class:`FitSettings` and :func:`fit_config` (re-exported by
:mod:`segcal.calibrators.fitting`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from segcal.calibrators.objectives import get_objective

__all__ = ["CHUNK_ELEMENTS", "FitSettings", "chunk_rows", "fit_config"]

#: The most values (rows x classes) in one chunk of a full-batch evaluation: 2^20, i.e. 4 MiB per
#: float32 temporary of the chunk's forward and backward pass whatever the class count (55,188
#: rows of 19 classes, 87,381 of 12). Measured on 19-class float16 rows (docs/scaling.md): chunks
#: of 2^20 rows (20 Mi values) made 80-160 MiB temporaries, most of a streamed fit's peak memory
#: (streamed TS on 19 x 1024 x 2048 maps: 1078 MiB; 701 / 754 / 855 MiB with 2^20 / 2^21 / 2^22
#: values), and ran 2.3-2.7x slower per value than 2^20 values with one thread, or with two on
#: idle cores. With two threads on cores shared with another job every chunk pays the threads'
#: synchronisation, and 2^20 values were then 3.2x slower than 2^22 (and 3.7x 20 Mi values).
CHUNK_ELEMENTS = 2**20


def chunk_rows(chunk_size: int, num_classes: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk of ``num_classes`` values: at most ``chunk_size`` rows and ``chunk_elements``
    values (the fit's full-batch chunks and :meth:`Calibrator.forward`'s).

    Parameters
    ----------
    chunk_size
        The most rows (the calibrator's ``chunk_size``).
    num_classes
        Values per row.
    chunk_elements
        The most values (rows x classes).

    Returns
    -------
    int
        ``min(chunk_size, chunk_elements // num_classes)``, at least 1.
    """
    return max(1, min(int(chunk_size), int(chunk_elements) // max(1, int(num_classes))))


@dataclass
class FitSettings:
    """Settings of one run of :func:`minimize` (the calibrator's fit keyword arguments).

    ``max_iter`` bounds L-BFGS iterations, ``max_steps`` Adam steps; ``batch_size`` is the pixels
    per Adam step, ``chunk_size`` the most rows per chunk of a full-batch evaluation and
    ``chunk_elements`` the most values (rows x classes) per chunk (:meth:`chunk_rows`: the rows
    used); ``images_per_step`` the whole images per Adam step for spatial data (None:
    ``batch_size``). ``progress`` shows a tqdm bar on stderr labelled ``progress_label``.
    """

    optimizer: str
    lr: float | None
    max_iter: int
    max_steps: int
    batch_size: int
    chunk_size: int
    patience: int | None
    lr_patience: int | None
    lr_factor: float
    min_delta: float
    eval_every: int
    seed: int
    monitor: str  # validation score: "nll" or "objective" (the fitting objective)
    tol: float = 1e-7
    weight_decay: float = 0.0  # AdamW only
    images_per_step: int | None = None  # spatial data: whole images per Adam step (None: batch_size)
    progress: bool = False
    progress_label: str = "fit"
    chunk_elements: int = CHUNK_ELEMENTS

    def chunk_rows(self, num_classes: int) -> int:
        """Rows per chunk of a full-batch evaluation on ``num_classes`` classes.

        Parameters
        ----------
        num_classes
            Values per row (the scores' class count).

        Returns
        -------
        int
            :func:`chunk_rows` of these settings: the chunk is bounded by its values, so 19 and
            12 classes make temporaries of the same size.
        """
        return chunk_rows(self.chunk_size, num_classes, self.chunk_elements)

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> FitSettings:
        """The settings named in ``config`` (a calibrator's fit settings; other keys are
        ignored), updated with ``overrides``."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in config.items() if k in names}
        kw.update(overrides)
        return cls(**kw)


def fit_config(
    *,
    objective: str,
    optimizer: str,
    lr: float | None,
    max_iter: int,
    max_steps: int,
    batch_size: int,
    chunk_size: int,
    memory_budget: float,
    patience: int | None,
    min_delta: float,
    lr_patience: int | None,
    lr_factor: float,
    eval_every: int,
    seed: int,
    subsample: float | None,
    monitor: str,
) -> dict[str, Any]:
    """The validated fit settings of a calibrator, as plain values (``Calibrator.fit_settings``).

    The arguments are the fitting keyword arguments of :class:`~segcal.calibrators.base.Calibrator`,
    whose signature is the one place their defaults are declared (documented there); a
    ``ValueError`` names the first invalid one.
    """
    get_objective(objective)  # validate early
    if optimizer not in ("auto", "lbfgs", "adam"):
        raise ValueError(f"optimizer: expected 'auto', 'lbfgs' or 'adam', got {optimizer!r}")
    if monitor not in ("nll", "objective"):
        raise ValueError(f"monitor: expected 'nll' or 'objective', got {monitor!r}")
    if subsample is not None and not (0 < float(subsample) <= 1):
        raise ValueError(f"subsample: expected a fraction in (0, 1], got {subsample}")
    for k, v in (("max_iter", max_iter), ("max_steps", max_steps), ("batch_size", batch_size),
                 ("chunk_size", chunk_size), ("eval_every", eval_every)):
        if int(v) < 1:
            raise ValueError(f"{k}: expected a positive integer, got {v}")
    return dict(
        objective=str(objective),
        optimizer=optimizer,
        lr=lr,
        max_iter=int(max_iter),
        max_steps=int(max_steps),
        batch_size=int(batch_size),
        chunk_size=int(chunk_size),
        memory_budget=float(memory_budget),
        patience=patience,
        min_delta=float(min_delta),
        lr_patience=lr_patience,
        lr_factor=float(lr_factor),
        eval_every=int(eval_every),
        seed=int(seed),
        subsample=None if subsample is None else float(subsample),
        monitor=monitor,
    )
