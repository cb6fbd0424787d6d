"""The ``segcal`` command line.

Each sub-command lives in its own module ``segcal.cli.<name>_cmd`` exposing
``add_parser(subparsers)`` (which registers the parser and sets ``func``). Modules are imported
lazily so ``segcal --help`` stays fast and a missing optional dependency only affects its command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from segcal.version import __version__

#: sub-command name -> module (in display order)
COMMANDS: dict[str, str] = {
    "eval": "segcal.cli.eval_cmd",
    "fit": "segcal.cli.fit_cmd",
    "apply": "segcal.cli.apply_cmd",
    "calibrators": "segcal.cli.calibrators_cmd",
    "predict": "segcal.cli.predict_cmd",
    "bench": "segcal.cli.bench_cmd",
    "demo": "segcal.cli.demo_cmd",
    "estimate": "segcal.cli.estimate_cmd",
    "pseudolabel": "segcal.cli.pseudolabel_cmd",
    "adapt": "segcal.cli.adapt_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segcal",
        description="Post-hoc calibration of semantic segmentation models.",
    )
    parser.add_argument("--version", action="version", version=f"segcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in COMMANDS.values():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:  # command not implemented yet
                continue
            raise
        mod.add_parser(sub)
    return parser


class CLIError(Exception):
    """An error to report to the user as one line, without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError) as exc:
        if getattr(args, "debug", False) or __import__("os").environ.get("SEGCAL_DEBUG"):
            raise
        print(f"segcal {args.command}: error: {exc}", file=sys.stderr)
        return 1
