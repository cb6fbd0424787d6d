"""Medical calibration table: a thin wrapper around ``segcal bench --dataset hippocampus``.

The protocol and code live in :mod:`segcal.bench.hippocampus` (see ``docs/medical.md``);
this script only forwards its arguments, so both commands produce the same ``results.json``,
``results.md`` and ``report.html``::

    nice -n 19 python3 benchmarks/medical_calibration.py --cache /tmp/segcal_med_cache --out /tmp/med
    python3 benchmarks/medical_calibration.py --quick --cache /tmp/med_quick_cache --out /tmp/med_quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segcal.cli import main as segcal_main


def main(argv: list[str] | None = None) -> int:
    return segcal_main(["bench", "--dataset", "hippocampus", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
