"""``segcal eval --conformal-*``: the conformal loss table built inside eval's one pass.

The threshold file equals the one ``segcal conformal fit`` writes on the same folder, byte for
byte, for every risk and both methods; the table equals :func:`segcal.conformal.folder_loss_table`'s
through either engine kernel, with or without numba, for one image per batch and for packed
batches of small images; every bad ``--conformal-*`` value exits 2 naming the flag, with nothing
written.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from segcal.cli import main
from segcal.conformal import (
    ConformalResult,
    LossTableBuilder,
    default_grid,
    folder_loss_table,
    loss_table,
)
from segcal.errors import InputError
from segcal.metrics import CalibrationMetrics
from segcal.pipeline.evaluate import evaluate_folder

C, VOID = 5, 7


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, Path]:
    """24 float16 logit files (two sizes, one above a 16384-pixel chunk) and PNG labels with void 7."""
    rng = np.random.default_rng(18)
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    for i in range(24):
        h, w = (150, 120) if i % 6 == 0 else (20, 30)
        y = rng.integers(0, C, size=(h, w))
        z = rng.normal(size=(C, h, w)) * 2.0
        z[y, np.arange(h)[:, None], np.arange(w)[None, :]] += rng.uniform(0, 6)  # a model right most of the time
        y[rng.random((h, w)) < 0.1] = VOID
        np.save(pred / f"im{i:02d}.npy", z.astype(np.float16))
        Image.fromarray(y.astype(np.uint8)).save(lab / f"im{i:02d}.png")
    return pred, lab


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


RISKS = [
    (["--conformal-risk", "miscoverage", "--conformal-alpha", "0.1"], ["--risk", "miscoverage", "--alpha", "0.1"]),
    (["--conformal-risk", "fnr", "--conformal-class", "2", "--conformal-alpha", "0.2", "--conformal-delta", "0.2"],
     ["--risk", "fnr", "--class", "2", "--alpha", "0.2", "--delta", "0.2"]),
    (["--conformal-risk", "coverage", "--conformal-tau", "0.8", "--conformal-alpha", "0.3",
      "--conformal-grid-size", "51"], ["--risk", "coverage", "--tau", "0.8", "--alpha", "0.3", "--grid-size", "51"]),
]


@pytest.mark.parametrize(("eval_flags", "fit_flags"), RISKS, ids=["miscoverage-crc", "fnr-ltt", "coverage-crc"])
def test_eval_writes_the_file_conformal_fit_writes(folder, tmp_path, eval_flags, fit_flags) -> None:
    pred, lab = folder
    common = ["--pred", str(pred), "--labels", str(lab), "--ignore-index", str(VOID), "--no-progress"]
    rc, out, err = run(["eval", *common, *eval_flags, "--conformal-out", str(tmp_path / "a.json")])
    assert rc == 0, err
    assert "conformal: lambda = " in out
    rc, _, err = run(["conformal", "fit", *common, *fit_flags, "--out", str(tmp_path / "b.json")])
    assert rc == 0, err
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_pass_table_equals_folder_loss_table(folder, backend, monkeypatch) -> None:
    pred, lab = folder
    if backend == "torch":  # the engine's torch kernel (as without numba, or on a GPU)
        monkeypatch.setattr("segcal.metrics.engine.HAVE_NUMBA", False)
    for risk, kw in [("miscoverage", {}), ("fnr", {"class_index": 1}), ("coverage", {"tau": 0.9})]:
        builder = LossTableBuilder(risk, ignore_index=VOID, **kw)
        ev = evaluate_folder(pred, lab, ignore_index=VOID, conformal=builder)
        alone = folder_loss_table(pred, lab, risk, ignore_index=VOID, **kw)
        assert ev.conformal is not None and ev.conformal.stems == alone.stems == ev.stems
        assert np.array_equal(ev.conformal.losses, alone.losses) and np.array_equal(ev.conformal.sizes, alone.sizes)
        assert np.array_equal(ev.conformal.n_valid, alone.n_valid)
        assert ev.conformal.n_valid.sum() == ev.metrics.compute()["n_pixels"]


def test_without_numba_and_packed_batches(folder, monkeypatch) -> None:
    """The numpy counts (no numba) give the same table; a batch of several small images (packed into
    one chunk by the engine) gives one row per image, equal to loss_table's."""
    pred, lab = folder
    expect = folder_loss_table(pred, lab, "miscoverage", ignore_index=VOID)
    with monkeypatch.context() as m:
        m.setattr("segcal.conformal.counting.count_kernel", lambda: None)
        ev = evaluate_folder(pred, lab, ignore_index=VOID, conformal=LossTableBuilder(ignore_index=VOID))
    assert np.array_equal(ev.conformal.losses, expect.losses) and np.array_equal(ev.conformal.sizes, expect.sizes)
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(6, C, 12, 9)) * 3).astype(np.float32)
    y = rng.integers(0, C + 1, size=(6, 12, 9))
    y[y == C] = VOID
    for backend in ("auto", "torch"):
        builder = LossTableBuilder(grid=default_grid(31), ignore_index=VOID)
        metric = CalibrationMetrics(C, ignore_index=VOID, backend=backend)
        builder.begin(6)
        metric.update(torch.from_numpy(x), torch.from_numpy(y), on_chunk=builder.chunk)
        builder.end([f"s{i}" for i in range(6)])
        ref = loss_table([(f"s{i}", x[i], y[i]) for i in range(6)], grid=default_grid(31), ignore_index=VOID,
                         input_type="logits")
        assert np.array_equal(builder.table().losses, ref.losses)
        assert np.array_equal(builder.table().sizes, ref.sizes)


def test_builder_refusals(folder) -> None:
    pred, lab = folder
    with pytest.raises(InputError, match="ignore_index"):
        evaluate_folder(pred, lab, ignore_index=None, conformal=LossTableBuilder(ignore_index=VOID))
    with pytest.raises(InputError, match="class_index: class 9 is outside"):
        evaluate_folder(pred, lab, ignore_index=VOID, conformal=LossTableBuilder("fnr", class_index=9,
                                                                                 ignore_index=VOID))


BAD = [
    (["--conformal-alpha", "0.1"], "--conformal-alpha: given without --conformal-out"),
    (["--conformal-risk", "fnr"], "--conformal-risk: given without --conformal-out"),
    (["--conformal-out", "{out}"], "--conformal-alpha: --conformal-out needs the target risk"),
    (["--conformal-alpha", "1.5", "--conformal-out", "{out}"], "--conformal-alpha: expected a level in (0, 1)"),
    (["--conformal-alpha", "nan", "--conformal-out", "{out}"], "--conformal-alpha: expected a level in (0, 1)"),
    (["--conformal-alpha", "0.1", "--conformal-delta", "0", "--conformal-out", "{out}"],
     "--conformal-delta: expected a level in (0, 1)"),
    (["--conformal-risk", "fnr", "--conformal-alpha", "0.1", "--conformal-out", "{out}"],
     "--conformal-class: --conformal-risk fnr needs the class"),
    (["--conformal-risk", "fnr", "--conformal-class", "-1", "--conformal-alpha", "0.1", "--conformal-out", "{out}"],
     "--conformal-class: expected a class index >= 0"),
    (["--conformal-risk", "fnr", "--conformal-class", "5", "--conformal-alpha", "0.1", "--conformal-out", "{out}"],
     "--conformal-class: class 5 is outside [0, 5)"),
    (["--conformal-risk", "coverage", "--conformal-alpha", "0.1", "--conformal-out", "{out}"],
     "--conformal-tau: --conformal-risk coverage needs a coverage level"),
    (["--conformal-risk", "coverage", "--conformal-tau", "1.5", "--conformal-alpha", "0.1", "--conformal-out",
      "{out}"], "--conformal-tau: --conformal-risk coverage needs a coverage level in (0, 1], found 1.5"),
    (["--conformal-grid-size", "1", "--conformal-alpha", "0.1", "--conformal-out", "{out}"],
     "--conformal-grid-size: expected at least 2, found 1"),
    (["--conformal-alpha", "0.01", "--conformal-out", "{out}"], "--conformal-alpha 0.01: "),  # 24 images: infeasible
    (["--conformal-alpha", "0.1", "--conformal-out", "{pred}"], "--conformal-out"),  # an input folder
]


@pytest.mark.parametrize(("flags", "message"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_conformal_flags_exit_2_and_write_nothing(folder, tmp_path, flags, message) -> None:
    pred, lab = folder
    out = tmp_path / "out" / "cr.json"
    others = [tmp_path / "out" / "m.json", tmp_path / "out" / "r.html"]
    argv = ["eval", "--pred", str(pred), "--labels", str(lab), "--ignore-index", str(VOID), "--no-progress",
            "--json", str(others[0]), "--html", str(others[1]),
            *(f.format(out=out, pred=pred) for f in flags)]
    rc, _, err = run(argv)
    assert rc == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not any(p.exists() for p in others)
    assert sorted(p.name for p in pred.iterdir()) == [f"im{i:02d}.npy" for i in range(24)]


def test_bad_risk_choice_exits_2(folder, tmp_path, capsys) -> None:
    pred, lab = folder
    with pytest.raises(SystemExit) as exc:  # argparse's own refusal of a choice
        main(["eval", "--pred", str(pred), "--labels", str(lab), "--conformal-risk", "dice",
              "--conformal-alpha", "0.1", "--conformal-out", str(tmp_path / "cr.json")])
    assert exc.value.code == 2 and "--conformal-risk" in capsys.readouterr().err
    assert not (tmp_path / "cr.json").exists()


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(risk=st.sampled_from([None, "miscoverage", "fnr", "coverage"]),
       alpha=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
       delta=st.one_of(st.none(), st.floats(-0.5, 1.5)),
       klass=st.one_of(st.none(), st.integers(-3, 8)),
       tau=st.one_of(st.none(), st.floats(-0.5, 1.5)),
       grid=st.one_of(st.none(), st.integers(-1, 30)),
       out=st.booleans())
def test_random_conformal_flags_exit_0_or_2(small_folder, risk, alpha, delta, klass, tau, grid, out) -> None:
    """Any combination of --conformal-* values: exit 0 with a loadable threshold file, or exit 2 with
    one line on stderr and nothing written; never a traceback."""
    pred, lab, tmp = small_folder
    target, report = tmp / "o" / "cr.json", tmp / "o" / "m.json"
    for p in (target, report):
        p.unlink(missing_ok=True)
    argv = ["eval", "--pred", str(pred), "--labels", str(lab), "--no-progress", "--json", str(report)]
    for flag, v in (("--conformal-risk", risk), ("--conformal-alpha", alpha), ("--conformal-delta", delta),
                    ("--conformal-class", klass), ("--conformal-tau", tau), ("--conformal-grid-size", grid)):
        if v is not None:
            argv.append(f"{flag}={v}")  # '=': argparse reads '-1e-34' after a flag as an option
    if out:
        argv += ["--conformal-out", str(target)]
    rc, _, err = run(argv)
    assert rc in (0, 2), err
    if rc == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not target.exists() and not report.exists()
    else:
        assert report.exists()
        if out:
            assert ConformalResult.load(target).n_images == 12


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(3)
    pred, lab = tmp / "pred", tmp / "labels"
    pred.mkdir()
    lab.mkdir()
    for i in range(12):
        np.save(pred / f"im{i:02d}.npy", (rng.normal(size=(3, 6, 7)) * 3).astype(np.float16))
        Image.fromarray(rng.integers(0, 3, size=(6, 7)).astype(np.uint8)).save(lab / f"im{i:02d}.png")
    return pred, lab, tmp
