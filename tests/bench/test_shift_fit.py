"""bench.shift_fit (issue 17): the ridge of the anchored sts chosen by leave-one-family-out within
the fit set's families, never on the family held out of the fit set; pooled NLL of a calibrator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.bench.protocol import ImageData, WholeVolumes
from segcal.bench.shift_config import ShiftCalConfig, check_config
from segcal.bench.shift_fit import Anchored, copies, family_of, pooled_nll
from segcal.calibrators import create
from segcal.errors import InputError

torch.set_num_threads(1)
GRID = (0.0, 0.1, 10.0)


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
        self.calls: list[tuple[list[str], list[str], float]] = []

    def fit(self, cal, fit_imgs, sel_imgs, total, seed, ignore):
        self.calls.append(([im.stem for im in fit_imgs], [im.stem for im in sel_imgs], float(cal.l2)))
        self.base.fit(cal, fit_imgs, sel_imgs, total, seed, ignore)

    def describe(self, cal, *args):
        return {}


def _fit_set(families: tuple[str, ...]) -> tuple[list[ImageData], list[ImageData]]:
    clean = _cases(8, 1.0, 0)
    pert = [im for k, f in enumerate(families) for im in copies(_cases(8, 2.5 + k, 1 + k), f)]
    fit = clean[:4] + [im for im in pert if int(im.stem.split("@")[0][4:]) < 4]
    sel = clean[4:] + [im for im in pert if int(im.stem.split("@")[0][4:]) >= 4]
    return fit, sel


def test_l2_is_chosen_by_leave_one_family_out_within_the_fit_families():
    fit, sel = _fit_set(("a", "b", "c"))
    spy = Spy()
    cal = create("sts", max_iter=30)
    Anchored(spy, l2_grid=GRID).fit(cal, fit, sel, None, 0, None)
    sel_info = cal.fit_info["l2_selection"]
    assert sel_info["selected"] and sel_info["families"] == ["a", "b", "c"] and sel_info["grid"] == list(GRID)
    # one inner fit per (candidate, family), then the refit of the chosen one on the whole set
    assert len(spy.calls) == len(GRID) * 3 + 1
    for (fit_stems, sel_stems, l2), (cand, g) in zip(spy.calls, [(v, g) for v in GRID for g in "abc"], strict=False):
        assert l2 == cand
        assert not any(family_of(s) == g for s in fit_stems + sel_stems)  # g's copies never fitted on
        assert {family_of(s) for s in fit_stems} == {None} | (set("abc") - {g})
    # the chosen value is the lowest mean NLL over the inner held-out families, and is the one used
    means = {k: float(np.mean(list(v.values()))) for k, v in sel_info["nll"].items()}
    assert means == pytest.approx(sel_info["mean_nll"])
    assert repr(sel_info["l2"]) == min(means, key=means.get)
    assert spy.calls[-1][2] == sel_info["l2"] == cal.l2 == cal.get_config()["l2"]
    assert sorted(spy.calls[-1][0]) == sorted(im.stem for im in fit)
    assert cal.anchored and Anchored(spy, l2_grid=GRID).describe(cal)["l2"] == cal.l2


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
    assert cfg.sts_anchor_range == "val+train" and cfg.sts_l2_grid == (0.0, 0.01, 0.1, 1.0)
    assert cfg.pc_min_correction == 1.0 and cfg.mri_seeds == (0, 1)
    assert ShiftCalConfig.quick_config().sts_anchor_range == "val+train"
    check_config(ShiftCalConfig(sts_anchor_range="val", mri=False))
    with pytest.raises(InputError, match="sts_l2_grid"):
        check_config(ShiftCalConfig(sts_l2_grid=(0.0, -1.0), mri=False))
