"""``segcal conformal fit|eval|apply`` on a small prediction folder: the command line gives the
library's numbers, writes the guarantee, and refuses bad input with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conformal_synthetic import IGNORE, pool

from segcal.cli import main
from segcal.conformal import ConformalResult, apply_sets, default_grid, fit_threshold, loss_table


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(4)
    imgs = pool(rng, 60)
    for name, part in (("cal", imgs[:40]), ("test", imgs[40:])):
        (tmp_path / name / "pred").mkdir(parents=True)
        (tmp_path / name / "labels").mkdir()
        for i, (p, y) in enumerate(part):
            np.save(tmp_path / name / "pred" / f"im{i:03d}.npy", p)
            np.save(tmp_path / name / "labels" / f"im{i:03d}.npy", y)
    return tmp_path, imgs


def test_fit_eval_apply(folders, capsys):
    root, imgs = folders
    cr = root / "cr.json"
    args = ["--pred", str(root / "cal" / "pred"), "--labels", str(root / "cal" / "labels"), "--probabilities"]
    assert main(["conformal", "fit", *args, "--alpha", "0.1", "--ignore-index", str(IGNORE),
                 "--grid-size", "101", "--out", str(cr)]) == 0
    res = ConformalResult.load(cr)
    expect = fit_threshold(loss_table(imgs[:40], grid=default_grid(101), ignore_index=IGNORE), 0.1)
    assert res.lam == expect.lam and res.method == "crc" and res.n_images == 40
    assert "never treated as exchangeable" in json.loads(cr.read_text())["guarantee"]
    out_json = root / "eval.json"
    assert main(["conformal", "eval", "--pred", str(root / "test" / "pred"), "--labels",
                 str(root / "test" / "labels"), "--probabilities", "--result", str(cr), "--json", str(out_json)]) == 0
    got = json.loads(out_json.read_text())
    ref = loss_table(imgs[40:], grid=[res.lam], ignore_index=IGNORE)
    assert got["realised_risk"] == pytest.approx(ref.losses.mean(), abs=1e-15) and got["n_images"] == 20
    out = root / "sets"
    assert main(["conformal", "apply", "--pred", str(root / "test" / "pred"), "--probabilities",
                 "--result", str(cr), "--out", str(out)]) == 0
    with np.load(out / "im000.npz") as z:
        np.testing.assert_array_equal(z["packed"], apply_sets(res, imgs[40][0]).packed)
        assert z["sizes"].shape == imgs[40][0].shape[1:]
    assert (out / "conformal.json").exists()
    assert main(["conformal", "fit", *args, "--alpha", "0.1", "--delta", "0.2", "--risk", "fnr", "--class", "1",
                 "--ignore-index", str(IGNORE), "--out", str(root / "ltt.json")]) == 0
    assert ConformalResult.load(root / "ltt.json").method == "ltt"


def test_refused_inputs_exit_2(folders, capsys):
    root, _ = folders
    args = ["--pred", str(root / "cal" / "pred"), "--labels", str(root / "cal" / "labels"), "--probabilities"]
    assert main(["conformal", "fit", *args, "--alpha", "0.1", "--risk", "fnr", "--out", str(root / "x.json")]) == 2
    assert "--class" in capsys.readouterr().err
    assert main(["conformal", "fit", *args, "--alpha", "0.1", "--out", str(root / "x.json")]) == 2
    assert "--ignore-index 255" in capsys.readouterr().err  # void labels without --ignore-index
    assert main(["conformal", "fit", *args, "--alpha", "0.01", "--ignore-index", str(IGNORE),
                 "--out", str(root / "x.json")]) == 2
    assert "at least 99 images" in capsys.readouterr().err


class _Terminal:
    """A stderr that says it is a terminal (tqdm draws bars only on one) and keeps what it got."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal_and_quiet(folders, monkeypatch, quiet):
    """fit/apply show a bar over the files on a terminal's stderr; -q silences it (and off a
    terminal there is none, so an error stays one line: the fuzz tests check that)."""
    root, _ = folders
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    cr = root / "cr.json"
    q = ["-q"] if quiet else []
    assert main(["conformal", "fit", "--pred", str(root / "cal" / "pred"), "--labels", str(root / "cal" / "labels"),
                 "--probabilities", "--alpha", "0.1", "--ignore-index", str(IGNORE), "--out", str(cr), *q]) == 0, term.text
    assert main(["conformal", "apply", "--pred", str(root / "test" / "pred"), "--probabilities", "--result",
                 str(cr), "--out", str(root / "sets"), *q]) == 0
    assert ("conformal:" in term.text and "conformal apply:" in term.text) is not quiet
