"""nnU-Net v2 prediction files (``--save_probabilities``): properties-aware reading and writing.

nnU-Net v2 writes, per case, ``<case>.npz`` (key ``probabilities``, shape ``(C, *array_shape)``)
and ``<case>.pkl`` (the properties dict of the case). The array axes are those of nnU-Net's
image reader, *not* nibabel's:

* ``SimpleITKIO`` (nnU-Net's default): ``SimpleITK.GetArrayFromImage`` gives the voxel grid with
  the ITK index order reversed, ``[k, j, i]``. Properties hold ``sitk_stuff`` (``spacing`` and
  ``origin`` in ITK (i, j, k) order, ``direction`` as 9 row-major numbers, LPS world) and
  ``spacing`` reversed to array order.
* ``NibabelIO``: ``get_fdata().transpose(2, 1, 0)``; properties hold
  ``nibabel_stuff['original_affine']``.
* The reorienting readers (``SimpleITKIOWithReorient``, ``NibabelIOWithReorient``) store arrays in a
  reoriented grid; segcal refuses those unless the reorientation was the identity.

For a NIfTI file the ITK index ``(i, j, k)`` and nibabel's voxel index ``(i, j, k)`` are the same
stored voxel, so for both plain readers the way back to nibabel's ``(x, y, z)`` order is to reverse
the spatial axes of the array: ``probs.transpose(0, 3, 2, 1)``. The reader type is taken from the
properties, never guessed from the array shape (hippocampus crops often have two equal axes, where a
shape check cannot tell the orders apart); when a label header is given, its shape **and** affine
must agree with the geometry recorded in the properties, or reading fails with a message saying what
disagrees.

Properties are unpickled with a restricted unpickler that only admits builtins containers and
numpy arrays/scalars, so a ``.pkl`` from elsewhere cannot run code; what it may build is capped
(:data:`MAX_PROPERTIES_BYTES` read, :data:`MAX_PICKLED_ARRAY_BYTES` per array, no ``range``, no
``bytes(n)``), so a tiny file cannot allocate a large amount of memory. A refused or corrupt
``.pkl`` is an :class:`~segcal.errors.InputError` naming the file.

:func:`read_aligned` / :func:`write_calibrated` line any 3D prediction (nnU-Net's or segcal's own
``.npy`` written by :func:`segcal.pipeline.predict.predict_volumes`) up with a NIfTI label volume.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcal.errors import InputError
from segcal.io.arrays import label_geometry, read_label, read_prediction, write_prediction
from segcal.io.files import atomic_write, load_npz
from segcal.io.nifti import nifti_header

PROBS_KEY = "probabilities"
#: the largest properties file read (nnU-Net's are a few kB)
MAX_PROPERTIES_BYTES = 4 * 2**20
#: the largest array a properties file may build
MAX_PICKLED_ARRAY_BYTES = 4 * 2**20

# LPS (ITK) <-> RAS (nibabel) world coordinates
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_ALLOWED_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float",
                              "complex", "bool", "str", "slice")
} | {
    ("collections", "OrderedDict"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_NUMPY_SCALARS = ("float32", "int32", "int16", "uint8", "uint16", "bool_")


class NnUNetFormatError(InputError):
    """An nnU-Net prediction that segcal cannot line up safely with its label volume."""


class UnsafePickleError(InputError, pickle.UnpicklingError):
    """A properties file asks for something the restricted unpickler does not build."""


def _check_array_size(shape: Any, dtype: Any) -> None:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int | np.integer) and d >= 0 for d in dims):
        raise UnsafePickleError(f"an array of shape {shape!r}; expected non-negative integer sizes")
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 8
    nbytes = math.prod(int(d) for d in dims) * max(itemsize, 1)
    if nbytes > MAX_PICKLED_ARRAY_BYTES:
        raise UnsafePickleError(
            f"an array of shape {tuple(dims)} ({nbytes} bytes); at most {MAX_PICKLED_ARRAY_BYTES} "
            "bytes are built from a properties file"
        )


def _capped_ndarray(shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> np.ndarray:
    _check_array_size(shape, dtype)
    return np.ndarray(shape, dtype, *args, **kwargs)


def _capped_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _capped_ndarray and subtype is not np.ndarray:
        raise UnsafePickleError(f"an array of type {subtype!r}; expected numpy.ndarray")
    _check_array_size(shape, dtype)
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _plain_bytes(*args: Any) -> bytes:
    if args and not isinstance(args[0], bytes | bytearray | str):
        raise UnsafePickleError(f"bytes({type(args[0]).__name__}); only bytes copies are built")
    return bytes(*args)


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        if module == "__builtin__":  # protocol 0-2 pickles name the Python 2 module
            module = "builtins"
        if module.startswith("numpy") and name == "_reconstruct":
            return _capped_reconstruct
        if module == "numpy" and name == "ndarray":
            return _capped_ndarray
        if (module, name) == ("builtins", "bytes"):
            return _plain_bytes
        if (module, name) in _ALLOWED_GLOBALS or (module == "numpy" and name.endswith("64")) or (
            module == "numpy" and name in _NUMPY_SCALARS
        ):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name} (only builtins and numpy arrays/scalars are allowed)"
        )


def unpickle_properties(data: bytes, path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle nnU-Net properties ``data`` (read from ``path``) with the restricted unpickler.

    Raises
    ------
    UnsafePickleError
        (an :class:`~segcal.errors.InputError` and a ``pickle.UnpicklingError``) for a global
        outside the allow-list or an over-sized construction.
    InputError
        For a truncated or corrupt pickle, or one that does not hold a dict.
    """
    path = Path(path)
    try:
        props = _SafeUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"nnU-Net properties {path}: {exc}") from exc
    except Exception as exc:  # corrupt pickles raise a dozen types (EOFError, KeyError, ...)
        raise InputError(
            f"nnU-Net properties {path}: cannot unpickle ({type(exc).__name__}: {exc}); expected the "
            "properties .pkl nnU-Net v2 writes next to each .npz"
        ) from exc
    if not isinstance(props, dict):
        raise NnUNetFormatError(f"{path.name}: properties are a {type(props).__name__}, not a dict")
    return props


def read_properties(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle an nnU-Net properties file (restricted to builtins and numpy types, size-capped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"nnU-Net properties {path} not found (expected next to the .npz)")
    size = path.stat().st_size
    if size > MAX_PROPERTIES_BYTES:
        raise InputError(
            f"nnU-Net properties {path}: {size} bytes; expected a properties file of at most "
            f"{MAX_PROPERTIES_BYTES} bytes"
        )
    return unpickle_properties(path.read_bytes(), path)


def properties_path(npz_path: str | os.PathLike) -> Path:
    """``<case>.npz`` -> ``<case>.pkl`` (where nnU-Net writes the properties)."""
    p = Path(npz_path)
    return p.with_name(p.name[: -len(".npz")] + ".pkl") if p.name.endswith(".npz") else p.with_suffix(".pkl")


def is_nnunet_prediction(path: str | os.PathLike) -> bool:
    """True for ``<case>.npz`` with a ``<case>.pkl`` next to it (nnU-Net ``--save_probabilities``)."""
    p = Path(path)
    return p.name.endswith(".npz") and properties_path(p).exists()


@dataclass(frozen=True)
class NnUNetGeometry:
    """How an nnU-Net array maps to nibabel's voxel order, from the properties alone."""

    reader: str  # "SimpleITKIO" | "NibabelIO"
    array_shape: tuple[int, ...]  # spatial shape of the nnU-Net array (reader order)
    to_nibabel: tuple[int, ...]  # spatial permutation: nib = arr.transpose(to_nibabel)
    affine: np.ndarray  # expected nibabel (RAS) affine of the label NIfTI

    @property
    def nibabel_shape(self) -> tuple[int, ...]:
        return tuple(self.array_shape[i] for i in self.to_nibabel)


def _sitk_affine(sitk_stuff: dict) -> np.ndarray:
    spacing = np.asarray(sitk_stuff["spacing"], dtype=np.float64)
    origin = np.asarray(sitk_stuff["origin"], dtype=np.float64)
    direction = np.asarray(sitk_stuff["direction"], dtype=np.float64)
    n = spacing.size
    if n != 3 or origin.size != 3 or direction.size != 9:
        raise NnUNetFormatError(
            f"nnU-Net properties: sitk_stuff describes a {n}D image (spacing {tuple(spacing)}); "
            "segcal's nnU-Net reader handles 3D volumes only"
        )
    lps = np.eye(4)
    lps[:3, :3] = direction.reshape(3, 3) * spacing[None, :]
    lps[:3, 3] = origin
    return _LPS_TO_RAS @ lps


def geometry_from_properties(props: dict[str, Any]) -> NnUNetGeometry:
    """Identify nnU-Net's reader from its properties and return the axis mapping.

    Raises ``NnUNetFormatError`` when the properties do not say enough (no ``sitk_stuff`` or
    ``nibabel_stuff``), describe a reoriented grid, or are not 3D.
    """
    if "shape_before_cropping" not in props:
        raise NnUNetFormatError(
            "nnU-Net properties have no 'shape_before_cropping'; cannot check the probabilities' shape"
        )
    shape = tuple(int(s) for s in props["shape_before_cropping"])
    if len(shape) != 3:
        raise NnUNetFormatError(
            f"nnU-Net properties: shape_before_cropping {shape} is not 3D; only 3D volumes are handled"
        )
    rev = (2, 1, 0)
    if "sitk_stuff" in props:
        st = props["sitk_stuff"]
        if "original_orientation" in st:
            raise NnUNetFormatError(
                "nnU-Net properties come from SimpleITKIOWithReorient (sitk_stuff has "
                "'original_orientation'): the probabilities are on a reoriented grid that segcal does "
                "not map back; export with nnU-Net's default SimpleITKIO or NibabelIO"
            )
        aff = _sitk_affine(st)
        spacing = props.get("spacing")
        if spacing is not None and not np.allclose(
            np.abs(np.asarray(spacing, float)), np.abs(np.asarray(st["spacing"], float))[::-1], atol=1e-5
        ):
            raise NnUNetFormatError(
                f"nnU-Net properties: spacing {list(spacing)} is not sitk spacing {list(st['spacing'])} "
                "reversed, so the array axis order is not the SimpleITK one segcal expects"
            )
        return NnUNetGeometry("SimpleITKIO", shape, rev, aff)
    if "nibabel_stuff" in props:
        nb = props["nibabel_stuff"]
        orig = np.asarray(nb["original_affine"], dtype=np.float64)
        if "reoriented_affine" in nb and not np.allclose(nb["reoriented_affine"], orig, atol=1e-5):
            raise NnUNetFormatError(
                "nnU-Net properties come from NibabelIOWithReorient with a non-trivial reorientation; "
                "the probabilities are on a reoriented grid that segcal does not map back"
            )
        return NnUNetGeometry("NibabelIO", shape, rev, orig)
    raise NnUNetFormatError(
        "nnU-Net properties have neither 'sitk_stuff' nor 'nibabel_stuff': cannot tell the axis "
        f"order of the probabilities (keys: {sorted(props)}); segcal will not guess it from the shape"
    )


def checked_geometry(props: dict[str, Any], path: str | os.PathLike) -> NnUNetGeometry:
    """:func:`geometry_from_properties`, with malformed entries refused naming the file."""
    try:
        return geometry_from_properties(props)
    except NnUNetFormatError as exc:
        raise NnUNetFormatError(f"{Path(path).name}: {exc}") from exc
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise NnUNetFormatError(
            f"{Path(path).name}: malformed nnU-Net properties ({type(exc).__name__}: {exc}); expected "
            "'shape_before_cropping' and 'sitk_stuff' (spacing, origin, direction) or 'nibabel_stuff'"
        ) from exc


def check_against_label(
    geom: NnUNetGeometry,
    label_shape: tuple[int, ...] | None = None,
    label_affine: np.ndarray | None = None,
    *,
    name: str = "",
    atol: float = 1e-3,
) -> None:
    """Refuse when the label header (nibabel order) disagrees with the properties' geometry."""
    where = f"{name}: " if name else ""
    if label_shape is not None:
        label_shape = tuple(int(s) for s in label_shape)
        if label_shape != geom.nibabel_shape:
            raise NnUNetFormatError(
                f"{where}label volume has shape {label_shape} (nibabel x, y, z) but the nnU-Net "
                f"properties ({geom.reader}) give {geom.array_shape} in array order, i.e. "
                f"{geom.nibabel_shape} in nibabel order"
            )
    if label_affine is not None:
        la = np.asarray(label_affine, dtype=np.float64)
        if la.shape != (4, 4) or not np.allclose(la, geom.affine, atol=atol):
            raise NnUNetFormatError(
                f"{where}label affine does not match the geometry in the nnU-Net properties "
                f"({geom.reader}); label affine:\n{np.round(la, 4)}\nfrom properties:\n"
                f"{np.round(geom.affine, 4)}\nThe prediction and label are not the same voxel grid, "
                "or the probabilities come from a different image"
            )


def read_nnunet_prediction(
    npz_path: str | os.PathLike,
    *,
    label_shape: tuple[int, ...] | None = None,
    label_affine: np.ndarray | None = None,
    num_classes: int | None = None,
) -> tuple[np.ndarray, dict[str, Any], NnUNetGeometry]:
    """Read ``<case>.npz`` + ``<case>.pkl``; return ``(probs (C, x, y, z), properties, geometry)``.

    The probabilities are transposed to nibabel's voxel order using the reader recorded in the
    properties. ``label_shape``/``label_affine`` (from the label NIfTI's header, nibabel) are checked
    against the properties; ``num_classes`` against the class axis.
    """
    npz_path = Path(npz_path)
    props_path = properties_path(npz_path)
    props = read_properties(props_path)
    geom = checked_geometry(props, props_path)
    probs, _ = load_npz(
        npz_path, (PROBS_KEY,), what="pred",
        hint="; expected an nnU-Net v2 file written with --save_probabilities",
    )
    if probs.dtype.kind != "f":
        raise NnUNetFormatError(f"{npz_path.name}: probabilities have dtype {probs.dtype}, expected float")
    if probs.ndim != 4:
        raise NnUNetFormatError(
            f"{npz_path.name}: probabilities have shape {probs.shape}; expected (C, *3D array shape)"
        )
    if tuple(probs.shape[1:]) != geom.array_shape:
        raise NnUNetFormatError(
            f"{npz_path.name}: probabilities' spatial shape {tuple(probs.shape[1:])} differs from "
            f"shape_before_cropping {geom.array_shape} in the properties"
        )
    if num_classes is not None and probs.shape[0] != num_classes:
        raise NnUNetFormatError(
            f"{npz_path.name}: {probs.shape[0]} classes in the probabilities, expected {num_classes}"
        )
    check_against_label(geom, label_shape, label_affine, name=npz_path.name)
    out = np.ascontiguousarray(probs.transpose(0, *(1 + i for i in geom.to_nibabel)))
    return out, props, geom


def write_nnunet_prediction(
    out_path: str | os.PathLike,
    probs_nibabel: np.ndarray,
    source_npz: str | os.PathLike,
    *,
    dtype: Any = np.float32,
) -> Path:
    """Write calibrated ``(C, x, y, z)`` probabilities as nnU-Net ``.npz`` + a copy of the ``.pkl``.

    The axes are put back in the order the source file used (read from its properties), so the
    output drops into any nnU-Net tooling in place of the original.
    """
    src = Path(source_npz)
    out_path = Path(out_path)
    if not out_path.name.endswith(".npz"):
        raise InputError(f"nnU-Net output must be a .npz file, got {out_path.name}")
    pkl_path = properties_path(src)
    pkl_bytes = pkl_path.read_bytes()
    geom = checked_geometry(unpickle_properties(pkl_bytes, pkl_path), pkl_path)
    arr = np.asarray(probs_nibabel)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != geom.nibabel_shape:
        raise NnUNetFormatError(
            f"{out_path.name}: probabilities of shape {arr.shape} do not fit the source geometry "
            f"(C, {', '.join(map(str, geom.nibabel_shape))}) in nibabel order"
        )
    inv = np.argsort(geom.to_nibabel)
    arr = arr.transpose(0, *(1 + int(i) for i in inv)).astype(dtype, copy=False)
    with atomic_write(out_path) as fh:
        np.savez_compressed(fh, **{PROBS_KEY: arr})
    with atomic_write(properties_path(out_path)) as fh:
        fh.write(pkl_bytes)
    return out_path


def read_nnunet_item(
    pred_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One nnU-Net case for ``segcal eval``/``fit``/``apply``: ``(probs (C, x, y, z), label or None)``.

    The label (if given) is read with ``segcal.io.read_label`` after its header has been checked
    against the properties (shape and, for NIfTI, affine).
    """
    shape, affine = (None, None) if label_path is None else label_geometry(label_path)
    probs, _, _ = read_nnunet_prediction(
        pred_path, label_shape=shape, label_affine=affine, num_classes=num_classes
    )
    label = None
    if label_path is not None:
        label = read_label(label_path)
        if label.ndim == 4 and label.shape[3] == 1:
            label = label[..., 0]
    return probs, label


def write_like_source(
    out_path: str | os.PathLike,
    array: np.ndarray,
    source_path: str | os.PathLike,
    *,
    key: str | None = None,
    dtype: Any = np.float16,
) -> Path:
    """Drop-in for ``write_prediction`` in ``segcal apply``: keep an nnU-Net source's format.

    For an nnU-Net source (``.npz`` + ``.pkl``) ``array`` must be probabilities in nibabel order
    (what ``PredictionFolder.read`` gave); it is written with ``write_nnunet_prediction`` (float32,
    source axis order, ``.pkl`` copied). Asking for logits there raises: nnU-Net's format holds
    probabilities only. Anything else goes to ``write_prediction(out_path, array, key, dtype)``.
    """
    if is_nnunet_prediction(source_path):
        if key not in (None, PROBS_KEY):
            raise InputError(
                f"{Path(source_path).name}: nnU-Net prediction files hold probabilities only; "
                f"cannot write {key!r} in that format (use --output probs)"
            )
        return write_nnunet_prediction(out_path, array, source_path)
    return write_prediction(out_path, array, key=key, dtype=dtype)


def read_label_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 3D integer label NIfTI as ``(label (X, Y, Z) int64, affine)``; 4D files are refused."""
    shape, affine = nifti_header(path, what="label")
    lab = read_label(path)
    return lab.reshape(shape).astype(np.int64, copy=False), affine


def _check_classes(arr: np.ndarray, num_classes: int | None, name: str) -> None:
    if num_classes is not None and arr.shape[0] != num_classes:
        raise InputError(f"{name}: {arr.shape[0]} classes in the prediction, expected {num_classes}")


def read_aligned(
    pred_path: str | os.PathLike,
    label_path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    folder_meta: dict[str, Any] | None = None,
    atol: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Prediction ``(C, X, Y, Z)`` and label ``(X, Y, Z)`` int64 on the same voxel grid, checked.

    * nnU-Net ``.npz`` + ``.pkl``: transposed using the properties, checked against the label's
      shape and affine (:class:`NnUNetFormatError` when they disagree).
    * segcal ``.npy``/``.npz``: shape must equal the label's; if ``folder_meta['cases'][stem]``
      records an affine (``predict_volumes`` does), it must match the label's.

    Every disagreement (shape, affine, class count, dimensionality) is an
    :class:`~segcal.errors.InputError` naming the file and both values.
    """
    pred_path, label_path = Path(pred_path), Path(label_path)
    shape, affine = nifti_header(label_path, what="label")
    if is_nnunet_prediction(pred_path):
        pred, _, _ = read_nnunet_prediction(
            pred_path, label_shape=shape, label_affine=affine, num_classes=num_classes
        )
    else:
        pred, _ = read_prediction(pred_path)
        if pred.ndim != 4:
            raise InputError(
                f"{pred_path.name}: prediction has shape {pred.shape}; expected (C, X, Y, Z) for a 3D volume"
            )
        _check_classes(pred, num_classes, pred_path.name)
        if tuple(pred.shape[1:]) != shape:
            raise InputError(
                f"{pred_path.name}: prediction spatial shape {tuple(pred.shape[1:])} differs from "
                f"label {label_path.name} shape {shape}"
            )
        stem = pred_path.name.rsplit(".", 1)[0]
        rec = (folder_meta or {}).get("cases", {}).get(stem)
        if rec is not None and rec.get("affine") is not None:
            paff = np.asarray(rec["affine"], dtype=np.float64)
            if not np.allclose(paff, affine, atol=atol):
                raise InputError(
                    f"{pred_path.name}: prediction affine (segcal.json) differs from label "
                    f"{label_path.name} affine:\n{np.round(paff, 4)}\nvs\n{np.round(affine, 4)}"
                )
    label = read_label_volume(label_path)[0]
    return pred, label


def write_calibrated(
    out_dir: str | os.PathLike, stem: str, probs: np.ndarray, source_path: str | os.PathLike
) -> Path:
    """Write calibrated ``(C, X, Y, Z)`` probabilities in the source's format.

    nnU-Net source -> ``out_dir/<stem>.npz`` (key ``probabilities``, nnU-Net axis order, float32) and
    ``<stem>.pkl`` copied; otherwise -> ``out_dir/<stem>.npz`` with key ``probabilities`` in
    nibabel order (segcal format).
    """
    out = Path(out_dir) / f"{stem}.npz"
    if is_nnunet_prediction(source_path):
        return write_nnunet_prediction(out, probs, source_path)
    return write_prediction(out, probs, key="probabilities", dtype=np.float32)


__all__ = [
    "MAX_PICKLED_ARRAY_BYTES",
    "MAX_PROPERTIES_BYTES",
    "PROBS_KEY",
    "NnUNetFormatError",
    "NnUNetGeometry",
    "UnsafePickleError",
    "check_against_label",
    "checked_geometry",
    "geometry_from_properties",
    "is_nnunet_prediction",
    "properties_path",
    "read_aligned",
    "read_label_volume",
    "read_nnunet_item",
    "read_nnunet_prediction",
    "read_properties",
    "unpickle_properties",
    "write_calibrated",
    "write_like_source",
    "write_nnunet_prediction",
]
