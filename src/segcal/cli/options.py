"""Argument declarations shared by the command parsers (argparse only, no torch).

The parsers (:mod:`segcal.cli.parsers`) are built for ``segcal --help`` and every command line,
so this module imports nothing heavy. The run-time counterparts (device objects, the input type
a folder holds) are in :mod:`segcal.cli.common`.
"""

from __future__ import annotations

import argparse

#: the values of ``--input-type`` (``--probabilities`` is the short form of ``--input-type probs``)
INPUT_TYPES = ("logits", "probs")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, left out where it says nothing (None, off flags).

    The help text of an option that already states its default (``... (default 15)``) is kept as
    it is.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def add_input_type_args(p: argparse.ArgumentParser, default_help: str = "the folder's segcal.json, else logits") -> None:
    """``--input-type logits|probs`` and its short form ``--probabilities`` (dest ``input_type``).

    Both spellings are accepted by every command that reads predictions; giving both with
    different values is refused by :func:`segcal.cli.common.input_type_from_args`.
    """
    g = p.add_argument_group("input type")
    g.add_argument("--input-type", choices=INPUT_TYPES, default=None, dest="input_type",
                   help=f"what the prediction files hold (when not given: {default_help})")
    g.add_argument("--probabilities", action="store_true", dest="probabilities",
                   help="the prediction files hold probabilities (same as --input-type probs)")


def add_device_arg(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    """``--device cpu|cuda|cuda:N|auto`` (checked at run time by :func:`segcal.cli.common.device_from_arg`)."""
    p.add_argument("--device", default=default,
                   help=f"cpu, cuda, cuda:N or auto (cuda when available) (default {default})")


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress`` (also spelled ``--quiet`` / ``-q``, as in ``segcal bench``): no progress bars
    on stderr (dest ``no_progress``)."""
    p.add_argument("--no-progress", "--quiet", "-q", action="store_true", dest="no_progress",
                   help="no progress bars on stderr (--quiet and -q are the same)")


def csv_arg(s: str) -> tuple[str, ...]:
    """argparse type: ``"a, b,c"`` -> ``("a", "b", "c")``."""
    return tuple(x.strip() for x in s.split(",") if x.strip())


def ints_arg(s: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers."""
    try:
        return tuple(int(x) for x in csv_arg(s))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from exc


__all__ = ["INPUT_TYPES", "HelpFormatter", "add_device_arg", "add_input_type_args", "add_progress_arg",
           "csv_arg", "ints_arg"]
