"""Run-time helpers shared by the commands: devices, the input type, output folders.

Each helper raises :class:`segcal.errors.InputError` naming the flag to change, so the one error
layer (:func:`segcal.cli.app.main`) prints one line and exits with code 2. The argument
declarations these helpers read are in :mod:`segcal.cli.options`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from segcal.errors import InputError
from segcal.io.arrays import find_label_files, label_dtype
from segcal.validation import check_input_kind, ignore_index_note

#: what a message tells a command-line user to pass (the library's messages take this mapping as
#: ``flags`` / ``names``; ``{value}`` is filled in by the message)
CLI_FLAGS = {"probs": "--probabilities (or --input-type probs)", "logits": "--input-type logits",
             "ignore_index": "--ignore-index {value}"}


def checked_ignore_index(value: int | None, labels: str | Path | None, flag: str = "--ignore-index") -> int | None:
    """``value`` of ``flag``, or None (after a one-line warning on stderr) when it lies outside the
    range of the labels' dtype (the first label file of ``labels``, a folder or a file, read from
    its header): no label can equal it, so nothing is ignored, as the command then runs
    (:func:`segcal.validation.ignore_index_note`; 255 with uint8 labels 0..11 is in the range).
    Unreadable or missing labels are left to the command, which names them."""
    if value is None or labels is None:
        return value
    path = Path(labels)
    try:
        if path.is_dir():
            files = find_label_files(path)
            if not files:
                return value
            path = files[sorted(files)[0]]
        elif not path.is_file():
            return value
        note = ignore_index_note(value, label_dtype(path))
    except (InputError, OSError):
        return value
    if note is None:
        return value
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"segcal: warning: {flag} {value}: {note} (first label file {path.name}); pass the label value "
              f"of void pixels (e.g. 255) or leave {flag} out", file=sys.stderr)
    return None


def device_from_arg(arg: str) -> torch.device:
    """The torch device named by ``--device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``).

    ``auto`` is CUDA when available, else the CPU. A CUDA device on a machine without one, or a
    name torch does not know, is refused naming ``--device``.
    """
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"--device: unknown device {arg!r}; expected cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: CUDA was requested ({arg!r}) but is not available; pass --device cpu")
    return dev


def input_type_from_args(args: argparse.Namespace) -> str | None:
    """``logits``, ``probs`` or None (not given) from ``--input-type`` / ``--probabilities``.

    Giving ``--probabilities`` together with ``--input-type logits`` is refused.
    """
    given = getattr(args, "input_type", None)
    if getattr(args, "probabilities", False):
        if given == "logits":
            raise InputError("--probabilities and --input-type logits contradict each other; pass one of them")
        return "probs"
    return given


def check_scores_kind(scores: Any, input_type: str, where: str, *, axis: int = 0) -> None:
    """Refuse probabilities read as logits and logits read as probabilities, naming the CLI flag.

    ``where`` names the file (``pred/0001.npy``). See :func:`segcal.validation.check_input_kind`.
    """
    check_input_kind(scores, input_type, where, axis=axis, flags=CLI_FLAGS)


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_out_path(out: str | Path, inputs: Mapping[str, str | Path | None], *, kind: str = "dir",
                   flag: str = "--out") -> Path:
    """Refuse an output that would overwrite or mix with an input; return it resolved.

    Parameters
    ----------
    out
        The output folder (``kind="dir"``) or file (``kind="file"``).
    inputs
        Flag -> path of every input the command reads (``{"--pred": ..., "--labels": ...}``);
        None values are skipped.
    kind
        ``"dir"``: an existing file at ``out`` is refused; ``"file"``: an existing folder is.
    flag
        The output's flag, for messages.

    Raises
    ------
    InputError
        ``out`` is an input, lies inside an input folder, or contains an input.
    """
    o = _resolved(out)
    for name, path in inputs.items():
        if path is None:
            continue
        p = _resolved(path)
        if o == p:
            raise InputError(f"{flag} {out}: is the same path as {name}; inputs are never overwritten, "
                             f"pass another {flag}")
        if p in o.parents:
            raise InputError(f"{flag} {out}: lies inside the {name} folder {path}; inputs are never "
                             f"mixed with outputs, pass a {flag} outside it")
        if o in p.parents:
            raise InputError(f"{flag} {out}: contains the {name} input {path}; pass a {flag} that "
                             "neither is nor holds an input")
    if kind == "dir" and o.exists() and not o.is_dir():
        raise InputError(f"{flag} {out}: is an existing file; expected a folder (a new or existing directory)")
    if kind == "file" and o.is_dir():
        raise InputError(f"{flag} {out}: is an existing folder; expected a file path")
    return o


__all__ = ["CLI_FLAGS", "check_out_path", "check_scores_kind", "device_from_arg", "input_type_from_args"]


def files_bar(items: Iterable[Any], desc: str, args: argparse.Namespace, total: int | None = None,
              show: bool = True) -> Any:
    """A progress bar over a command's files on stderr: drawn on a terminal only (a log or a pipe
    gets none, so an error stays one line), never with ``--no-progress`` / ``--quiet`` / ``-q`` or
    ``show=False`` (e.g. on ranks other than 0 under torchrun)."""
    return tqdm(items, desc=desc, unit="file", leave=False, total=total,
                disable=True if getattr(args, "no_progress", False) or not show else None, file=sys.stderr)
