"""Conformal risk control for segmentation, with the image (or volume) as the exchangeable unit.

Build a per-image loss table over a λ grid in one streaming pass (:func:`loss_table`,
:func:`folder_loss_table`; memory ``O(images × grid)``, 2D and 3D, ``ignore_index``, optionally
through a segcal calibrator), choose λ̂ by conformal risk control in expectation or by
Learn-then-Test with probability 1 − δ (:func:`fit_threshold`; ``../shared/methods.md`` §9.3–9.4),
save it with its guarantee in words (:class:`ConformalResult`), and turn one image's
probabilities into bit-packed pixel sets and a set-size map (:func:`apply_sets`), written as
.npz / PNG / NIfTI / nnU-Net files with the guarantee in each file (:mod:`segcal.conformal.writers`). Pixels are
never treated as exchangeable: the API only takes whole images. See ``docs/conformal.md``.
"""

from segcal.conformal.bounds import crc_index, hb_pvalues, ltt_index
from segcal.conformal.builder import LossTableBuilder
from segcal.conformal.counting import engine_probabilities
from segcal.conformal.result import ConformalResult, PixelSets, apply_sets, fit_threshold
from segcal.conformal.tables import (
    RISKS,
    LossTable,
    as_probabilities,
    default_grid,
    folder_loss_table,
    image_row,
    loss_table,
)
from segcal.conformal.writers import (
    OUTPUT_FORMATS,
    SetWriter,
    decode_codes,
    encode_codes,
    staged_folder,
)

__all__ = [
    "OUTPUT_FORMATS",
    "RISKS",
    "ConformalResult",
    "LossTable",
    "LossTableBuilder",
    "PixelSets",
    "SetWriter",
    "apply_sets",
    "as_probabilities",
    "crc_index",
    "decode_codes",
    "default_grid",
    "encode_codes",
    "engine_probabilities",
    "fit_threshold",
    "folder_loss_table",
    "hb_pvalues",
    "image_row",
    "loss_table",
    "ltt_index",
    "staged_folder",
]
