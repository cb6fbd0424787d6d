"""Estimator checks run on EVERY registered calibrator (scikit-learn "check_estimator" idea).

Parametrised over ``segcal.calibrators.available()``, so a calibrator added later is checked
automatically: declared properties (translation invariance, argmax / order preservation) hold on
random inputs -- and undeclared TI fails (VS, MS) --, fit reduces NLL on a miscalibrated problem,
save/load round-trips, TorchScript export runs without segcal, bad input gets a clear error,
numpy in -> numpy out, 3D volumes work.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segcal
import segcal.calibrators as sc

torch.set_num_threads(1)  # the CI box is small and shared: 2 spinning threads are ~30x slower

NAMES = [a["name"] for a in sc.available()]
PROPS = {a["name"]: a for a in sc.available()}
C = 4


def make_problem(n: int = 3000, c: int = C, scale: float = 3.0, seed: int = 0):
    """Logits ``scale · z`` from a calibrated source ``y ~ Cat(softmax(z))``."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, c, generator=g)
    u = torch.rand(n, c, generator=g).clamp_min(1e-20)
    y = (z - torch.log(-torch.log(u))).argmax(1)
    return scale * z, y


def _fitted(name: str):
    x, y = make_problem()
    kw = {"max_steps": 150, "lr": 0.01} if PROPS[name]["spatial"] else {}  # Adam on whole images
    return sc.create(name, max_iter=30, **kw).fit(x, y)


@pytest.fixture(scope="module")
def fitted():
    return {name: _fitted(name) for name in NAMES}


def _perturbed(cal, seed: int = 1):
    """A copy with generic (random) parameters: structural guarantees must hold for any values."""
    import copy

    cal = copy.deepcopy(cal)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cal.parameters():
            # convolution kernels (LTS/IBTS): noise of the order of a trained kernel (0.5/sqrt(taps));
            # 0.5 per tap on 25·C taps drives T to its 1e-8 floor, where float rounding of the
            # input is amplified 1e8-fold
            scale = 0.5 / float(np.sqrt(p[0].numel())) if p.ndim >= 4 else 0.5
            p.add_(scale * torch.randn(p.shape, generator=g))
    return cal


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
    cal = _perturbed(fitted[name])
    g = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(500, C, generator=g)
    shift = 20 * torch.rand(500, 1, generator=g) - 10  # a different constant per pixel
    with torch.no_grad():
        a = F.log_softmax(cal(x), 1)
        b = F.log_softmax(cal(x + shift), 1)
    diff = float((a - b).abs().max())
    if PROPS[name]["translation_invariant"]:
        assert diff < 2e-3, f"{name} declares TI but shifting changed the output by {diff}"
    else:
        assert diff > 0.1, f"{name} does not declare TI but looks TI (max diff {diff})"


def test_vs_and_ms_are_not_translation_invariant_and_the_rest_are():
    not_ti = {n for n in NAMES if not PROPS[n]["translation_invariant"]}
    assert {"vs", "ms"} <= not_ti
    assert {"msc", "dc", "cdc", "cmsap", "cmsop", "ts", "ets", "vs_ti", "ms_ti"}.isdisjoint(not_ti)


def _random_pixels(n: int = 10**6, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, C, generator=g)


@pytest.mark.parametrize("name", [n for n in NAMES if PROPS[n]["argmax_preserving"]])
def test_argmax_preserved_on_a_million_pixels(name, fitted):
    cal = _perturbed(fitted[name])
    x = _random_pixels()
    with torch.no_grad():
        out = cal(x)
    top = x.argmax(1)
    # the input's top class is a maximum of the output everywhere ...
    assert bool((out.gather(1, top[:, None]).squeeze(1) >= out.max(1).values).all())
    # ... and THE argmax wherever the input's top two are resolved
    s = x.topk(2, 1).values
    resolved = (s[:, 0] - s[:, 1]) > 1e-3
    assert bool((out.argmax(1) == top)[resolved].all())


@pytest.mark.parametrize("name", [n for n in NAMES if PROPS[n]["order_preserving"]])
def test_full_order_preserved_on_a_million_pixels(name, fitted):
    cal = _perturbed(fitted[name])
    x = _random_pixels()
    with torch.no_grad():
        out = cal(x)
    s, perm = torch.sort(x, 1, descending=True)
    o = out.gather(1, perm)
    step = o[:, 1:] - o[:, :-1]  # must be <= 0 along the input's order
    assert bool((step <= 0).all()), f"{name}: the order of some pixel was reversed"
    resolved = (s[:, :-1] - s[:, 1:]) > 1e-3
    if name != "ets":  # ETS: weak order (mixture probabilities may round to ties)
        assert bool((step[resolved] < 0).all())
    else:
        assert float((step[resolved] < 0).float().mean()) > 0.99


@pytest.mark.parametrize("name", [n for n in NAMES if not PROPS[n]["order_preserving"]])
def test_undeclared_preservation_is_really_absent(name, fitted):
    cal = _perturbed(fitted[name])
    x = 3 * torch.randn(20000, C, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = cal(x)
    if PROPS[name]["argmax_preserving"]:  # AP but not OP: some order changes
        assert bool((out.argsort(1) != x.argsort(1)).any())
    else:
        assert bool((out.argmax(1) != x.argmax(1)).any())


@pytest.mark.parametrize("name", NAMES)
def test_fit_reduces_nll_on_a_miscalibrated_problem(name, fitted):
    x, y = make_problem(seed=5)  # held-out draw
    before = F.cross_entropy(x, y).item()
    with torch.no_grad():
        after = F.cross_entropy(fitted[name](x), y).item()
    assert after < before - 0.1, (name, before, after)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, fitted, tmp_path):
    cal = fitted[name]
    cal.save(tmp_path / "cal.pt")
    back = segcal.load(tmp_path / "cal.pt")
    assert type(back) is type(cal) and back.get_config() == cal.get_config()
    x = torch.randn(50, C)
    with torch.no_grad():
        torch.testing.assert_close(back(x), cal(x))
    payload = torch.load(tmp_path / "cal.pt", weights_only=True)
    assert payload["format"] == "segcal-calibrator" and payload["version"] == 1
    assert payload["properties"]["translation_invariant"] == PROPS[name]["translation_invariant"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_gets_a_clear_error(name, fitted):
    cal = fitted[name]
    x, y = make_problem(200)
    with pytest.raises(ValueError, match=r"logits: expected shape"):
        cal(torch.randn(5))
    with pytest.raises(ValueError, match=rf"expected {C} classes"):
        cal(torch.randn(3, C + 1, 2, 2))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        cal(bad)
    with pytest.raises(ValueError, match="non-finite"):
        sc.create(name).fit(bad, y)
    yy = y.clone()
    yy[0] = C
    with pytest.raises(ValueError, match=r"labels \[4\] are outside \[0, 4\)"):
        sc.create(name).fit(x, yy)
    sc.create(name, max_iter=2).fit(x, torch.where(torch.arange(200) == 0, 255, y), ignore_index=255)
    with pytest.raises(ValueError, match="empty input"):
        sc.create(name).fit(x[:0], y[:0])
    with pytest.raises(ValueError, match="no valid pixels"):
        sc.create(name).fit(x, y, mask=torch.zeros(200, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        sc.create(name).fit(x, y[:10])
    with pytest.raises(sc.NotFittedError):
        sc.create(name)(x)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_in_numpy_out_and_3d_volumes(name, fitted):
    cal = fitted[name]
    g = torch.Generator().manual_seed(6)
    if PROPS[name]["spatial"]:  # whole-image maps: no per-row identity; 3D in their own tests
        img = torch.randn(2, C, 6, 7, generator=g)
        p = cal.predict_proba(img.numpy())
        assert isinstance(p, np.ndarray) and p.shape == (2, C, 6, 7) and p.dtype == np.float32
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(cal(img.to(torch.float16)), cal(img.half().float()))
        return
    vol = torch.randn(2, C, 3, 4, 5, generator=g)
    p = cal.predict_proba(vol.numpy())
    assert isinstance(p, np.ndarray) and p.shape == (2, C, 3, 4, 5) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    rows = vol.movedim(1, -1).reshape(-1, C)
    with torch.no_grad():
        ref = cal(rows).reshape(2, 3, 4, 5, C).movedim(-1, 1)
        torch.testing.assert_close(cal(vol), ref)
        torch.testing.assert_close(cal(vol.to(torch.float16)), cal(vol.half().float()))
    assert isinstance(cal(vol.numpy()), np.ndarray)


@pytest.mark.parametrize("name", NAMES)
def test_probability_inputs(name):
    x, y = make_problem(1500)
    p = F.softmax(x, 1)
    cal = sc.create(name, input_type="probs", max_iter=20).fit(p, y)
    with torch.no_grad():
        q = cal.predict_proba(p)
    assert torch.isfinite(q).all()
    assert F.nll_loss(torch.log(q), y) < F.nll_loss(torch.log(p), y)
    with pytest.raises(ValueError, match="probabilities"):
        cal(x)


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
