"""Files of ``segcal conformal apply``: pixel sets, set-size maps and guaranteed-recall masks, each
carrying the guarantee it comes with.

For a result of risk ``"miscoverage"`` or ``"coverage"`` each prediction file gives its pixel sets
``S(x) = {k : p_k(x) >= 1 - λ̂}`` and the set-size map ``|S(x)|``; for ``"fnr"`` with class K it
gives the guaranteed-recall mask ``{p_K >= 1 - λ̂}`` of class K (the mask whose expected missed
fraction of K is controlled). Layout of the output folder, by ``fmt``:

``"npz"``
    ``<stem>.npz``: ``packed`` (``numpy.packbits`` of the boolean masks along the class axis,
    :class:`~segcal.conformal.PixelSets`), ``num_masks``, ``sizes`` (uint16) and ``guarantee`` (the
    metadata below as a JSON string).
``"png"`` (2D only)
    ``sets/<stem>.png``: per pixel the class code ``Σ_k 2^k · [k ∈ S(x)]`` (bit k = class k),
    8-bit grey for at most 8 classes, 16-bit grey for 9 to 16; with more than 16 classes
    ``sets/<stem>_part<g>.png`` holds classes ``16g .. 16g + 15`` (bit ``k - 16g``), one 16-bit
    PNG per group. ``sizes/<stem>.png``: the set size (8-bit; 16-bit above 255 classes).
    ``recall/<stem>.png`` (``"fnr"``): the mask, 0/1, 8-bit.
``"nifti"`` (3D only)
    The same three folders with ``.nii.gz`` volumes: codes in uint8 / uint16 / uint32 / uint64
    (up to 64 classes in one volume, ``_part<g>`` groups of 64 above), sizes uint8 / uint16,
    mask uint8. Voxel order and affine of the source: the ``reference`` NIfTI of the same stem
    (its header is copied: affine, qform/sform codes, pixdim, units), else the geometry of an
    nnU-Net case (its properties), else the affine :func:`segcal.pipeline.predict.predict_volumes`
    recorded in the prediction folder's ``segcal.json``; with none of them writing is refused.
``"nnunet"`` (nnU-Net v2 cases: ``<case>.npz`` + ``<case>.pkl``)
    ``sets/<case>.npz`` + ``sets/<case>.pkl``: the per-class 0/1 masks ``(C, *array)`` under key
    ``probabilities`` (float16, nnU-Net's axis order, the source properties copied:
    :func:`segcal.io.nnunet.write_nnunet_prediction`), so nnU-Net's tools and segcal's reader line
    them up as they do the source; ``sizes/<case>.nii.gz`` and ``recall/<case>.nii.gz`` on the
    case's original grid (affine from the properties), as nnU-Net writes its segmentations.

**Where the guarantee is.** Every file: PNG ``iTXt`` chunks ``segcal-conformal`` (the JSON of
:func:`guarantee_metadata`: risk, α, δ, λ̂, threshold, n calibration units, method, class, τ,
exchangeable unit, what the file holds and how it is encoded, the guarantee in words) and
``Description`` (the sentence); NIfTI ``descrip`` (80 bytes: a short form, e.g. ``segcal crc fnr1
a=0.1 lam=0.93 n=35 unit=volume``) and a header extension of code 6 (comment) holding the full
JSON; ``.npz``: the ``guarantee`` key, except nnU-Net's ``probabilities`` files, whose format has
no slot for it (the folder manifest holds it). The folder manifest ``conformal.json`` is the
result (:meth:`ConformalResult.to_dict`, readable by :meth:`ConformalResult.load`) plus
``outputs``: the format, the encoding and the files of every stem.

**Atomic.** :func:`staged_folder` writes everything into a hidden sibling folder and renames it
over ``out`` only when every file and the manifest are written: an error (a refused file, a full
disk, Ctrl-C) leaves ``out`` as it was, never half-written.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from segcal.conformal.result import ConformalResult, PixelSets
from segcal.errors import InputError
from segcal.io import atomic_write, to_jsonable
from segcal.io.files import list_stems
from segcal.io.nifti import NIFTI_SUFFIXES, nibabel
from segcal.io.nnunet import (
    checked_geometry,
    is_nnunet_prediction,
    properties_path,
    read_properties,
    write_nnunet_prediction,
)

OUTPUT_FORMATS: tuple[str, ...] = ("npz", "png", "nifti", "nnunet")
MANIFEST = "conformal.json"
#: the largest number of classes one code file holds, per format
MAX_BITS = {"png": 16, "nifti": 64, "nnunet": 64}
PNG_KEY = "segcal-conformal"
NIFTI_COMMENT_CODE = 6  # NIFTI_ECODE_COMMENT
ENCODING = ("code = sum over classes k in the set of 2**k (bit k = class k; groups of {bits} classes per file "
            "above {bits}: file _part<g> holds classes {bits}g..{bits}g+{last}, bit k - {bits}g)")


def guarantee_metadata(result: ConformalResult, content: str, unit: str) -> dict[str, Any]:
    """The guarantee as stored in every output file (JSON-ready).

    ``content``: ``"sets"``, ``"sizes"`` or ``"recall"``; ``unit``: ``"image"`` or ``"volume"``.
    """
    return to_jsonable({
        "format": "segcal-conformal-output", "content": content, "risk": result.risk, "alpha": result.alpha,
        "delta": result.delta, "lambda": result.lam, "threshold": 1.0 - result.lam, "method": result.method,
        "n_calibration_units": result.n_images, "class_index": result.class_index, "tau": result.tau,
        "exchangeable_unit": f"{unit} (one prediction file); never the pixel", "guarantee": result.guarantee,
    })


def short_description(result: ConformalResult, unit: str) -> str:
    """At most 80 ASCII characters (NIfTI ``descrip``)."""
    risk = f"fnr{result.class_index}" if result.risk == "fnr" else result.risk
    d = "" if result.delta is None else f" d={result.delta:g}"
    return f"segcal {result.method} {risk} a={result.alpha:g}{d} lam={result.lam:.6g} n={result.n_images} unit={unit}"[:80]


def code_dtype(bits: int) -> np.dtype:
    """The smallest unsigned integer type with at least ``bits`` bits."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if np.dtype(dt).itemsize * 8 >= bits:
            return np.dtype(dt)
    raise InputError(f"bits: {bits} is more than 64")


def encode_codes(masks: np.ndarray, max_bits: int) -> list[np.ndarray]:
    """Boolean masks ``(C, *spatial)`` -> integer codes (bit k = class k), one array per group of ``max_bits`` classes."""
    m = np.asarray(masks, dtype=bool)
    out = []
    for start in range(0, m.shape[0], max_bits):
        group = m[start : start + max_bits]
        dt = code_dtype(group.shape[0])
        code = np.zeros(group.shape[1:], dtype=dt)
        for b in range(group.shape[0]):
            code |= group[b].astype(dt) << dt.type(b)
        out.append(code)
    return out


def decode_codes(codes: list[np.ndarray], num_classes: int, max_bits: int) -> np.ndarray:
    """The inverse of :func:`encode_codes`: boolean masks ``(num_classes, *spatial)``."""
    masks = []
    for k in range(num_classes):
        c = np.asarray(codes[k // max_bits]).astype(np.uint64)
        masks.append((c >> np.uint64(k % max_bits)) & np.uint64(1))
    return np.stack(masks).astype(bool)


def _part_names(stem: str, n_parts: int) -> list[str]:
    return [stem] if n_parts == 1 else [f"{stem}_part{g}" for g in range(n_parts)]


# ------------------------------------------------------------------------------ files
def write_png(path: Path, array: np.ndarray, meta: Mapping[str, Any]) -> None:
    """A 2D uint8 / uint16 array as 8- / 16-bit grey PNG with the guarantee in iTXt chunks (atomic)."""
    a = np.ascontiguousarray(array)
    if a.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{path.name}: PNG holds 8- or 16-bit values, not {a.dtype}")
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PNG_KEY, json.dumps(meta))
    info.add_itxt("Description", str(meta["guarantee"]))
    im = Image.fromarray(a if a.dtype == np.uint8 else a.astype("<u2"))  # mode L / I;16
    with atomic_write(path) as fh:
        im.save(fh, format="PNG", pnginfo=info)


def read_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``(array, guarantee metadata)`` of a PNG written by :func:`write_png`."""
    with Image.open(path) as im:
        arr = np.array(im)
        text = dict(getattr(im, "text", {}))
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint16)
    return arr, json.loads(text[PNG_KEY]) if PNG_KEY in text else {}


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, header: Any, meta: Mapping[str, Any],
                descrip: str, intent: str) -> None:
    """A volume as ``.nii.gz`` with ``affine`` (and a copy of ``header`` when given): ``descrip``,
    ``intent_name`` and a comment extension holding the JSON ``meta`` (atomic)."""
    nib = nibabel()
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.ascontiguousarray(array), np.asarray(affine, dtype=np.float64), header=hdr)
    h = img.header
    h.set_data_dtype(array.dtype)
    h.set_slope_inter(1.0, 0.0)
    h["descrip"] = descrip.encode("ascii", "replace")[:80]
    h["intent_name"] = intent.encode("ascii")[:16]
    h.extensions.clear()
    h.extensions.append(nib.nifti1.Nifti1Extension(NIFTI_COMMENT_CODE, json.dumps(meta).encode("utf-8")))
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    with atomic_write(path) as fh:
        fh.write(data)


def read_nifti_output(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any], str]:
    """``(array, affine, guarantee metadata, descrip)`` of a volume written by :func:`write_nifti`."""
    img = nibabel().load(str(path))
    meta: dict[str, Any] = {}
    for ext in img.header.extensions:
        if int(ext.get_code()) == NIFTI_COMMENT_CODE:
            meta = json.loads(ext.get_content())
    arr = np.asarray(img.dataobj)
    return arr, np.asarray(img.affine), meta, img.header["descrip"].item().decode("ascii")


# ------------------------------------------------------------------------------ geometry
def reference_files(folder: str | os.PathLike | None) -> dict[str, Path]:
    """Stem -> NIfTI file of a ``reference`` folder (``<stem>.nii.gz``; nnU-Net's ``<case>_0000`` too)."""
    if folder is None:
        return {}
    found = list_stems(Path(folder), NIFTI_SUFFIXES, "--reference")
    if not found:
        raise InputError(f"--reference: no .nii / .nii.gz files in {folder}")
    out = dict(found)
    for stem, p in found.items():
        if stem.endswith("_0000"):
            out.setdefault(stem[: -len("_0000")], p)
    return out


def volume_geometry(stem: str, shape: tuple[int, ...], source: Path, reference: Mapping[str, Path],
                    folder_meta: Mapping[str, Any]) -> tuple[np.ndarray, Any]:
    """``(affine, header or None)`` of a volume: reference NIfTI, nnU-Net properties, or ``segcal.json``."""
    if stem in reference:
        try:
            ref = nibabel().load(str(reference[stem]))
        except Exception as exc:  # nibabel raises several types for corrupt files
            raise InputError(f"--reference: cannot read {reference[stem]}: {exc}") from exc
        rshape = tuple(int(s) for s in ref.shape)
        if rshape[3:] == (1,):
            rshape = rshape[:3]
        if rshape != tuple(shape):
            raise InputError(f"--reference: {reference[stem].name} has shape {rshape}, the prediction of {stem!r} "
                             f"{tuple(shape)}; expected the volume the prediction was made on")
        return np.asarray(ref.affine, dtype=np.float64), ref.header
    if reference:
        raise InputError(f"--reference: no NIfTI file for {stem!r} (expected {stem}.nii.gz)")
    if is_nnunet_prediction(source):
        props = properties_path(source)
        return np.asarray(checked_geometry(read_properties(props), props).affine, dtype=np.float64), None
    rec = (folder_meta.get("cases") or {}).get(stem) or {}
    if rec.get("affine") is not None:
        aff = np.asarray(rec["affine"], dtype=np.float64)
        if aff.shape == (4, 4) and np.isfinite(aff).all():
            return aff, None
    raise InputError(f"--reference: no affine is known for {stem!r} (not an nnU-Net case, none recorded in "
                     "the prediction folder's segcal.json); pass --reference DIR with the NIfTI volumes")


# ------------------------------------------------------------------------------ writer
class SetWriter:
    """Writes one prediction file's :class:`~segcal.conformal.PixelSets` in ``fmt`` under ``root``.

    Parameters
    ----------
    result
        The fitted threshold (its guarantee goes into every file).
    fmt
        One of :data:`OUTPUT_FORMATS` (layout in the module docstring).
    root
        The folder written into (:func:`staged_folder` gives a staging folder).
    reference
        Stem -> NIfTI file whose header the ``"nifti"`` volumes copy (:func:`reference_files`).
    folder_meta
        The prediction folder's manifest (affines recorded by ``predict_volumes``).
    """

    def __init__(self, result: ConformalResult, fmt: str, root: str | os.PathLike,
                 reference: Mapping[str, Path] | None = None, folder_meta: Mapping[str, Any] | None = None) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise InputError(f"--format: {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        self.result, self.fmt, self.root = result, fmt, Path(root)
        self.reference = dict(reference or {})
        self.folder_meta = dict(folder_meta or {})
        self.files: dict[str, list[str]] = {}
        self.num_masks: int | None = None

    @property
    def recall(self) -> bool:
        return self.result.risk == "fnr"

    def write(self, stem: str, sets: PixelSets, source: str | os.PathLike) -> list[str]:
        """Write the files of one prediction file; returns their paths relative to the root."""
        spatial = tuple(sets.sizes.shape)
        self.num_masks = sets.num_masks
        if self.fmt == "png" and len(spatial) != 2:
            raise InputError(f"--format png: {stem!r} has spatial shape {spatial}; PNG holds 2D images "
                             "(use --format nifti or nnunet for volumes, npz for any shape)")
        if self.fmt in ("nifti", "nnunet") and len(spatial) != 3:
            raise InputError(f"--format {self.fmt}: {stem!r} has spatial shape {spatial}; expected a 3D volume "
                             "(use --format png for 2D images, npz for any shape)")
        if self.fmt == "nnunet" and not is_nnunet_prediction(source):
            raise InputError(f"--format nnunet: {Path(source).name} is not an nnU-Net v2 case (.npz with a .pkl "
                             "beside it); use --format nifti (with --reference) for other volumes")
        unit = "image" if len(spatial) == 2 else "volume"
        names = getattr(self, f"_{self.fmt}")(stem, sets, Path(source), unit)
        self.files[stem] = names
        return names

    def _meta(self, content: str, unit: str, encoding: str) -> dict[str, Any]:
        return guarantee_metadata(self.result, content, unit) | {"encoding": encoding}

    def _code_encoding(self, bits: int) -> str:
        return ENCODING.format(bits=bits, last=bits - 1)

    def _npz(self, stem: str, sets: PixelSets, source: Path, unit: str) -> list[str]:
        meta = self._meta("recall" if self.recall else "sets", unit,
                          "packed = numpy.packbits(masks, axis=0) (big-endian bit order, class 0 = highest bit "
                          "of byte 0); unpack with numpy.unpackbits(packed, axis=0, count=num_masks)")
        with atomic_write(self.root / f"{stem}.npz") as fh:
            np.savez_compressed(fh, packed=sets.packed, num_masks=np.int64(sets.num_masks), sizes=sets.sizes,
                                guarantee=np.str_(json.dumps(meta)))
        return [f"{stem}.npz"]

    def _png(self, stem: str, sets: PixelSets, source: Path, unit: str) -> list[str]:
        masks = sets.masks()
        if self.recall:
            write_png(self.root / "recall" / f"{stem}.png", masks[0].astype(np.uint8),
                      self._meta("recall", unit, f"0/1 mask of class {self.result.class_index}"))
            return [f"recall/{stem}.png"]
        codes = encode_codes(masks, MAX_BITS["png"])
        names = [f"sets/{n}.png" for n in _part_names(stem, len(codes))]
        meta = self._meta("sets", unit, self._code_encoding(MAX_BITS["png"]))
        for name, code in zip(names, codes, strict=True):
            write_png(self.root / name, code, meta)
        size_dtype = np.uint8 if masks.shape[0] <= 255 else np.uint16
        write_png(self.root / "sizes" / f"{stem}.png", sets.sizes.astype(size_dtype),
                  self._meta("sizes", unit, "number of classes in the pixel's set"))
        return [*names, f"sizes/{stem}.png"]

    def _volumes(self, stem: str, sets: PixelSets, unit: str, affine: np.ndarray, header: Any,
                 with_codes: bool) -> list[str]:
        desc = short_description(self.result, unit)
        masks = sets.masks()
        if self.recall:
            write_nifti(self.root / "recall" / f"{stem}.nii.gz", masks[0].astype(np.uint8), affine, header,
                        self._meta("recall", unit, f"0/1 mask of class {self.result.class_index}"), desc,
                        "segcal recall")
            return [f"recall/{stem}.nii.gz"]
        names = []
        if with_codes:
            codes = encode_codes(masks, MAX_BITS["nifti"])
            meta = self._meta("sets", unit, self._code_encoding(MAX_BITS["nifti"]))
            for name, code in zip(_part_names(stem, len(codes)), codes, strict=True):
                write_nifti(self.root / "sets" / f"{name}.nii.gz", code, affine, header, meta, desc, "segcal sets")
                names.append(f"sets/{name}.nii.gz")
        size_dtype = np.uint8 if masks.shape[0] <= 255 else np.uint16
        write_nifti(self.root / "sizes" / f"{stem}.nii.gz", sets.sizes.astype(size_dtype), affine, header,
                    self._meta("sizes", unit, "number of classes in the voxel's set"), desc, "segcal size")
        return [*names, f"sizes/{stem}.nii.gz"]

    def _nifti(self, stem: str, sets: PixelSets, source: Path, unit: str) -> list[str]:
        affine, header = volume_geometry(stem, tuple(sets.sizes.shape), source, self.reference, self.folder_meta)
        return self._volumes(stem, sets, unit, affine, header, with_codes=True)

    def _nnunet(self, stem: str, sets: PixelSets, source: Path, unit: str) -> list[str]:
        affine, header = volume_geometry(stem, tuple(sets.sizes.shape), source, self.reference, self.folder_meta)
        names = []
        if not self.recall:
            write_nnunet_prediction(self.root / "sets" / f"{stem}.npz", sets.masks().astype(np.float16), source,
                                    dtype=np.float16)
            names = [f"sets/{stem}.npz", f"sets/{stem}.pkl"]
        return names + self._volumes(stem, sets, unit, affine, header, with_codes=False)

    def manifest(self) -> dict[str, Any]:
        """``conformal.json``: the result plus ``outputs`` (format, encoding, files per stem)."""
        bits = MAX_BITS.get(self.fmt)
        enc = {
            "npz": "packed = numpy.packbits(masks, axis=0); sizes = set size (uint16)",
            "png": self._code_encoding(16) + "; 8-bit PNG up to 8 classes, 16-bit up to 16",
            "nifti": self._code_encoding(64) + "; uint8/16/32/64 volumes",
            "nnunet": "sets/<case>.npz: per-class 0/1 masks under 'probabilities' (float16, nnU-Net axis order, "
                      "properties copied); sizes/, recall/: NIfTI on the case's original grid",
        }[self.fmt]
        where = {"npz": "the 'guarantee' key of each .npz (JSON)",
                 "png": f"iTXt chunks '{PNG_KEY}' (JSON) and 'Description' (the sentence)",
                 "nifti": "descrip (short form, 80 bytes) and a header extension of code 6 (comment, JSON)",
                 "nnunet": "NIfTI files: descrip + comment extension; the .npz files: this manifest only "
                           "(nnU-Net's format has no metadata slot)"}[self.fmt]
        return self.result.to_dict() | {"outputs": to_jsonable({
            "format": self.fmt, "content": "recall" if self.recall else "sets and sizes", "encoding": enc,
            "max_classes_per_code_file": bits, "num_masks": self.num_masks, "guarantee_metadata": where,
            "complete": True, "files": self.files,
        })}


def begin_staging(out: str | os.PathLike) -> Path:
    """A new hidden sibling of ``out`` to write into (:func:`commit_staging` makes it ``out``).

    Raises
    ------
    InputError
        ``out`` is a file, or a non-empty folder that ``segcal conformal apply`` did not write
        (no ``conformal.json``): it is never replaced.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is an existing file; expected a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise InputError(f"--out {out}: is a folder holding files that 'segcal conformal apply' did not write; "
                         "pass a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def commit_staging(tmp: Path, out: str | os.PathLike) -> None:
    """Replace ``out`` by the staged folder ``tmp`` (an earlier output is removed after the swap)."""
    out = Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_staging(tmp: Path) -> None:
    """Remove a staged folder (after an error: nothing half-written is left)."""
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Write into a hidden sibling of ``out`` (:func:`begin_staging`); on success it replaces
    ``out`` (:func:`commit_staging`), on any error it is removed."""
    tmp = begin_staging(out)
    try:
        yield tmp
        commit_staging(tmp, out)
    except BaseException:
        discard_staging(tmp)
        raise


def write_manifest(root: Path, writer: SetWriter) -> None:
    """The folder manifest, written last."""
    buf = io.StringIO()
    json.dump(writer.manifest(), buf, indent=2)
    with atomic_write(root / MANIFEST, "w") as fh:
        fh.write(buf.getvalue() + "\n")


__all__ = [
    "MANIFEST",
    "MAX_BITS",
    "OUTPUT_FORMATS",
    "SetWriter",
    "begin_staging",
    "code_dtype",
    "commit_staging",
    "decode_codes",
    "discard_staging",
    "encode_codes",
    "guarantee_metadata",
    "read_nifti_output",
    "read_png",
    "reference_files",
    "short_description",
    "staged_folder",
    "volume_geometry",
    "write_manifest",
    "write_nifti",
    "write_png",
]
