"""Reading and writing prediction folders, label maps, images and volumes (floor 1 of segcal).

Modules, from the ground up: :mod:`~segcal.io.files` (atomic writes, JSON, NumPy files, stem
matching), :mod:`~segcal.io.images` (Pillow), :mod:`~segcal.io.nifti` (nibabel, optional),
:mod:`~segcal.io.arrays` (prediction files and label maps), :mod:`~segcal.io.nnunet` (nnU-Net v2
folders and 3D alignment), :mod:`~segcal.io.predictions` (the prediction-folder format).
"""

from segcal.io.arrays import (
    LABEL_SUFFIXES,
    PREDICTION_SUFFIXES,
    find_label_files,
    read_label,
    read_prediction,
    write_prediction,
)
from segcal.io.files import atomic_write, to_jsonable
from segcal.io.predictions import (
    PredictionFolder,
    PredictionItem,
    begin_folder,
    finish_folder,
    pair_folders,
    writing_folder,
)

__all__ = [
    "LABEL_SUFFIXES",
    "PREDICTION_SUFFIXES",
    "PredictionFolder",
    "PredictionItem",
    "atomic_write",
    "begin_folder",
    "find_label_files",
    "finish_folder",
    "pair_folders",
    "read_label",
    "read_prediction",
    "to_jsonable",
    "write_prediction",
    "writing_folder",
]
