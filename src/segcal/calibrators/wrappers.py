"""The generic translation-invariance wrapper (``../shared/methods.md`` §1, §8.2).

Feeding ``log S(z)`` instead of ``z`` to any calibrator makes it translation invariant ([RPH]
construction rule): ``log S(z + c·1) = log S(z)``. :func:`translation_invariant` derives, from any
calibrator class, a class whose canonical input is ``log S(z)`` (probabilities: ``log`` with a
1e-12 floor). ``vs_ti`` (VS on log S) and ``ms_ti`` (MS on log S; the same family as DC) are
registered; spatial calibrators (LTS) get their TI version the same way.
"""

from __future__ import annotations

from segcal.calibrators.affine import MatrixScaling, VectorScaling
from segcal.calibrators.base import Calibrator
from segcal.calibrators.registry import register

_CACHE: dict[type, type] = {}


def translation_invariant(cls: type[Calibrator], *, name: str | None = None,
                          aliases: tuple[str, ...] = ()) -> type[Calibrator]:
    """Return the TI version of calibrator class ``cls`` (input ``log S(z)``); not registered."""
    if cls in _CACHE:
        return _CACHE[cls]
    attrs = {
        "name": name or f"{cls.name}_ti",
        "aliases": aliases,
        "input_space": "logprobs",
        "translation_invariant": True,
        "description": f"{cls.name} applied to log S(z) (translation invariant)",
        "section": f"§1 (TI rule) + {cls.section}",
        "__doc__": (
            f"Translation-invariant {cls.__name__}: the map of {cls.__name__} applied to "
            f"``log S(z)`` (methods.md §1). Declares the argmax/order guarantees of {cls.__name__}.\n\n"
            + (cls.__doc__ or "")
        ),
        "__module__": __name__,
    }
    new = type(f"TI{cls.__name__}", (cls,), attrs)
    _CACHE[cls] = new
    return new


VectorScalingTI = register(
    translation_invariant(VectorScaling, name="vs_ti", aliases=("vs(logs)", "vector_scaling_ti"))
)
MatrixScalingTI = register(
    translation_invariant(MatrixScaling, name="ms_ti", aliases=("ms(logs)", "matrix_scaling_ti"))
)
