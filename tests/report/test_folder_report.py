"""The one-folder HTML report and the eval JSON summary (``segcal.report.folder_report``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from segcal.errors import InputError
from segcal.metrics import CalibrationMetrics
from segcal.report.folder_report import FAILURE, folder_report_html, folder_summary, headline

pytest.importorskip("matplotlib")


def metrics_with_void(c=4, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3, c, 16, 16)) * 2
    y = np.where(rng.random((3, 16, 16)) < 0.7, z.argmax(1), rng.integers(0, c, (3, 16, 16)))
    y[:, 0] = c - 1  # class c-1 is the void channel (= ignore_index)
    m = CalibrationMetrics(c, n_bins=8, ignore_index=c - 1)
    m.update(torch.from_numpy(z), torch.from_numpy(y))
    return m


def test_summary_is_json_and_the_report_tables_hold_its_numbers():
    m = metrics_with_void()
    res = m.compute()
    summary = json.loads(json.dumps(folder_summary(m, {"pred": "P"})))  # JSON-clean as written
    assert summary["config"] == {"pred": "P"} and summary["classwise_reliability"]["classes"] == [0, 1, 2]
    doc = folder_report_html(summary, class_names=["sky", "road", "car", "void"])
    for label, v in headline(res):
        assert f"<td>{label}</td><td>{v:.5f}</td>" in doc
    rows = re.findall(r"<tr( class='void')?><td>(\d)</td><td>(\w+)</td><td>(\d+)</td>", doc)
    assert [(r[1], r[2]) for r in rows] == [("0", "sky"), ("1", "road"), ("2", "car"), ("3", "void")]
    assert [bool(r[0]) for r in rows] == [False, False, False, True]
    np.testing.assert_array_equal([int(r[3]) for r in rows], res["confusion_matrix"].sum(1))
    for k in range(3):
        assert f"<td>{res['iou_per_class'][k]:.4f}</td>" in doc
    assert doc.startswith("<!DOCTYPE html>") and doc.rstrip().endswith("</html>")


def test_report_refuses_what_is_not_an_evaluation(tmp_path):
    with pytest.raises(InputError, match="results_or_metrics"):
        folder_report_html(3.0)
    with pytest.raises(InputError, match="no 'reliability' entry"):
        folder_report_html({"ece": 0.1})
    with pytest.raises(InputError, match="cannot read"):
        folder_report_html(tmp_path / "none.json")


def test_failure_section_draws_the_risk_coverage_curve_when_the_metrics_provide_it():
    m = metrics_with_void(seed=1)
    summary = folder_summary(m)
    cov = np.linspace(0.01, 1, 100)
    err = 1 - summary["accuracy"]
    summary.update(aurc=0.1, augrc=0.05, failure_auroc=0.8, risk_at_coverage_90=0.2,
                   risk_coverage={"coverage": cov.tolist(), "risk": (err * cov).tolist(),
                                  "generalized_risk": (err * cov**2).tolist()})
    doc = folder_report_html(summary)
    assert "<h2>Failure detection</h2>" in doc
    assert "<td>AURC (risk-coverage area)</td><td>0.10000</td>" in doc
    assert "<td>risk at 90 % coverage</td><td>0.20000</td>" in doc
    assert "alt='risk-coverage curves'" in doc
    summary["image_failure"] = {"error_rate": {"mean_confidence": {"n": 3, "aurc": 0.25, "augrc": 0.125}}}
    assert "<td>error rate</td><td>mean confidence</td><td>3</td><td>0.2500</td><td>–</td><td>0.1250</td>" in \
        folder_report_html(summary)
    summary.pop("risk_coverage")
    assert "alt='risk-coverage curves'" not in folder_report_html(summary)
    for key in [k for k in summary if k.startswith("risk_at_coverage") or k in dict(FAILURE)]:
        summary.pop(key)
    assert "Failure detection" not in folder_report_html(summary)
