"""The errors segcal raises on purpose.

Every error a user can cause (a bad file, a bad argument, an incomplete folder) is an
:class:`InputError`: the message names the file or argument, says what was found and what was
expected. The command line turns it into one line on stderr and exit code 2, without a traceback
(see :mod:`segcal.cli`). ``InputError`` subclasses :class:`ValueError` so that code written
against the usual Python contract (``except ValueError``) keeps working.
"""

from __future__ import annotations

#: exit code of a command whose input (file, folder, argument) was refused
EXIT_INPUT = 2


class SegcalError(Exception):
    """Base class of the errors segcal raises deliberately."""


class InputError(SegcalError, ValueError):
    """Refused input: the message names the file or argument, what was found and what was expected."""


class InputTypeError(InputError, TypeError):
    """Refused input of the wrong kind (a dtype or a Python type): also a :class:`TypeError`."""


class MissingDependencyError(SegcalError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def missing_dependency(module: str, extra: str, what: str) -> MissingDependencyError:
    """The error for an absent optional dependency, with its install hint.

    Parameters
    ----------
    module
        Import name that failed (``"sklearn"``).
    extra
        segcal extra that installs it (``"test"``, ``"plot"``, ...).
    what
        What needed it, for the message (``"isotonic calibration"``).
    """
    return MissingDependencyError(
        f"{what} needs the optional dependency {module!r}, which is not installed; "
        f"install it with: pip install 'segcal[{extra}]'"
    )


def reason(exc: BaseException) -> str:
    """A one-line, user-facing reason for a reader's exception.

    torch's refusal of a file by its restricted unpickler (``weights_only=True``) is reduced to
    what was refused: its advice to retry with ``weights_only=False`` (which would run arbitrary
    code from the file) is never repeated.
    """
    text = str(exc)
    if "weights_only" in text or "WeightsUnpickler" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        for cut in ("Check the documentation", " was not an allowed global", "Please use"):
            detail = detail.split(cut, 1)[0]
        detail = " ".join(detail.split())
        return "refused by the restricted loader (not a file segcal wrote" + (f": {detail})" if detail else ")")
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    text = " ".join(text.split())
    name = type(exc).__name__
    if not text:
        return name
    return text if isinstance(exc, SegcalError) or type(exc) is ValueError else f"{text} ({name})"


def unreadable(path: object, exc: BaseException, what: str = "a segcal file") -> InputError:
    """The :class:`InputError` for a file a reader could not parse (truncated, random bytes, ...).

    Parameters
    ----------
    path
        The file.
    exc
        What the reader raised (``EOFError``, ``zipfile.BadZipFile``, ``pickle.UnpicklingError``, ...).
    what
        What the file should have been, for the message (``"a fitted calibrator (.pt)"``).
    """
    return InputError(f"{path}: could not be read as {what}: {reason(exc)}")


__all__ = ["EXIT_INPUT", "InputError", "InputTypeError", "MissingDependencyError", "SegcalError", "missing_dependency",
           "reason", "unreadable"]
