"""The ``segcal`` command line: the parser, the dispatch and the one error layer.

Start-up stays well under a second (``benchmarks/startup.py``): the parser is built from the
argparse-only modules of :mod:`segcal.cli.parsers`, and a command's module
``segcal.cli.<command>_cmd`` (which imports torch) is imported only once that command was chosen.

Errors are handled here, at one place, for every command:

* refused input (:class:`segcal.errors.InputError`, and the ``ValueError`` a library check raises)
  -> one line ``segcal <command>: error: <message>`` on stderr, exit code 2;
* what readers raise on a bad or unreadable file (``OSError`` with its file name, including
  permission errors and a full disk, ``EOFError``, ``zipfile.BadZipFile``,
  ``pickle.UnpicklingError``, ``PIL.UnidentifiedImageError``, ``json.JSONDecodeError``) -> the
  same, exit code 2; torch's advice to retry a refused file with ``weights_only=False`` is never
  printed;
* a missing optional dependency -> the install hint naming the extra, exit code 2;
* a closed pipe (``segcal eval ... | head``) -> quiet exit;
* anything else is a bug and keeps its traceback. ``--debug`` or ``SEGCAL_DEBUG=1`` re-raises
  every error with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from types import ModuleType

from segcal.cli.options import HelpFormatter
from segcal.cli.parsers import (
    adapt,
    apply,
    bench,
    calibrators,
    conformal,
    demo,
    estimate,
    export,
    fit,
    predict,
    pseudolabel,
)
from segcal.cli.parsers import eval as eval_args
from segcal.errors import EXIT_INPUT, InputError, MissingDependencyError, reason
from segcal.version import __version__

#: sub-command name -> (its argparse-only parser module, the module that runs it), in display order
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "eval": (eval_args, "segcal.cli.eval_cmd"),
    "fit": (fit, "segcal.cli.fit_cmd"),
    "apply": (apply, "segcal.cli.apply_cmd"),
    "calibrators": (calibrators, "segcal.cli.calibrators_cmd"),
    "predict": (predict, "segcal.cli.predict_cmd"),
    "bench": (bench, "segcal.cli.bench_cmd"),
    "demo": (demo, "segcal.cli.demo_cmd"),
    "estimate": (estimate, "segcal.cli.estimate_cmd"),
    "pseudolabel": (pseudolabel, "segcal.cli.pseudolabel_cmd"),
    "adapt": (adapt, "segcal.cli.adapt_cmd"),
    "conformal": (conformal, "segcal.cli.conformal_cmd"),
    "export": (export, "segcal.cli.export_cmd"),
}

#: optional import name -> the segcal extra that installs it (for a bare ModuleNotFoundError)
EXTRAS = {"sklearn": "isotonic", "scipy": "shift", "matplotlib": "plot", "nibabel": "nifti", "monai": "medical",
          "numba": "fast", "torchmetrics": "bench", "SimpleITK": "test", "fiducio": "bench",
          "onnx": "export", "onnxscript": "export"}

#: exit code of a run stopped by Ctrl-C (128 + SIGINT)
EXIT_INTERRUPTED = 130


class CLIError(InputError):
    """A refused command line (kept for existing callers; raise :class:`~segcal.errors.InputError`)."""


def _reader_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError,
                                         json.JSONDecodeError]
    try:  # Pillow is a dependency; its UnidentifiedImageError is an OSError anyway
        from PIL import UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow is installed with segcal
        return tuple(errors)
    return (*errors, UnidentifiedImageError)


#: what the error layer turns into one line and exit code 2 (besides InputError / ValueError)
READER_ERRORS = _reader_errors()


def build_parser() -> argparse.ArgumentParser:
    """The whole ``segcal`` parser (argparse only: no torch, no command module imported)."""
    parser = argparse.ArgumentParser(
        prog="segcal",
        description="Post-hoc calibration of semantic segmentation models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"segcal {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (also: SEGCAL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for args_module, _run_module in COMMANDS.values():
        p = args_module.add_parser(sub)
        p.formatter_class = HelpFormatter
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of every error (also: SEGCAL_DEBUG=1)")
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Import the chosen command's module and run it (``run(args) -> int``)."""
    module = importlib.import_module(COMMANDS[args.command][1])
    run: Callable[[argparse.Namespace], int | None] = module.run
    return int(run(args) or 0)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", "; ", text.strip())


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at devnull so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass


def _debug(args: argparse.Namespace | None) -> bool:
    env = os.environ.get("SEGCAL_DEBUG", "")
    return bool(getattr(args, "debug", False)) or env not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run ``segcal`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    0: success; 2: refused input (one line on stderr) or a bad command line (argparse's usage
    message); 1: a closed output pipe; 130: interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_INPUT
    name = args.command
    try:
        code = run_command(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the error layer
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:
        if _debug(args):
            raise
        print(f"segcal {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InputError, MissingDependencyError, ValueError, *READER_ERRORS) as exc:
        if _debug(args):
            raise
        print(f"segcal {name}: error: {_one_line(reason(exc))}", file=sys.stderr)
        return EXIT_INPUT
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None or _debug(args):
            raise
        print(f"segcal {name}: error: this command needs the optional dependency {exc.name!r}, which is not "
              f"installed; install it with: pip install 'segcal[{extra}]'", file=sys.stderr)
        return EXIT_INPUT


__all__ = ["COMMANDS", "EXIT_INTERRUPTED", "EXTRAS", "READER_ERRORS", "CLIError", "build_parser", "main",
           "run_command"]
