"""Test-suite set-up: the suite is split by layer (``tests/<layer>/``, as ``src/segcal``).

Shared test helpers (the independent reference implementation of the metrics) live in
``tests/helpers/``; test modules are imported with ``--import-mode=importlib`` so that no test
folder is put on ``sys.path`` (a folder named like a library, ``tests/datasets``, would shadow it).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
