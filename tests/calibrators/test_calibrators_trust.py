"""Trust in calibrator files and fits (issue 16): what a bad file, a diverged fit, a missing
optional dependency or a long fit gives the user. Each test failed on commit a8985da."""

from __future__ import annotations

import pickle
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

import segcal
import segcal.calibrators as sc
from segcal.calibrators.data import Batch, FitData, FolderBatches
from segcal.errors import InputError, MissingDependencyError
from segcal.io import PredictionFolder

torch.set_num_threads(1)


def problem(n: int = 3000, c: int = 4, scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, c, generator=g)
    y = (z - torch.log(-torch.log(torch.rand(n, c, generator=g).clamp_min(1e-20)))).argmax(1)
    return scale * z, y


def image_problem(n: int = 3, c: int = 3, h: int = 10, w: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, c, h, w, generator=g)
    y = (z - torch.log(-torch.log(torch.rand(n, c, h, w, generator=g).clamp_min(1e-20)))).argmax(1)
    return 3 * z, y


@pytest.fixture(scope="module")
def ts_file(tmp_path_factory):
    x, y = problem()
    path = tmp_path_factory.mktemp("cal") / "ts.pt"
    sc.create("ts").fit(x, y).save(path)
    return path


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name,param", [("ts", "raw_t"), ("dc", "W"), ("cmsop", "raw_mu")])
def test_non_finite_parameters_are_refused_at_load(tmp_path, name, param, value):
    x, y = problem()
    good = tmp_path / "good.pt"
    sc.create(name, max_iter=5).fit(x, y).save(good)
    payload = torch.load(good, weights_only=True)
    payload["state_dict"][param].view(-1)[0] = value
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(InputError, match=param) as info:
        segcal.load(bad)
    assert str(bad) in str(info.value) and "NaN or infinite" in str(info.value)
    assert isinstance(segcal.load(good), sc.resolve(name))  # the intact file still loads


def _bad_files(tmp_path, ts_file):
    raw = ts_file.read_bytes()
    files = {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "text": b"this is not a calibrator\n",
        # a pickle of an object weights_only=True refuses (torch would advise weights_only=False)
        "pickle": pickle.dumps(Counter(a=1), protocol=2),
        "pickle4": pickle.dumps(Counter(a=1), protocol=4),  # torch warns about the protocol
    }
    out = {}
    for k, data in files.items():
        p = tmp_path / f"{k}.pt"
        p.write_bytes(data)
        out[k] = p
    base = torch.load(ts_file, weights_only=True)
    for k, drop in (("no_state", "state_dict"), ("no_config", "config"), ("no_name", "name")):
        p = tmp_path / f"{k}.pt"
        torch.save({key: v for key, v in base.items() if key != drop}, p)
        out[k] = p
    p = tmp_path / "empty_state.pt"  # a state that does not fit the calibrator
    torch.save({**base, "state_dict": {}}, p)
    out["empty_state"] = p
    p = tmp_path / "bad_config.pt"
    torch.save({**base, "config": {**base["config"], "no_such_argument": 1}}, p)
    out["bad_config"] = p
    return out


@pytest.mark.parametrize("loader", ["segcal.load", "Calibrator.load", "TemperatureScaling.load"])
def test_bad_calibrator_files_get_an_input_error_naming_the_file(tmp_path, ts_file, loader):
    load = {"segcal.load": segcal.load, "Calibrator.load": sc.Calibrator.load,
            "TemperatureScaling.load": sc.TemperatureScaling.load}[loader]
    for kind, path in _bad_files(tmp_path, ts_file).items():
        with pytest.raises(InputError) as info, warnings.catch_warnings():
            warnings.simplefilter("error")  # one clear error, no torch warning beside it
            load(path)
        msg = str(info.value)
        assert str(path) in msg, (kind, msg)
        assert "weights_only" not in msg, (kind, msg)  # never repeat torch's unsafe advice
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")


def test_subclass_load_refuses_a_file_of_another_calibrator(tmp_path, ts_file):
    assert isinstance(sc.TemperatureScaling.load(ts_file), sc.TemperatureScaling)
    with pytest.raises(InputError, match="holds a 'ts' calibrator"):
        sc.DirichletCalibration.load(ts_file)


def test_a_loaded_calibrator_is_in_eval_mode_without_gradients(tmp_path):
    x, y = problem()
    for name in ("ts", "selective"):
        cal = sc.create(name, max_iter=5, selector_epochs=1) if name == "selective" else sc.create(name)
        cal.fit(x, y).save(tmp_path / f"{name}.pt")
        back = segcal.load(tmp_path / f"{name}.pt")
        assert not back.training and not any(m.training for m in back.modules())
        out = back(x[:10])
        assert not out.requires_grad
        torch.testing.assert_close(out, cal(x[:10]).detach())
        back.fit(x, y)  # refitting a loaded calibrator still works (fit turns gradients on)


# ----------------------------------------------------------------------------- fits
class _DivergingTS(sc.TemperatureScaling):
    """A TS whose post-fit step leaves a NaN temperature (as a diverged hook would)."""

    name = "diverging_ts_test"

    def _post_fit(self, train, val):
        with torch.no_grad():
            self.raw_t.fill_(float("nan"))
        return None


def test_non_finite_parameters_after_fit_are_refused_naming_the_method():
    x, y = problem()
    cal = _DivergingTS()
    with pytest.raises(InputError, match=r"fit: the diverging_ts_test calibrator's parameter\(s\) \['raw_t'\]"):
        cal.fit(x, y)
    assert not cal.is_fitted
    good = sc.create("ts").fit(x, y)
    before = good.temperature
    good.__class__ = _DivergingTS  # a failed refit keeps the previous state
    with pytest.raises(InputError):
        good.fit(x, y)
    assert good.is_fitted and good.temperature == pytest.approx(before)


def test_isotonic_without_scikit_learn_names_the_extra(monkeypatch, tmp_path):
    x, y = problem()
    fitted = sc.create("isotonic").fit(x, y)
    fitted.save(tmp_path / "iso.pt")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.isotonic", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'segcal\[isotonic\]'") as info:
        sc.create("isotonic").fit(x, y)
    assert "sklearn" in str(info.value) and isinstance(info.value, ImportError)
    back = segcal.load(tmp_path / "iso.pt")  # applying a fitted table needs no scikit-learn
    torch.testing.assert_close(back(x[:50]), fitted(x[:50]))


@pytest.mark.parametrize("name,kw,spatial", [
    ("cmsop", {"max_iter": 5}, False),
    ("selective", {"selector_epochs": 2}, False),
    ("lts", {"max_steps": 4}, True),
])
def test_long_fits_show_progress_over_optimiser_steps_on_stderr(capsys, name, kw, spatial):
    x, y = image_problem() if spatial else problem(2000)
    sc.create(name, **kw).fit(x, y)
    assert capsys.readouterr().err == ""  # off by default in the API
    sc.create(name, **kw).fit(x, y, progress=True)
    err = capsys.readouterr().err
    assert f"fit {name}:" in err and "step" in err, err[-500:]


def test_fit_settings_is_a_copy_of_the_constructor_settings():
    cal = sc.create("lts", max_steps=7, batch_size=2, memory_budget=1e6, subsample=0.5, seed=3)
    s = cal.fit_settings
    assert (s["max_steps"], s["batch_size"], s["memory_budget"], s["subsample"], s["seed"]) == (7, 2, 1e6, 0.5, 3)
    assert s["objective"] == "nll" and {"optimizer", "lr", "max_iter", "chunk_size", "monitor"} <= set(s)
    s["max_steps"] = 1000
    assert cal.fit_settings["max_steps"] == 7


def test_batch_is_the_public_type_of_the_data_hooks():
    x, y = problem(100)
    seen = []

    class Spy(sc.TemperatureScaling):
        name = "spy_ts_test"

        def _post_fit(self, train, val):
            assert isinstance(train, FitData)
            seen.extend(type(b) for b in train.iter_chunks(64))

    Spy(max_iter=2).fit(x, y)
    assert seen and all(t is Batch for t in seen)


# ----------------------------------------------------------------------------- folders
def _folder(root, n=3, c=3):
    pred, lab = root / "pred", root / "labels"
    pred.mkdir()
    lab.mkdir()
    for i in range(n):
        x, y = image_problem(n=1, c=c, seed=i)
        np.save(pred / f"im{i}.npy", x[0].numpy())
        np.save(lab / f"im{i}.npy", y[0].numpy().astype(np.uint8))
    return pred, lab


@pytest.mark.parametrize("case", ["nan", "classes"])
def test_a_bad_file_in_a_fitting_folder_is_named(tmp_path, case):
    pred, lab = _folder(tmp_path)
    x = np.load(pred / "im1.npy")
    if case == "nan":
        x[0, 2, 3] = np.nan
    else:
        x = np.concatenate([x, x[:1]], 0)  # 4 classes where the others have 3
    np.save(pred / "im1.npy", x)
    with pytest.raises(InputError) as info:
        sc.create("ts").fit(FolderBatches(PredictionFolder(pred, lab)))
    msg = str(info.value)
    assert str(pred / "im1.npy") in msg
    assert ("non-finite" in msg) if case == "nan" else ("expected 3 classes on axis 1, got 4" in msg)


def test_batches_with_another_class_count_are_refused():
    a, ya = problem(100, c=3)
    b, yb = problem(100, c=4)
    with pytest.raises(ValueError, match="expected 3 classes on axis 1, got 4"):
        sc.create("ts").fit([(a, ya), (b, yb)])
