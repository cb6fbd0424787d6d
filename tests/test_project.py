"""Checks on the project itself: the README's test command is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"TEST_CMD='(.+)'", ci)
    assert m, ".ci/run must define TEST_CMD"
    readme = (ROOT / "README.md").read_text()
    assert m.group(1) in readme.splitlines(), "README.md must show the exact command .ci/run runs"


def test_constraints_pin_cpu_torch():
    text = (ROOT / "constraints.txt").read_text()
    assert "torch==2.13.0+cpu" in text
