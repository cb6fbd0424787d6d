"""bench.shift_fit (issue 17): the ridge and the feature set of the anchored sts chosen by
leave-one-family-out within the fit set's families (never on the family held out of the fit set),
once per fit set, by the worst inner family's NLL excess over clean TS; pooled NLL of a calibrator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.bench.protocol import ImageData, WholeVolumes
from segcal.bench.shift_config import ShiftCalConfig, check_config
from segcal.bench.shift_fit import Anchored, copies, family_of, pooled_nll
from segcal.calibrators import create
from segcal.calibrators.shift_aware import DEFAULT_FEATURES, SPATIAL_FEATURES
from segcal.errors import InputError

torch.set_num_threads(1)
GRID = (0.0, 10.0)


def _cases(n: int, scale: float, seed: int, prefix: str = "case") -> list[ImageData]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = (6, 7, 5)
        lab = rng.integers(0, 3, shape)
        z = rng.normal(0, 1, (3, *shape)).astype(np.float32)
        z[lab, *np.indices(shape)] += 1.0
        out.append(ImageData(f"{prefix}{i}", scale * z, lab))
    return out


class Spy:
    """The base strategy (WholeVolumes), recording the stems of every fit it is asked for."""

    info_keys = ("optimizer",)

    def __init__(self) -> None:
        self.base = WholeVolumes()
        self.calls: list[tuple[list[str], list[str], float, tuple[str, ...]]] = []

    def fit(self, cal, fit_imgs, sel_imgs, total, seed, ignore):
        self.calls.append(([im.stem for im in fit_imgs], [im.stem for im in sel_imgs], float(cal.l2),
                           tuple(cal.features)))
        self.base.fit(cal, fit_imgs, sel_imgs, total, seed, ignore)

    def describe(self, cal, *args):
        return {}


def _fit_set(families: tuple[str, ...]) -> tuple[list[ImageData], list[ImageData]]:
    clean = _cases(8, 1.0, 0)
    pert = [im for k, f in enumerate(families) for im in copies(_cases(8, 2.5 + k, 1 + k), f)]
    fit = clean[:4] + [im for im in pert if int(im.stem.split("@")[0][4:]) < 4]
    sel = clean[4:] + [im for im in pert if int(im.stem.split("@")[0][4:]) >= 4]
    return fit, sel


SETS = (DEFAULT_FEATURES, DEFAULT_FEATURES + SPATIAL_FEATURES)


def _nll_at(t, imgs):
    z = torch.from_numpy(np.stack([im.logits for im in imgs])) / t
    return float(torch.nn.functional.cross_entropy(z, torch.from_numpy(np.stack([im.labels for im in imgs]))))


@pytest.mark.parametrize("criterion", ["worst", "mean"])
def test_candidates_are_chosen_by_leave_one_family_out_within_the_fit_families(criterion):
    fit, sel = _fit_set(("a", "b", "c"))
    spy = Spy()
    cal = create("sts", max_iter=30)
    Anchored(spy, l2_grid=GRID, feature_sets=SETS, criterion=criterion).fit(cal, fit, sel, None, 0, None)
    info = cal.fit_info["l2_selection"]
    assert info["selected"] and info["families"] == ["a", "b", "c"] and info["grid"] == list(GRID)
    assert info["criterion"] == criterion and info["feature_sets"] == [list(f) for f in SETS]
    # one inner fit per (family, candidate), then the refit of the chosen one on the whole set
    cands = [(v, f) for f in SETS for v in GRID]
    assert len(spy.calls) == 3 * len(cands) + 1
    for (fit_stems, sel_stems, l2, feats), (g, (cand, fs)) in zip(
            spy.calls, [(g, c) for g in "abc" for c in cands], strict=False):
        assert (l2, feats) == (cand, fs)
        assert not any(family_of(s) == g for s in fit_stems + sel_stems)  # g's copies never fitted on
        assert {family_of(s) for s in fit_stems} == {None} | (set("abc") - {g})
    # the reference: clean TS, i.e. TS fitted on the clean images of the fit half (the anchor)
    clean = [im for im in fit if "@" not in im.stem]
    ts = create("ts").fit(torch.from_numpy(np.stack([im.logits for im in clean])),
                          torch.from_numpy(np.stack([im.labels for im in clean])))
    for g in "abc":
        hold = [im for im in fit + sel if family_of(im.stem) == g]
        assert info["reference_nll"][g] == pytest.approx(_nll_at(float(ts.temperature), hold), rel=2e-3)
    # the score, recomputed from the per-family NLLs; the chosen candidate minimises it and is used
    worst = {k: max(v[g] - info["reference_nll"][g] for g in "abc") for k, v in info["nll"].items()}
    mean = {k: float(np.mean(list(v.values()))) for k, v in info["nll"].items()}
    want = worst if criterion == "worst" else mean
    assert info["score"] == pytest.approx(want)
    assert info["chosen"] == min(want, key=want.get)
    assert info["chosen"] == f"{info['l2']!r}|{'+'.join(info['features'])}"
    assert spy.calls[-1][2:] == (info["l2"], tuple(info["features"])) == (cal.l2, cal.features)
    assert cal.get_config()["l2"] == info["l2"] and cal.get_config()["features"] == info["features"]
    assert sorted(spy.calls[-1][0]) == sorted(im.stem for im in fit)
    rec = Anchored(spy, l2_grid=GRID).describe(cal)
    assert cal.anchored and rec["l2"] == cal.l2 and rec["features"] == list(cal.features)


def test_the_choice_is_made_once_per_fit_set_and_row():
    fit, sel = _fit_set(("a", "b"))
    spy = Spy()
    strategy = Anchored(spy, l2_grid=(0.0, 10.0), feature_sets=SETS)
    first = create("sts", max_iter=30, seed=0)
    strategy.fit(first, fit, sel, None, 0, None)
    n = len(spy.calls)
    assert n == 2 * 4 + 1
    second = create("sts", max_iter=30, seed=1)  # the next seed of the same row: no new inner fits
    strategy.fit(second, sel, fit, None, 1, None)
    assert len(spy.calls) == n + 1 and second.fit_info["l2_selection"] is first.fit_info["l2_selection"]
    assert first.fit_info["l2_selection"]["selected_on_seed"] == 0
    assert (second.l2, second.features) == (first.l2, first.features)
    other = create("sts", max_iter=30, seed=0, anchor_margin=0.5)  # another row: its own selection
    strategy.fit(other, fit, sel, None, 0, None)
    assert len(spy.calls) == n + 1 + 2 * 4 + 1


def test_no_selection_with_one_family_or_one_candidate():
    fit, sel = _fit_set(("a",))
    spy = Spy()
    cal = create("sts", max_iter=30)
    Anchored(spy, l2_grid=(0.5, 1.0)).fit(cal, fit, sel, None, 0, None)
    info = cal.fit_info["l2_selection"]
    assert not info["selected"] and info["why"] == "fewer than 2 families" and cal.l2 == 0.5 and len(spy.calls) == 1
    fit, sel = _fit_set(("a", "b"))
    cal = create("sts", max_iter=30)
    Anchored(Spy(), l2_grid=(0.3,)).fit(cal, fit, sel, None, 0, None)
    assert cal.l2 == 0.3 and cal.fit_info["l2_selection"]["why"] == "one candidate"
    cal = create("sts", max_iter=30, l2=0.2)  # no grid: the calibrator's own l2, nothing recorded
    Anchored(Spy()).fit(cal, fit, sel, None, 0, None)
    assert cal.l2 == 0.2 and "l2_selection" not in cal.fit_info


def test_pooled_nll_matches_a_direct_computation():
    imgs = _cases(3, 2.0, 5)
    ts = create("ts").fit(torch.from_numpy(np.stack([im.logits for im in imgs])),
                          torch.from_numpy(np.stack([im.labels for im in imgs])))
    z = torch.from_numpy(np.stack([im.logits for im in imgs])) / ts.temperature
    y = torch.from_numpy(np.stack([im.labels for im in imgs]))
    want = float(torch.nn.functional.cross_entropy(z, y))
    assert pooled_nll(ts, imgs, None) == pytest.approx(want, rel=1e-5)
    keep = y != 2  # an ignore label leaves its pixels out
    want = float(torch.nn.functional.cross_entropy(z.movedim(1, -1)[keep], y[keep]))
    assert pooled_nll(ts, imgs, 2) == pytest.approx(want, rel=1e-5)


def test_config_defaults_and_checks():
    cfg = ShiftCalConfig()
    assert cfg.sts_anchor_range == "val+train" and cfg.sts_l2_grid == (0.0, 0.01, 0.1)
    assert cfg.sts_feature_sets == SETS and cfg.sts_selection == "mean"
    assert cfg.pc_min_correction == 1.0 and cfg.mri_seeds == (0, 1)
    assert ShiftCalConfig.quick_config().sts_anchor_range == "val+train"
    check_config(ShiftCalConfig(sts_anchor_range="val", mri=False))
    with pytest.raises(InputError, match="sts_l2_grid"):
        check_config(ShiftCalConfig(sts_l2_grid=(0.0, -1.0), mri=False))
    with pytest.raises(InputError, match="sts_feature_sets"):
        check_config(ShiftCalConfig(sts_feature_sets=(("entropy", "nope"),), mri=False))
    with pytest.raises(InputError, match="sts_selection"):
        check_config(ShiftCalConfig(sts_selection="best", mri=False))
    with pytest.raises(ValueError, match="criterion"):
        Anchored(Spy(), criterion="best")
