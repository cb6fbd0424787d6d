"""The argument parsers of the commands, one module per command (argparse only, no torch).

``segcal --help`` and every command line build the whole parser from these modules, so they
import nothing but :mod:`argparse` and :mod:`segcal.cli.options`. Each exposes
``add_parser(subparsers) -> argparse.ArgumentParser``; the command itself runs in
``segcal.cli.<command>_cmd.run(args)``, imported only once its command was chosen
(:func:`segcal.cli.app.run_command`).
"""
