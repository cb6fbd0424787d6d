"""Arguments of ``segcal demo`` (argparse only; the command runs in :mod:`segcal.cli.demo_cmd`)."""

from __future__ import annotations

import argparse
from typing import Any

from segcal.cli.parsers.bench import add_common


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="find CamVid + ESPNet, predict, calibrate (TS, DC, CMSop, selective), print the table, write a report",
        description=(
            "A 1-3 minute tour: finds the data (--data-root, SEGCAL_DATA or ../shared/data), predicts a few "
            "CamVid images with the in-domain and the Cityscapes ESPNet, fits TS, DC, CMSop (and selective "
            "scaling when registered), prints the table and writes report.html."
        ),
    )
    add_common(p)
    return p
