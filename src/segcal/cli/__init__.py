"""The ``segcal`` command line (entry point :func:`main`).

Each command has an argparse-only parser module ``segcal.cli.parsers.<command>`` and a module
``segcal.cli.<command>_cmd`` exposing ``run(args) -> int``, imported only when its command runs,
so ``segcal --help`` / ``--version`` start without torch. The parser, the dispatch and the one
error layer (exit code 2 for refused input) are in :mod:`segcal.cli.app`; shared arguments in
:mod:`segcal.cli.options`; shared run-time helpers in :mod:`segcal.cli.common`.
"""

from __future__ import annotations

from segcal.cli.app import COMMANDS, CLIError, build_parser, main, run_command

__all__ = ["COMMANDS", "CLIError", "build_parser", "main", "run_command"]
