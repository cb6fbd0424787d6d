"""``benchmarks/adaptation_protocol.py``: per-run summary, seed aggregation and merging (no model run)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("adaptation_protocol", ROOT / "benchmarks" / "adaptation_protocol.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(seed: int, mious, est, resc=None, method="calsfda"):
    eps = {}
    for e, m in enumerate(mious):
        eps[str(e)] = {"miou": m, "image_ece": 0.5 - m, "ece": 0.4 - m, "nll": 1.0, "accuracy": 0.8,
                       "estimated_ece": est[e]}
        if resc is not None:
            eps[str(e)]["rescored_ece"] = resc[e]
    sel = min(range(len(est)), key=lambda e: (est[e], e)) if method == "calsfda" else len(mious) - 1
    log = {"config": {"seed": seed, "lr": 1e-3}, "selection_rule": "x", "initial_estimated_ece": 0.3,
           "epochs": [{"seconds": 10.0 * (seed + 1)}]}
    res = {"method": method, "selected_epoch": sel, "epochs": eps}
    return res, log


def test_summary_selected_last_oracle_and_rescored(bench):
    res, log = _run(0, [0.1, 0.3, 0.2], est=[0.2, 0.3, 0.1], resc=[0.3, 0.1, 0.2])
    s = bench.run_summary(res, log)
    assert s["selected_epoch"] == 2 and s["last_epoch"] == 2
    assert s["oracle_epoch"] == 1 and s["est_argmin_epoch"] == 2
    assert s["rescore_argmin_epoch"] == 1
    assert s["oracle_ece_epoch"] == 1  # image_ece = 0.5 - miou is lowest where miou is highest


def test_aggregate_gaps_over_seeds(bench):
    runs = {}
    for seed, (mious, est, resc) in enumerate([([0.1, 0.3, 0.2], [0.2, 0.3, 0.1], [0.3, 0.1, 0.2]),
                                               ([0.2, 0.1, 0.4], [0.1, 0.3, 0.2], [0.3, 0.2, 0.1])]):
        res, log = _run(seed, mious, est, resc)
        res["summary"] = bench.run_summary(res, log)
        runs[f"calsfda_s{seed}"] = res
    agg = bench.aggregate(runs)["calsfda"]["metrics"]
    # seed 0: oracle 0.3, selected (argmin est = 2) 0.2, last 0.2, rescored argmin (1) 0.3
    # seed 1: oracle 0.4, selected (argmin est = 0) 0.2, last 0.4, rescored argmin (2) 0.4
    assert agg["gap_selected_oracle_miou"]["values"] == pytest.approx([0.1, 0.2])
    assert agg["gap_last_oracle_miou"]["values"] == pytest.approx([0.1, 0.0])
    assert agg["gap_rescore_oracle_miou"]["values"] == pytest.approx([0.0, 0.0])
    assert math.isclose(agg["rescore_argmin.miou"]["mean"], 0.35)
    assert agg["seconds"]["values"] == [10.0, 20.0]


def test_merge_keeps_source_and_adabn_and_checks_config(bench, tmp_path, capsys):
    cfg = {"model": "m", "mapping": None, "corruption": "fog", "severity": 3, "seed": 0, "max_images": None}
    src = {"miou": 0.1, "ece": 0.3, "image_ece": 0.35, "nll": 2.0, "accuracy": 0.5}
    res, log = _run(0, [0.1, 0.3], est=[0.2, 0.1], resc=[0.1, 0.2])
    res["summary"] = bench.run_summary(res, log)
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"config": cfg, "n_test": 3, "source": src,
                             "adabn": {"n_images": 4, **src}, "runs": {}}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"config": cfg, "n_test": 3, "source": None, "runs": {"calsfda_s0": res}}))
    out = bench.merge([str(a), str(b)])
    assert out["source"] == src and out["adabn"]["n_images"] == 4 and "calsfda_s0" in out["runs"]
    out["aggregate"] = bench.aggregate(out["runs"])
    bench.print_tables(out)
    text = capsys.readouterr().out
    assert "AdaBN (4 target images, all BN)" in text and "rescored-ECE argmin" in text
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"config": {**cfg, "severity": 5}, "n_test": 3, "source": None, "runs": {}}))
    with pytest.raises(SystemExit, match="severity"):
        bench.merge([str(a), str(c)])


def test_spread_is_the_subset_adapt_takes(bench):
    from segcal.adaptation import quick_subset as _quick_subset

    seq = list(range(367))
    for n in (1, 4, 32, 366, 367, 400, None):
        assert bench.spread(seq, n) == (seq if not n else _quick_subset(seq, n))
