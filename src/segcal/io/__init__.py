"""Reading and writing prediction folders, label maps and volumes (the lowest layer of segcal)."""

from segcal.io.files import atomic_write, to_jsonable
from segcal.io.predictions import (
    LABEL_SUFFIXES,
    PREDICTION_SUFFIXES,
    PredictionFolder,
    PredictionItem,
    find_label_files,
    pair_folders,
    read_label,
    read_prediction,
    write_prediction,
)

__all__ = [
    "LABEL_SUFFIXES",
    "PREDICTION_SUFFIXES",
    "PredictionFolder",
    "PredictionItem",
    "atomic_write",
    "find_label_files",
    "pair_folders",
    "read_label",
    "read_prediction",
    "to_jsonable",
    "write_prediction",
]
