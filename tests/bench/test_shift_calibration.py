"""segcal bench --shift-calibration (issue 17): families, perturbation hook, targets, tables, a real --quick run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from segcal.bench.shift_calibration import lofo_summary
from segcal.bench.shift_config import FamilyMix, ShiftCalConfig, check_config
from segcal.bench.shift_estimator import agreement
from segcal.bench.shift_fit import argmax_check
from segcal.bench.spec import CAMVID_IGNORE, SHIFT_FAMILIES, SHIFT_ROW_DATA, SHIFT_ROWS
from segcal.cli import main
from segcal.cli.app import build_parser
from segcal.cli.bench_cmd import shift_config_from_args
from segcal.data import data_root
from segcal.datasets.camvid import camvid_split
from segcal.errors import InputError
from segcal.io.arrays import read_prediction
from segcal.report.shift_tables import (
    adaptation_table,
    shift_markdown_report,
    sts_selection_table,
    targets_table,
)
from segcal.shift import available_corruptions, corrupt, derive_seed

ROOT = data_root(required=False)
HAVE_REAL = (
    ROOT is not None
    and (ROOT / "camvid" / "test").is_dir()
    and (ROOT / "espnet" / "espnet_p_2_q_8_camvid.pth").is_file()
)
HAVE_MRI = ROOT is not None and (ROOT / "msd_task04_hippocampus" / "imagesTr").is_dir()


def test_families_partition_the_corruptions():
    names = [c for cs in SHIFT_FAMILIES.values() for c in cs]
    assert sorted(names) == sorted(available_corruptions())  # every corruption in exactly one family
    assert len(names) == len(set(names))
    assert set(SHIFT_FAMILIES) == {"noise", "blur", "weather", "digital"}
    assert set(SHIFT_ROWS) == set(SHIFT_ROW_DATA)


def test_family_mix_is_per_stem_and_matches_corrupt():
    mix = FamilyMix("noise", SHIFT_FAMILIES["noise"], None, seed=3)
    stems = [f"img{i:03d}" for i in range(200)]
    drawn = [mix.assign(s) for s in stems]
    assert {c for c, _ in drawn} == set(SHIFT_FAMILIES["noise"])  # every corruption of the family occurs
    assert {s for _, s in drawn} == {1, 2, 3, 4, 5}  # a spread of strengths
    assert mix.assign("img007@blur") == mix.assign("img007")  # a copy is perturbed like its image
    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    name, sev = mix.assign("img007")
    np.testing.assert_array_equal(mix(img, "img007@x"), corrupt(img, name, sev, seed=derive_seed(4, "img007")))
    fixed = FamilyMix("blur", SHIFT_FAMILIES["blur"], 5, seed=0)
    assert all(fixed.assign(s)[1] == 5 for s in stems[:20])
    # the draw does not depend on which other images are in the set
    assert FamilyMix("noise", SHIFT_FAMILIES["noise"], None, 3).assign("img150") == drawn[150]


def test_check_config_refuses_bad_input():
    with pytest.raises(InputError, match="families"):
        check_config(ShiftCalConfig(families=("noise", "frost")))
    with pytest.raises(InputError, match="methods"):
        check_config(ShiftCalConfig(methods=("ts_clean", "lts")))
    with pytest.raises(InputError, match="reference row ts_clean"):
        check_config(ShiftCalConfig(methods=("ts_aug",)))
    with pytest.raises(InputError, match="severities"):
        check_config(ShiftCalConfig(severities=(6,)))
    with pytest.raises(InputError, match="sts_anchor_range"):
        check_config(ShiftCalConfig(sts_anchor_range="test"))


def _run(method: str, seed: int, **m) -> tuple[str, dict]:
    return f"{method}@{seed}", {"method": method, "seed": seed, "metrics": m}


def test_argmax_check_raises_on_a_flipping_ap_row():
    runs = dict([_run("uncalibrated", 0, miou=0.5, flip_rate=0.0), _run("ts_clean", 0, miou=0.5, flip_rate=0.0),
                 _run("ts_aug", 0, miou=0.5, flip_rate=0.0)])
    ok = argmax_check({"runs": runs}, ["ts_clean", "ts_aug"])
    assert ok["ts_aug"]["argmax_kept"] and ok["ts_clean"]["argmax_kept"]
    runs["ts_aug@0"]["metrics"] = {"miou": 0.5, "flip_rate": 1e-6}
    with pytest.raises(AssertionError, match="ts_aug"):
        argmax_check({"runs": runs}, ["ts_clean", "ts_aug"])


def _cond(held: str | None, sev: int | None, ece: dict, nll: dict, ci_nll: dict) -> dict:
    return {"held_out": held, "severity": sev,
            "summary": {m: {"ece": e, "image_ece": e, "nll": nll[m]} for m, e in ece.items()},
            "bootstrap_vs_ts_clean": {m: {"nll": c} for m, c in ci_nll.items()},
            "argmax_check": {m: {"argmax_kept": True} for m in ece if m != "uncalibrated"}}


def test_lofo_summary_targets_by_hand():
    sig_worse = {"diff": 0.1, "lo": 0.05, "hi": 0.2, "significant": True}
    fine = {"diff": -0.1, "lo": -0.2, "hi": 0.01, "significant": False}
    conds = {
        "noise-3": _cond("noise", 3, {"ts_clean": 0.4, "ts_aug": 0.1, "cmsop_aug": 0.3},
                         {"ts_clean": 2.0, "ts_aug": 1.0, "cmsop_aug": 2.5}, {"ts_aug": fine, "cmsop_aug": sig_worse}),
        "noise-5": _cond("noise", 5, {"ts_clean": 0.6, "ts_aug": 0.3, "cmsop_aug": 0.3},
                         {"ts_clean": 3.0, "ts_aug": 2.0, "cmsop_aug": 2.0}, {"ts_aug": fine, "cmsop_aug": fine}),
        "clean": _cond(None, None, {"ts_clean": 0.02, "ts_aug": 0.03, "cmsop_aug": 0.024},
                       {"ts_clean": 0.5, "ts_aug": 0.6, "cmsop_aug": 0.5}, {}),
    }
    out = lofo_summary({"conditions": conds}, ["ts_clean", "ts_aug", "cmsop_aug"])
    r = out["rows"]
    assert out["sets"] == ["noise-3", "noise-5"]
    assert out["ts_clean_mean_ece"] == pytest.approx(0.5)
    assert r["ts_aug"]["mean_ece"] == pytest.approx(0.2) and r["ts_aug"]["ratio_to_ts_clean"] == pytest.approx(0.4)
    assert r["ts_aug"]["mean_ece_by_severity"] == {"3": pytest.approx(0.1), "5": pytest.approx(0.3)}
    assert r["ts_aug"]["target_half_ece"] and not r["cmsop_aug"]["target_half_ece"]  # 0.3 > 0.25
    assert r["ts_aug"]["target_nll_not_worse"] and r["cmsop_aug"]["nll_significantly_worse_than_ts_clean"] == ["noise-3"]
    assert not r["ts_aug"]["target_clean_within_0.005"]  # 0.03 - 0.02 = 0.01
    assert r["cmsop_aug"]["target_clean_within_0.005"]  # 0.004
    assert r["ts_aug"]["miou_kept_everywhere"] is True
    lines = targets_table({"lofo": out})
    assert any(line.startswith("| ts_aug | 0.2000 = 0.40 × TS: met") for line in lines)
    assert any("missed (significantly worse on noise-3)" in line for line in lines)


def test_agreement_against_scipy():
    rng = np.random.default_rng(0)
    true = rng.random(30)
    est = true * 0.5 + 0.1 * rng.random(30)
    a = agreement(est, true)
    assert a["mae"] == pytest.approx(np.abs(est - true).mean())
    assert a["bias"] == pytest.approx((est - true).mean())
    assert a["spearman"] == pytest.approx(stats.spearmanr(est, true).statistic)


def _ece15(probs: np.ndarray, labels: np.ndarray) -> float:
    """Float64 NumPy pooled top-label ECE, 15 equal-width bins (bin = min(floor(conf * 15), 14))."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    b = np.minimum((conf * 15).astype(np.int64), 14)
    cnt = np.bincount(b, minlength=15)
    sc = np.bincount(b, conf, minlength=15)
    sa = np.bincount(b, correct.astype(np.float64), minlength=15)
    return float(np.abs(sc - sa).sum() / cnt.sum())


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL, reason="needs CamVid and the ESPNet weights (SEGCAL_DATA)")
def test_shift_calibration_quick_real(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["bench", "--shift-calibration", "--quick", "--cache", str(cache), "--out", str(out), "--quiet",
            "--eval-fraction", "1", "--val-limit", "4", *([] if HAVE_MRI else ["--no-mri"])]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert set(res["conditions"]) == {"noise-3", "blur-3", "clean"}
    assert "## Targets (issue 17)" in md and "## Label-free ECE estimator" in md
    for tag in ("noise-3", "blur-3"):
        c = res["conditions"][tag]
        assert c["held_out"] == tag.split("-")[0] and c["fitted_with"] == [f for f in ("noise", "blur") if f != c["held_out"]]
        uncal = c["summary"]["uncalibrated"]
        rows = ("ts_clean", "ts_aug", "cmsop_aug", "sts_aug", "ts_aug_pc")
        for m in rows:  # all argmax preserving: mIoU exactly kept
            assert c["summary"][m]["miou"] == uncal["miou"] and c["summary"][m]["flip_rate"] == 0.0
        assert set(c["bootstrap_vs_ts_clean"]) == {"uncalibrated", *rows[1:]}
        # the target-adaptive row is its base divided by the correction PseudoCal chose on the target
        info = c["adaptation"]["ts_aug_pc@0"]
        assert info["how"] == "pseudocal" and info["mode"] == "input mixup" and info["anchored"]
        assert info["correction"] == pytest.approx(np.clip(info["c_target"] / info["c_source"], 0.2, 5.0), rel=1e-6)
        assert set(res["estimator"]["conditions"][tag]) == {
            "value-net (clean val)", "value-net (clean + perturbed val)", "maxprob", "entropy"}
    # independent float64 check of the uncalibrated and clean-TS pooled ECE on a held-out set (all pixels)
    c = res["conditions"]["noise-3"]
    items = {it.stem: it for it in camvid_split(ROOT, "test")}
    folder = cache / "espnet-camvid" / "test" / "mix-noise-s3-seed0"
    zs, ys = [], []
    for stem in c["stems"]:
        z, _ = read_prediction(folder / f"{stem}.npy")
        lab = items[stem].load_label().reshape(-1)
        keep = lab != CAMVID_IGNORE
        zs.append(np.asarray(z, dtype=np.float64).reshape(z.shape[0], -1)[:, keep].T)
        ys.append(lab[keep])
    z, y = np.concatenate(zs), np.concatenate(ys)
    assert c["summary"]["uncalibrated"]["ece"] == pytest.approx(_ece15(_softmax(z), y), abs=2e-5)
    t = next(f["temperature"] for f in res["fits"]["clean"] if f["method"] == "ts_clean")
    assert c["summary"]["ts_clean"]["ece"] == pytest.approx(_ece15(_softmax(z / t), y), abs=2e-5)
    # the augmented fold of noise saw blur copies, not noise ones
    aug = next(f for f in res["fits"]["no-noise"] if f["method"] == "ts_aug")
    assert aug["fit_images"] + aug["selection_images"] == 8  # 4 clean + 4 blur copies
    # sts's clean range also from the (first 4) train images (the default): predicted, labels unused
    assert len(list((cache / "espnet-camvid" / "train" / "clean").glob("*.npy"))) == 4
    assert res["config"]["sts_anchor_range"] == "val+train"
    # sts's ridge: chosen by leave-one-family-out where the fit set has two families (clean rows), not
    # in the folds (one family each)
    rec = next(f for f in res["fits"]["all:espnet-camvid"] if f["method"] == "sts_aug")
    assert rec["l2_selection"]["selected"] and rec["l2"] in rec["l2_selection"]["grid"]
    assert rec["l2_selection"]["families"] == ["blur", "noise"] and rec["l2_selection"]["criterion"] == "mean"
    assert rec["features"] in rec["l2_selection"]["feature_sets"] and len(rec["l2_selection"]["score"]) == 4
    assert "## sts: the ridge and feature set chosen" in md
    rec = next(f for f in res["fits"]["no-noise"] if f["method"] == "sts_aug")
    assert not rec["l2_selection"]["selected"] and rec["l2"] == 0.0
    if HAVE_MRI:  # the MRI leave-one-shift-out rows (quick: 2 shifts, 4 calibration / 3 test cases)
        mri = res["mri"]
        assert set(mri["conditions"]) == {"gamma-3", "rician_noise-3", "clean"}
        assert mri["cache"]["root"] == str(cache / "hippocampus")
        assert all(r["dice_kept_everywhere"] for r in mri["loso"]["rows"].values())
        assert "## MRI: leave-one-shift-out" in md and "### MRI targets (issue 17)" in md


def test_cli_anchor_range_default_and_option():
    parse = build_parser().parse_args
    assert shift_config_from_args(parse(["bench", "--shift-calibration"])).sts_anchor_range == "val+train"
    args = parse(["bench", "--shift-calibration", "--sts-anchor-range", "val"])
    assert shift_config_from_args(args).sts_anchor_range == "val"


def test_cli_refuses_foreign_options(tmp_path, capsys):
    assert main(["bench", "--shift-calibration", "--models", "espnet-camvid", "--out", str(tmp_path / "o")]) == 2
    assert "--models" in capsys.readouterr().err
    assert main(["bench", "--no-mri", "--out", str(tmp_path / "o")]) == 2
    assert "--no-mri" in capsys.readouterr().err
    assert main(["bench", "--sts-anchor-range", "val+train", "--out", str(tmp_path / "o")]) == 2
    assert "--sts-anchor-range" in capsys.readouterr().err
    assert main(["bench", "--shift-calibration", "--families", "noise,frost", "--out", str(tmp_path / "o"),
                 "--data-root", str(tmp_path / "nope")]) == 2


def test_markdown_report_of_a_tiny_results_dict():
    cond = {"held_out": "noise", "severity": 3, "fitted_with": ["blur"], "assignment": {"shot_noise": 2},
            "n_images": 2, "n_eval_pixels": 10, "model": "espnet-camvid",
            "summary": {"uncalibrated": {"ece": 0.5, "image_ece": 0.5, "nll": 3.0, "brier": 0.9, "miou": 0.1,
                                         "flip_rate": 0.0, "n_seeds": 1},
                        "ts_clean": {"ece": 0.4, "image_ece": 0.41, "nll": 2.0, "brier": 0.8, "miou": 0.1,
                                     "flip_rate": 0.0, "n_seeds": 1}},
            "bootstrap_vs_ts_clean": {"uncalibrated": {"ece": {"diff": 0.1, "lo": 0.05, "hi": 0.15, "significant": True}}}}
    res = {"config": {"seeds": [0], "command": None}, "timings": {"total_s": 3.0},
           "environment": {"threads": 1}, "families": {"noise": ["shot_noise"]},
           "protocol": {"fit": "f", "test": {"images": ["a", "b"], "per_set": "p"}, "eval_pixels": "e", "bins": 15,
                        "ignore_label": 11, "bootstrap": "b", "estimator_truth": "t"},
           "properties": {"ts_clean": {"translation_invariant": True, "argmax_preserving": True,
                                       "order_preserving": True, "data": "clean"}},
           "conditions": {"noise-3": cond}, "lofo": {}, "estimator": {}}
    md = shift_markdown_report(res)
    assert "| ts_clean | 0.4000 | 0.4000 |" in md  # LOFO summary row: the one set and its mean
    assert "| ts_clean | clean | TI/AP/OP | 0.4000 | 0.4100 |" in md
    assert "| uncalibrated | 0.1000 [0.0500, 0.1500]* |" in md


def test_sts_selection_and_adaptation_tables():
    sets = [["entropy"], ["entropy", "boundary_fraction"]]
    sel = {"l2": 0.01, "features": sets[1], "grid": [0.0, 0.01], "feature_sets": sets, "families": ["a", "b"],
           "selected": True, "criterion": "worst", "selected_on_seed": 0,
           "score": {"0.0|entropy": 0.5, "0.01|entropy": 0.25, "0.0|entropy+boundary_fraction": -0.125,
                     "0.01|entropy+boundary_fraction": -0.25}, "nll": {}}
    none = {"l2": 0.0, "features": sets[0], "grid": [0.0, 0.01], "feature_sets": sets, "families": ["a"],
            "selected": False, "why": "fewer than 2 families", "selected_on_seed": 0, "criterion": "worst"}
    res = {"fits": {"no-c": [{"method": "ts_aug", "seed": 0},
                             {"method": "sts_aug", "seed": 0, "l2": 0.01, "l2_selection": sel},
                             {"method": "sts_aug", "seed": 1, "l2": 0.01, "l2_selection": dict(sel)}],
                    "no-d": [{"method": "sts_aug", "seed": 0, "l2": 0.0, "l2_selection": none}]},
           "conditions": {"c-3": {"adaptation": {"sts_aug_pc@0": {"correction": 1.0, "c_unclamped": 0.42},
                                                 "ts_aug_pc@0": {"correction": 0.8}}}}}
    table = sts_selection_table(res)
    assert table[2:4] == [
        "| no-c | sts_aug | 0, 1 | a, b | worst | 0.5000 | 0.2500 | -0.1250 | -0.2500 | l2=0.01 F2 |",
        "| no-d | sts_aug | 0 | a | worst | – | – | – | – | l2=0 F1 (fewer than 2 families) |"]
    assert table[-1] == "Feature sets: F1 = entropy; F2 = entropy, boundary_fraction."
    assert adaptation_table(res)[2] == "| c-3 | 0.42 → 1.00 | 0.80 |"
    assert sts_selection_table({"fits": {}}) == [] and adaptation_table({"conditions": {}}) == []
