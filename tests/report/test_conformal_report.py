"""``segcal eval --html ... --conformal-out``: the report gains a conformal section with the numbers
of the written threshold file (risk, alpha / delta, lambda-hat, the guarantee, the mean set size),
and an inline figure; without the conformal flags there is none."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcal.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(9)
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    for i in range(15):
        y = rng.integers(0, 4, size=(16, 20))
        z = rng.normal(size=(4, 16, 20)) * 2.0
        z[y, np.arange(16)[:, None], np.arange(20)[None, :]] += 3.0
        np.save(pred / f"im{i:02d}.npy", z.astype(np.float16))
        Image.fromarray(y.astype(np.uint8)).save(lab / f"im{i:02d}.png")
    return pred, lab


def section(doc: str) -> str:
    start = doc.index("<h2>Conformal risk control</h2>")
    return doc[start:]


@pytest.mark.parametrize("flags", [["--conformal-alpha", "0.15"],
                                   ["--conformal-risk", "fnr", "--conformal-class", "1", "--conformal-alpha", "0.2",
                                    "--conformal-delta", "0.3"]], ids=["crc-miscoverage", "ltt-fnr"])
def test_html_report_has_the_conformal_section(folder, tmp_path, flags, capsys) -> None:
    pred, lab = folder
    report, cr = tmp_path / "r.html", tmp_path / "cr.json"
    assert main(["eval", "--pred", str(pred), "--labels", str(lab), "--no-progress", "--html", str(report),
                 *flags, "--conformal-out", str(cr)]) == 0
    res = json.loads(cr.read_text())
    doc = report.read_text()
    sec = section(doc)
    cells = dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", sec))
    assert cells["lambda-hat"] == f"{res['lambda']:.6g}"
    assert cells["threshold 1 - lambda-hat"] == f"{1 - res['lambda']:.6g}"
    assert cells["alpha"] == f"{res['alpha']:g}"
    assert cells["delta"] == ("–" if res["delta"] is None else f"{res['delta']:g}")
    assert cells["calibration images"] == "15"
    assert cells["calibration risk at lambda-hat"] == f"{res['calibration_risk']:.5f}"
    size_key = next(k for k in cells if k.endswith("at lambda-hat") and k.startswith("mean"))
    assert cells[size_key] == f"{res['mean_size']:.5f}"
    assert ("mask volume" in size_key) == (res["risk"] == "fnr")
    assert cells["risk"].startswith(res["risk"])
    assert cells["method"].startswith("CRC" if res["method"] == "crc" else "Learn-then-Test")
    assert html.escape(res["guarantee"]) in sec
    uri = re.search(r"<img alt='conformal loss against lambda and per-image losses' src='data:image/png;base64,"
                    r"([A-Za-z0-9+/=]+)'>", sec)
    assert uri is not None
    assert base64.b64decode(uri.group(1))[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_conformal_section_without_the_flags(folder, tmp_path, capsys) -> None:
    pred, lab = folder
    report = tmp_path / "r.html"
    assert main(["eval", "--pred", str(pred), "--labels", str(lab), "--no-progress", "--html", str(report)]) == 0
    assert "Conformal risk control" not in report.read_text()
