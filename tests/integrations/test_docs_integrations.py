"""The torchmetrics, MONAI / Ignite and Lightning examples of docs/integrations.md run as written."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def _example(heading: str) -> str:
    text = DOC.read_text()
    assert text.count(f"\n{heading}") == 1, heading
    section = text.split(f"\n{heading}", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("heading", [
    "## torchmetrics-style: `segcal.integrations.torchmetrics.CalibrationMetric`",
    "## MONAI and Ignite",
    "## Lightning: calibration on the validation loop, a calibrator after training",
], ids=["torchmetrics", "monai-ignite", "lightning"])
def test_the_example_runs(heading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():  # Lightning's notes on data-loader workers and tiny datasets
        warnings.simplefilter("ignore")
        exec(compile(_example(heading), "docs/integrations.md", "exec"), {})
    if heading.startswith("## Lightning"):
        assert (tmp_path / "checkpoints" / "calibrator.pt").is_file()
