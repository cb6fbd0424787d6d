"""Arguments of ``segcal calibrators`` (argparse only; runs in :mod:`segcal.cli.calibrators_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return sub.add_parser("calibrators", help="list calibrators (names, aliases, TI / AP / OP)",
                          description="List every registered calibrator with its aliases, declared "
                          "properties (TI: translation invariant, AP: argmax-preserving, OP: "
                          "order-preserving) and the methods.md section it implements.")
