"""File plumbing shared by every reader and writer (the ground floor of :mod:`segcal.io`).

* :func:`atomic_write` -- every writer in segcal is atomic: data go to a temporary file
  ``.<name>.<random>.tmp`` in the destination folder that is renamed over the final name only
  once complete, so a failure never leaves a half-written file; :func:`clean_temporary_files`
  removes the ones a killed process left behind.
* :func:`to_jsonable` -- the one JSON cleaner; :func:`read_json` -- the one JSON reader (errors
  name the file).
* :func:`list_stems` / :func:`check_stems_match` -- the one folder listing and stem matching.
* :func:`load_npy` / :func:`load_npz` -- NumPy files read safely: no pickles, and a zero-byte,
  truncated or corrupt file is an :class:`~segcal.errors.InputError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from segcal.errors import InputError
from segcal.validation import native_byte_order

#: the temporary files of :func:`atomic_write`: ``.<final name>.<random>.tmp``
TEMPORARY_FILE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_jsonable(
    obj: Any,
    *,
    finite: bool = True,
    drop_private: bool = False,
    unknown: str = "keep",
) -> Any:
    """Recursively convert ``obj`` to plain JSON / ``torch.load(weights_only=True)`` values.

    The one cleaner of segcal: results, bench outputs, calibrator configurations and adaptation
    logs all go through it. Dict keys become ``str``, tuples and arrays lists, NumPy scalars
    Python scalars.

    Parameters
    ----------
    obj
        Any nesting of dicts, lists, tuples, NumPy arrays and scalars.
    finite
        Replace NaN and +-Inf floats by ``None`` (JSON has no NaN). ``False`` keeps them (a
        ``torch.save`` payload may hold NaN).
    drop_private
        Drop dict entries whose key starts with ``"_"`` (bench-internal values).
    unknown
        What to do with any other object: ``"keep"`` it as is, or ``"str"`` it.
    """
    if isinstance(obj, dict):
        return {
            str(k): to_jsonable(v, finite=finite, drop_private=drop_private, unknown=unknown)
            for k, v in obj.items()
            if not (drop_private and str(k).startswith("_"))
        }
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, list | tuple):
        return [to_jsonable(v, finite=finite, drop_private=drop_private, unknown=unknown) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return None if finite and not math.isfinite(obj) else obj
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    return str(obj) if unknown == "str" else obj


#: what reading a corrupt ``.npy`` / ``.npz`` can raise inside NumPy and zipfile
NPY_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
              NotImplementedError, struct.error, RuntimeError, SyntaxError, TypeError,
              OverflowError, MemoryError, tokenize.TokenError)  # fmt: skip


def _npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], np.dtype] | None:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:  # version 3 (utf-8 field names): leave the checks to numpy.load
        return None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def load_npy(path: str | os.PathLike, *, what: str = "array", mmap: bool = False) -> np.ndarray:
    """Read a ``.npy`` file (memory-mapped read-only with ``mmap``); never unpickles.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    InputError
        Zero-byte, truncated (fewer bytes than its header promises), object arrays, or any other
        undecodable file; the message names the file, what was found and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    size = path.stat().st_size
    expected = "a NumPy .npy array file (numpy.save)"
    if size == 0:
        raise InputError(f"{what}: {path} is empty (0 bytes); expected {expected}")
    try:
        with open(path, "rb") as fh:
            header = _npy_header(fh)
            offset = fh.tell()
    except NPY_ERRORS as exc:
        raise InputError(f"{what}: cannot read {path} ({exc}); expected {expected}") from exc
    if header is not None:
        shape, dtype = header
        if dtype.hasobject:
            raise InputError(f"{what}: {path} holds Python objects ({dtype}); expected a numeric array")
        need = offset + math.prod(shape) * dtype.itemsize
        if size < need:
            raise InputError(
                f"{what}: {path} is truncated: {size} bytes, but its header describes a {dtype} "
                f"array of shape {shape} ({need} bytes); expected the complete file"
            )
    try:
        return native_byte_order(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
    except NPY_ERRORS as exc:
        raise InputError(f"{what}: cannot read {path} ({exc}); expected {expected}") from exc


NPZ_EXPECTED = "a NumPy .npz archive (numpy.savez)"


def npz_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, checked to be a non-empty file (the start of every ``.npz`` read).

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    InputError
        If it is empty (0 bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    if path.stat().st_size == 0:
        raise InputError(f"{what}: {path} is empty (0 bytes); expected {NPZ_EXPECTED}")
    return path


def load_npz(
    path: str | os.PathLike, keys: tuple[str, ...], *, what: str = "array", hint: str = ""
) -> tuple[np.ndarray, str]:
    """Read the first of ``keys`` present in a ``.npz`` file; returns ``(array, key)``.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    InputError
        Zero-byte, truncated or corrupt archive (bad zip, bad CRC, bad compressed data), none of
        ``keys`` in it (``hint`` is appended), or a pickled member.
    """
    path = npz_path(path, what)
    expected = NPZ_EXPECTED
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise InputError(f"{what}: {path} is a .npy array, not an archive; expected {expected}")
        with z:
            present = [k for k in keys if k in z.files]
            if not present:
                names = " or ".join(repr(k) for k in keys)
                raise InputError(f"{what}: {path.name} has no {names} array (keys: {z.files}){hint}")
            return native_byte_order(np.asarray(z[present[0]])), present[0]
    except InputError:
        raise
    except NPY_ERRORS as exc:
        raise InputError(f"{what}: cannot read {path} ({type(exc).__name__}: {exc}); expected {expected}") from exc


def npz_header(
    path: str | os.PathLike, keys: tuple[str, ...], *, what: str = "array", hint: str = ""
) -> tuple[tuple[int, ...], np.dtype, str]:
    """``(shape, dtype, key)`` of the first of ``keys`` in a ``.npz`` archive, from the member's
    ``.npy`` header (the first bytes of the member are inflated, never its data).

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    InputError
        As :func:`load_npz`: an empty or corrupt archive, none of ``keys`` in it, an object member.
    """
    path = npz_path(path, what)
    expected = NPZ_EXPECTED
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            present = [k for k in keys if k in names]
            if not present:
                found = " or ".join(repr(k) for k in keys)
                raise InputError(f"{what}: {path.name} has no {found} array (keys: {sorted(names)}){hint}")
            with zf.open(names[present[0]]) as fh:
                header = _npy_header(fh)  # type: ignore[arg-type]
    except InputError:
        raise
    except NPY_ERRORS as exc:
        raise InputError(f"{what}: cannot read {path} ({type(exc).__name__}: {exc}); expected {expected}") from exc
    if header is None:  # a version-3 header: numpy reads it
        arr, key = load_npz(path, keys, what=what, hint=hint)
        return tuple(arr.shape), arr.dtype, key
    shape, dtype = header
    if dtype.hasobject:
        raise InputError(f"{what}: {path} holds Python objects ({dtype}); expected a numeric array")
    return shape, dtype, present[0]


def clean_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder``; return them.

    Only files named like :func:`atomic_write`'s own (``.<name>.<random>.tmp``) are touched; a
    missing folder is not an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and TEMPORARY_FILE.match(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p)
    return removed


def read_json(path: str | os.PathLike, *, what: str = "JSON file", expect: type = dict) -> Any:
    """Read a JSON file that must hold an ``expect`` (a dict by default).

    Raises
    ------
    InputError
        The file cannot be read, is not valid JSON, or holds another type; the message names the
        file, what was found and what was expected.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what}: cannot read {path}: {exc}") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        found = "an empty file" if not text.strip() else f"invalid JSON ({exc})"
        raise InputError(f"{what}: {path} holds {found}; expected a JSON {expect.__name__}") from exc
    if not isinstance(value, expect):
        raise InputError(
            f"{what}: {path} holds a JSON {type(value).__name__}; expected a JSON {expect.__name__}"
        )
    return value


def split_suffix(name: str, suffixes: tuple[str, ...], ignore_case: bool = False) -> tuple[str, str] | None:
    """``(stem, suffix)`` of ``name`` for the first of ``suffixes`` it ends with, else None."""
    test = name.lower() if ignore_case else name
    for suf in suffixes:
        if test.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)], name[-len(suf):]
    return None


def list_stems(
    folder: str | os.PathLike, suffixes: tuple[str, ...], what: str, *, ignore_case: bool = False
) -> dict[str, Path]:
    """Map stem -> path for the files of ``folder`` ending in one of ``suffixes`` (sorted).

    The one folder-listing routine of segcal: multi-part suffixes (``.nii.gz``) are handled,
    hidden files (including :func:`atomic_write`'s temporary files) and sub-folders skipped;
    ``ignore_case`` matches ``.PNG`` as ``.png``.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        If ``folder`` is missing or not a folder (the message starts with ``what``).
    InputError
        If two files share a stem.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what}: {folder} is not a folder")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        split = split_suffix(p.name, suffixes, ignore_case)
        if split is None:
            continue
        stem, _ = split
        if stem in found:
            raise InputError(
                f"{what}: two files share the stem {stem!r} in {folder}: {found[stem].name}, {p.name}"
            )
        found[stem] = p
    return found


def check_stems_match(
    left: dict[str, Path] | set[str],
    right: dict[str, Path] | set[str],
    header: str,
    left_only: str,
    right_only: str,
) -> None:
    """Raise an :class:`~segcal.errors.InputError` listing the stems present on one side only.

    The message is ``"<header>; N <left_only>: a, b, ...; M <right_only>: ..."`` (10 stems shown
    per side). The one stem-matching check of segcal (prediction/label folders, image/label
    folders, NIfTI volume pairs).
    """
    only_l = sorted(set(left) - set(right))
    only_r = sorted(set(right) - set(left))
    if not (only_l or only_r):
        return

    def _fmt(xs: list[str]) -> str:
        return ", ".join(xs[:10]) + (f" ... (+{len(xs) - 10} more)" if len(xs) > 10 else "")

    msg = [header]
    if only_l:
        msg.append(f"{len(only_l)} {left_only}: {_fmt(only_l)}")
    if only_r:
        msg.append(f"{len(only_r)} {right_only}: {_fmt(only_r)}")
    raise InputError("; ".join(msg))


def read_ahead(path: str | os.PathLike) -> bool:
    """Ask the kernel to start reading ``path`` into the page cache (``POSIX_FADV_WILLNEED``).

    Parameters
    ----------
    path
        A file about to be read (memory-mapped ``.npy`` files are read when their pages are
        touched: without the hint, a folder that does not fit the page cache is read from disk
        in the thread that computes).

    Returns
    -------
    bool
        Whether the hint was given (False where ``posix_fadvise`` is missing or fails: the file is
        then read as before). The call returns at once; it holds no memory of the process.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


__all__ = [
    "TEMPORARY_FILE",
    "atomic_write",
    "check_stems_match",
    "clean_temporary_files",
    "list_stems",
    "load_npy",
    "load_npz",
    "npz_header",
    "read_ahead",
    "read_json",
    "split_suffix",
    "to_jsonable",
]
