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


__all__ = ["EXIT_INPUT", "InputError", "MissingDependencyError", "SegcalError", "missing_dependency"]
