"""Estimator checks run on EVERY registered calibrator (scikit-learn "check_estimator" idea).

Parametrised over ``segcal.calibrators.available()``, so a calibrator added later is checked
automatically: declared properties (translation invariance, argmax / order preservation) hold on
random inputs -- and undeclared TI fails (VS, MS) --, fit reduces NLL on a miscalibrated problem,
save/load round-trips, TorchScript export runs without segcal, bad input gets a clear error,
numpy in -> numpy out, 3D volumes work, outputs stay finite for extreme logits. The checks are the
library's (:mod:`segcal.calibrators.checks`, what ``check_calibrator`` runs on any calibrator,
a user's own too); these tests run them and assert on their measured values.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import segcal
import segcal.calibrators as sc
from segcal.calibrators import checks
from segcal.calibrators.temperature import raw_temperature, temperature_of

torch.set_num_threads(1)  # the CI box is small and shared: 2 spinning threads are ~30x slower

NAMES = [a["name"] for a in sc.available()]
PROPS = {a["name"]: a for a in sc.available()}
C = 4


make_problem = checks.make_problem


@pytest.fixture(scope="module")
def fitted():
    return {name: checks.fitted_for_checks(name, num_classes=C) for name in NAMES}


def test_registry_lists_every_family_and_aliases_resolve():
    for n in ["ts", "vs", "ms", "msc", "dc", "ets", "cdc", "cmsap", "cmsop", "vs_ti", "ms_ti"]:
        assert n in NAMES
    for a in sc.available():
        for alias in a["aliases"]:
            assert sc.resolve(alias) is sc.resolve(a["name"])
    assert type(sc.create("Temperature_Scaling")).name == "ts"
    with pytest.raises(ValueError, match="unknown calibrator 'nope'"):
        sc.create("nope")


@pytest.mark.parametrize("name", NAMES)
def test_translation_invariance_matches_declaration(name, fitted):
    r = checks.check_translation_invariance(fitted[name], exact=True)
    diff = r.details["max_change"]
    if PROPS[name]["translation_invariant"]:
        assert diff < 2e-3, f"{name} declares TI but shifting changed the output by {diff}"
    else:
        assert diff > 0.1, f"{name} does not declare TI but looks TI (max diff {diff})"
    assert r.passed, r.message


def test_vs_and_ms_are_not_translation_invariant_and_the_rest_are():
    not_ti = {n for n in NAMES if not PROPS[n]["translation_invariant"]}
    assert {"vs", "ms"} <= not_ti
    assert {"msc", "dc", "cdc", "cmsap", "cmsop", "ts", "ets", "vs_ti", "ms_ti"}.isdisjoint(not_ti)


@pytest.mark.parametrize("name", [n for n in NAMES if PROPS[n]["argmax_preserving"]])
def test_argmax_preserved_on_a_million_pixels(name, fitted):
    r = checks.check_argmax_preservation(fitted[name], n=10**6)
    # the input's top class is a maximum of the output everywhere ...
    assert r.details["not_max"] == 0
    # ... and THE argmax wherever the input's top two are resolved
    assert r.details["flipped"] == 0
    assert r.passed and not r.skipped, r.message


@pytest.mark.parametrize("name", [n for n in NAMES if PROPS[n]["order_preserving"]])
def test_full_order_preserved_on_a_million_pixels(name, fitted):
    r = checks.check_order_preservation(fitted[name], n=10**6)
    assert r.details["reversed"] == 0, f"{name}: the order of some pixel was reversed"
    if name != "ets":  # ETS: weak order (mixture probabilities may round to ties)
        assert r.details["strict_fraction"] == 1.0
    else:
        assert r.details["strict_fraction"] > 0.99
    assert r.passed, r.message


@pytest.mark.parametrize("name", [n for n in NAMES if not PROPS[n]["order_preserving"]])
def test_undeclared_preservation_is_really_absent(name, fitted):
    r = checks.check_undeclared_properties(fitted[name], exact=True)
    # AP but not OP: some order changes; neither: some argmax changes
    assert r.details["changed"] > 0
    assert r.passed and not r.skipped, r.message


@pytest.mark.parametrize("name", NAMES)
def test_fit_reduces_nll_on_a_miscalibrated_problem(name, fitted):
    r = checks.check_fit(fitted[name])
    before, after = r.details["before"], r.details["after"]
    assert after < before - 0.1, (name, before, after)
    assert r.passed


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, fitted, tmp_path):
    cal = fitted[name]
    r = checks.check_save_load(cal, tmp_path)
    assert r.passed and r.details["registered"], r.message
    back = segcal.load(tmp_path / f"{cal.name}.pt")
    assert type(back) is type(cal) and back.get_config() == cal.get_config()
    x = torch.randn(50, C)
    with torch.no_grad():
        torch.testing.assert_close(back(x), cal(x))
    payload = torch.load(tmp_path / f"{cal.name}.pt", weights_only=True)
    assert payload["format"] == "segcal-calibrator" and payload["version"] == 1
    assert payload["properties"]["translation_invariant"] == PROPS[name]["translation_invariant"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_gets_a_clear_error(name, fitted):
    # 1-D logits, C + 1 classes, NaN (forward and fit), label C, ignore_index=255, empty input,
    # an all-False mask, labels of another size, use before fit: see checks.check_bad_input
    r = checks.check_bad_input(fitted[name], name)
    assert r.passed, r.message


@pytest.mark.parametrize("name", NAMES)
def test_numpy_in_numpy_out_and_3d_volumes(name, fitted):
    # spatial (whole-image maps): (2, C, 6, 7) images; others: (2, C, 3, 4, 5) volumes == their rows
    r = checks.check_numpy_and_volumes(fitted[name])
    assert r.passed, r.message


@pytest.mark.parametrize("name", NAMES)
def test_probability_inputs(name):
    r = checks.check_probability_inputs(name, num_classes=C)
    assert r.details["after"] < r.details["before"]
    assert r.passed, r.message


@pytest.mark.parametrize("name", NAMES)
def test_outputs_stay_finite_for_extreme_logits(name, fitted):
    # histogram binning / isotonic gave NaN for logit gaps above ~745 (0/0 in the tie margin)
    r = checks.check_finite_outputs(fitted[name])
    assert r.passed, r.message


def test_torchscript_export_runs_without_segcal(fitted, tmp_path):
    x = torch.randn(2, C, 3, 4, generator=torch.Generator().manual_seed(7))
    vol = torch.randn(1, C, 2, 3, 4)
    rows = torch.randn(9, C)
    img = torch.randn(2, C, 6, 7, generator=torch.Generator().manual_seed(8))
    for name in NAMES:
        cal = fitted[name]
        cal.to_torchscript(tmp_path / f"{name}.ts")
        with torch.no_grad():
            if PROPS[name]["spatial"]:  # traced on images of their rank (reflect needs > 4 pixels)
                io = {"x": img, "vol": img[:1], "rows": img[1:], "ex": cal(img), "evol": cal(img[:1]),
                      "erows": cal(img[1:])}
            else:
                io = {"x": x, "vol": vol, "rows": rows, "ex": cal(x), "evol": cal(vol), "erows": cal(rows)}
            torch.save(io, tmp_path / f"{name}.io.pt")
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["segcal"] = None  # any import of segcal now fails
        import torch
        for name in {NAMES!r}:
            m = torch.jit.load(r"{tmp_path}/" + name + ".ts")
            io = torch.load(r"{tmp_path}/" + name + ".io.pt")
            with torch.no_grad():
                for k in ("x", "vol", "rows"):
                    torch.testing.assert_close(m(io[k]), io["e" + k], rtol=1e-4, atol=1e-4)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- check_calibrator
class ToyBiasedTS(sc.Calibrator):
    """A user's own calibrator: ``z / T + b``. Translation invariant, but the per-class bias ``b``
    can change the argmax, so its declaration ``argmax_preserving = True`` is FALSE."""

    name = "toy_biased_ts"
    translation_invariant = True
    argmax_preserving = True  # the false claim check_calibrator must report

    def _build(self, num_classes: int) -> None:
        self.raw_t = nn.Parameter(torch.tensor(raw_temperature(1.0)))
        self.b = nn.Parameter(torch.zeros(num_classes))

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return rows / temperature_of(self.raw_t) + self.b


class ToyHonestTS(ToyBiasedTS):
    """The same map, declared honestly (TI only)."""

    name = "toy_honest_ts"
    argmax_preserving = False


def test_check_calibrator_reports_a_users_false_argmax_claim():
    results = sc.check_calibrator(ToyBiasedTS, on_fail=None)
    by = {r.name: r for r in results}
    assert [r.name for r in results] == list(checks.CHECKS)
    assert not by["argmax_preservation"].passed and by["argmax_preservation"].details["flipped"] > 0
    assert [r.name for r in results if not r.passed] == ["argmax_preservation"]
    assert "not registered" in by["save_load"].message  # checked through the class itself
    with pytest.raises(sc.CalibratorCheckError, match="argmax_preservation: declares AP") as info:
        sc.check_calibrator(ToyBiasedTS())  # an instance works as a template too
    assert [r.name for r in info.value.failures] == ["argmax_preservation"]
    with pytest.warns(UserWarning, match="argmax_preservation"):
        sc.check_calibrator(ToyBiasedTS, checks=["argmax_preservation"], on_fail="warn")


def test_check_calibrator_passes_honest_calibrators():
    results = sc.check_calibrator(ToyHonestTS)  # raises on any failure
    by = {r.name: r for r in results}
    assert by["argmax_preservation"].skipped and by["order_preservation"].skipped
    # declaring less than holds is allowed, unless the declarations must be exact
    assert all(r.passed for r in sc.check_calibrator(_ModestTS, checks=["undeclared_properties"]))
    with pytest.raises(sc.CalibratorCheckError, match="undeclared_properties: does not declare AP"):
        sc.check_calibrator(_ModestTS, exact=True, checks=["undeclared_properties"])
    assert all(r.passed for r in sc.check_calibrator("ts", exact=True))


class _ModestTS(sc.TemperatureScaling):
    """TS declaring less than holds (no AP / OP)."""

    name = "toy_modest_ts"
    argmax_preserving = False
    order_preserving = False
